# resty.llmproxy in nginx's phases: routing, request and response
# transforms, usage, retries and failure policies, against three mock
# backends (t/lib/llmproxy_mock.lua) on extra ports.
#
# Sections of this file (besides the harness's):
#   --- hooks        YAML under `scripts:` of the generated llmproxy.yaml
#   --- init_worker  replaces the default init_worker_by_lua_block body

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi-lib, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

my $backends_yaml = <<'YAML';
backends:
  - {name: standard,         url: "http://127.0.0.1:$TEST_NGINX_PORT_1", weight: 10}
  - {name: high-performance, url: "http://127.0.0.1:$TEST_NGINX_PORT_2", weight: 10}
  - {name: ultra,            url: "http://127.0.0.1:$TEST_NGINX_PORT_3", weight: 5}
YAML

# init_worker's opts.backends overrides the YAML's list (the same list here;
# the other test files use the YAML's, from engine:backends()).
my $init_worker = <<'LUA';
        require("resty.llmproxy").init_worker("$TEST_NGINX_SERVROOT/html/llmproxy.yaml", { backends = {
            { name = "standard", url = "http://127.0.0.1:$TEST_NGINX_PORT_1", weight = 10 },
            { name = "high-performance", url = "http://127.0.0.1:$TEST_NGINX_PORT_2", weight = 10 },
            { name = "ultra", url = "http://127.0.0.1:$TEST_NGINX_PORT_3", weight = 5 },
        } })
LUA

my $mocks = '';
for my $m (['standard', 1], ['high-performance', 2], ['ultra', 3]) {
    my ($name, $n) = @$m;
    $mocks .= <<"CONF";
    server {
        listen 127.0.0.1:\$TEST_NGINX_PORT_$n;
        location / { content_by_lua_block { require("llmproxy_mock").chat("$name") } }
    }
CONF
}

my $location = <<'CONF';
    location /v1/ {
        access_by_lua_block        { require("resty.llmproxy").access() }
        header_filter_by_lua_block { require("resty.llmproxy").header_filter() }
        body_filter_by_lua_block   { require("resty.llmproxy").body_filter() }
        log_by_lua_block           { require("resty.llmproxy").log() }
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Accept-Encoding "";
        proxy_pass http://llmproxy_backends;
    }
CONF

known_sections(qw(hooks init_worker));
add_block_preprocessor(sub {
    my $block = shift;
    my $init = $block->init_worker // $init_worker;
    my $extra = $block->http_config // '';
    $block->set_value('http_config', <<"CONF" . $mocks . $extra);
    upstream llmproxy_backends {
        server 0.0.0.1;   # never used: the balancer sets the peer
        balancer_by_lua_block { require("resty.llmproxy").balancer() }
        keepalive 8;
    }
    init_worker_by_lua_block {
$init
    }
CONF
    $block->set_value('config', $location) unless defined $block->config;
    unless (defined $block->user_files) {
        my $hooks = $block->hooks;
        my $scripts = defined $hooks && $hooks =~ /\S/ ? "scripts:\n$hooks" : "scripts: {}\n";
        $block->set_value('user_files', ">>> llmproxy.yaml\n$backends_yaml$scripts");
    }
});

run_tests();

__DATA__

=== TEST 1: the seed's routing script sends viplevel 3 to ultra; X-Request-ID goes both ways
--- hooks
  routing: {script_file: $TEST_NGINX_REPO/examples/scripts/routing.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"hi"}],"viplevel":3}
--- more_headers
X-Request-ID: test-req-1
--- response_headers
X-LLMProxy-Backend: ultra
X-Seen-Backend: ultra
X-Request-ID: test-req-1
X-Seen-Request-ID: test-req-1
X-Seen-Model: gpt-4
--- error_log eval
qr/llmproxy: engine \d+\.\d+\.\d+ loaded from \S+llmproxy.yaml \(3 backends; hooks: routing\)/
--- no_error_log
[error]
[warn]



