#!/usr/bin/env python3
"""Helpers of the HTTP benchmark scripts (bench/http/run.sh,
openresty/bench/run.sh): CPU per request, and the median of interleaved
rounds. Each prints one JSON value.

  rounds.py peak LOADGEN URL BODY CONNECTIONS SECONDS PID...
      one `LOADGEN rps` run, its JSON with `cpu_us`: the CPU time (utime +
      stime, from /proc) the processes PID... spent over the run, per
      answered request
  rounds.py peaks NUM DEN ROUND_JSON...
      per key, the round with the median peak RPS; `ratios`: NUM/DEN RPS of
      every round, sorted; `ratio`: their median (a paired comparison: both
      figures come from the same round)
  rounds.py half A B PEAKS_JSON
      half of the lower peak RPS of keys A and B, as an integer
  rounds.py halves PROXY BASE ROUND_JSON...
      the round with the median p99 PROXY adds over BASE; `added`: that
      difference in every round, sorted
  rounds.py ones PROXY BASE ROUND_JSON...
      the same with the median p50 (the one-connection runs)
"""
import json
import os
import subprocess
import sys


def cpu_ticks(pids):
    """utime + stime of the processes, in clock ticks."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)"
        total += int(fields[11]) + int(fields[12])  # stat fields 14 and 15
    return total


def peak(loadgen, url, body, conns, dur, pids):
    before = cpu_ticks(pids)
    out = subprocess.run([loadgen, "rps", url, body, conns, dur], check=True, capture_output=True, text=True)
    after = cpu_ticks(pids)
    o = json.loads(out.stdout)
    o["cpu_us"] = (after - before) * 1e6 / os.sysconf("SC_CLK_TCK") / max(o["requests"], 1)
    return o


def peaks(num, den, rounds):
    rs = [json.loads(a) for a in rounds]
    med = lambda k: sorted((r[k] for r in rs), key=lambda x: x["rps"])[len(rs) // 2]
    out = {k: med(k) for k in rs[0]}
    out["ratios"] = sorted(r[num]["rps"] / r[den]["rps"] for r in rs)
    out["ratio"] = out["ratios"][len(rs) // 2]
    return out


def median_added(proxy, base, rounds, metric):
    added = lambda r: r[proxy][metric] - r[base][metric]
    rs = sorted((json.loads(a) for a in rounds), key=added)
    out = rs[len(rs) // 2]
    out["added"] = [round(added(r), 3) for r in rs]
    return out


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "peak":
        result = peak(*args[:5], args[5:])
    elif cmd == "half":
        m = json.loads(args[2])
        result = int(min(m[args[0]]["rps"], m[args[1]]["rps"]) / 2)
    elif cmd == "peaks":
        result = peaks(args[0], args[1], args[2:])
    elif cmd == "halves":
        result = median_added(args[0], args[1], args[2:], "p99_ms")
    elif cmd == "ones":
        result = median_added(args[0], args[1], args[2:], "p50_ms")
    else:
        sys.exit(f"rounds.py: unknown command {cmd!r}")
    print(json.dumps(result))
