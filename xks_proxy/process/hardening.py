"""Keeping the master key out of core files: a process that holds it (or a share) never dumps core.

A core file of a serving proxy would hold the master key, every credential secret and, during
an unseal, the shares given so far, in a file anyone who can read the dump directory may read.
`no_core_dumps()` sets RLIMIT_CORE to 0 (a crash writes no core file) and clears the process's
dumpable flag (no core, no ptrace attach by other processes of the same uid, /proc/<pid>/mem
unreadable to them). Both are inherited by forked workers. Linux only for the flag; elsewhere,
or if the call fails, the limit alone stands: hardening never stops a proxy from starting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys

log = logging.getLogger("xks_proxy")
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def no_core_dumps() -> None:
    """RLIMIT_CORE 0 and not dumpable; call before anything reads a share, passphrase or master key."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        log.warning("cannot set RLIMIT_CORE to 0: %s", exc)
    if sys.platform.startswith("linux") and _prctl(PR_SET_DUMPABLE, 0) != 0:
        log.warning("cannot clear the dumpable flag (prctl PR_SET_DUMPABLE)")


def dumpable() -> int | None:
    """The process's dumpable flag (0: not dumpable), None where it cannot be read."""
    return _prctl(PR_GET_DUMPABLE, 0) if sys.platform.startswith("linux") else None


def _prctl(option: int, arg: int) -> int | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
        return None if libc is None else int(libc.prctl(option, arg, 0, 0, 0))
    except (OSError, AttributeError):
        return None
