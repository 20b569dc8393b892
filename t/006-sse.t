# Server-sent event streams through nginx: relayed event by event (never
# buffered whole), response_transform per event with response.is_stream,
# `[DONE]` passing through, events split across upstream chunks, usage
# asked of the backend and its chunk hidden from a client that did not ask
# for it (as the standalone gateway does), and the usage hook on streams.

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

=== TEST 1: a stream without hooks: the backend is asked for usage, the client sees the plain stream
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true}
--- response_headers
Content-Type: text/event-stream
!Content-Length
X-LLMProxy-Backend: standard
X-Seen-Body: {"model":"gpt-4","stream":true,"stream_options":{"include_usage":true}}
--- response_body eval
'data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"gpt-4","choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"finish_reason":null}]}

data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"gpt-4","choices":[{"index":0,"delta":{"content":" from"},"finish_reason":null}]}

data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"gpt-4","choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}

data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"gpt-4","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}

data: [DONE]

'
--- no_error_log
[error]



=== TEST 2: a client that asks for usage gets the backend's stream unchanged, usage chunk included
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true,"stream_options":{"include_usage":true}}
--- more_headers
X-Mock-Chunks: 1
--- response_headers
X-Seen-Body: {"model":"gpt-4","stream":true,"stream_options":{"include_usage":true}}
--- response_body eval
'data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"gpt-4","choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"gpt-4","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}

data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"gpt-4","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}

data: [DONE]

'
--- no_error_log
[error]



=== TEST 3: stream_options without include_usage is completed, other options kept
--- request
POST /v1/chat/completions
{"stream":true,"model":"gpt-4","stream_options":{"x":1,"include_usage":false}}
--- more_headers
X-Mock-Chunks: 1
--- response_headers
X-Seen-Body: {"stream":true,"model":"gpt-4","stream_options":{"x":1,"include_usage":true}}
--- response_body_like
\A(data: [^\n]*"choices":\[\{[^\n]*\}\]\}\n\n){2}data: \[DONE\]\n\n\z



=== TEST 4: the seed's transforms on a stream: every event maps the model back, [DONE] passes
--- hooks
  request_transform: {script_file: $TEST_NGINX_REPO/examples/scripts/request_transform.lua}
  response_transform: {script_file: $TEST_NGINX_REPO/examples/scripts/response_transform.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true,"messages":[]}
--- response_headers
X-Seen-Model: llama-3-70b-instruct
Content-Type: text/event-stream
--- response_body_like
\A(data: \{(?=[^\n]*"model":"gpt-4")(?![^\n]*"usage")[^\n]*\}\n\n){4}data: \[DONE\]\n\n\z
--- no_error_log
[error]
already sent



=== TEST 5: events split across upstream chunks are joined before the transform
--- hooks
  request_transform: {script_file: $TEST_NGINX_REPO/examples/scripts/request_transform.lua}
  response_transform: {script_file: $TEST_NGINX_REPO/examples/scripts/response_transform.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true}
--- more_headers
X-Mock-Split: 1
X-Mock-Chunks: 5
--- response_body_like
\A(data: \{(?=[^\n]*"model":"gpt-4")[^\n]*\}\n\n){6}data: \[DONE\]\n\n\z
--- no_error_log
[error]



=== TEST 6: response_transform sees is_stream, the event as response.body, and status 200
--- hooks
  response_transform:
    script: |
      assert(response.is_stream == true and response.status_code == 200)
      return {body = {n = #response.body.choices, f = response.body.choices[1].finish_reason}}
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true}
--- more_headers
X-Mock-Chunks: 1
--- response_body eval
'data: {"f":null,"n":1}

data: {"f":"stop","n":1}

data: [DONE]

'
--- no_error_log
[error]



=== TEST 7: the seed's usage hook runs at the end of a stream, on the captured usage chunk
--- hooks
  routing: {script_file: $TEST_NGINX_REPO/examples/scripts/routing.lua}
  usage: {script_file: $TEST_NGINX_REPO/examples/scripts/usage.lua}
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true,"viplevel":3}
--- more_headers
X-Request-ID: s-7
X-Mock-Chunks: 4
--- response_headers
X-LLMProxy-Backend: ultra
--- response_body_like
\A(data: [^\n]*\n\n){5}data: \[DONE\]\n\n\z
--- error_log eval
qr/llmproxy: usage of request s-7 on 'ultra': \{"billable_tokens":4,"completion_tokens":4,"discount":0.5,"prompt_tokens":5,"total_tokens":9,"viplevel":3\}/
--- no_error_log
[error]



