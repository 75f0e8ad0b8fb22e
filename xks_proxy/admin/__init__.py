"""Key administration over the wire: the REST admin API (`api`), its client (`client`) and the
JSON-level key lifecycle (`lifecycle`) that the CLI and the API share, so that `xks-proxy keys ...`
does the same thing locally and through `--admin-url`.
"""
