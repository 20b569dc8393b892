#!/usr/bin/env python3
"""Helpers of the HTTP benchmark scripts (bench/http/run.sh,
openresty/bench/run.sh): CPU per request, and the median of interleaved
rounds. Each prints one JSON object.

  rounds.py cpu RUN_JSON TICKS_BEFORE TICKS_AFTER
      the load generator's JSON with `cpu_us`: the CPU ticks spent over the
      run (utime + stime of the measured processes) per answered request
  rounds.py peaks NUM DEN ROUND_JSON...
      per key, the round with the median peak RPS; `ratios`: NUM/DEN RPS of
      every round, sorted; `ratio`: their median (a paired comparison: both
      figures come from the same round)
  rounds.py halves PROXY BASE ROUND_JSON...
      the round with the median p99 PROXY adds over BASE; `added`: that
      difference in every round, sorted
"""
import json
import os
import sys


def cpu(run, before, after):
    o = json.loads(run)
    ticks = int(after) - int(before)
    o["cpu_us"] = ticks * 1e6 / os.sysconf("SC_CLK_TCK") / max(o["requests"], 1)
    return o


def peaks(num, den, rounds):
    rs = [json.loads(a) for a in rounds]
    med = lambda k: sorted((r[k] for r in rs), key=lambda x: x["rps"])[len(rs) // 2]
    out = {k: med(k) for k in rs[0]}
    out["ratios"] = sorted(r[num]["rps"] / r[den]["rps"] for r in rs)
    out["ratio"] = out["ratios"][len(rs) // 2]
    return out


def halves(proxy, base, rounds):
    added = lambda r: r[proxy]["p99_ms"] - r[base]["p99_ms"]
    rs = sorted((json.loads(a) for a in rounds), key=added)
    out = rs[len(rs) // 2]
    out["added"] = [round(added(r), 3) for r in rs]
    return out


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "cpu":
        result = cpu(*args)
    elif cmd == "peaks":
        result = peaks(args[0], args[1], args[2:])
    elif cmd == "halves":
        result = halves(args[0], args[1], args[2:])
    else:
        sys.exit(f"rounds.py: unknown command {cmd!r}")
    print(json.dumps(result))