=== TEST 8: the usage hook sees metadata.is_stream and the usage chunk as response.body
--- hooks
  usage:
    script: |
      return {total_tokens = usage.total_tokens, s = metadata.is_stream,
              empty = #response.body.choices == 0, url = metadata.backend_url ~= ""}
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true}
--- more_headers
X-Request-ID: s-8
--- error_log
usage of request s-8 on 'standard': {"empty":true,"s":true,"total_tokens":8,"url":true}



=== TEST 9: a failing response_transform passes events through (on_error: standard)
--- hooks
  response_transform:
    script: |
      return request.missing.x
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true}
--- more_headers
X-Mock-Chunks: 1
--- response_body eval
'data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"gpt-4","choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"finish_reason":null}]}

data: {"id":"chatcmpl-s","object":"chat.completion.chunk","model":"gpt-4","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}

data: [DONE]

'
--- error_log
response_transform hook failed for request
passing the response through



=== TEST 10: ... under on_error: deny the stream stops with one error event
--- hooks
  response_transform:
    on_error: deny
    script: |
      return request.missing.x
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true}
--- response_body eval
'data: {"error":{"message":"the stream was stopped: the response_transform hook failed","type":"hook_error","code":"hook_failed"}}

'
--- error_log
stopping the response (on_error: deny)



=== TEST 11: chunks reach the client as the backend sends them (timed from inside nginx)
--- config
    location = /drive {
        content_by_lua_block {
            local sock = ngx.socket.tcp()
            sock:settimeout(5000)
            assert(sock:connect("127.0.0.1", $TEST_NGINX_SERVER_PORT))
            local body = '{"model":"gpt-4","stream":true}'
            assert(sock:send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                .. "X-Mock-Chunks: 4\r\nX-Mock-Chunk-Delay-Ms: 250\r\n"
                .. "Content-Length: " .. #body .. "\r\n\r\n" .. body))
            ngx.update_time()
            local t0 = ngx.now()
            local arrivals, seen = {}, 0
            while true do
                local data, err = sock:receiveany(65536)
                if not data then break end
                ngx.update_time()
                local _, n = data:gsub("data: ", "")
                for _ = 1, n do
                    seen = seen + 1
                    arrivals[seen] = ngx.now() - t0
                end
            end
            -- 4 content events 250 ms apart, the stop event, [DONE]
            ngx.say("events: ", seen)
            ngx.say("first before 0.5 s: ", arrivals[1] < 0.5)
            ngx.say("spread over 0.6 s: ", arrivals[seen] - arrivals[1] > 0.6)
        }
    }
--- request
GET /drive
--- response_body
events: 6
first before 0.5 s: true
spread over 0.6 s: true



=== TEST 12: the SSE splitter is the core's (llmproxy.sse_parser): CRLF, a lone CR, several data lines, comments, other fields kept, the bound
--- config
    location = /t {
        content_by_lua_block {
            local llmproxy = require "llmproxy"
            local p = llmproxy.sse_parser(64)
            local ev, data, n = p:push('data: {"a"')
            ngx.say(n)
            ev, data, n = p:push(':1}\n\nevent: x\r\nid: 7\r\ndata: a\r\ndata: b\r\n\r\n: keepalive\n\ndata: [DO')
            ngx.say(n, " ", ev[1] == 'data: {"a":1}\n\n', " ", data[2], " ", tostring(data[3]))
            ngx.say((llmproxy.sse_with_data(ev[2], "{}"):gsub("\n", "|")))
            ngx.say((llmproxy.sse_with_data(ev[1], "{}"):gsub("\n", "|")))
            ev, data, n = p:push("NE]\n\ndata: cr\r\rdata: tail")
            ngx.say(n, " ", data[1], " ", data[2])
            ngx.say(p:finish())
            ngx.say(p:finish() == nil)
            local _, _, m, over = p:push(string.rep("x", 65))
            ngx.say(m, " ", over)
            _, _, m, over = p:push("\n\ndata: late\n\n")
            ngx.say(m, " ", over, " ", p:finish() == nil)
            ngx.say((llmproxy.sse_data_event("{}"):gsub("\n", "|")))
        }
    }
--- request
GET /t
--- response_body
0
3 true a
b false
event: x|id: 7|data: {}||
data: {}||
2 [DONE] cr
data: tailtail
true
0 true
0 true true
data: {}||



=== TEST 13: streams are counted: active streams back to 0, upstream latency to the first event
--- request
GET /metrics
--- response_body_like
\A(?=.*\nllmproxy_active_streams 0\n)(?=.*\nllmproxy_upstream_latency_seconds_count\{backend="standard"\} [1-9])



=== TEST 14: on a stream, response_transform's status and header changes are logged, not applied: the head leaves before the first event
--- hooks
  response_transform:
    script: |
      return {status_code = 299, headers = {["X-Changed"] = "yes"}}
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true,"messages":[]}
--- error_code: 200
--- response_headers
!X-Changed
Content-Type: text/event-stream
--- error_log
they were already sent
