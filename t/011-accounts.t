# Keys, the standard checks and the auth script in nginx, on the config's
# `keys:`, as the standalone gateway answers them (proxy/tests/accounts.rs,
# docs/adr/028): 401/403/429 with the gateway's codes through
# error_handler (type auth_error), Bearer or x-api-key, the key never
# forwarded, every auth script verdict, and the failure policy (auth fails
# closed: the standard denial when there is one, else 503).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

my $keys = <<'YAML';
keys:
  - {key: sk-good, user_id: u-good, name: "测试用户", total_quota: 0}
  - {key: sk-off, user_id: u-off, status: disabled}
  - {key: sk-old, user_id: u-old, expires_at: "2020-01-01T00:00:00Z"}
  - {key: sk-far, user_id: u-far, allowed_ips: ["10.0.0.0/8", "2001:db8::/32"]}
  - {key: sk-near, user_id: u-near, allowed_ips: ["127.0.0.0/8"]}
  - {key: sk-spent, user_id: u-spent, total_quota: 100, used_quota: 100}
  - {key: sk-vip, user_id: u-vip, total_quota: 2000000}
  - {key: sk-std, user_id: u-std, total_quota: 100000}
  - {key: sk-free, user_id: u-free, total_quota: unlimited}
YAML

# Every block gets the keys (before its own `--- yaml`).
add_block_preprocessor(sub {
    my $block = shift;
    my $extra = exists $block->{yaml} ? $block->yaml : '';
    $block->set_value('yaml', $keys . $extra);
});
gateway_setup();

run_tests();

__DATA__

=== TEST 1: no key: 401 invalid_api_key, the gateway's body
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}
--- no_error_log
[error]



=== TEST 2: an unknown key: 401 invalid_api_key
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-nope
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}



=== TEST 3: a good key by Bearer: admitted; the key is not forwarded
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 200
--- response_headers
X-Seen-Authorization: -
X-Seen-Api-Key: -
--- no_error_log
[error]



=== TEST 4: a good key by x-api-key (trimmed): admitted; the key is not forwarded
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Api-Key:   sk-good  
--- error_code: 200
--- response_headers
X-Seen-Authorization: -
X-Seen-Api-Key: -
--- no_error_log
[error]



=== TEST 5: a backend's configured Authorization still goes upstream
--- backends
  - {name: a, url: "http://127.0.0.1:$TEST_NGINX_PORT_1", headers: {Authorization: "Bearer upstream-secret"}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 200
--- response_headers
X-Seen-Authorization: Bearer upstream-secret



=== TEST 6: standard check: sk-off -> 403 key_disabled
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-off
--- error_code: 403
--- response_body chomp
{"error":{"message":"API key is disabled","type":"auth_error","code":"key_disabled"}}
--- no_error_log
[error]



=== TEST 7: standard check: sk-old -> 403 key_expired
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-old
--- error_code: 403
--- response_body chomp
{"error":{"message":"API key has expired","type":"auth_error","code":"key_expired"}}
--- no_error_log
[error]



=== TEST 8: standard check: sk-far -> 403 ip_not_allowed
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-far
--- error_code: 403
--- response_body chomp
{"error":{"message":"client address is not allowed for this API key","type":"auth_error","code":"ip_not_allowed"}}
--- no_error_log
[error]



=== TEST 9: standard check: sk-spent -> 429 quota_exhausted
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-spent
--- error_code: 429
--- response_body chomp
{"error":{"message":"API key quota is exhausted","type":"auth_error","code":"quota_exhausted"}}
--- no_error_log
[error]



=== TEST 10: an allowed address passes (127.0.0.1 in 127.0.0.0/8)
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-near
--- error_code: 200
--- response_body_like
"model":"gpt-4"



=== TEST 11: standard denials of a caller without a usable key are the gateway's, not error_handler's (403)
--- hooks
  error_handler:
    script: |
      return {status_code = error.status_code, body = {t = error.type, m = error.message, s = error.status_code}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-off
--- error_code: 403
--- response_body chomp
{"error":{"message":"API key is disabled","type":"auth_error","code":"key_disabled"}}



=== TEST 12: standard denials of a caller without a usable key are the gateway's, not error_handler's (401)
--- hooks
  error_handler:
    script: |
      return {status_code = error.status_code, body = {t = error.type, m = error.message, s = error.status_code}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}



=== TEST 13: auth script (deny): allow lets an unknown key in when may_override lists unknown
--- hooks
  auth:
    on_error: deny
    may_override: [unknown]
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"allow"}
--- more_headers
Authorization: Bearer sk-nope
--- error_code: 200
--- response_body_like
"choices"



=== TEST 14: auth script (deny): allow cannot let a request without a key in (no may_override): 401
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"allow"}
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}



