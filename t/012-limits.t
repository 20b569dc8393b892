# The standard rate limiter in nginx (`limits:`, docs/adr/028): global and
# per-key requests per minute, tokens per minute and concurrency in
# `lua_shared_dict llmproxy_limits`, 429 + Retry-After through
# error_handler (type rate_limit), and the rate_limit script's
# `rate_limit_status` / `current_time` and its verdicts over the limiter.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

# The dict outlives the reloads between blocks (as it does nginx's): each
# block uses its own key, and global counts are compared loosely.
# nginx keeps TZ for its workers: current_time's default zone (local).
$ENV{TZ} = 'Asia/Kolkata';
gateway_setup();
run_tests();

__DATA__

=== TEST 1: global_rpm 3: the 4th request of the minute gets 429 global_rate_limit with Retry-After
--- yaml
limits: {global_rpm: 3}
--- request eval
[("POST /v1/chat/completions\n{\"model\":\"gpt-4\"}") x 4]
--- error_code eval
[200, 200, 200, 429]
--- response_body_like eval
[qr/"choices"/, qr/"choices"/, qr/"choices"/,
 qr/^\Q{"error":{"message":"the gateway's request rate limit is reached","type":"rate_limit","code":"global_rate_limit"}}\E$/]
--- no_error_log
[error]



=== TEST 2: key_rpm 2 per key, through error_handler (type rate_limit), Retry-After the bucket's 60/2 s
--- yaml
keys:
  - {key: sk-2, user_id: a}
limits: {key_rpm: 2}
--- hooks
  error_handler:
    script: |
      return {status_code = error.status_code, body = {t = error.type, m = error.message}}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            for _ = 1, 3 do
                local status, headers, body = drive.chat(port, '{"model":"gpt-4"}', { Authorization = "Bearer sk-2" })
                ngx.say(status, " ", headers["retry-after"] or "-", " ", status == 200 and "choices" or body)
            end
        }
    }
--- request
GET /drive
--- response_body_like
^200 - choices
200 - choices
429 (29|30) \{"m":"this API key's request rate limit is reached","t":"rate_limit"\}
$



=== TEST 3: key_concurrency 1: the slot comes back in log() on every path (admitted, refused later, backend error)
--- yaml
keys:
  - {key: sk-3, user_id: a}
limits: {key_concurrency: 1}
--- more_headers
Authorization: Bearer sk-3
--- request eval
["POST /v1/chat/completions\n{\"model\":\"gpt-4\"}", "POST /v1/chat/completions\n{\"model\": oops",
 "POST /v1/chat/completions\n{\"model\":\"gpt-4\"}", "POST /v1/chat/completions\n{\"model\":\"gpt-4\"}"]
--- error_code eval
[200, 400, 200, 200]



=== TEST 4: key_concurrency 1: a second request while the first is in flight gets 429 key_concurrency_limit
--- yaml
keys:
  - {key: sk-4, user_id: a}
limits: {key_concurrency: 1}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local h = { Authorization = "Bearer sk-4", ["X-Mock-Delay-Ms"] = "300" }
            local slow = ngx.thread.spawn(drive.chat, port, '{"model":"gpt-4"}', h)
            ngx.sleep(0.1)
            local s2, _, b2 = drive.chat(port, '{"model":"gpt-4"}', { Authorization = "Bearer sk-4" })
            local _, s1 = ngx.thread.wait(slow)
            local s3 = drive.chat(port, '{"model":"gpt-4"}', { Authorization = "Bearer sk-4" })
            ngx.say(s1, " ", s2, " ", s3)
            ngx.say(b2)
        }
    }
--- request
GET /drive
--- response_body
200 429 200
{"error":{"message":"this API key has too many requests in flight","type":"rate_limit","code":"key_concurrency_limit"}}



=== TEST 5: key_tpm 60: charged after the response (57 tokens), the next request passes, then the window is spent
--- yaml
keys:
  - {key: sk-5, user_id: a}
