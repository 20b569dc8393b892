# Scripts' `log.info/warn/error` and `print` in nginx: lines in the error
# log at the matching level, tagged as the gateway tags its JSON lines
# (request id, hook, script).

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

=== TEST 1: log.warn / log.info / log.error / print of a routing script: one line each, at its level, tagged
--- hooks
  routing:
    script: |
      log.warn("x")
      log.info("chosen", 1)
      log.error("bad", true)
      print("printed")
      return nil
--- more_headers
X-Request-ID: rid-log-1
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_log eval
[
  qr/\[warn\] .*llmproxy: script log: x \(request_id=rid-log-1, hook=routing, script=scripts\.routing\)/,
  qr/\[info\] .*llmproxy: script log: chosen\t1 \(request_id=rid-log-1, hook=routing, script=scripts\.routing\)/,
  qr/\[error\] .*llmproxy: script log: bad\ttrue \(request_id=rid-log-1, hook=routing, script=scripts\.routing\)/,
  qr/\[info\] .*llmproxy: script log: printed \(request_id=rid-log-1, hook=routing, script=scripts\.routing\)/,
]



=== TEST 2: a script that fails after logging: the line is written, then the hook error
--- hooks
  routing:
    script: |
      log.warn("before the failure")
      error("boom")
--- more_headers
X-Request-ID: rid-log-2
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_log eval
[
  qr/\[warn\] .*llmproxy: script log: before the failure \(request_id=rid-log-2, hook=routing, script=scripts\.routing\)/,
  qr/routing hook failed for request rid-log-2/,
]



=== TEST 3: a script that does not log writes no script line
--- hooks
  routing:
    script: return nil
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- no_error_log
script log:
