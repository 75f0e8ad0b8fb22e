"""The markdown tables of a run (bench/results/table.md), ready to paste into README."""

from __future__ import annotations

from typing import Any

NAMES = {"encrypt": "Encrypt", "decrypt": "Decrypt", "metadata": "GetKeyMetadata"}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def _row(label: str, r: dict[str, Any]) -> str:
    """One wrk cell, with its ratios to its baseline cell (medians over rounds [min-max]) if it has one."""
    ratio = f"{r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]" if "ratio" in r else "1.00"
    cpu_ratio = f"{r['cpu_ratio']:.2f}" if r.get("cpu_ratio") else ("1.00" if "ratio" not in r else "n/a")
    return (f"| {label} | {r['rps']:.0f} | {ratio} | {r['server_cpu_us_per_request']:.0f} | {cpu_ratio} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['errors']} | {r['rss_mb_worker_peak']:.0f} | {r['server_cpu_percent']:.0f} | "
            f"{r['wrk_cpu_percent']:.0f} |")  # fmt: skip


HEAD = ("| cell | req/s | vs baseline | server CPU µs/req | CPU vs baseline | p50 ms | p99 ms | p99.9 ms | errors | worker RSS MB | "
        "server CPU % | wrk CPU % |\n|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
EXPLAIN = ("req/s vs baseline: median over the rounds of the ratio to the baseline cell measured just before [min-max]. "
           "CPU vs baseline: the baseline's server CPU per request over this cell's (median over rounds): the throughput "
           "ratio a quiet machine would give with the server CPU-bound, since it does not depend on the share of the core the "
           "server got. server CPU %: of one core, all the server's processes; wrk CPU %: the generator's, from its rusage.")


def headline(h: dict[str, Any]) -> list[str]:
    rounds = len(h["baseline encrypt"]["rounds_rps"])
    lines = ["### Headline: one worker on core 0, wrk -t1 -c32 on core 1, 256 B plaintext + 64 B AAD, plain HTTP, default logging and audit", "",
             f"Medians of {rounds} interleaved rounds. {EXPLAIN}", "", HEAD]  # fmt: skip
    for name, r in h.items():
        kind, op = name.split()
        label = "baseline (minimal aiohttp)" if kind == "baseline" else {"pkcs11": "SoftHSMv2"}.get(kind, kind)
        lines.append(_row(f"{label}, {NAMES[op]}", r))
    base = ", ".join(f"{v:.0f}" for v in h["baseline encrypt"]["rounds_rps"])
    lines += ["", f"Noise: the baseline's Encrypt rounds gave {base} req/s."]
    if "pkcs11 encrypt" in h:
        ratio = _ratio(h["pkcs11 encrypt"]["rps"], h["vault encrypt"]["rps"])
        lines.append(f"SoftHSMv2 / vault, Encrypt at one worker (medians): {ratio}.")
    return lines


def openloop(o: dict[str, Any]) -> list[str]:
    lines = ["### Open loop: Encrypt offered at a fixed rate (bench/loadgen.py, 64 connections), one worker on core 0, generator on core 1", "",
             "Medians over the rounds; each round's p99 in the last column.", "",
             "| server | offered/s | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | server CPU % | server CPU µs/req | generator CPU % | p99 per round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in o.items():
        lines.append(f"| {name} | {r['offered_rps']:.0f} | {r['achieved_rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['p999_ms']:.2f} | {r['max_ms']:.2f} | {r['errors']:.0f} | {r['server_cpu_percent']:.0f} | {r['server_cpu_us_per_request']:.0f} | {r['loadgen_cpu_percent']:.0f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['rounds_p99_ms'])} |")  # fmt: skip
    for name, r in o.items():
        if r["achieved_rps"] < 0.98 * r["offered_rps"]:
            need = r["server_cpu_us_per_request"] * r["offered_rps"] / 1e4
            why = ("more than its one core: CPU-bound" if need > 100 else
                   "the rest of the core went to other work" if r["server_cpu_percent"] < 90 else "CPU-bound")  # fmt: skip
            lines.append(f"\n{name} did not keep up: at {r['server_cpu_us_per_request']:.0f} µs of CPU per request, {r['offered_rps']:.0f}/s "
                         f"needs {need:.0f}% of a core; it got {r['server_cpu_percent']:.0f}% ({why}).")  # fmt: skip
    return lines


def scaling(s: dict[str, Any]) -> list[str]:
    lines = ["### How cost grows: vault, Encrypt; one pinned worker (each cell right after the pinned baseline) unless unpinned", "",
             "The 256 B cell is the reference (1 key, 1 store): compare the other cells' ratios with its ratios. " + EXPLAIN, "", HEAD]  # fmt: skip
    for label, r in s.items():
        if not label.startswith("baseline before"):
            lines.append(_row(label, r))
    return lines


def memory(m: dict[str, Any]) -> list[str]:
    return ["### Memory", "",
            f"1,000 idle TLS connections (handshake + one GetHealthStatus each, then kept alive) against one TLS worker: "
            f"{m['connections_opened']} opened ({m['health_answered_200']} answered 200) in {m['seconds_to_open']} s; "
            f"worker RSS {m['rss_mb_before']:.1f} MB before, {m['rss_mb_with_idle']:.1f} MB with them open, "
            f"**+{m['rss_mb_added']:.1f} MB**."]  # fmt: skip


def localkms(k: dict[str, Any]) -> list[str]:
    lines = ["### Local KMS: Encrypt through `xks-proxy local-kms` (HTTP) and the proxy (TLS, one worker), nothing pinned", "",
             "| cell | req/s | p50 ms | p99 ms | p99.9 ms | errors | proxy CPU % | local KMS CPU % | wrk CPU % |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in k.items():
        if isinstance(r, dict):
            lines.append(f"| {label} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['errors']} | "
                         f"{r['server_cpu_percent']:.0f} | {r.get('local_kms_cpu_percent', 0):.0f} | {r['wrk_cpu_percent']:.0f} |")  # fmt: skip
    lines += ["", f"Added latency per call (p50 with one connection, local KMS + proxy minus proxy alone): **{k['added_p50_ms_per_call']:.2f} ms**."]
    return lines


def profile(p: dict[str, Any]) -> list[str]:
    if "percent" not in p:
        return ["### Profile", "", p.get("error", "no profile")]
    under, without = p["encrypt_under_profiler"]["rps"], p["encrypt_without_profiler"]["rps"]
    lines = ["### Profile: one worker under the headline Encrypt load (py-spy, pausing the worker per sample, 250 Hz)", "",
             f"{p['samples']} samples; throughput {without:.0f} req/s without the profiler, {under:.0f} with it.", "",
             "| category | share of the worker's samples |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.1f}% |" for k, v in p["percent"].items()]
    leaves = "; ".join(f"{k} {v:.1f}%" for k, v in p["other_top_leaves_percent"].items()) or "none"
    lines += ["", f"Largest leaves in \"other\": {leaves}. Threads waiting ({p['idle_thread_samples_left_out']} samples) are left out."]
    return lines


def handler(parts: dict[str, Any]) -> list[str]:
    """Our handler's CPU per request in a tight loop, beside the whole worker's in this run's headline cell."""
    lines = ["### Our code alone: XksServer.handle in one process, no HTTP (bench/handler.py, pinned to core 0)", "",
             "CPU per request of routing, body, SigV4, JSON, quota and policy, the vault's AES-GCM, the response object and "
             "the access and audit record, the same request 4,000 times in a row: warm caches, so a lower bound of what the "
             "same code costs inside a serving worker (the profile above is the share there). For comparing two versions "
             "of our code.", "",
             "| operation | our handler µs/req [min-max] | whole worker µs/req (headline) |", "|---|---|---|"]  # fmt: skip
    cells = parts.get("headline", {})
    for op, r in parts["handler"].items():
        worker = cells.get(f"vault {op}", {}).get("server_cpu_us_per_request")
        lines.append(f"| {NAMES[op]} | {r['us_per_request']:.0f} [{r['min']:.0f}-{r['max']:.0f}] | {f'{worker:.0f}' if worker else 'n/a'} |")
    return lines


def floor(f: dict[str, Any]) -> list[str]:
    """The proxy beside a server doing only the spec's work, both against the baseline."""
    rounds = len(f["baseline encrypt"]["rounds_rps"])
    lines = ["### The floor: Encrypt on a server doing only the spec's work (bench/floor.py), one worker on core 0", "",
             "SigV4, JSON, base64, AES-GCM and one audit line on aiohttp's low-level server; none of the proxy's other "
             f"features. Medians of {rounds} interleaved rounds. {EXPLAIN}", "", HEAD]  # fmt: skip
    labels = {"baseline": "baseline (minimal aiohttp)", "vault": "the proxy (vault)", "floor": "the floor"}
    for name, r in f.items():
        lines.append(_row(f"{labels[name.split()[0]]}, Encrypt", r))
    return lines


def catalog(c: dict[str, Any]) -> list[str]:
    """The pkcs11 backend's catalog scan on SoftHSMv2, by keys on the token."""
    if "error" in c:
        return ["### PKCS#11 catalog scan (bench/catalog.py)", "", c["error"]]
    lines = ["### PKCS#11 catalog scan on SoftHSMv2, by keys on the token (bench/catalog.py, median of 5, pinned)", "",
             "| keys | scan ms | of which C_FindObjects ms |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {keys} | {r['scan_ms']} | {r['find_ms']} |" for keys, r in c.items()]
    return lines


def instructions(i: dict[str, Any]) -> list[str]:
    """Callgrind's instruction counts: noise-free, for comparing versions of our code."""
    if "error" in i:
        return ["### Instructions per request (bench/instructions.py)", "", i["error"]]
    lines = ["### Instructions per request under callgrind, whole process, one worker (bench/instructions.py)", "",
             f"{i['warm_requests']} requests to warm, then {i['counted_requests']} counted over {i['connections']} keep-alive "
             "connections. Not a time (SHA-256 runs in software under valgrind): compare versions of our code with it.", "",
             "| operation | baseline k instructions/req | vault k instructions/req | baseline / vault |", "|---|---|---|---|"]  # fmt: skip
    for op in ("encrypt", "decrypt", "metadata"):
        r = i[op]
        lines.append(f"| {NAMES[op]} | {r['baseline'] / 1000:.1f} | {r['vault'] / 1000:.1f} | {r['ratio']:.3f} |")
    return lines


def render(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    out = [f"Measured {results['started']} on {m['cpus']} cores ({m['processor']}), Python {m['python']}; "
           f"{s['duration']} s per headline and profile cell, {s['openloop_duration']} s per open-loop cell, "
           f"{s['scaling_duration']} s per scaling and local KMS cell. "
           "Other work shared the machine: compare ratios within this run, not absolute numbers across runs."]  # fmt: skip
    if "code" in results:
        c = results["code"]
        dirty = ", ".join(c["uncommitted_product_files"])
        out.append(f"Code: {c['commit']}" + (f" plus uncommitted changes to {dirty}." if dirty else "."))
    out.append("")
    for part in ("headline", "openloop", "scaling", "memory", "localkms", "profile", "instructions", "floor", "catalog"):
        if part in results["parts"]:
            out += globals()[part](results["parts"][part]) + [""]
    if "handler" in results["parts"]:
        out += handler(results["parts"]) + [""]
    return "\n".join(out)
