"""Closed-loop parts: the issue's headline cells and how cost grows with the work.

Headline: one worker on core 0, wrk -t1 -c32 on core 1, pre-signed 256-byte Encrypt with 64 bytes
of AAD (and Decrypt, GetKeyMetadata), plain HTTP, default logging and audit, against the minimal
aiohttp app measured the same way.

The machine is shared with other work, whose bursts move a cell by tens of percent. So the
servers of a part run side by side (all pinned to core 0, one loaded at a time), every cell is
measured right after its baseline cell, in several rounds, and each ratio is the median of the
rounds' ratios (with their min and max: the noise). Beside it, the CPU ratio: the baseline's server
CPU time per request over the proxy's, which does not depend on how much of the core the server
got, so it is what the throughput ratio would be on a quiet machine with the server CPU-bound.
"""

from __future__ import annotations

import statistics
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

from bench import presign
from bench.context import LOADGEN_CORE, Context, Server, fetch_ciphertexts
from bench.homes import KEY, PREFIX, Credential, Home

OPS = ("encrypt", "decrypt", "metadata")
#: The baseline ignores bodies; any well-formed ciphertext will do.
FAKE_CIPHERTEXT = {"ciphertext": "AAAA", "initializationVector": "AAAAAAAAAAAAAAAA",
                   "authenticationTag": "AAAAAAAAAAAAAAAAAAAAAA==", "ciphertextMetadata": "AQAAAAE="}  # fmt: skip


@dataclass
class Cell:
    """A measurement: a server, how to sign its requests (anew each round: valid 5 minutes),
    and the cell it is compared with (None: it is a baseline)."""

    server: Server
    requests: Callable[[], list[str]]
    baseline: str | None = None
    cores: str | None = LOADGEN_CORE


def signed(server: Server, home: Home, op: str, targets: list[tuple[Credential, str]] | None = None,
           size: int = presign.PLAINTEXT_BYTES) -> Callable[[], list[str]]:  # fmt: skip
    """A signer of `op` requests rotating over `targets` (default: the home's first key)."""
    targets = targets or [(home.stores[0], KEY)]
    cts: dict[str, Any] = {}
    if op == "decrypt":
        cts = fetch_ciphertexts(server, targets) if server.supervised else {f"{c.prefix}/{k}": FAKE_CIPHERTEXT for c, k in targets}
    return lambda: presign.rotation(server.port, targets, op, size, cts)


def interleaved(ctx: Context, cells: dict[str, Cell], duration: float, rounds_wanted: int) -> dict[str, Any]:
    """Every cell once per round, in order; each metric's median over the rounds, and each
    compared cell's median ratio of requests/s to its baseline's (same round)."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in cells}
    for _ in range(rounds_wanted):
        for name, cell in cells.items():
            rounds[name].append(ctx.wrk(cell.server, cell.requests(), duration, cores=cell.cores))
    out: dict[str, Any] = {}
    for name, cell in cells.items():
        out[name] = _median(rounds[name])
        out[name]["rounds_rps"] = [r["rps"] for r in rounds[name]]
        if cell.baseline:
            ratios = sorted(r["rps"] / b["rps"] for r, b in zip(rounds[name], rounds[cell.baseline]))
            out[name].update(ratio=round(statistics.median(ratios), 3), ratio_min=round(ratios[0], 3), ratio_max=round(ratios[-1], 3))
            cpu = [b["server_cpu_us_per_request"] / r["server_cpu_us_per_request"] for r, b in zip(rounds[name], rounds[cell.baseline])
                   if r["server_cpu_us_per_request"] and b["server_cpu_us_per_request"]]  # fmt: skip
            out[name]["cpu_ratio"] = round(statistics.median(cpu), 3) if cpu else None
    return out


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's median over the rounds (errors: their sum)."""
    return {k: sum(r[k] for r in runs) if k == "errors" else statistics.median(r[k] for r in runs) for k in runs[0]}


