#!/usr/bin/env bash
# OpenResty benchmark behind `make bench-openresty`: one run, one machine,
# 127.0.0.1 only, one `llmproxy mock-backend`. Compares plain nginx
# `proxy_pass` with nginx + resty.llmproxy running the seed's auth,
# rate_limit, routing and usage scripts over the config's keys and the
# shared-dict limiter (`limits:` set high enough never to refuse), with 1
# and 2 workers: peak RPS, p50/p99, and the p99 added at half of the peak.
# Writes the openresty-bench section of docs/benchmarks.md.
#
# Usage: openresty/bench/run.sh BIN_DIR LIB_DIR [OUT_MD]
#   BIN_DIR holds llmproxy and examples/loadgen (a release build);
#   LIB_DIR holds libllmproxy.so (a release build).
# Env: SECONDS_PER_RUN (default 8), ROUNDS (default 3: peak runs are
#      interleaved and the median round is kept), CONNECTIONS (default 64),
#      TEST_NGINX_MODULES (default /usr/lib/nginx/modules: the lua module).
#
# Besides RPS, each peak run reports the CPU time nginx's workers spent per
# request (utime + stime from /proc over the run, divided by the requests
# answered): on a machine where the proxy is the bottleneck the RPS ratio
# of two configurations is the inverse ratio of these. A floor row runs
# empty Lua handlers in the same five phases (what any Lua module pays).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
BIN_DIR=$(cd "$1" && pwd)
LIB_DIR=$(cd "$2" && pwd)
OUT=${3:-docs/benchmarks.md}
BIN=$BIN_DIR/llmproxy
LOADGEN=$BIN_DIR/examples/loadgen
DUR=${SECONDS_PER_RUN:-8}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNECTIONS:-64}
MODULES=${TEST_NGINX_MODULES:-/usr/lib/nginx/modules}
ulimit -n 65536 2>/dev/null || ulimit -n 8192