=== TEST 15: auth script (deny): deny with reason and status_code
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"deny"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 402
--- response_body chomp
{"error":{"message":"no u-good","type":"auth_error","code":"denied_by_script"}}



=== TEST 16: auth script (deny): deny without either: 403 access denied
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"deny_default"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 403
--- response_body chomp
{"error":{"message":"access denied","type":"auth_error","code":"denied_by_script"}}



=== TEST 17: auth script (deny): nil keeps the standard verdict (good key)
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 200
--- response_body_like
"choices"



=== TEST 18: auth script (deny): nil keeps the standard verdict (disabled key)
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{}
--- more_headers
Authorization: Bearer sk-off
--- error_code: 403
--- response_body chomp
{"error":{"message":"API key is disabled","type":"auth_error","code":"key_disabled"}}



=== TEST 19: auth script (deny): nil keeps the standard verdict (unknown key)
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{}
--- more_headers
Authorization: Bearer sk-nope
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}



=== TEST 20: auth script (deny): a failure with a good key: 503 hook_failed (fails closed)
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"boom"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 503
--- response_body chomp
{"error":{"message":"the request was refused: the auth hook failed (script_error)","type":"hook_error","code":"hook_failed"}}
--- error_log
refusing the request (on_error: deny)



=== TEST 21: auth script (deny): a failure with an unknown key: the standard 401 (still closed)
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"boom"}
--- more_headers
Authorization: Bearer sk-nope
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}
--- error_log
; using the standard verdict



=== TEST 22: auth script (standard): allow lets an unknown key in when may_override lists unknown
--- hooks
  auth:
    on_error: standard
    may_override: [unknown]
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"allow"}
--- more_headers
Authorization: Bearer sk-nope
--- error_code: 200
--- response_body_like
"choices"



=== TEST 23: auth script (standard): allow cannot let a request without a key in (no may_override): 401
--- hooks
  auth:
    on_error: standard
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"allow"}
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}



=== TEST 24: auth script (standard): deny with reason and status_code
--- hooks
  auth:
    on_error: standard
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"deny"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 402
--- response_body chomp
{"error":{"message":"no u-good","type":"auth_error","code":"denied_by_script"}}



=== TEST 25: auth script (standard): deny without either: 403 access denied
--- hooks
  auth:
    on_error: standard
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"deny_default"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 403
--- response_body chomp
{"error":{"message":"access denied","type":"auth_error","code":"denied_by_script"}}



=== TEST 26: auth script (standard): nil keeps the standard verdict (good key)
--- hooks
  auth:
    on_error: standard
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 200
--- response_body_like
"choices"



=== TEST 27: auth script (standard): nil keeps the standard verdict (disabled key)
--- hooks
  auth:
    on_error: standard
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{}
--- more_headers
Authorization: Bearer sk-off
--- error_code: 403
--- response_body chomp
{"error":{"message":"API key is disabled","type":"auth_error","code":"key_disabled"}}



=== TEST 28: auth script (standard): nil keeps the standard verdict (unknown key)
--- hooks
  auth:
    on_error: standard
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{}
--- more_headers
Authorization: Bearer sk-nope
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}



