#!/usr/bin/env python3
"""Run the per-call benchmarks of `make bench-ffi` and write the report.

    report.py ROOT N ROUNDS DOC  -- INPROC_CMD -- C_CMD -- LUA_CMD [-- LIFE_CMD]

Runs the three hosts (Rust in-process, C ABI, LuaJIT module), and one
request's whole data path through the C ABI next to the same rules
hand-written in LuaJIT (`request_life.lua`), one after the other, ROUNDS
times, so every C and Lua figure has in-process figures from the same run
next to it, measured minutes apart at most on the same load.
Each host prints one line per case: `host name calls=N median_ns=...
p99_ns=... mean_ns=...`. The report gives, per case, the median of the
rounds' medians (and of their p99s), the ratio of the C ABI's prepared
path to `Engine::route` per round and that of the request handle to the
hand-written rules (the median of those ratios). It prints
the table and, unless DOC is `-`, writes it into DOC between
`<!-- BEGIN ffi-bench -->` and `<!-- END ffi-bench -->` (appended at the end
when the markers are missing; other sections are left as they are).
"""

import os
import re
import statistics
import subprocess
import sys

LINE = re.compile(r"^(rust|c|lua)\s+(\S+)\s+calls=(\d+)\s+median_ns=(\d+)\s+p99_ns=(\d+)\s+mean_ns=(\d+)")

# (host, case): what it measures, in report order.
CASES = [
    ("rust", "route(typed)", "`Engine::route`, request (body parsed) and backends built once: **the baseline**"),
    ("rust", "run_parts", "`Engine::run_parts`, request and backends map built once (the core under the prepared path)"),
    ("rust", "run_json(value)", "`Engine::run_json` on the parsed input (request rebuilt, body copied, per call)"),
    ("rust", "parse", "`serde_json` parse of the input text alone"),
    ("rust", "parse+run_json", "parse, then `run_json`"),
    ("c", "run_prepared", "`llmp_engine_run_prepared`, `llmp_request` and `llmp_globals` built once"),
    ("c", "new+prepared", "`llmp_request_new` + `run_prepared` + `llmp_request_free` per call (one hook per request)"),
    ("c", "engine_run", "`llmp_engine_run` on the input text (10 KB body parsed per call)"),
    ("lua", "run_prepared", "`engine:run_prepared(hook, llmproxy.request(..), llmproxy.globals(..))`, both built once"),
    ("lua", "request_handle", "`engine:run` with `input.request` an `llmproxy.request`, backends a Lua table"),
    ("lua", "body_raw", "`engine:run`, body as `request.body_raw` text (parsed per call), rest as tables"),
    ("lua", "json_text", "`engine:run` on the input as one JSON string"),
    ("lua", "table", "`engine:run` on the input as Lua tables (body converted per call)"),
]
# One request's whole data path (`request_life.lua`): its own table.
LIFE_CASES = [
    ("lua", "handwritten(cjson)", "the seed's four rules hand-written in plain LuaJIT + lua-cjson (decode the body, "
     "route, transform, encode; decode the answer, transform, encode; the usage record encoded), JIT on: "
     "**the baseline**"),
    ("lua", "handle(c_abi)", "`llmp_handle_new` (body parsed once) + `route` + `upstream` + `respond` + `usage` + "
     "`free` through LuaJIT's FFI; the seed scripts sandboxed; header changes decoded from JSON"),
]
LIFE_BASELINE = ("lua", "handwritten(cjson)")
LIFE_TARGET = ("lua", "handle(c_abi)")
LIFE_TARGET_MAX = 1.5
BASELINE = ("rust", "route(typed)")
TARGET = ("c", "run_prepared")
TARGET_MAX = 1.3


def run(cmd):
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    sys.stdout.write(out)
    sys.stdout.flush()
    rows = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            rows[(m.group(1), m.group(2))] = (int(m.group(4)), int(m.group(5)))
    return rows


def us(ns):
    return f"{ns / 1000:.2f}"