tmp=$(mktemp -d /tmp/llmproxy-openresty-bench.XXXXXX)
pids=()
stop_nginx() { [ -f "$1/nginx.pid" ] && kill -QUIT "$(cat "$1/nginx.pid")" 2>/dev/null || true; }
cleanup() {
  for d in "$tmp"/n*; do stop_nginx "$d"; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() {
  for _ in $(seq 1 200); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.05
  done
  echo "bench-openresty: nothing answers on port $1" >&2; exit 1
}

MOCK=$(port)
"$BIN" mock-backend --listen 127.0.0.1:$MOCK --chunks 8 2>/dev/null & pids+=($!)
wait_up $MOCK

cat > "$tmp/llmproxy.yaml" <<YAML
backends:
  - { name: standard, url: "http://127.0.0.1:$MOCK" }
  - { name: high-performance, url: "http://127.0.0.1:$MOCK" }
  - { name: ultra, url: "http://127.0.0.1:$MOCK" }
keys:
  - { key: sk-bench, user_id: bench, total_quota: 1000000000000 }
limits: { global_rpm: 1000000000, key_rpm: 1000000000, key_concurrency: 100000 }
scripts:
  auth: { script_file: $REPO/examples/scripts/auth.lua }
  rate_limit: { script_file: $REPO/examples/scripts/rate_limit.lua }
  routing: { script_file: $REPO/examples/scripts/routing.lua }
  usage: { script_file: $REPO/examples/scripts/usage.lua }
YAML

head -4 "$tmp/llmproxy.yaml" > "$tmp/bare.yaml"
echo "scripts: {}" >> "$tmp/bare.yaml"

# nginx_conf DIR PORT WORKERS llmproxy|plain|floor|handwritten [YAML]
nginx_conf() {
  local d=$1 p=$2 w=$3 kind=$4 yaml=${5:-$tmp/llmproxy.yaml}
  mkdir -p "$d/logs"
  {
    if [ "$kind" != plain ]; then
      printf 'load_module %s/ndk_http_module.so;\nload_module %s/ngx_http_lua_module.so;\n' "$MODULES" "$MODULES"
      [ "$(id -u)" = 0 ] && echo "user root;"
    fi
    cat <<NGX
worker_processes $w;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $d/body;
  proxy_temp_path $d/proxy;
  fastcgi_temp_path $d/fastcgi;
  uwsgi_temp_path $d/uwsgi;
  scgi_temp_path $d/scgi;
NGX
    if [ "$kind" = floor ]; then
      cat <<NGX
  upstream backend {
    server 0.0.0.1;
    balancer_by_lua_block { require("ngx.balancer").set_current_peer("127.0.0.1", $MOCK) }
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$p;
    location / {
      access_by_lua_block        { }
      header_filter_by_lua_block { }
      body_filter_by_lua_block   { }
      log_by_lua_block           { }
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_pass http://backend;
    }
  }
}
NGX
    elif [ "$kind" = handwritten ]; then
      cat <<NGX
  lua_package_path "$REPO/openresty/bench/?.lua;;";
  lua_shared_dict handwritten 10m;
  init_by_lua_block { require "handwritten" }
  upstream backend {
    server 0.0.0.1;
    balancer_by_lua_block { require("handwritten").balancer($MOCK) }
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$p;
    client_body_buffer_size 1m;
    location / {
      access_by_lua_block      { require("handwritten").access() }
      body_filter_by_lua_block { require("handwritten").body_filter() }
      log_by_lua_block         { require("handwritten").log() }
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_pass http://backend;
    }
  }
}
NGX
    elif [ "$kind" = plain ]; then
      cat <<NGX
  upstream backend { server 127.0.0.1:$MOCK; keepalive 256; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$p;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGX
    else
      cat <<NGX
  lua_package_path "$REPO/openresty/lib/?.lua;;";
  lua_package_cpath "$LIB_DIR/lib?.so;;";
  lua_shared_dict llmproxy_metrics 4m;
  lua_shared_dict llmproxy_limits 10m;
  init_by_lua_block { require "resty.llmproxy" }
  init_worker_by_lua_block { require("resty.llmproxy").init_worker("$yaml") }
  upstream llmproxy_backends {
    server 0.0.0.1;
    balancer_by_lua_block { require("resty.llmproxy").balancer() }
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$p;
    client_body_buffer_size 1m;
    location / {
      access_by_lua_block        { require("resty.llmproxy").access() }
      header_filter_by_lua_block { require("resty.llmproxy").header_filter() }
      body_filter_by_lua_block   { require("resty.llmproxy").body_filter() }
      log_by_lua_block           { require("resty.llmproxy").log() }
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_pass http://llmproxy_backends;
    }
  }
}
NGX
    fi
  } > "$d/nginx.conf"
  nginx -p "$d" -c "$d/nginx.conf"
}

BODY='{"model":"gpt-4","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello to the benchmark."}],"viplevel":3,"temperature":0.7}'
export LOADGEN_HEADER="Authorization: Bearer sk-bench"
# peak URL NGINX_DIR: one peak run, with the CPU time of nginx's workers per
# request (`cpu_us`).
peak() {
  # shellcheck disable=SC2046 # one argument per worker pid
  python3 bench/lib/rounds.py peak "$LOADGEN" "$1" "$BODY" $CONNS $DUR $(pgrep -P "$(cat "$2/nginx.pid")")
}