limits: {key_tpm: 60}
--- more_headers
Authorization: Bearer sk-5
--- request eval
[("POST /v1/chat/completions\n{\"model\":\"gpt-4\"}") x 3]
--- error_code eval
[200, 200, 429]
--- response_body_like eval
[qr/"choices"/, qr/"choices"/, qr/"code":"key_token_limit"/]



=== TEST 6: the rate_limit script sees the limiter's status and the YAML's time zone
--- yaml
keys:
  - {key: sk-6, user_id: a}
limits: {global_rpm: 100, key_rpm: 10, time_zone: "+05:30"}
--- hooks
  rate_limit:
    script: |
      local h = math.floor((current_time.timestamp + 19800) / 3600) % 24
      return {allow = false, retry_after = 7, reason = json.encode({z = h == current_time.hour,
        g = rate_limit_status.global_remaining, k = rate_limit_status.key_remaining,
        c = rate_limit_status.concurrent_count, h = current_time.hour, w = current_time.weekday,
        t = current_time.timestamp, u = key_info.user_id})}
--- more_headers
Authorization: Bearer sk-6
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 429
--- response_headers
Retry-After: 7
--- response_body_like
^\{"error":\{"message":"\{(?=.*\\"g\\":\d+)(?=.*\\"z\\":true)(?=.*\\"k\\":9)(?=.*\\"c\\":1)(?=.*\\"u\\":\\"a\\").*","type":"rate_limit","code":"rate_limited_by_script"\}\}$



=== TEST 7: a script's deny gives its request back: key_rpm 1 still admits after a refusal
--- yaml
keys:
  - {key: sk-7, user_id: a}
limits: {key_rpm: 1}
--- hooks
  rate_limit:
    script: |
      if request.body.deny then return {allow = false} end
      return nil
--- more_headers
Authorization: Bearer sk-7
--- request eval
["POST /v1/chat/completions\n{\"deny\":true}", "POST /v1/chat/completions\n{}", "POST /v1/chat/completions\n{}"]
--- error_code eval
[429, 200, 429]
--- response_body_like eval
[qr/"code":"rate_limited_by_script"/, qr/"choices"/, qr/"code":"key_rate_limit"/]



=== TEST 8: a script's allow overrules the limiter; nil keeps its verdict
--- yaml
keys:
  - {key: sk-8, user_id: a}
limits: {key_rpm: 1}
--- hooks
  rate_limit:
    script: |
      if request.body.vip then return {allow = true} end
      return nil
--- more_headers
Authorization: Bearer sk-8
--- request eval
["POST /v1/chat/completions\n{}", "POST /v1/chat/completions\n{}", "POST /v1/chat/completions\n{\"vip\":true}"]
--- error_code eval
[200, 429, 200]



=== TEST 9: limits without the shared dict: the config does not load (503), said in the log
--- http_config
--- yaml
limits: {global_rpm: 3}
--- init_opts
{ limits_dict = "no_such_dict" }
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 503
--- error_log
limits: are set but there is no lua_shared_dict no_such_dict



=== TEST 10: refusals are counted by reason, as the gateway's llmproxy_rate_limited_total
--- request
GET /metrics
--- response_body_like eval
qr/llmproxy_rate_limited_total\{reason="global_rpm"\} [1-9]\d*\n(?s:.*)llmproxy_rate_limited_total\{reason="key_rpm"\} [1-9]\d*\n(?s:.*)llmproxy_rate_limited_total\{reason="key_tpm"\} [1-9]\d*\n(?s:.*)llmproxy_rate_limited_total\{reason="key_concurrency"\} [1-9]\d*\n(?s:.*)llmproxy_rate_limited_total\{reason="script"\} [1-9]\d*\n/



=== TEST 11: no time_zone: current_time is in the machine's local zone (TZ=Asia/Kolkata, UTC+05:30)
--- yaml
keys:
  - {key: sk-11, user_id: a}
