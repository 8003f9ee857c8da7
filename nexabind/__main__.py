"""The ``nexabind`` command's entry point (``python -m nexabind`` and the console script)."""

import gc


def main() -> None:
    # A command imports click, its own modules and, for fetch, requests: tens of thousands of
    # objects that live until exit. With the default threshold (700) the collector scans them
    # again and again while they load (~15 ms of a cold fetch) and frees nothing. A command
    # that runs long still collects, every 50,000 net allocations.
    gc.set_threshold(50_000, 10, 10)
    from nexabind.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
