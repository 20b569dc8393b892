# Prometheus metrics with two workers: every worker counts into the shared
# dict, and /metrics answers the same merged numbers whichever worker
# serves it; the gateway's names, labels and buckets; hook errors by kind.
#
# The gateway listens on $TEST_NGINX_PORT_1 with `reuseport`, so the kernel
# spreads connections over both workers; a driver (a content handler on the
# main port, t/lib/llmproxy_drive.lua) sends requests with cosockets and
# reads X-Worker-Pid to see which worker answered. The shared dict lives
# across the blocks of this file (reloads keep it), so blocks compare
# numbers before and after their own requests.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

workers(2);

my $mocks = mock_servers(['standard', 2], ['ultra', 3]);

known_sections(qw(hooks));
add_block_preprocessor(sub {
    my $block = shift;
    my $hooks = exists $block->{hooks} ? $block->hooks
        : "  routing: {script_file: \$TEST_NGINX_REPO/examples/scripts/routing.lua}\n";
    $block->set_value('user_files', <<"YAML");
>>> llmproxy.yaml
backends:
  - {name: standard, url: "http://127.0.0.1:\$TEST_NGINX_PORT_2"}
  - {name: ultra,    url: "http://127.0.0.1:\$TEST_NGINX_PORT_3"}
scripts:
$hooks
YAML
    $block->set_value('http_config', <<'CONF' . $mocks);
    lua_shared_dict llmproxy_metrics 1m;
    upstream llmproxy_backends {
        server 0.0.0.1;
        balancer_by_lua_block { require("resty.llmproxy").balancer() }
    }
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker("$TEST_NGINX_SERVROOT/html/llmproxy.yaml")
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_PORT_1 reuseport;
        location /v1/ {
            access_by_lua_block        { require("resty.llmproxy").access() }
            header_filter_by_lua_block { require("resty.llmproxy").header_filter() }
            body_filter_by_lua_block   { require("resty.llmproxy").body_filter() }
            log_by_lua_block           { require("resty.llmproxy").log() }
            add_header X-Worker-Pid $pid always;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_pass http://llmproxy_backends;
        }
        location = /metrics {
            add_header X-Worker-Pid $pid always;
            content_by_lua_block { require("resty.llmproxy").metrics() }
        }
    }
CONF
});

run_tests();

__DATA__

=== TEST 1: 40 requests over both workers; /metrics from either worker shows all 40
--- config
    location = /t {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = $TEST_NGINX_PORT_1
            local key = 'llmproxy_requests_total{backend="ultra",status="200"}'
            local calls = 'llmproxy_hook_calls_total{hook="routing"}'
            local before = assert(drive.metrics(port))
            local pids, n = {}, 0
            for i = 1, 40 do
                local status, h = drive.chat(port, '{"model":"gpt-4","viplevel":3}')
                assert(status == 200, "status " .. tostring(status))
                if not pids[h["x-worker-pid"]] then
                    pids[h["x-worker-pid"]] = true
                    n = n + 1
                end
            end
            ngx.say("workers that served requests: ", n)
            -- the log phase runs after the response: let it finish
            ngx.sleep(0.2)
            local scraped, same = {}, true
            local first
            for i = 1, 20 do
                local m, pid = assert(drive.metrics(port))
                scraped[pid] = true
                local got = { (m[key] or 0) - (before[key] or 0), (m[calls] or 0) - (before[calls] or 0) }
                first = first or got
                same = same and got[1] == first[1] and got[2] == first[2]
            end
            local scrapers = 0
            for _ in pairs(scraped) do scrapers = scrapers + 1 end
            ngx.say("workers that served /metrics: ", scrapers)
            ngx.say("every scrape the same: ", same)
            ngx.say("requests counted: ", first[1], ", routing calls: ", first[2])
        }
    }
--- request
GET /t
--- response_body
workers that served requests: 2
workers that served /metrics: 2
every scrape the same: true
requests counted: 40, routing calls: 40
--- no_error_log
[error]



