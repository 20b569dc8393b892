# nginx keeps serving through hostile scripts and dying backends:
# - a backend (a separate process) dies mid-test: the balancer retries on
#   another backend, passive health marks it unhealthy after
#   gateway.health.failures_to_unhealthy failures, the routing script sees
#   `healthy = false`, and later requests no longer try it;
# - looping and memory-bomb scripts get the configured failure (503
#   hook_failed under on_error: deny, the fallback under standard) on every
#   request, while the same worker keeps answering.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Socket::INET;
use POSIX ();
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

# The backend that dies: a forked process answering every request with a
# fixed chat completion, until the test kills it (kill -9 from nginx).
my $listen = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 16, ReuseAddr => 1)
    or die "cannot listen: $!\n";
my $flaky_port = $listen->sockport;
my $flaky_pid = fork() // die "fork: $!\n";
if ($flaky_pid == 0) {
    $SIG{$_} = 'DEFAULT' for qw(INT TERM HUP);
    my $body = '{"id":"flaky","object":"chat.completion","model":"flaky","choices":[],'
        . '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}';
    while (my $c = $listen->accept) {
        my $head = '';
        while ($head !~ /\r\n\r\n/) {
            my $n = sysread $c, $head, 4096, length $head;
            last unless $n;
        }
        my ($len) = $head =~ /Content-Length:\s*(\d+)/i;
        my $have = length($head) - index($head, "\r\n\r\n") - 4;
        while ($len && $have < $len) {
            my $n = sysread $c, my $buf, $len - $have;
            last unless $n;
            $have += $n;
        }
        print {$c} "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " . length($body)
            . "\r\nConnection: close\r\n\r\n$body";
        close $c;
    }
    POSIX::_exit(0);
}
close $listen;
$ENV{TEST_NGINX_FLAKY_PORT} = $flaky_port;
$ENV{TEST_NGINX_FLAKY_PID} = $flaky_pid;
END {
    local $?;    # waitpid would set the test's exit status
    if ($flaky_pid) {
        kill 'KILL', $flaky_pid;
        waitpid $flaky_pid, 0;
    }
}

gateway_setup();
run_tests();

__DATA__

=== TEST 1: a backend dies mid-test: retried on another, marked unhealthy, then avoided
--- backends
  - {name: flaky, url: "http://127.0.0.1:$TEST_NGINX_FLAKY_PORT"}
  - {name: standard, url: "http://127.0.0.1:$TEST_NGINX_PORT_1"}
--- yaml
gateway:
  health: {failures_to_unhealthy: 2, cooldown_ms: 60000}
--- hooks
  routing:
    script: |
      if backends.flaky.healthy then return "flaky" end
      return nil
--- config
    location = /kill {
        content_by_lua_block {
            os.execute("kill -9 $TEST_NGINX_FLAKY_PID")
            ngx.sleep(0.2)
            ngx.say("killed")
        }
    }
    location = /counts {
        content_by_lua_block {
            local m = assert(require("llmproxy_drive").metrics($TEST_NGINX_SERVER_PORT))
            ngx.say("retries: ", m.llmproxy_retries_total,
                ", flaky healthy: ", m['llmproxy_backend_healthy{backend="flaky"}'],
                ", flaky 200s: ", m['llmproxy_requests_total{backend="flaky",status="200"}'],
                ", standard 200s: ", m['llmproxy_requests_total{backend="standard",status="200"}'])
        }
    }
--- request eval
my $chat = "POST /v1/chat/completions\n{\"model\":\"gpt-4\"}";
[$chat, $chat, "GET /kill", $chat, $chat, $chat, $chat, "GET /counts"]
--- response_body eval
[qr/"id":"flaky"/, qr/"id":"flaky"/, "killed\n", qr/"id":"chatcmpl-1"/, qr/"id":"chatcmpl-1"/,
 qr/"id":"chatcmpl-1"/, qr/"id":"chatcmpl-1"/,
 "retries: 2, flaky healthy: 0, flaky 200s: 2, standard 200s: 4\n"]
--- error_log
backend 'flaky' failed (failed 502); retrying on 'standard'
backend 'flaky' marked unhealthy after 2 failures



=== TEST 2: a looping routing script under on_error: deny: 503 hook_failed every time, nginx keeps serving
--- hooks
  routing:
    on_error: deny
    timeout_ms: 30
    script: |
      local n = 0
      while true do n = n + 1 end
--- config
    location = /ok { content_by_lua_block { ngx.say("ok ", ngx.worker.pid()) } }
