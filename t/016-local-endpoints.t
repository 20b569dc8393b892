# The endpoints the gateway answers itself, answered by nginx the same way
# on the same YAML: `GET /v1/models` (core's list: gateway.models, else the
# backend names; no auth, no backend) and `GET /healthz`.

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

=== TEST 1: GET /v1/models through access(): gateway.models, without a key even when keys are configured
--- yaml
gateway: {models: [gpt-4, gpt-4o-mini]}
keys:
  - {key: sk-m1, user_id: models-user}
--- request
GET /v1/models
--- response_body chomp
{"object":"list","data":[{"id":"gpt-4","object":"model","created":0,"owned_by":"llmproxy"},{"id":"gpt-4o-mini","object":"model","created":0,"owned_by":"llmproxy"}]}
--- response_headers
Content-Type: application/json
!X-Backend
--- no_error_log
[error]



=== TEST 2: without gateway.models, the backend names; models() in a location of its own
--- config
    location = /v1/models {
        content_by_lua_block { require("resty.llmproxy").models() }
    }
--- request
GET /v1/models
--- response_body chomp
{"object":"list","data":[{"id":"standard","object":"model","created":0,"owned_by":"llmproxy"},{"id":"high-performance","object":"model","created":0,"owned_by":"llmproxy"},{"id":"ultra","object":"model","created":0,"owned_by":"llmproxy"}]}



=== TEST 3: another method on /v1/models is relayed, as in the gateway (passthrough): the mock answers
--- request
POST /v1/models
{}
--- response_body_like
"id":"chatcmpl-



=== TEST 4: GET /healthz: 200 {"status":"ok"}, as the gateway's
--- request
GET /healthz
--- response_body chomp
{"status":"ok"}
--- response_headers
Content-Type: application/json



=== TEST 5: no engine (a config that does not build): /healthz and /v1/models are 503 engine_unavailable
--- user_files
>>> llmproxy.yaml
backends: 42
--- request eval
["GET /healthz", "GET /v1/models"]
--- error_code eval
[503, 503]
--- response_body_like eval
[qr/"code":"engine_unavailable"/, qr/"code":"engine_unavailable"/]
