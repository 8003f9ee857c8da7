"""The ``nexabind`` command's entry point (``python -m nexabind`` and the console script)."""

import gc


def main() -> None:
    """Run the ``nexabind`` command, with the collector set for a process that ends with it."""
    # A command imports click, its own modules and, for fetch, requests: tens of thousands of
    # objects that live until exit. With the default threshold (700) the collector scans them
    # again and again while they load (~15 ms of a cold fetch) and frees nothing. A command
    # that runs long still collects, every 50,000 net allocations.
    gc.set_threshold(50_000, 10, 10)
    from nexabind.cli import cli

    try:
        cli()
    finally:
        # The process ends here: move every object to the permanent generation, so the
        # interpreter's final collections skip them (~40 ms after a fetch, which imports requests).
        gc.freeze()


if __name__ == "__main__":
    main()
