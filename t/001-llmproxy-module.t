# The LuaJIT module (libllmproxy.so, `require "llmproxy"`) inside nginx:
# loading in init_worker and content phases, running the seed's routing
# script, and a looping script that times out while nginx keeps serving.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi-lib, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

add_block_preprocessor(sub {
    my $block = shift;
    # Every block gets a worker-level engine built from inline YAML with
    # the seed's routing script, unless it brings its own http_config.
    $block->set_value('http_config', <<'CONF') unless defined $block->http_config;
    init_worker_by_lua_block {
        local llmproxy = require "llmproxy"
        local engine, err = llmproxy.new([[
scripts:
  routing:
    script_file: $TEST_NGINX_REPO/examples/scripts/routing.lua
]])
        if not engine then
            ngx.log(ngx.ERR, "engine: ", tostring(err))
            return
        end
        package.loaded.test_engine = engine
    }
CONF
});

run_tests();

__DATA__

=== TEST 1: require "llmproxy" in init_worker
--- http_config
    init_worker_by_lua_block {
        local llmproxy = require "llmproxy"
        ngx.log(ngx.NOTICE, "init_worker: llmproxy ", llmproxy.version, ", new is a ", type(llmproxy.new))
    }
--- config
    location = /t {
        content_by_lua_block { ngx.say(package.loaded.llmproxy ~= nil) }
    }
--- request
GET /t
--- response_body
true
--- error_log eval
qr/init_worker: llmproxy \d+\.\d+\.\d+, new is a function/
--- no_error_log
[error]



=== TEST 2: require "llmproxy" in the content phase; the module's exports
--- http_config
--- config
    location = /t {
        content_by_lua_block {
            local llmproxy = require "llmproxy"
            ngx.say("version: ", (llmproxy.version:match("^%d+%.%d+%.%d+$")))
            ngx.say("new: ", type(llmproxy.new))
            ngx.say("null is cjson.null: ", llmproxy.null == require("cjson").null)
            ngx.say("array_mt: ", type(llmproxy.array_mt))
        }
    }
--- request
GET /t
--- response_body eval
qr/^version: \d+\.\d+\.\d+\nnew: function\nnull is cjson.null: true\narray_mt: table\n\z/
--- no_error_log
[error]



=== TEST 3: the seed's routing script, on requests built in Lua
--- config
    location = /t {
        content_by_lua_block {
            local engine = package.loaded.test_engine
            local backends = {
                standard = { url = "http://127.0.0.1:9001", healthy = true, weight = 10 },
                ["high-performance"] = { url = "http://127.0.0.1:9002", healthy = true, weight = 10 },
                ultra = { url = "http://127.0.0.1:9003", healthy = true, weight = 5 },
            }
            for _, body in ipairs({ { viplevel = 3 }, { viplevel = 1 }, { model = "gpt-4" } }) do
                local res, err = engine:run("routing", { request = { id = "r1", body = body }, backends = backends })
                ngx.say(tostring(body.viplevel), " -> ", tostring(res), " ", tostring(err))
            end
        }
    }
--- request
GET /t
--- response_body
3 -> ultra nil
1 -> high-performance nil
nil -> standard nil
--- no_error_log
[error]



=== TEST 4: the seed's routing script on the client's raw JSON body (body_raw)
--- config
    location = /v1/chat/completions {
        content_by_lua_block {
            ngx.req.read_body()
            local engine = package.loaded.test_engine
            local res, err = engine:run("routing", {
                request = { id = ngx.var.request_id, body_raw = ngx.req.get_body_data() },
                backends = { standard = { url = "http://a" }, ultra = { url = "http://b" },
                             ["high-performance"] = { url = "http://c" } },
            })
            ngx.say(res, " ", tostring(err))
        }
    }
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"hi"}],"viplevel":3,"user":{"profile":{"region":"cn-north"}}}
--- response_body
ultra nil
--- no_error_log
[error]



=== TEST 5: a routing result that names no backend is bad_output
--- config
    location = /t {
        content_by_lua_block {
            local engine = package.loaded.test_engine
            local res, err = engine:run("routing", {
                request = { id = "r5", body = { viplevel = 3 } },
                backends = { standard = { url = "http://a" } },
            })
            ngx.say(tostring(res), " ", err.kind)
        }
    }
--- request
GET /t
--- response_body
nil bad_output



=== TEST 6: a looping script gets a timeout error, and the worker keeps serving
--- http_config
    init_worker_by_lua_block {
        local llmproxy = require "llmproxy"
        package.loaded.loop_engine = assert(llmproxy.new([[
scripts:
  routing:
    timeout_ms: 50
    script: |
      local n = 0
      while true do n = n + 1 end
]]))
    }
