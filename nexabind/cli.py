"""The ``nexabind`` command: thin click commands over the library.

Status goes to stderr, data to stdout; ``--json`` where a script would read the output.
"""

from __future__ import annotations

import click

from nexabind import __version__
from nexabind.errors import NexabindError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="nexabind")
def cli() -> None:
    """Prebuilt llama.cpp for Python: fetch, build, inspect and run it."""


# Commands are added below, one section per area (build, fetch and cache, binding).


def main() -> None:
    """Entry point of the ``nexabind`` console script."""
    cli()