results=()
for W in 1 2; do
  PP=$(port); LP=$(port); BP=$(port); FP=$(port); HP=$(port)
  nginx_conf "$tmp/nh$W" $HP $W handwritten
  nginx_conf "$tmp/np$W" $PP $W plain
  nginx_conf "$tmp/nl$W" $LP $W llmproxy
  nginx_conf "$tmp/nb$W" $BP $W llmproxy "$tmp/bare.yaml"
  nginx_conf "$tmp/nf$W" $FP $W floor
  wait_up $PP; wait_up $LP; wait_up $BP; wait_up $FP; wait_up $HP
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "$LOADGEN_HEADER" -d "$BODY" "http://127.0.0.1:$HP/v1/chat/completions")
  [ "$code" = 200 ] || { echo "bench-openresty: the hand-written baseline answered $code" >&2; cat "$tmp/nh$W/logs/error.log" >&2; exit 1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "$LOADGEN_HEADER" -d "$BODY" "http://127.0.0.1:$LP/v1/chat/completions")
  [ "$code" = 200 ] || { echo "bench-openresty: llmproxy answered $code" >&2; cat "$tmp/nl$W/logs/error.log" >&2; exit 1; }
  : > "$tmp/nl$W/logs/error.log" # wait_up's keyless probe is refused (logged): not part of the run
  echo "bench-openresty: $W worker(s), peak RPS, $CONNS connections, ${DUR}s each, $ROUNDS rounds" >&2
  rounds=()
  for r in $(seq 1 "$ROUNDS"); do
    R_P=$(peak "http://127.0.0.1:$PP/v1/chat/completions" "$tmp/np$W"); echo "plain    $R_P" >&2
    R_F=$(peak "http://127.0.0.1:$FP/v1/chat/completions" "$tmp/nf$W"); echo "floor    $R_F" >&2
    R_L=$(peak "http://127.0.0.1:$LP/v1/chat/completions" "$tmp/nl$W"); echo "llmproxy $R_L" >&2
    R_B=$(peak "http://127.0.0.1:$BP/v1/chat/completions" "$tmp/nb$W"); echo "no hooks $R_B" >&2
    R_H=$(peak "http://127.0.0.1:$HP/v1/chat/completions" "$tmp/nh$W"); echo "by hand  $R_H" >&2
    rounds+=("{\"rp\":$R_P,\"rf\":$R_F,\"rl\":$R_L,\"rb\":$R_B,\"rh\":$R_H}")
  done
  MED=$(python3 bench/lib/rounds.py peaks rl rp "${rounds[@]}")
  HALF=$(python3 bench/lib/rounds.py half rp rl "$MED")
  echo "bench-openresty: fixed rate $HALF req/s" >&2
  halves=()
  for r in $(seq 1 "$ROUNDS"); do
    H_P=$("$LOADGEN" rate "http://127.0.0.1:$PP/v1/chat/completions" "$BODY" $HALF $CONNS $DUR); echo "plain    $H_P" >&2
    H_L=$("$LOADGEN" rate "http://127.0.0.1:$LP/v1/chat/completions" "$BODY" $HALF $CONNS $DUR); echo "llmproxy $H_L" >&2
    halves+=("{\"hp\":$H_P,\"hl\":$H_L}")
  done
  # The round with the median added p99.
  HMED=$(python3 bench/lib/rounds.py halves hl hp "${halves[@]}")
  errs=$(grep -c '\[error\]' "$tmp/nl$W/logs/error.log" || true)
  grep '\[error\]' "$tmp/nl$W/logs/error.log" | head -3 >&2 || true
  results+=("{\"workers\":$W,\"med\":$MED,\"half\":$HMED,\"log_errors\":$errs}")
  for k in p l b f h; do stop_nginx "$tmp/n$k$W"; done
done

