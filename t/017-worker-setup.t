# How a worker finds and keeps its engine: a relative config path is
# relative to nginx's prefix (-p), not the working directory; with
# `lua_code_cache off` (every request a new Lua VM, without the engine
# init_worker built), or without the library on lua_package_cpath,
# requests get 503 engine_unavailable naming the cause.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();
no_reload();    # lua_code_cache is an http-level directive: a fresh nginx per block
run_tests();

__DATA__

=== TEST 1: init_worker("html/llmproxy.yaml") reads the file under nginx's prefix
--- http_config
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker("html/llmproxy.yaml")
    }
--- config
    location = /t {
        content_by_lua_block {
            local s = require("resty.llmproxy").status()
            ngx.say(s and s.config == ngx.config.prefix() .. "html/llmproxy.yaml" and "loaded from the prefix"
                or "not loaded")
            ngx.say(s and table.concat(s.backends, ",") or "-")
        }
    }
--- user_files
>>> llmproxy.yaml
backends:
  - {name: relative-ok, url: "http://127.0.0.1:9"}
--- request
GET /t
--- response_body
loaded from the prefix
relative-ok
--- no_error_log
[error]



=== TEST 2: a {file = ...} table is resolved the same way
--- http_config
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker({ file = "html/llmproxy.yaml" })
    }
--- config
    location = /t {
        content_by_lua_block {
            local s = require("resty.llmproxy").status()
            ngx.say(s and table.concat(s.backends, ",") or "not loaded")
        }
    }
--- user_files
>>> llmproxy.yaml
backends:
  - {name: table-ok, url: "http://127.0.0.1:9"}
--- request
GET /t
--- response_body
table-ok



=== TEST 3: lua_code_cache off: 503 engine_unavailable that names lua_code_cache, in the body and the log
--- http_config
    lua_code_cache off;
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker("$TEST_NGINX_SERVROOT/html/llmproxy.yaml")
    }
--- config
    location /v1/ {
        access_by_lua_block { require("resty.llmproxy").access() }
        proxy_pass http://127.0.0.1:9;
    }
--- user_files
>>> llmproxy.yaml
backends:
  - {name: a, url: "http://127.0.0.1:9"}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 503
--- response_body_like
"message":"the gateway has no engine loaded \(lua_code_cache is off: .*set lua_code_cache on\)","type":"backend_error","code":"engine_unavailable"
--- error_log
llmproxy: engine
gets 503: lua_code_cache is off



=== TEST 4: lua_code_cache on (the default), same config: served
--- http_config
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker("$TEST_NGINX_SERVROOT/html/llmproxy.yaml")
    }
--- config
    location /v1/ {
        access_by_lua_block { require("resty.llmproxy").access() }
        content_by_lua_block { ngx.say("admitted") }
    }
--- user_files
>>> llmproxy.yaml
backends:
  - {name: a, url: "http://127.0.0.1:9"}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- response_body
admitted
--- no_error_log
lua_code_cache



=== TEST 5: the library is not on lua_package_cpath: init_worker says so, requests get 503 engine_unavailable
--- http_config
    init_worker_by_lua_block {
        package.cpath = "/nonexistent/?.so"
        require("resty.llmproxy").init_worker("$TEST_NGINX_SERVROOT/html/llmproxy.yaml")
    }
--- config
    location /v1/ {
        access_by_lua_block { require("resty.llmproxy").access() }
        proxy_pass http://127.0.0.1:9;
    }
--- user_files
>>> llmproxy.yaml
backends:
  - {name: a, url: "http://127.0.0.1:9"}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 503
--- response_body_like
^\{"error":\{"message":"the gateway has no engine loaded \(the llmproxy module did not load\)","type":"backend_error","code":"engine_unavailable"\}\}$
--- error_log
cannot load the llmproxy module (is libllmproxy.so on lua_package_cpath?)



=== TEST 6: a backend's config Host is not sent under nginx (proxy_pass writes its own): said when the backends load
--- http_config
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker("html/llmproxy.yaml")
    }
--- config
    location = /t {
        content_by_lua_block {
            local s = require("resty.llmproxy").status()
            ngx.say(s and table.concat(s.backends, ",") or "not loaded")
        }
    }
--- user_files
>>> llmproxy.yaml
backends:
  - {name: vhost, url: "http://127.0.0.1:9", headers: {Host: llm.example, X-Key: k}}
--- request
GET /t
--- response_body
vhost
--- error_log
llmproxy: backend 'vhost': headers.Host is not sent: proxy_pass writes the Host header itself
--- no_error_log
[error]



=== TEST 7: a retry policy that is not the default names the proxy_next_upstream line it needs, and the statuses nginx cannot retry
--- http_config
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker("html/llmproxy.yaml")
    }
--- config
    location = /t {
        content_by_lua_block {
            local s = require("resty.llmproxy").status()
            ngx.say(s and table.concat(s.backends, ",") or "not loaded")
        }
    }
--- user_files
>>> llmproxy.yaml
backends:
  - {name: a, url: "http://127.0.0.1:9"}
gateway:
  retry: {on_status: [429, 418], on_timeout: false}
--- request
GET /t
--- response_body
a
--- error_log
llmproxy: gateway.retry is not the default: nginx retries what proxy_next_upstream says; for this policy set `proxy_next_upstream error http_429 non_idempotent;` in the location
llmproxy: gateway.retry.on_status 418: proxy_next_upstream cannot name these statuses, so nginx does not retry them
--- no_error_log
[error]



=== TEST 8: the default retry policy is the setup's proxy_next_upstream line: nothing to say
--- http_config
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker("html/llmproxy.yaml")
    }
--- config
    location = /t {
        content_by_lua_block {
            local s = require("resty.llmproxy").status()
            ngx.say(s and table.concat(s.backends, ",") or "not loaded")
        }
    }
--- user_files
>>> llmproxy.yaml
backends:
  - {name: a, url: "http://127.0.0.1:9"}
--- request
GET /t
--- response_body
a
--- no_error_log
gateway.retry
[error]



=== TEST 9: active health probes (health.probe_interval_ms): a backend that does not answer is marked unhealthy without a request; one that answers 2xx stays healthy
--- http_config
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker("html/llmproxy.yaml")
    }
--- config
    location = /probe/ok {
        return 200 "ok";
    }
    location = /t {
        content_by_lua_block {
            ngx.sleep(0.8) -- several probe rounds of 100 ms
            ngx.say("slept")
        }
    }
--- user_files
>>> llmproxy.yaml
backends:
  - {name: live, url: "http://127.0.0.1:$TEST_NGINX_SERVER_PORT"}
  - {name: dead, url: "http://127.0.0.1:9"}
gateway:
  health: {probe_interval_ms: 100, probe_path: /probe/ok, probe_timeout_ms: 200, failures_to_unhealthy: 3}
--- request
GET /t
--- response_body
slept
--- error_log
llmproxy: backend 'dead' marked unhealthy after 3 failures
--- no_error_log
backend 'live' marked unhealthy
cannot start the health probe timer
[crit]