=== TEST 2: the page is valid exposition text with core's metric catalog and the gateway's buckets
--- config
    location = /t {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = $TEST_NGINX_PORT_1
            drive.chat(port, '{"model":"gpt-4"}')
            ngx.sleep(0.1)
            local m, _, text, bad = assert(drive.metrics(port))
            ngx.say("invalid lines: ", #bad)
            -- Every family is core's catalog's, as the gateway's are.
            local problems = require("llmproxy").metric_problems(text)
            ngx.say("catalog problems: ", #problems, table.concat(problems, "; "))
            for _, name in ipairs({ "llmproxy_requests_total", "llmproxy_upstream_latency_seconds",
                    "llmproxy_hook_calls_total", "llmproxy_hook_errors_total", "llmproxy_hook_duration_seconds",
                    "llmproxy_retries_total", "llmproxy_active_streams", "llmproxy_usage_total",
                    "llmproxy_backend_healthy", "llmproxy_backend_latency_ewma_ms",
                    "llmproxy_backend_active_connections", "llmproxy_vm_pool" }) do
                local typ = text:match("# TYPE " .. name .. " (%a+)\n")
                ngx.say(name, " ", tostring(typ))
            end
            -- histograms: cumulative buckets, +Inf = count
            local h = 'llmproxy_hook_duration_seconds'
            local prev, ok = 0, true
            for _, le in ipairs({ "0.00001", "0.000025", "0.00005", "0.0001", "0.00025", "0.0005", "0.001",
                    "0.0025", "0.005", "0.01", "0.05", "0.1", "+Inf" }) do
                local v = m[h .. '_bucket{hook="routing",le="' .. le .. '"}']
                ok = ok and v ~= nil and v >= prev
                prev = v or prev
            end
            ngx.say("hook buckets cumulative: ", ok, ", +Inf = count: ",
                prev == m[h .. '_count{hook="routing"}'])
            ngx.say("upstream count = requests to standard: ",
                m['llmproxy_upstream_latency_seconds_count{backend="standard"}']
                == m['llmproxy_requests_total{backend="standard",status="200"}'])
            ngx.say("usage: ", m['llmproxy_usage_total{backend="standard",kind="total_tokens"}'] ~= nil,
                " ", m['llmproxy_usage_total{backend="standard",kind="billable_tokens"}'] ~= nil)
            ngx.say("healthy: ", m['llmproxy_backend_healthy{backend="standard"}'],
                ", pool capacity > 0: ", m['llmproxy_vm_pool{stat="capacity"}'] > 0)
            ngx.say("errors pre-registered: ",
                m['llmproxy_hook_errors_total{hook="error_handler",kind="memory"}'])
        }
    }
--- request
GET /t
--- response_body
invalid lines: 0
catalog problems: 0
llmproxy_requests_total counter
llmproxy_upstream_latency_seconds histogram
llmproxy_hook_calls_total counter
llmproxy_hook_errors_total counter
llmproxy_hook_duration_seconds histogram
llmproxy_retries_total counter
llmproxy_active_streams gauge
llmproxy_usage_total counter
llmproxy_backend_healthy gauge
llmproxy_backend_latency_ewma_ms gauge
llmproxy_backend_active_connections gauge
llmproxy_vm_pool gauge
hook buckets cumulative: true, +Inf = count: true
upstream count = requests to standard: true
usage: true true
healthy: 1, pool capacity > 0: true
errors pre-registered: 0



=== TEST 3: failing hooks are counted by kind, across both workers
--- hooks
  routing:
    timeout_ms: 20
    script: |
      if request.body.loop then while true do end end
      if request.body.boom then error("boom") end
      return "nowhere"
--- config
    location = /t {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = $TEST_NGINX_PORT_1
            local function err(kind) return 'llmproxy_hook_errors_total{hook="routing",kind="' .. kind .. '"}' end
            local before = assert(drive.metrics(port))
            for _, body in ipairs({ '{"loop":1}', '{"loop":1}', '{"boom":1}', '{}', '{}', '{}' }) do
                local status = drive.chat(port, body)
                assert(status == 200, "served by the default balancer")
            end
            ngx.sleep(0.1)
            local after = assert(drive.metrics(port))
            for _, kind in ipairs({ "timeout", "script_error", "bad_output", "memory" }) do
                ngx.say(kind, ": ", (after[err(kind)] or 0) - (before[err(kind)] or 0))
            end
        }
    }
--- request
GET /t
--- response_body
timeout: 2
script_error: 1
bad_output: 3
memory: 0



=== TEST 4: result fields a hook does not use are ignored and counted, across both workers
--- hooks
  response_transform:
    script: |
      return {headers = {["X-Seen-Note"] = "kept"}, note = "not a field of response_transform"}
--- config
    location = /t {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = $TEST_NGINX_PORT_1
            local name = 'llmproxy_hook_ignored_fields_total{hook="response_transform"}'
            for _ = 1, 3 do
                local status = drive.chat(port, '{"model":"gpt-4"}')
                assert(status == 200, "the rest of the result applies")
            end
            ngx.sleep(0.2)
            local m = assert(drive.metrics(port))
            ngx.say("ignored: ", m[name])
        }
    }
--- request
GET /t
--- response_body
ignored: 3