def main():
    args = sys.argv[1:]
    root, n, rounds, doc = args[0], int(args[1]), int(args[2]), args[3]
    cmds, cur = [], None
    for a in args[4:]:
        if a == "--":
            cur = []
            cmds.append(cur)
        else:
            cur.append(a)
    medians, p99s, ratios, life_ratios = {}, {}, [], []
    for r in range(rounds):
        print(f"-- round {r + 1} of {rounds}", flush=True)
        seen = {}
        for cmd in cmds:
            seen.update(run(cmd))
        for key, (med, p99) in seen.items():
            medians.setdefault(key, []).append(med)
            p99s.setdefault(key, []).append(p99)
        if BASELINE in seen and TARGET in seen:
            ratios.append(seen[TARGET][0] / seen[BASELINE][0])
        if LIFE_BASELINE in seen and LIFE_TARGET in seen:
            life_ratios.append(seen[LIFE_TARGET][0] / seen[LIFE_BASELINE][0])

    med = {k: statistics.median(v) for k, v in medians.items()}
    p99 = {k: statistics.median(v) for k, v in p99s.items()}
    base = med[BASELINE]
    ratio = statistics.median(ratios)
    cores = os.cpu_count()
    try:
        cores = subprocess.run(["nproc"], check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    except OSError:
        pass

    lines = [
        "<!-- BEGIN ffi-bench (generated by `make bench-ffi`) -->",
        "",
        "## FFI: per-call cost through the C ABI and the LuaJIT module (`bench/ffi/`)",
        "",
        f"Command: `make bench-ffi` (`bench/ffi/report.py`: {rounds} rounds of `bench-inproc`, `bench_c` and "
        f"`bench_lua.lua`, {n} individually timed calls per case and round after {n // 10} warm-up calls); "
        f"machine: `nproc` = {cores}. Script: the seed's routing example (conformance case 001); input: "
        "`bench/ffi/routing-input-10k.json` (a request with a ~10 KB body, three backends). "
        "Figures are the median over rounds of each round's median (and p99); every host uses the "
        "same LuaJIT (the system's) and the same release build of the core.",
        "",
        "| host | case | what | median µs | p99 µs | x route |",
        "|---|---|---|---|---|---|",
    ]
    for host, name, what in CASES:
        if (host, name) not in med:
            continue
        m, p = med[(host, name)], p99[(host, name)]
        lines.append(f"| {host} | `{name}` | {what} | {us(m)} | {us(p)} | {m / base:.2f}x |")
    met = "yes" if ratio <= TARGET_MAX else "**no**"
    boundary = med[TARGET] - med[("rust", "run_parts")] if ("rust", "run_parts") in med else None
    lines += [
        "",
        "| ratio | value | target | met |",
        "|---|---|---|---|",
        f"| C `run_prepared` / Rust `route(typed)` (median of per-round ratios) | {ratio:.2f}x | "
        f"<= {TARGET_MAX}x | {met} |",
    ]
    if ("c", "engine_run") in med:
        lines.append(f"| C `engine_run` / Rust `route(typed)` (before: input parsed per call) | "
                     f"{med[('c', 'engine_run')] / base:.2f}x | (reference) | |")
    if ("lua", "run_prepared") in med:
        lines.append(f"| Lua `run_prepared` / Rust `route(typed)` | {med[('lua', 'run_prepared')] / base:.2f}x "
                     "| (reference) | |")
    if boundary is not None:
        lines.append(f"| C `run_prepared` − Rust `run_parts` (the C boundary: hook name, result to JSON text, "
                     f"string free) | {boundary / 1000:+.2f} µs | (reference) | |")
    if life_ratios:
        life_base = med[LIFE_BASELINE]
        life_ratio = statistics.median(life_ratios)
        lines += [
            "",
            "One request's whole data path (`bench/ffi/request_life.lua`, same rounds, same process for both "
            "rows): a ~250-byte chat body (viplevel 3) and a completion with usage; the seed's routing, "
            "request_transform, response_transform and usage rules; both rows end with the upstream body, the "
            "client body and the usage record as Lua strings.",
            "",
            "| host | case | what | median µs | p99 µs | x hand-written |",
            "|---|---|---|---|---|---|",
        ]
        for host, name, what in LIFE_CASES:
            m, p = med[(host, name)], p99[(host, name)]
            lines.append(f"| {host} | `{name}` | {what} | {us(m)} | {us(p)} | {m / life_base:.2f}x |")
        life_met = "yes" if life_ratio <= LIFE_TARGET_MAX else "**no**"
        lines += [
            "",
            "| ratio | value | target | met |",
            "|---|---|---|---|",
            f"| request handle through the C ABI / hand-written LuaJIT + cjson (median of per-round ratios) | "
            f"{life_ratio:.2f}x | <= {LIFE_TARGET_MAX}x | {life_met} |",
        ]
    lines += ["", "<!-- END ffi-bench -->"]
    section = "\n".join(lines)
    print()
    print(section)

    if doc != "-":
        path = doc if os.path.isabs(doc) else os.path.join(root, doc)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        pat = re.compile(r"<!-- BEGIN ffi-bench.*?<!-- END ffi-bench -->", re.S)
        if pat.search(text):
            text = pat.sub(lambda _: section, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"\nwrote the ffi-bench section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