--- request eval
my $chat = "POST /v1/chat/completions\n{\"model\":\"gpt-4\"}";
[$chat, "GET /ok", $chat, "GET /ok", $chat, "GET /ok"]
--- error_code eval
[503, 200, 503, 200, 503, 200]
--- response_body eval
my $e = '{"error":{"message":"the request was refused: the routing hook failed (timeout)","type":"hook_error","code":"hook_failed"}}';
[$e, qr/^ok \d+\n/, $e, qr/^ok \d+\n/, $e, qr/^ok \d+\n/]
--- no_error_log
[alert]
[crit]
exited on signal



=== TEST 3: memory bombs (string.rep, table growth, doubling) are memory errors; the fallback applies
--- hooks
  request_transform:
    memory_mb: 4
    script: |
      local kind = request.body.bomb
      if kind == "rep" then return {body = {x = string.rep("x", 1e9)}} end
      if kind == "table" then local t = {} for i = 1, 1e9 do t[i] = i end end
      local s = "x"
      while true do s = s .. s end
--- request eval
["POST /v1/chat/completions\n{\"model\":\"gpt-4\",\"bomb\":\"rep\"}",
 "POST /v1/chat/completions\n{\"model\":\"gpt-4\",\"bomb\":\"table\"}",
 "POST /v1/chat/completions\n{\"model\":\"gpt-4\",\"bomb\":\"concat\"}",
 "POST /v1/chat/completions\n{\"model\":\"gpt-4\",\"bomb\":\"rep\"}"]
--- error_code eval
[200, 200, 200, 200]
--- response_body_like eval
[qr/"model":"gpt-4"/, qr/"model":"gpt-4"/, qr/"model":"gpt-4"/, qr/"model":"gpt-4"/]
--- error_log
memory:
sending the request unchanged
--- no_error_log
[alert]
[crit]



=== TEST 4: a looping error_handler (timeout) falls back to the default error body
--- backends
  - {name: down, url: "http://127.0.0.1:1"}
--- hooks
  error_handler:
    timeout_ms: 30
    script: |
      local ok = pcall(function() while true do end end)
      return {status_code = 200, body = {swallowed = ok}}
--- request eval
["POST /v1/chat/completions\n{\"model\":\"gpt-4\"}", "POST /v1/chat/completions\n{\"model\":\"gpt-4\"}"]
--- error_code eval
[502, 502]
--- response_body eval
['{"error":{"message":"cannot connect to the backend: down (http://127.0.0.1:1)","type":"backend_error","code":"backend_unreachable"}}',
 '{"error":{"message":"cannot connect to the backend: down (http://127.0.0.1:1)","type":"backend_error","code":"backend_unreachable"}}']
--- error_log
error_handler hook failed for request
timeout:
sending the default error



=== TEST 5: hook errors were counted by kind on the way
--- request
GET /metrics
--- response_body_like
\A(?=.*\nllmproxy_hook_errors_total\{hook="routing",kind="timeout"\} 3\n)(?=.*\nllmproxy_hook_errors_total\{hook="request_transform",kind="memory"\} 4\n)(?=.*\nllmproxy_hook_errors_total\{hook="error_handler",kind="timeout"\} 2\n)



=== TEST 6: a backend that breaks a stream off after its first event counts as a failure for its health, as in the gateway
--- backends
  - {name: standard, url: "http://127.0.0.1:$TEST_NGINX_PORT_1"}
--- yaml
gateway:
  health: {failures_to_unhealthy: 1, cooldown_ms: 60000}
--- config
    location = /broken {
        content_by_lua_block {
            local body = '{"model":"gpt-4","stream":true,"messages":[]}'
            local sock = ngx.socket.tcp()
            assert(sock:connect("127.0.0.1", $TEST_NGINX_SERVER_PORT))
            assert(sock:send(table.concat({
                "POST /v1/chat/completions HTTP/1.1", "Host: localhost", "Connection: close",
                "Content-Type: application/json", "X-Mock-Break: 1", "Content-Length: " .. #body, "", body,
            }, "\r\n")))
            local got = sock:receive("*a") or ""
            sock:close()
            ngx.sleep(0.2)
            local m = assert(require("llmproxy_drive").metrics($TEST_NGINX_SERVER_PORT))
            ngx.say("first event: ", got:find('"content":"Hello"', 1, true) ~= nil,
                ", [DONE]: ", got:find("[DONE]", 1, true) ~= nil,
                ", standard healthy: ", m['llmproxy_backend_healthy{backend="standard"}'])
        }
    }
--- request
GET /broken
--- response_body
first event: true, [DONE]: false, standard healthy: 0
--- error_log
backend 'standard' marked unhealthy after 1 failures