def headline(ctx: Context) -> dict[str, Any]:
    vault = ctx.home("headline")
    homes: dict[str, Home] = {"vault": vault}
    if "pkcs11" in ctx.args.backends:
        homes["pkcs11"] = ctx.home("softhsm", "pkcs11")
    with ExitStack() as stack:
        base = stack.enter_context(ctx.serving(None))
        servers = {name: stack.enter_context(ctx.serving(home)) for name, home in homes.items()}
        cells: dict[str, Cell] = {}
        for op in OPS:
            cells[f"baseline {op}"] = Cell(base, signed(base, vault, op))
            for name, server in servers.items():
                cells[f"{name} {op}"] = Cell(server, signed(server, homes[name], op), baseline=f"baseline {op}")
        return interleaved(ctx, cells, ctx.args.duration, ctx.args.rounds)


def _scaling_home(home: Home) -> None:
    """100 keys in the first store, and 9 more stores with one key each."""
    home.add_keys(PREFIX, [f"k{i:03d}" for i in range(1, 100)])
    for i in range(1, 10):
        cred = home.add_store(f"store{i}")
        home.add_keys(cred.prefix, [KEY])


def _thousand_home(home: Home) -> None:
    home.add_keys(PREFIX, [f"k{i:04d}" for i in range(1, 1000)])


def scaling(ctx: Context) -> dict[str, Any]:
    """Encrypt on one pinned worker under each variation of the headline's request, each right
    after the pinned baseline; then 1 and 2 workers, unpinned, each with the generator's CPU."""
    home = ctx.home("scaling", setup=_scaling_home)
    thousand = ctx.home("thousand", setup=_thousand_home)
    store0 = home.stores[0]
    keys = [KEY] + [k for k in home.keys[PREFIX] if k != KEY]
    with ExitStack() as stack:
        base = stack.enter_context(ctx.serving(None))
        server = stack.enter_context(ctx.serving(home))
        big = stack.enter_context(ctx.serving(thousand))
        variations: dict[str, Cell] = {}
        for size in (16, 256, 1024, 4096):
            variations[f"plaintext {size} B"] = Cell(server, signed(server, home, "encrypt", size=size))
        for n in (10, 100):
            variations[f"{n} keys in use"] = Cell(server, signed(server, home, "encrypt", [(store0, k) for k in keys[:n]]))
        variations["10 stores (one key each)"] = Cell(server, signed(server, home, "encrypt", [(c, KEY) for c in home.stores[:10]]))
        every = [(thousand.stores[0], k) for k in thousand.keys[PREFIX]]
        variations["1,000 keys in the vault, all in use"] = Cell(big, signed(big, thousand, "encrypt", every))
        cells: dict[str, Cell] = {}
        for name, cell in variations.items():
            cells[f"baseline before {name}"] = Cell(base, signed(base, home, "encrypt"))
            cell.baseline = f"baseline before {name}"
            cells[name] = cell
        out = interleaved(ctx, cells, ctx.args.scaling_duration, ctx.args.scaling_rounds)
    out.update(workers(ctx, home))
    return out


def workers(ctx: Context, home: Home) -> dict[str, Any]:
    """1 and 2 workers, nothing pinned: the generator's CPU beside the server's says whose limit it is."""
    out: dict[str, Any] = {}
    for n in (1, 2):
        with ctx.serving(None, n, cores=None) as base, ctx.serving(home, n, cores=None) as server:
            cells = {f"baseline, {n} workers, unpinned": Cell(base, signed(base, home, "encrypt"), cores=None),
                     f"{n} workers, unpinned": Cell(server, signed(server, home, "encrypt"), f"baseline, {n} workers, unpinned", None)}  # fmt: skip
            out.update(interleaved(ctx, cells, ctx.args.scaling_duration, ctx.args.scaling_rounds))
    return out


def floor(ctx: Context) -> dict[str, Any]:
    """Encrypt on the baseline, the proxy and the floor (bench/floor.py: the spec's work only), interleaved."""
    home = ctx.home("headline")
    cred = home.stores[0]
    with ExitStack() as stack:
        base = stack.enter_context(ctx.serving(None))
        proxy = stack.enter_context(ctx.serving(home))
        bare = stack.enter_context(ctx.serving_floor(cred))
        cells = {
            "baseline encrypt": Cell(base, signed(base, home, "encrypt")),
            "vault encrypt": Cell(proxy, signed(proxy, home, "encrypt"), baseline="baseline encrypt"),
            "floor encrypt": Cell(bare, signed(bare, home, "encrypt"), baseline="baseline encrypt"),
        }
        return interleaved(ctx, cells, ctx.args.duration, ctx.args.rounds)