--- hooks
  rate_limit:
    script: |
      local h = math.floor((current_time.timestamp + 19800) / 3600) % 24
      return {allow = false, reason = (h == current_time.hour) and "local" or ("hour " .. current_time.hour)}
--- more_headers
Authorization: Bearer sk-11
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 429
--- response_body_like
"message":"local"



=== TEST 12: key_rpm 2, spent (the next block raises it)
--- yaml
keys:
  - {key: sk-12, user_id: a}
limits: {key_rpm: 2}
--- more_headers
Authorization: Bearer sk-12
--- request eval
[("POST /v1/chat/completions\n{}") x 3]
--- error_code eval
[200, 200, 429]



=== TEST 13: raised to 100 by reload: the same key is admitted at once (ADR 041)
--- yaml
keys:
  - {key: sk-12, user_id: a}
limits: {key_rpm: 100}
--- more_headers
Authorization: Bearer sk-12
--- request eval
[("POST /v1/chat/completions\n{}") x 2]
--- error_code eval
[200, 200]



=== TEST 14: the core's shared limiter cases (conformance/limits.json) through the shared dict, its lock and engine's rule
--- http_config
    lua_shared_dict limits_cases 1m;
--- config
    location = /cases {
        content_by_lua_block {
            local cjson = require "cjson"
            local llmproxy = require "llmproxy"
            local limits = require "resty.llmproxy.limits"
            local dict = ngx.shared.limits_cases
            local f = assert(io.open("$TEST_NGINX_REPO/conformance/limits.json"))
            local cases = cjson.decode(f:read("*a"))
            f:close()
            local failed, steps = 0, 0
            local function check(at, what, got, want)
                if want ~= nil and want ~= cjson.null and got ~= want
                    and not (type(want) == "number" and type(got) == "number" and math.abs(got - want) < 0.01) then
                    failed = failed + 1
                    ngx.say("FAIL ", at, ": ", what, " ", tostring(got), " ~= ", tostring(want))
                end
            end
            for _, case in ipairs(cases) do
                dict:flush_all()
                local limiter = llmproxy.limiter(case.limits)
                local held = {}
                for i, step in ipairs(case.steps) do
                    steps = steps + 1
                    local at = case.name .. ": step " .. i
                    local id = step.key ~= cjson.null and step.key or nil
                    local now = step.at_ms / 1000
                    local op = step.op
                    if op == "acquire" or op == "force" then
                        local acq = assert(limits.acquire(dict, limiter, id, now, op == "force"))
                        if acq.took and id then
                            held[id] = held[id] or {}
                            table.insert(held[id], acq)
                        end
                        held.last = acq
                        local e = step.expect
                        if e then
                            local d = acq.denial
                            check(at, "denial", d and d.kind or cjson.null, e.denial or cjson.null)
                            check(at, "retry_after", d and d.retry_after, e.retry_after)
                            for _, k in ipairs({ "global_remaining", "key_remaining", "concurrent_count" }) do
                                check(at, k, acq.status[k], e[k])
                            end
                        end
                    elseif op == "refund" then
                        -- Give back the last request of this key (or without one).
                        local acq = id and table.remove(held[id]) or held.last
                        assert(limits.refund(dict, limiter, acq))
                    elseif op == "release" then
                        limits.release(dict, table.remove(held[id], 1))
                    elseif op == "charge" then
                        assert(limits.charge_tokens(dict, limiter, id, step.tokens, now))
                    elseif op == "limits" then
                        limiter = llmproxy.limiter(step.limits)
                    else
                        error(at .. ": unknown op " .. tostring(op))
                    end
                end
            end
            ngx.say(#cases, " cases, ", steps, " steps, ", failed, " failed")
        }
    }
--- request
GET /cases
--- response_body_like
^[1-9]\d* cases, \d+ steps, 0 failed$
--- no_error_log
[error]

