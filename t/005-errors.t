# Errors through nginx: every failure of a request goes through
# error_handler, and without one (or when it returns nil) the response is
# the standalone gateway's: its `{"error":{"message","type","code"}}` body
# for failures the gateway finds itself (a body that is not JSON or too
# large, no backend, a backend that cannot be reached or times out), the
# backend's own answer when it sent one. Also the auth and rate_limit
# stages, and hooks failing under on_error: deny.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

gateway_setup();
run_tests();

__DATA__

=== TEST 1: a body that is not JSON: 400 invalid_json, the gateway's body (no error_handler)
--- request
POST /v1/chat/completions
{"model": oops
--- more_headers
X-Request-ID: err-1
--- error_code: 400
--- response_headers
Content-Type: application/json
X-Request-ID: err-1
!X-LLMProxy-Backend
--- response_body chomp
{"error":{"message":"the request body is not valid JSON: invalid JSON: expected value at line 1 column 11","type":"bad_request","code":"invalid_json"}}
--- no_error_log
[error]



=== TEST 2: a JSON body that is not an object: 400 invalid_body; an empty body: invalid_json
--- request eval
["POST /v1/chat/completions\n[1, 2]", "POST /v1/embeddings\n"]
--- error_code eval
[400, 400]
--- response_body eval
['{"error":{"message":"the request body must be a JSON object","type":"bad_request","code":"invalid_body"}}',
 '{"error":{"message":"the request body is not valid JSON: invalid JSON: EOF while parsing a value at line 1 column 0","type":"bad_request","code":"invalid_json"}}']



=== TEST 3: the seed's error_handler shapes a bad request (type bad_request, request id)
--- hooks
  error_handler: {script_file: $TEST_NGINX_REPO/examples/scripts/error_handler.lua}
--- request
POST /v1/chat/completions
{"model": oops
--- more_headers
X-Request-ID: err-3
--- error_code: 400
--- response_headers
Content-Type: application/json
--- response_body chomp
{"error":{"message":"未知错误","request_id":"err-3","type":"bad_request"}}
--- no_error_log
[error]



=== TEST 4: over gateway.max_body_bytes: 413 body_too_large from access(), error_handler sees it
--- yaml
gateway: {max_body_bytes: 1024}
--- hooks
  error_handler:
    script: |
      return {status_code = error.status_code, body = {t = error.type, m = error.message}}
--- request eval
"POST /v1/chat/completions\n" . '{"model":"gpt-4","messages":[{"role":"user","content":"' . ("x" x 2000) . '"}]}'
--- error_code: 413
--- response_body chomp
{"m":"the request body is larger than 1024 bytes","t":"bad_request"}



=== TEST 5: over client_max_body_size: nginx's own 413 page becomes the gateway's JSON error
--- location
        client_max_body_size 100;
--- request eval
"POST /v1/chat/completions\n" . '{"model":"gpt-4","messages":[{"role":"user","content":"' . ("x" x 200) . '"}]}'
--- error_code: 413
--- response_headers
Content-Type: application/json
--- response_body chomp
{"error":{"message":"the request body is too large","type":"bad_request","code":"body_too_large"}}



=== TEST 6: a backend that refuses connections: 502 backend_unreachable, after the retries
--- backends
  - {name: down1, url: "http://127.0.0.1:1"}
  - {name: down2, url: "http://127.0.0.1:2"}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 502
--- response_headers
Content-Type: application/json
X-LLMProxy-Backend: down2
--- response_body chomp
{"error":{"message":"cannot connect to the backend: down2 (http://127.0.0.1:2)","type":"backend_error","code":"backend_unreachable"}}
--- error_log
backend 'down1' failed
retrying on 'down2'



=== TEST 7: the seed's error_handler on a backend error: its message, status kept
--- backends
  - {name: down, url: "http://127.0.0.1:1"}
--- hooks
  error_handler: {script_file: $TEST_NGINX_REPO/examples/scripts/error_handler.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Request-ID: err-7
--- error_code: 502
--- response_body chomp
{"error":{"message":"后端服务异常","request_id":"err-7","type":"backend_error"}}
--- no_error_log
hook failed



=== TEST 8: every backend answers 503 (proxy_next_upstream exhausted): the last answer passes by default
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Status: 503
--- error_code: 503
--- response_headers
X-LLMProxy-Backend: ultra
--- response_body chomp
{"error":{"message":"mock error 503","type":"server_error","code":"503"}}
--- error_log
backend 'standard' failed (failed 503); retrying on 'high-performance'
backend 'high-performance' failed (failed 503); retrying on 'ultra'



=== TEST 9: ... and error_handler sees backend_error, the last backend's URL and the retry count
--- hooks
  error_handler:
    script: |
      return {status_code = 599, headers = {["X-Error-Type"] = error.type},
              body = {url = error.backend_url, retries = error.retry_count, status = error.status_code}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Status: 503
--- error_code: 599
--- response_headers
Content-Type: application/json
X-Error-Type: backend_error
--- response_body chomp
{"retries":2,"status":503,"url":"http://127.0.0.1:$TEST_NGINX_PORT_3"}



=== TEST 10: a slow backend: 504 timeout from gateway.timeouts (set per try by the balancer)
--- yaml
gateway:
  retry: {max_retries: 0}
  timeouts: {first_byte_ms: 200, idle_ms: 200}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Delay-Ms: 1000
--- error_code: 504
--- response_body chomp
{"error":{"message":"the backend timed out (first byte)","type":"timeout","code":"backend_timeout"}}
--- error_log
upstream timed out



=== TEST 11: ... and the seed's error_handler turns it into its timeout message
--- yaml
gateway:
  retry: {max_retries: 0}
  timeouts: {first_byte_ms: 200, idle_ms: 200}
--- hooks
  error_handler: {script_file: $TEST_NGINX_REPO/examples/scripts/error_handler.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Delay-Ms: 1000
X-Request-ID: err-11
--- error_code: 504
--- response_body chomp
{"error":{"message":"请求超时","request_id":"err-11","type":"timeout"}}



=== TEST 12: an upstream 429 is rate_limit for error_handler; nil keeps the backend's answer
--- hooks
  error_handler:
    script: |
      if error.type == "rate_limit" then
        return {status_code = 429, body = {slow_down = true}, headers = {["Retry-After"] = "7"}}
      end
      return nil
--- request eval
["POST /v1/chat/completions\n{\"model\":\"gpt-4\"}", "POST /v1/chat/completions\n{\"model\":\"gpt-4\"}"]
--- more_headers
X-Mock-Status: 429
--- error_code eval
[429, 429]
--- response_body eval
['{"slow_down":true}', '{"slow_down":true}']



=== TEST 13: an upstream 400 (bad_request) with error_handler returning nil passes through
--- hooks
  error_handler:
    script: |
      if error.type == "bad_request" then return nil end
      return {status_code = 500, body = {wrong = true}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Status: 400
--- error_code: 400
--- response_body chomp
{"error":{"message":"mock error 400","type":"invalid_request_error","code":"400"}}



=== TEST 14: a failing error_handler falls back to the default error (on_error: standard)
--- hooks
  error_handler:
    script: |
      return request.missing.field -- error() is not callable here: `error` is the hook's input
--- request
POST /v1/chat/completions
{"model": oops
--- error_code: 400
--- response_body_like
^\{"error":\{"message":"the request body is not valid JSON: .*","type":"bad_request","code":"invalid_json"\}\}$
--- error_log
error_handler hook failed for request
attempt to index field 'missing' 
sending the default error



=== TEST 15: a failing error_handler under on_error: deny refuses with 503 hook_failed
--- hooks
  error_handler:
    on_error: deny
    script: |
      return request.missing.field -- error() is not callable here: `error` is the hook's input
--- request
POST /v1/chat/completions
{"model": oops
--- error_code: 503
--- response_body chomp
{"error":{"message":"the request was refused: the error_handler hook failed (script_error)","type":"hook_error","code":"hook_failed"}}



=== TEST 16: a failing routing script under on_error: deny: 503 hook_failed, not shaped by error_handler
--- hooks
  routing:
    on_error: deny
    timeout_ms: 20
    script: |
      while true do end
  error_handler:
    script: |
      return {status_code = 200, body = {never = true}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 503
--- response_body chomp
{"error":{"message":"the request was refused: the routing hook failed (timeout)","type":"hook_error","code":"hook_failed"}}
--- error_log
refusing the request (on_error: deny)



=== TEST 17: auth: the seed's auth script denies gpt-4 to a small key (403 through error_handler)
--- yaml
keys:
  - {key: sk-small, user_id: u1, total_quota: 1000}
  - {key: sk-vip, user_id: u2, total_quota: 5000000}
--- hooks
  auth: {script_file: $TEST_NGINX_REPO/examples/scripts/auth.lua}
  error_handler:
    script: |
      return {status_code = error.status_code, body = {t = error.type, m = error.message}}
--- request eval
["POST /v1/chat/completions\n{\"model\":\"gpt-4\"}",
 "POST /v1/chat/completions\n{\"model\":\"gpt-3.5\"}"]
--- more_headers
Authorization: Bearer sk-small
--- error_code eval
[403, 200]
--- response_body eval
['{"m":"您的账户等级不支持 GPT-4 模型","t":"auth_error"}', qr/"model":"gpt-3.5"/]
--- error_log
auth verdict: deny
auth verdict: allow



=== TEST 18: auth: a VIP key may use gpt-4
--- yaml
keys:
  - {key: sk-vip, user_id: u2, total_quota: 5000000}
--- hooks
  auth: {script_file: $TEST_NGINX_REPO/examples/scripts/auth.lua}
--- request eval
["POST /v1/chat/completions\n{\"model\":\"gpt-4\"}", "POST /v1/chat/completions\n{\"model\":\"gpt-4\"}"]
--- more_headers
Authorization: Bearer sk-vip
--- error_code eval
[200, 200]
--- response_body_like eval
[qr/"model":"gpt-4"/, qr/"model":"gpt-4"/]



=== TEST 19: auth: no key: the seed script indexes a null key_info and auth fails closed with the standard 401
--- yaml
keys:
  - {key: sk-vip, user_id: u2, total_quota: 5000000}
--- hooks
  auth: {script_file: $TEST_NGINX_REPO/examples/scripts/auth.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}
--- error_log
auth hook failed for request
; using the standard verdict



=== TEST 20: auth: a valid key and a failing auth script (on_error: deny): 503 hook_failed, not shaped
--- yaml
keys:
  - {key: sk-vip, user_id: u2, total_quota: 5000000}
--- hooks
  auth:
    script: |
      error("boom")
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-vip
--- error_code: 503
--- response_body chomp
{"error":{"message":"the request was refused: the auth hook failed (script_error)","type":"hook_error","code":"hook_failed"}}
--- error_log
refusing the request (on_error: deny)



=== TEST 21: rate_limit: a script denial is 429 with Retry-After, through error_handler
--- hooks
  rate_limit:
    script: |
      if rate_limit_status.key_remaining > 1000 and current_time.weekday >= 1 then
        return {allow = false, reason = "slow down", retry_after = 12.5}
      end
      return nil
  error_handler:
    script: |
      return {status_code = error.status_code, body = {t = error.type, m = error.message}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 429
--- response_headers
Retry-After: 13
--- response_body chomp
{"m":"slow down","t":"rate_limit"}



=== TEST 22: no engine: 503 engine_unavailable (nothing can run error_handler)
--- user_files
>>> llmproxy.yaml
scripts:
  routing:
    script: "return ("
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 503
--- response_body chomp
{"error":{"message":"the gateway has no engine loaded","type":"backend_error","code":"engine_unavailable"}}



=== TEST 23: a failing response_transform under on_error: deny: 503 hook_failed (the head waits for the transform)
--- hooks
  response_transform:
    on_error: deny
    script: |
      return request.missing.x
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 503
--- response_headers
Content-Type: application/json
--- response_body chomp
{"error":{"message":"the request was refused: the response_transform hook failed (script_error)","type":"hook_error","code":"hook_failed"}}
--- error_log
stopping the response (on_error: deny)



=== TEST 24: other paths are relayed as they are: routed (body null), no transforms (GET /v1/models is answered locally: t/016)
--- hooks
  routing:
    script: |
      if request.body == json.null and request.path == "/v1/files" then return "ultra" end
      return "standard"
  response_transform:
    script: |
      return {body = {transformed = true}}
--- request
GET /v1/files
--- response_headers
X-LLMProxy-Backend: ultra
--- response_body chomp
{"id":"chatcmpl-1","object":"chat.completion","model":"unknown","choices":[],"usage":{"prompt_tokens":15,"completion_tokens":42,"total_tokens":57}}
--- no_error_log
[error]



=== TEST 25: ... and a body that is not JSON is no error there
--- hooks
  routing:
    script: |
      if request.body == json.null then return "high-performance" end
      return "standard"
--- request
POST /v1/files
not json at all
--- response_headers
X-LLMProxy-Backend: high-performance
X-Seen-Body: not json at all
--- no_error_log
[error]



=== TEST 26: error_handler on a body that is not JSON sees the request's headers, path and key, body null
--- hooks
  error_handler:
    script: |
      return {status_code = error.status_code, body = {
        tier = request.headers["X-Tier"], key = request.api_key, path = request.path,
        null_body = request.body == json.null, id = request.id}}
--- request
POST /v1/chat/completions
{"model": oops
--- more_headers
X-Tier: gold
Authorization: Bearer sk-1
X-Request-ID: err-26
--- error_code: 400
--- response_body chomp
{"id":"err-26","key":"sk-1","null_body":true,"path":"/v1/chat/completions","tier":"gold"}



=== TEST 27: "stream" and its options must have their OpenAI types: 400 invalid_field, nothing sent upstream
--- request eval
["POST /v1/chat/completions\n{\"model\":\"gpt-4\",\"stream\":\"true\"}",
 "POST /v1/chat/completions\n{\"model\":\"gpt-4\",\"stream\":1}",
 "POST /v1/completions\n{\"model\":\"gpt-4\",\"stream\":true,\"stream_options\":{\"include_usage\":\"yes\"}}",
 "POST /v1/chat/completions\n{\"model\":4}"]
--- error_code eval
[400, 400, 400, 400]
--- response_headers
Content-Type: application/json
!X-LLMProxy-Backend
--- response_body eval
['{"error":{"message":"invalid request: \'stream\' must be a boolean, got string","type":"bad_request","code":"invalid_field"}}',
 '{"error":{"message":"invalid request: \'stream\' must be a boolean, got number","type":"bad_request","code":"invalid_field"}}',
 '{"error":{"message":"invalid request: \'stream_options.include_usage\' must be a boolean, got string","type":"bad_request","code":"invalid_field"}}',
 '{"error":{"message":"invalid request: \'model\' must be a string, got number","type":"bad_request","code":"invalid_field"}}']
--- no_error_log
[error]



=== TEST 28: a backend's 500 reaches response_transform (issue 14, point 2): it normalises the error message
--- hooks
  response_transform:
    script: |
      if response.status_code >= 400 then
        return {body = {error = {message = "normalised: " .. tostring(response.body.error.message) .. " (" .. response.status_code .. ")"}}}
      end
      return nil
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Status: 500
--- error_code: 500
--- response_headers
Content-Type: application/json
--- response_body chomp
{"error":{"message":"normalised: mock error 500 (500)"}}
--- no_error_log
[error]
changed the status or headers



=== TEST 29: error_handler runs first: when it returns nil (a 400), response_transform sees the backend's answer
--- hooks
  error_handler:
    script: |
      if error.status_code == 500 then
        return {status_code = 502, body = {error = {message = "handled"}}}
      end
      return nil
  response_transform:
    script: |
      if response.status_code >= 400 then
        return {body = {error = {message = "normalised: " .. tostring(response.body.error.message)}}}
      end
      return nil
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Status: 400
--- error_code: 400
--- response_body chomp
{"error":{"message":"normalised: mock error 400"}}
--- no_error_log
[error]



=== TEST 30: ... and when it replaces the answer (a 500), response_transform never sees its body
--- hooks
  error_handler:
    script: |
      if error.status_code == 500 then
        return {status_code = 502, body = {error = {message = "handled"}}}
      end
      return nil
  response_transform:
    script: |
      if response.status_code >= 400 then
        return {body = {error = {message = "normalised: " .. tostring(response.body.error.message)}}}
      end
      return nil
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Status: 500
--- error_code: 502
--- response_body chomp
{"error":{"message":"handled"}}
--- no_error_log
[error]



=== TEST 31: a failure the gateway finds itself (no backend reachable) never reaches response_transform
--- backends
  - {name: down, url: "http://127.0.0.1:1"}
--- hooks
  response_transform:
    script: |
      return {body = {transformed = true}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 502
--- response_body_like
^\{"error":\{"message":"cannot connect to the backend: down \(http://127.0.0.1:1\)","type":"backend_error","code":"backend_unreachable"\}\}$



=== TEST 32: error_handler shapes only an identified caller's failures: no key: the gateway's 401
--- yaml
keys:
  - {key: sk-good, user_id: g}
--- hooks
  error_handler:
    script: |
      return {status_code = error.status_code, body = {shaped = error.type}}
--- request
POST /v1/chat/completions
{"model":"m"}
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}



=== TEST 33: ... a disabled key: the gateway's 403, also when an auth script denies it
--- yaml
keys:
  - {key: sk-off, user_id: o, status: disabled}
--- hooks
  auth:
    script: |
      return {allow = false, reason = "not you"}
  error_handler:
    script: |
      return {status_code = error.status_code, body = {shaped = error.type}}
--- request
POST /v1/chat/completions
{"model":"m"}
--- more_headers
Authorization: Bearer sk-off
--- error_code: 403
--- response_body chomp
{"error":{"message":"not you","type":"auth_error","code":"denied_by_script"}}



=== TEST 34: ... an unknown key's bad body (read before the auth script runs): the gateway's 400
--- yaml
keys:
  - {key: sk-good, user_id: g}
--- hooks
  auth:
    script: |
      return nil
  error_handler:
    script: |
      return {status_code = error.status_code, body = {shaped = error.type}}
--- request
POST /v1/chat/completions
{"model": oops
--- more_headers
Authorization: Bearer sk-unknown
--- error_code: 400
--- response_body_like: "code":"invalid_json"



=== TEST 35: ... an identified caller: its bad body, a script's denial and an exhausted quota are shaped
--- yaml
keys:
  - {key: sk-good, user_id: g, total_quota: 10, used_quota: 10}
--- hooks
  auth:
    script: |
      if request.body.model == "deny" then return {allow = false} end
      return nil
  error_handler:
    script: |
      return {status_code = error.status_code, body = {shaped = error.type}}
--- request eval
["POST /v1/chat/completions\n{\"model\": oops", "POST /v1/chat/completions\n{\"model\":\"deny\"}", "POST /v1/chat/completions\n{\"model\":\"m\"}"]
--- more_headers
Authorization: Bearer sk-good
--- error_code eval
[400, 403, 429]
--- response_body eval
['{"shaped":"bad_request"}', '{"shaped":"auth_error"}', '{"shaped":"auth_error"}']



=== TEST 36: an answer past gateway.max_response_bytes sent without a Content-Length, read whole in a subrequest (response_transform configured): 502 response_too_large, as in the gateway
--- yaml
gateway: {max_response_bytes: 100, retry: {max_retries: 0}}
--- hooks
  response_transform:
    script: |
      return {body = {transformed = true}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Message: 1
--- error_code: 502
--- response_body chomp
{"error":{"message":"the backend response is too large","type":"backend_error","code":"response_too_large"}}
--- no_error_log
[error]



=== TEST 37: the same answer without response_transform: its status has left when it grows past the bound, so it passes through unread, with a warning
--- yaml
gateway: {max_response_bytes: 100, retry: {max_retries: 0}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Message: 1
--- error_code: 200
--- response_body_like
^\{"id":"chatcmpl-1".*"total_tokens":57\}\}$
--- error_log
passed through without response_transform or usage



=== TEST 38: a backend that closes the connection halfway through an answer read in a subrequest: 502 backend_failed through error_handler
--- yaml
gateway: {retry: {max_retries: 0}}
--- hooks
  response_transform:
    script: |
      return {body = {transformed = true}}
  error_handler:
    script: |
      return {status_code = error.status_code, body = {seen = error.type, m = error.message}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Break: 1
--- error_code: 502
--- response_body chomp
{"m":"the backend connection failed: the answer was cut short","seen":"backend_error"}



=== TEST 39: error_handler alone runs when a backend's error answer's head arrives (no subrequest): it sees "the backend answered N", not the answer's own message (openresty/README.md, Errors)
--- yaml
gateway: {retry: {max_retries: 0}}
--- hooks
  error_handler:
    script: |
      return {status_code = 418, body = {seen = error.message}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Status: 500
--- error_code: 418
--- response_body chomp
{"seen":"the backend answered 500"}



=== TEST 40: first_byte_ms below idle_ms: a whole answer's head is bounded by first_byte_ms (504), a stream's by the larger of the two (nginx has one read timeout: openresty/README.md, Not yet)
--- yaml
gateway:
  retry: {max_retries: 0}
  timeouts: {first_byte_ms: 300, idle_ms: 3000}
--- request eval
["POST /v1/chat/completions\n{\"model\":\"gpt-4\"}",
 "POST /v1/chat/completions\n{\"model\":\"gpt-4\",\"stream\":true}"]
--- more_headers
X-Mock-Delay-Ms: 800
--- error_code eval
[504, 200]
--- response_body_like eval
['"code":"backend_timeout"', 'data: \[DONE\]']
