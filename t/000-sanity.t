# The harness itself (t/lib/Test/LLMProxy/Nginx.pm): every section it
# understands, on plain lua-nginx-module code (no llmproxy.so needed).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;

run_tests();

__DATA__

=== TEST 1: content_by_lua_block echo
--- config
    location = /t {
        content_by_lua_block {
            ngx.say("hello, ", ngx.var.arg_name or "world")
        }
    }
--- request
GET /t?name=nginx
--- response_body
hello, nginx
--- no_error_log
[error]



=== TEST 2: error_code and response_headers (set, absent)
--- config
    location = /t {
        content_by_lua_block {
            ngx.status = 418
            ngx.header["X-Test"] = "teapot"
            ngx.header.content_type = "application/json"
            ngx.print('{"ok":false}')
        }
    }
--- request
GET /t
--- error_code: 418
--- response_headers
X-Test: teapot
Content-Type: application/json
!X-Absent
--- response_body chomp
{"ok":false}



=== TEST 3: error_log sees an ngx.ERR line of this block
--- config
    location = /t {
        content_by_lua_block {
            ngx.log(ngx.ERR, "sanity marker 3: something went wrong")
            ngx.say("logged")
        }
    }
--- request
GET /t
--- response_body
logged
--- error_log
sanity marker 3: something went wrong
[error]



=== TEST 4: log offsets: the previous block's lines are not seen here
--- config
    location = /t {
        content_by_lua_block { ngx.say("quiet") }
    }
--- request
GET /t
--- response_body
quiet
--- no_error_log
sanity marker 3
[error]



=== TEST 5: more_headers reach the server
--- config
    location = /t {
        content_by_lua_block {
            local h = ngx.req.get_headers()
            ngx.say(h["X-Request-ID"], " ", h["x-custom"], " ", h["user-agent"])
        }
    }
--- request
GET /t
--- more_headers
X-Request-ID: req-42
X-Custom: yes
User-Agent: llmproxy-tests
--- response_body
req-42 yes llmproxy-tests



=== TEST 6: POST body, exact bytes and Content-Length
--- config
    location = /v1/chat/completions {
        content_by_lua_block {
            ngx.req.read_body()
            local body = ngx.req.get_body_data()
            ngx.header["X-Length"] = ngx.var.http_content_length
            ngx.print(ngx.req.get_method(), " ", body)
        }
    }
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"hi"}],"viplevel":3}
--- response_headers
X-Length: 74
--- response_body chomp
POST {"model":"gpt-4","messages":[{"role":"user","content":"hi"}],"viplevel":3}



=== TEST 7: a large body is spooled under the servroot's temp dir
--- config
    client_body_buffer_size 1k;
    location = /t {
        content_by_lua_block {
            ngx.req.read_body()
            local file = ngx.req.get_body_file()
            local f = assert(io.open(file, "rb"))
            local data = f:read("*a")
            f:close()
            ngx.say(ngx.req.get_body_data() == nil, " ", #data, " ",
                    file:find("$TEST_NGINX_SERVROOT/temp/client_body/", 1, true) == 1)
        }
    }
--- request eval
"POST /t\n" . ("x" x 10000)
--- response_body
true 10000 true



=== TEST 8: init_worker runs again in the fresh workers of each block
--- http_config
    init_worker_by_lua_block {
        ngx.log(ngx.NOTICE, "sanity init_worker ", ngx.worker.id(), " of ", ngx.worker.count())
    }
--- config
    location = /t {
        content_by_lua_block { ngx.say(ngx.worker.count()) }
    }
--- request
GET /t
--- response_body
1
--- error_log
sanity init_worker 0 of 1



=== TEST 9: main_config, $TEST_NGINX_* variables, response_body_like
--- main_config
    env LLMPROXY_SANITY;
--- config
    location = /t {
        content_by_lua_block {
            ngx.say("port=", ngx.var.server_port, " addr=", ngx.var.server_addr)
        }
    }
--- request
GET /t
--- response_body
port=$TEST_NGINX_SERVER_PORT addr=127.0.0.1
--- response_body_like
^port=\d+ addr=127\.0\.0\.1$



=== TEST 10: chunked responses are decoded
--- config
    location = /t {
        content_by_lua_block {
            ngx.say("part 1")
            ngx.flush(true)
            ngx.say("part 2")
        }
    }
--- request
GET /t
--- response_headers
Transfer-Encoding: chunked
--- response_body
part 1
part 2



=== TEST 11: proxy_pass to a second server on an extra port
--- http_config
    server {
        listen 127.0.0.1:$TEST_NGINX_PORT_1;
        location / {
            content_by_lua_block {
                ngx.req.read_body()
                ngx.say("backend saw ", ngx.req.get_method(), " ", ngx.var.uri, " ", ngx.req.get_body_data())
            }
        }
    }
--- config
    location /v1/ {
        proxy_pass http://127.0.0.1:$TEST_NGINX_PORT_1;
    }
--- request
POST /v1/models
{"a":1}
--- response_body
backend saw POST /v1/models {"a":1}
--- no_error_log
[error]
[warn]



=== TEST 12: the phases the module uses run, and log in order
--- http_config
    upstream phases_backend {
        server 0.0.0.1;
        balancer_by_lua_block {
            local b = require "ngx.balancer"
            ngx.log(ngx.INFO, "phase: ", ngx.get_phase())
            assert(b.set_current_peer("127.0.0.1", $TEST_NGINX_PORT_1))
        }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_PORT_1;
        location / { content_by_lua_block { ngx.print("from backend") } }
    }
--- config
    location = /t {
        access_by_lua_block { ngx.log(ngx.INFO, "phase: ", ngx.get_phase()) }
        header_filter_by_lua_block { ngx.log(ngx.INFO, "phase: ", ngx.get_phase()) }
        body_filter_by_lua_block {
            if ngx.arg[2] then ngx.log(ngx.INFO, "phase: ", ngx.get_phase()) end
        }
        log_by_lua_block { ngx.log(ngx.INFO, "phase: ", ngx.get_phase()) }
        proxy_pass http://phases_backend;
    }
--- request
GET /t
--- response_body chomp
from backend
--- error_log eval
[qr/phase: access.*\n(?:.*\n)*?.*phase: balancer.*\n(?:.*\n)*?.*phase: header_filter.*\n(?:.*\n)*?.*phase: body_filter.*\n(?:.*\n)*?.*phase: log/]
--- no_error_log
[error]



=== TEST 13: skip_nginx skips a block's checks on matching versions
--- skip_nginx: >= 1.0.0 every nginx is newer; the checks below must not run
--- config
    location = /t { return 500; }
--- request
GET /t
--- response_body
never checked