--- config
    location = /loop {
        content_by_lua_block {
            ngx.update_time()
            local t0 = ngx.now()
            local res, err = package.loaded.loop_engine:run("routing", { request = { id = "loop-1" } })
            ngx.update_time()
            local ms = (ngx.now() - t0) * 1000
            ngx.say(tostring(res), " ", err.kind, " ", ms >= 40 and ms < 1000)
            ngx.log(ngx.WARN, "loop result: ", tostring(err))
        }
    }
    location = /ok {
        content_by_lua_block { ngx.say("still serving, pid ", ngx.worker.pid() == tonumber(ngx.var.pid)) }
    }
--- request eval
["GET /loop", "GET /ok", "GET /loop", "GET /ok"]
--- response_body eval
["nil timeout true\n", "still serving, pid true\n", "nil timeout true\n", "still serving, pid true\n"]
--- error_log
loop result: timeout:
script exceeded its time limit of 50 ms
--- no_error_log
[alert]
[crit]



=== TEST 7: llmproxy.failure_step: core's order of error_handler and response_transform (ADR 042)
--- http_config
--- config
    location = /t {
        content_by_lua_block {
            local step = require("llmproxy").failure_step
            local up = { source = "upstream", json_body = true, error_handler = true, caller_identified = true,
                         response_transform = true }
            local function with(t, k, v)
                local c = {}
                for a, b in pairs(t) do c[a] = b end
                c[k] = v
                return c
            end
            ngx.say(step(up))
            ngx.say(step(with(up, "handled", "kept")))
            ngx.say(step(with(up, "handled", "replaced")))
            ngx.say(step(with(up, "handled", "denied")))
            ngx.say(step(with(up, "error_handler", false)))
            ngx.say(step(with(up, "caller_identified", false)))
            ngx.say(step({ source = "upstream", json_body = false, response_transform = true }))
            ngx.say(step({ source = "gateway", error_handler = true, caller_identified = true, response_transform = true }))
            ngx.say(step({ source = "gateway", error_handler = true, response_transform = true }))
            ngx.say(step({ source = "gateway", response_transform = true, handled = "kept" }))
            local ok, err = pcall(step, { source = "elsewhere" })
            ngx.say(ok, " ", (tostring(err):match("[^\n]*")))
            ok, err = pcall(step, { handled = "maybe" })
            ngx.say(ok, " ", (tostring(err):match("[^\n]*")))
        }
    }
--- request
GET /t
--- response_body eval
qr/^error_handler
response_transform
send
send
response_transform
response_transform
send
error_handler
send
send
false runtime error: failure_step: source must be 'gateway' or 'upstream', not 'elsewhere'
false runtime error: failure_step: handled must be not_run, kept, replaced or denied, not 'maybe'
\z/
--- no_error_log
[error]



=== TEST 8: llmproxy.sse_event: core's rule for one stream event, the shared cases (conformance/sse-events.json)
--- config
    location = /t {
        content_by_lua_block {
            local cases = require "llmproxy_cases"
            local sse_event = require("llmproxy").sse_event
            cases.run("$TEST_NGINX_REPO/conformance/sse-events.json", function(c)
                local relayed, usage = sse_event(c.data, c.strip_usage)
                return cases.differ("relayed", relayed, c.relayed) or cases.differ("usage", usage, c.usage)
            end)
        }
    }
--- request
GET /t
--- response_body_like
^[1-9]\d* cases, 0 failed$
--- no_error_log
[error]



=== TEST 9: llmproxy.usage_charge: core's charge of a finished request, the shared cases (conformance/usage-charges.json)
--- config
    location = /t {
        content_by_lua_block {
            local cases = require "llmproxy_cases"
            local usage_charge = require("llmproxy").usage_charge
            local FIELDS = { "billable_tokens", "limit_tokens", "prompt_tokens", "completion_tokens",
                             "total_tokens", "cost", "metrics" }
            cases.run("$TEST_NGINX_REPO/conformance/usage-charges.json", function(c)
                local got = usage_charge(c.raw, cases.value(c.record))
                for _, k in ipairs(FIELDS) do
                    local problem = cases.differ(k, got[k], c.charge[k])
                    if problem then
                        return problem
                    end
                end
            end)
        }
    }
--- request
GET /t
--- response_body_like
^[1-9]\d* cases, 0 failed$
--- no_error_log
[error]



=== TEST 10: llmproxy.rate_step: core's rate limit stage decision, the shared cases (conformance/rate-stage.json)
--- config
    location = /t {
        content_by_lua_block {
            local cases = require "llmproxy_cases"
            local rate_step = require("llmproxy").rate_step
            cases.run("$TEST_NGINX_REPO/conformance/rate-stage.json", function(c)
                local admit, a2, code, message, retry_after, reason =
                    rate_step(cases.value(c.script), c.took, cases.value(c.denial))
                local got
                if admit then
                    got = { admit = true, force = a2 }
                else
                    got = { admit = false, refund = a2, code = code, message = message,
                            retry_after = retry_after, reason = reason }
                end
                return cases.differ("step", got, c.expect)
            end)
        }
    }
--- request
GET /t
--- response_body_like
^[1-9]\d* cases, 0 failed$
--- no_error_log
[error]