=== TEST 29: auth script (standard): a failure with a good key: the standard verdict admits
--- hooks
  auth:
    on_error: standard
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"boom"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 200
--- response_body_like
"choices"
--- error_log
using the standard verdict



=== TEST 30: auth script (standard): a failure with an unknown key: the standard 401
--- hooks
  auth:
    on_error: standard
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"boom"}
--- more_headers
Authorization: Bearer sk-nope
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}



=== TEST 31: the script sees key_info (record fields, live usage), the checks and request.user_id
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"echo"}
--- more_headers
Authorization: Bearer sk-spent
--- error_code: 403
--- response_body_like
^(?=.*\\"u\\":\\"u-spent\\")(?=.*\\"user_id\\":\\"u-spent\\")(?=.*\\"key\\":\\"sk-spent\\")(?=.*\\"used_quota\\":100)(?=.*\\"status\\":\\"active\\")(?=.*\\"quota_available\\":false)(?=.*\\"key_valid\\":true)(?=.*\\"ip_allowed\\":true)



=== TEST 32: an unknown key: no key_info (null), key_valid false
--- hooks
  auth:
    on_error: deny
    script: |
      local mode = request.body.mode
      if mode == "allow" then return {allow = true} end
      if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
      if mode == "deny_default" then return {allow = false} end
      if mode == "boom" then error("boom") end
      if mode == "echo" then
        return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
      end
      return nil
--- request
POST /v1/chat/completions
{"mode":"echo"}
--- more_headers
Authorization: Bearer sk-nope
--- error_code: 403
--- response_body_like
^(?!.*user_id)(?=.*\\"key_valid\\":false)(?=.*\\"ip_allowed\\":false)



=== TEST 33: the seed's auth script verbatim: gpt-4 needs total_quota >= 1000000
--- hooks
  auth: {script_file: $TEST_NGINX_REPO/examples/scripts/auth.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-std
--- error_code: 403
--- response_body_like
您的账户等级不支持 GPT-4 模型



=== TEST 33b: the seed's auth script verbatim: an unlimited key is the top tier (key_info.total_quota 2^53-1)
--- hooks
  auth: {script_file: $TEST_NGINX_REPO/examples/scripts/auth.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-free
--- error_code: 200
--- response_body_like
"model":"gpt-4"



=== TEST 33c: the seed's auth script verbatim: the old total_quota 0 reads as unlimited
--- hooks
  auth: {script_file: $TEST_NGINX_REPO/examples/scripts/auth.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 200
--- response_body_like
"model":"gpt-4"



=== TEST 34: the seed's auth script verbatim: gpt-3.5 for anyone with a key
--- hooks
  auth: {script_file: $TEST_NGINX_REPO/examples/scripts/auth.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-3.5"}
--- more_headers
Authorization: Bearer sk-good
--- error_code: 200
--- response_body_like
"model":"gpt-3.5"



=== TEST 35: the seed's auth script verbatim: a VIP key may use gpt-4
--- hooks
  auth: {script_file: $TEST_NGINX_REPO/examples/scripts/auth.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-vip
--- error_code: 200
--- response_body_like
"model":"gpt-4"



=== TEST 36: refusals are counted by reason, as the gateway's llmproxy_auth_denied_total
--- request
GET /metrics
--- response_body_like eval
qr/llmproxy_auth_denied_total\{reason="invalid_key"\} [1-9]\d*\n(?s:.*)llmproxy_auth_denied_total\{reason="disabled"\} [1-9]\d*\n(?s:.*)llmproxy_auth_denied_total\{reason="quota_exhausted"\} [1-9]\d*\n(?s:.*)llmproxy_auth_denied_total\{reason="script"\} [1-9]\d*\n(?s:.*)llmproxy_auth_denied_total\{reason="hook_failed"\} [1-9]\d*\n/
