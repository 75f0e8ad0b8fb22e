"""`CommandError`: how a command refuses, printed by `app.main` as one line with exit status 1.

Its own module so that every CLI module can raise it without importing `common`, which itself
uses `secrets_input` to open a sealed home (an import the other way round would be a cycle).
`common` re-exports it: `from xks_proxy.cli.common import CommandError` stays the usual import.
"""


class CommandError(Exception):
    """A refused command, printed as one line."""
