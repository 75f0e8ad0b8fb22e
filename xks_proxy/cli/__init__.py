"""`xks-proxy`, the command line: `main` is the console entry point (pyproject `[project.scripts]`).

One module per command group; `app` assembles the parser and runs a command.
"""

from xks_proxy.cli.app import main

__all__ = ["main"]
