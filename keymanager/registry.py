"""The key backends, by the name `[keymanager] backend` gives: the one place that imports them.

A third backend is a new package `keymanager/<name>/` whose `backend.py` defines `BACKEND` (a
`keymanager.base.Backend`), and one line in `_BACKENDS`. Backends load lazily: a proxy on the
vault never imports the PKCS#11 library, nor a PKCS#11 proxy psycopg.
"""

from __future__ import annotations

from typing import Callable

from keymanager.base import Backend, KeyAdminError


def _vault() -> Backend:
    from keymanager.vault.backend import BACKEND

    return BACKEND


def _pkcs11() -> Backend:
    from keymanager.pkcs11.backend import BACKEND

    return BACKEND


_BACKENDS: dict[str, Callable[[], Backend]] = {"vault": _vault, "pkcs11": _pkcs11}

#: The backend names config.toml accepts, the default first.
NAMES: tuple[str, ...] = tuple(_BACKENDS)


def backend(name: str) -> Backend:
    """The backend called `name`; KeyAdminError if there is none (config validation names it first)."""
    try:
        load = _BACKENDS[name]
    except KeyError:
        raise KeyAdminError(f"keymanager.backend {name!r} is not available") from None
    return load()