=== TEST 2: viplevel 1 goes to high-performance
--- hooks
  routing: {script_file: $TEST_NGINX_REPO/examples/scripts/routing.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4","viplevel":1}
--- response_headers
X-LLMProxy-Backend: high-performance
X-Seen-Backend: high-performance
--- no_error_log
[error]



=== TEST 3: a body spooled to a temp file is routed too, and reaches the backend whole
--- http_config
    client_body_buffer_size 1k;
--- hooks
  routing: {script_file: $TEST_NGINX_REPO/examples/scripts/routing.lua}
--- request eval
"POST /v1/chat/completions\n" . '{"viplevel":3,"messages":[{"role":"user","content":"' . ("x" x 20000) . '"}]}'
--- response_headers
X-LLMProxy-Backend: ultra
X-Seen-Length: 20056
--- error_log
a client request body is buffered to a temporary file
--- no_error_log
[error]



=== TEST 4: the script sees title-cased headers, api_key, path and client_ip
--- hooks
  routing:
    script: |
      if request.api_key == "sk-test" and request.headers["X-Tier"] == "gold"
         and request.path == "/v1/chat/completions" and request.client_ip == "127.0.0.1" then
        return "ultra"
      end
      return "standard"
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-test
x-tier: gold
--- response_headers
X-LLMProxy-Backend: ultra
--- no_error_log
[error]



=== TEST 5: a failing routing script falls back to the default balancer
--- hooks
  routing:
    script: |
      error("routing exploded")
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- response_headers
X-LLMProxy-Backend: standard
--- error_log
routing hook failed for request
routing exploded
using the default balancer



=== TEST 6: a looping routing script times out; requests keep being served (round-robin)
--- hooks
  routing:
    timeout_ms: 50
    script: |
      while true do end
--- request eval
["POST /v1/chat/completions\n{\"model\":\"gpt-4\"}", "POST /v1/chat/completions\n{\"model\":\"gpt-4\"}"]
--- error_code eval
[200, 200]
--- response_body_like eval
[qr/"model":"gpt-4"/, qr/"model":"gpt-4"/]
--- error_log
timeout:
script exceeded its time limit of 50 ms
using the default balancer
--- no_error_log
[alert]
[crit]



=== TEST 7: a routing result that is not a backend is bad_output: default balancer
--- hooks
  routing:
    script: |
      return "nowhere"
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- response_headers
X-LLMProxy-Backend: standard
--- error_log
bad_output:
nowhere



=== TEST 8: a body that is not JSON is a 400 when a hook needs it
--- hooks
  routing: {script_file: $TEST_NGINX_REPO/examples/scripts/routing.lua}
--- request
POST /v1/chat/completions
{"model": oops
--- error_code: 400
--- response_headers
Content-Type: application/json
--- response_body_like
^\{"error":\{.*"code":"invalid_json".*\}\}$



=== TEST 9: no hooks: plain proxying over the default balancer
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- response_headers
X-LLMProxy-Backend: standard
--- response_body chomp
{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4","choices":[],"usage":{"prompt_tokens":15,"completion_tokens":42,"total_tokens":57}}
--- no_error_log
[error]
[warn]



=== TEST 10: the seed's request_transform maps the model and adds a header
--- hooks
  request_transform: {script_file: $TEST_NGINX_REPO/examples/scripts/request_transform.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[],"temperature":0.7}
--- response_headers
X-Seen-Model: llama-3-70b-instruct
X-Seen-Original-Model: gpt-4
X-Seen-Body: {"messages":[],"model":"llama-3-70b-instruct","temperature":0.7}
--- no_error_log
[error]



=== TEST 11: request_transform removes a header with false
--- hooks
  request_transform:
    script: |
      return {headers = {["X-Debug"] = false, ["X-Original-Model"] = "from-script"}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Debug: 1
--- response_headers
X-Seen-Debug: -
X-Seen-Original-Model: from-script
X-Seen-Model: gpt-4
--- no_error_log
[error]



=== TEST 12: a failing request_transform sends the request unchanged
--- hooks
  request_transform:
    script: |
      return {body = "not a table", headers = {["Bad Name"] = "x"}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- response_headers
X-Seen-Model: gpt-4
--- error_log
request_transform hook failed for request
sending the request unchanged



=== TEST 13: the seed's transforms both ways: the client sees gpt-4, arrays stay arrays
--- hooks
  request_transform: {script_file: $TEST_NGINX_REPO/examples/scripts/request_transform.lua}
  response_transform: {script_file: $TEST_NGINX_REPO/examples/scripts/response_transform.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}
--- response_headers
X-Seen-Model: llama-3-70b-instruct
Content-Type: application/json
--- response_body_like
^\{(?=.*"model":"gpt-4")(?=.*"choices":\[\])(?=.*"usage":\{)(?=.*"id":"chatcmpl-1").*\}$
--- no_error_log
[error]
already sent



=== TEST 14: a response_transform's status and header changes apply: the answer is read in a subrequest before its head goes out
--- hooks
  response_transform:
    script: |
      return {status_code = 299, body = {changed = true}, headers = {["X-Changed"] = "yes"}}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 299
--- response_headers
X-Changed: yes
Content-Length: 16
--- response_body chomp
{"changed":true}
--- no_error_log
[error]
already sent



=== TEST 15: a backend answer that is not JSON passes through untouched
--- hooks
  response_transform: {script_file: $TEST_NGINX_REPO/examples/scripts/response_transform.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Mock-Body: bad-json
--- response_body chomp
{not json
--- error_log
is not valid JSON; passed through



=== TEST 16: the seed's usage hook runs in the log phase
--- hooks
  routing: {script_file: $TEST_NGINX_REPO/examples/scripts/routing.lua}
  usage: {script_file: $TEST_NGINX_REPO/examples/scripts/usage.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4","viplevel":3}
--- response_headers
X-LLMProxy-Backend: ultra
X-Seen-Backend: ultra
--- error_log
llmproxy: usage of request
on 'ultra'
"billable_tokens":28
"discount":0.5
--- no_error_log
[error]



=== TEST 17: a backend that refuses connections is retried on another one
--- init_worker
        require("resty.llmproxy").init_worker("$TEST_NGINX_SERVROOT/html/llmproxy.yaml", { backends = {
            { name = "down", url = "http://127.0.0.1:1" },
            { name = "standard", url = "http://127.0.0.1:$TEST_NGINX_PORT_1" },
        } })
--- hooks
  routing:
    script: |
      return "down"
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- response_headers
X-LLMProxy-Backend: standard
X-Seen-Backend: standard
--- error_log
backend 'down' failed
retrying on 'standard'



=== TEST 18: a backend's upstream headers are sent, and never to another backend on retry
--- init_worker
        require("resty.llmproxy").init_worker("$TEST_NGINX_SERVROOT/html/llmproxy.yaml", { backends = {
            { name = "down", url = "http://127.0.0.1:1", headers = { Authorization = "Bearer upstream-key" } },
            { name = "standard", url = "http://127.0.0.1:$TEST_NGINX_PORT_1" },
        } })
--- hooks
  routing:
    script: |
      return "down"
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 502
--- error_log
connect() failed (111: Connection refused)
--- no_error_log
retrying on



=== TEST 19: calling a phase function in the wrong phase is a clear error
--- config
    location = /t {
        content_by_lua_block { require("resty.llmproxy").access() }
    }
--- request
GET /t
--- error_code: 500
--- error_log
resty.llmproxy.access() must be called from access_by_lua*, not in the content phase



=== TEST 20: every phase function refuses every other phase by name
--- config
    location = /t {
        content_by_lua_block {
            local m = require "resty.llmproxy"
            for _, fn in ipairs({ "init_worker", "reload", "access", "balancer", "header_filter", "body_filter", "log" }) do
                local ok, err = pcall(m[fn])
                ngx.say(ok, " ", (tostring(err):match("resty%.llmproxy%..*")))
            end
        }
        log_by_lua_block {
            local ok, err = pcall(require("resty.llmproxy").metrics)
            ngx.log(ngx.WARN, "metrics in log: ", ok, " ", (tostring(err):match("resty%.llmproxy%..*")))
        }
    }
--- request
GET /t
--- response_body
false resty.llmproxy.init_worker() must be called from init_worker_by_lua*, not in the content phase
false resty.llmproxy.reload() must be called from an ngx.timer callback, not in the content phase
false resty.llmproxy.access() must be called from access_by_lua*, not in the content phase
false resty.llmproxy.balancer() must be called from balancer_by_lua*, not in the content phase
false resty.llmproxy.header_filter() must be called from header_filter_by_lua*, not in the content phase
false resty.llmproxy.body_filter() must be called from body_filter_by_lua*, not in the content phase
false resty.llmproxy.log() must be called from log_by_lua*, not in the content phase
--- error_log
metrics in log: false resty.llmproxy.metrics() must be called from content_by_lua*, not in the log phase



=== TEST 21: reload() with a config that does not build keeps the working engine
--- hooks
  routing: {script_file: $TEST_NGINX_REPO/examples/scripts/routing.lua}
--- config
    location = /t {
        content_by_lua_block {
            local m = require "resty.llmproxy"
            local done = false
            assert(ngx.timer.at(0, function()
                local ok, err = m.reload("$TEST_NGINX_SERVROOT/html/missing.yaml")
                ngx.log(ngx.WARN, "reload returned ", tostring(ok))
                done = true
            end))
            while not done do ngx.sleep(0.01) end
            local status = m.status()
            ngx.say(status.hooks, "; ", table.concat(status.backends, ","))
        }
    }
--- request
GET /t
--- response_body
routing; standard,high-performance,ultra
--- error_log
reload returned nil
keeping the engine loaded from



=== TEST 22: a config that does not build: logged, and requests get 503
--- user_files
>>> llmproxy.yaml
scripts:
  routing:
    script: "return ("
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 503
--- response_body_like
"code":"engine_unavailable"
--- error_log
llmproxy: cannot build the engine from
no engine: requests get 503



=== TEST 23: backends nginx cannot reach (host names) are unusable: 503 with a warning
--- init_worker
        require("resty.llmproxy").init_worker("$TEST_NGINX_SERVROOT/html/llmproxy.yaml", { backends = {
            { name = "standard", url = "http://standard-backend:8000" },
        } })
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 503
--- response_body chomp
{"error":{"message":"no backend is available","type":"backend_error","code":"no_backend"}}
--- error_log
host 'standard-backend' is not an IP address



=== TEST 24: headers the client's Connection header names, and Proxy-*, stay on the client's hop
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Connection: close, X-Debug
X-Debug: secret
Proxy-Authorization: Basic c2VjcmV0
--- error_code: 200
--- response_headers
X-Seen-Debug: -
X-Seen-Proxy-Authorization: -
--- no_error_log
[error]



=== TEST 25: without a Connection header naming it, the same header goes upstream
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
X-Debug: visible
--- error_code: 200
--- response_headers
X-Seen-Debug: visible
--- no_error_log
[error]


=== TEST 26: a header value that is not UTF-8 (HTTP allows it) reaches scripts as U+FFFD, as in the gateway
--- hooks
  routing:
    script: |
      if request.headers["X-Latin"] == "caf\239\191\189, ok" then
        return "ultra"
      end
      return "standard"
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
x-latin: café
x-latin: ok
--- error_code: 200
--- response_headers
X-LLMProxy-Backend: ultra
--- no_error_log
[error]