python3 - "$OUT" "$(nproc)" "$CONNS" "$DUR" "$(nginx -v 2>&1)" "$ROUNDS" "${results[@]}" <<'PY'
import json, re, sys
out, nproc, conns, dur, nginx_version, rounds = sys.argv[1:7]
runs = [json.loads(a) for a in sys.argv[7:]]
nginx_version = nginx_version.split("/")[-1]
ok = lambda c: "yes" if c else "**no**"
lines = [
    "<!-- BEGIN openresty-bench (generated by `make bench-openresty`) -->",
    "",
    "## OpenResty: nginx + resty.llmproxy (`openresty/bench/run.sh`)",
    "",
    f"Command: `make bench-openresty`; machine: `nproc` = {nproc}; everything on 127.0.0.1: "
    "one `llmproxy mock-backend` (release, 8-chunk answers, no delay); "
    f"nginx {nginx_version} with `worker_processes` 1 or 2, upstream keep-alive, `access_log off`: "
    "plain `proxy_pass`; the same with resty.llmproxy in access/balancer/header/body/log "
    "running the seed's auth, rate_limit, routing and usage scripts over one configured key, the "
    "standard checks and the shared-dict limiter (`limits:` global and per-key rpm and per-key "
    "concurrency set high enough never to refuse; quota charged per request; no ledger); "
    "the module with no keys, limits or scripts (request parsing, usage capture, metrics); and, as the "
    "floor of any Lua module, empty Lua handlers in the same five phases (`balancer_by_lua` sets the peak); "
    "and what an OpenResty user would write instead: the same four seed rules by hand in plain, unsandboxed "
    "OpenResty Lua (`openresty/bench/handwritten.lua`: lua-cjson, JIT on, a shared-dict limiter). "
    f"Load: `target/release/examples/loadgen` (one thread), {conns} keep-alive connections, "
    f"{dur} s per run, non-streamed chat completions (~250-byte body, `Authorization: Bearer`); "
    f"{rounds} interleaved rounds of the four peak runs, the median round per row. "
    "The load generator, the backend and nginx share the same cores. "
    "**CPU µs/req** is the CPU time (user + system) of nginx's workers per answered request: "
    "where nginx is the bottleneck, the RPS of two rows is in the inverse ratio of their CPU µs/req; "
    "here the one-thread load generator and the backend take most of the machine, so peak RPS "
    "understates the difference.",
    "",
    "| workers | target | peak RPS | p50 ms | p99 ms | errors | CPU µs/req |",
    "|---|---|---|---|---|---|---|",
]
for r in runs:
    m = r["med"]
    for name, x in (("plain proxy_pass", m["rp"]), ("empty Lua handlers in the five phases (floor)", m["rf"]),
                    ("llmproxy (auth + rate_limit + routing + usage)", m["rl"]),
                    ("llmproxy, no keys, limits or hooks", m["rb"]),
                    ("the same four seed rules hand-written in plain OpenResty Lua (cjson, shared-dict limiter)", m["rh"])):
        lines.append(f"| {r['workers']} | {name} | {x['rps']:.0f} | {x['p50_ms']:.3f} | {x['p99_ms']:.3f} | "
                     f"{x['errors']} | {x['cpu_us']:.1f} |")
lines += ["", "At a fixed rate of half of the lower peak (latency from each request's scheduled start; "
          f"{rounds} interleaved rounds, the round with the median added p99):", "",
          "| workers | target | rate | achieved RPS | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
for r in runs:
    for name, x in (("plain proxy_pass", r["half"]["hp"]), ("llmproxy", r["half"]["hl"])):
        lines.append(f"| {r['workers']} | {name} | {x['target_rps']:.0f} | {x['achieved_rps']:.0f} | {x['p50_ms']:.3f} | {x['p99_ms']:.3f} |")
lines += ["", "| workers | value | result | goal | met |", "|---|---|---|---|---|"]
for r in runs:
    m = r["med"]
    ratio = m["ratio"]
    added = r["half"]["hl"]["p99_ms"] - r["half"]["hp"]["p99_ms"]
    added_rounds = ", ".join(f"{x:.3f}" for x in r["half"]["added"])
    per_round = ", ".join(f"{x:.2f}" for x in m["ratios"])
    lines.append(f"| {r['workers']} | llmproxy RPS / plain proxy_pass RPS, median of the rounds' ratios "
                 f"(rounds: {per_round}) | {ratio:.2f} | "
                 f">= 0.90 | {ok(ratio >= 0.9)} |")
    lines.append(f"| {r['workers']} | plain proxy_pass CPU / llmproxy CPU per request (the ratio where nginx is "
                 f"the bottleneck) | {m['rp']['cpu_us'] / m['rl']['cpu_us']:.2f} | (reported) | - |")
    lines.append(f"| {r['workers']} | llmproxy CPU / hand-written OpenResty CPU per request | "
                 f"{m['rl']['cpu_us'] / m['rh']['cpu_us']:.2f} | (reported) | - |")
    lines.append(f"| {r['workers']} | p99 added at half of peak (rounds: {added_rounds} ms) | {added:.3f} ms | "
                 f"<= 0.5 ms | {ok(added <= 0.5)} |")
    lines.append(f"| {r['workers']} | `[error]` lines in the llmproxy nginx's log | {r['log_errors']} | 0 | {ok(r['log_errors'] == 0)} |")
lines += ["", "<!-- END openresty-bench -->"]
section = "\n".join(lines)
try:
    text = open(out).read()
except FileNotFoundError:
    text = "# Benchmarks\n"
pat = re.compile(r"<!-- BEGIN openresty-bench.*?<!-- END openresty-bench -->", re.S)
text = pat.sub(lambda _: section, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
open(out, "w").write(text)
print(section)
PY
