# Every example script of the seed design end to end through nginx, on
# examples/llmproxy.yaml (all seven hooks; auth is the seed's rule behind a
# check for a missing key, examples/scripts/auth_example.lua) against the
# mock backends: routing by viplevel, auth allow and deny (this file's keys
# instead of the example's), rate_limit, request and response transforms
# on JSON and on streams, usage, error_handler.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

my $repo = repo_root();
open my $fh, '<', "$repo/examples/llmproxy.yaml" or die "examples/llmproxy.yaml: $!\n";
my $yaml = do { local $/; <$fh> };
close $fh;
my %port = (9001 => '$TEST_NGINX_PORT_1', 9002 => '$TEST_NGINX_PORT_2', 9003 => '$TEST_NGINX_PORT_3');
($yaml =~ s/127\.0\.0\.1:$_"/127.0.0.1:$port{$_}"/g) or die "no port $_ in the example config\n" for sort keys %port;
($yaml =~ s{script_file: scripts/}{script_file: \$TEST_NGINX_REPO/examples/scripts/}g) or die "no script_file\n";
($yaml =~ s{^keys:\n(?:  .*\n)+}{}m) or die "no keys in the example config\n";

gateway_setup();

# After gateway_setup's preprocessor: the example config instead of the
# generated one (plus a block's `--- yaml`), and the keys.
my $keys = <<'YAML';
keys:
  - {key: sk-vip, user_id: vip, total_quota: 5000000}
  - {key: sk-basic, user_id: basic, total_quota: 1000}
  - {key: sk-any, user_id: any, total_quota: 5000000}
YAML
add_block_preprocessor(sub {
    my $block = shift;
    my $extra = exists $block->{yaml} ? $block->yaml : '';
    $block->set_value('user_files', ">>> llmproxy.yaml\n$yaml$keys$extra");
});

run_tests();

__DATA__

=== TEST 1: a VIP key, viplevel 3: auth allows, routing picks ultra, the model is mapped both ways, usage at 50%
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"你好"}],"viplevel":3}
--- more_headers
Authorization: Bearer sk-vip
X-Request-ID: seed-1
--- response_headers
X-LLMProxy-Backend: ultra
X-Seen-Model: llama-3-70b-instruct
X-Seen-Original-Model: gpt-4
X-Request-ID: seed-1
--- response_body_like
^\{(?=.*"model":"gpt-4")(?=.*"choices":\[\])(?=.*"usage":\{).*\}$
--- error_log eval
[qr/llmproxy: engine \S+ loaded from \S+ \(3 backends; hooks: routing, auth, request_transform, response_transform, rate_limit, usage, error_handler\)/,
 "auth verdict: allow",
 "rate_limit verdict: standard",
 qr/usage of request seed-1 on 'ultra': \{"billable_tokens":28,"completion_tokens":42,"discount":0.5,"prompt_tokens":15,"total_tokens":57,"viplevel":3\}/]
--- no_error_log
[error]
[warn]



=== TEST 2: viplevel 1 and gpt-3.5 for a basic key: high-performance, qwen upstream, usage at 80%
--- request
POST /v1/chat/completions
{"model":"gpt-3.5","viplevel":1}
--- more_headers
Authorization: Bearer sk-basic
X-Request-ID: seed-2
--- response_headers
X-LLMProxy-Backend: high-performance
X-Seen-Model: qwen-72b-chat
--- response_body_like
"model":"gpt-3.5"
--- error_log
"billable_tokens":45
--- no_error_log
[error]



=== TEST 3: no viplevel: standard
--- request
POST /v1/chat/completions
{"model":"gpt-3.5"}
--- more_headers
Authorization: Bearer sk-any
--- response_headers
X-LLMProxy-Backend: standard
--- no_error_log
[error]



=== TEST 4: a basic key asking for gpt-4: the seed's auth denies, the seed's error_handler answers 403
--- request
POST /v1/chat/completions
{"model":"gpt-4","viplevel":3}
--- more_headers
Authorization: Bearer sk-basic
X-Request-ID: seed-4
--- error_code: 403
--- response_headers
Content-Type: application/json
!X-LLMProxy-Backend
--- response_body chomp
{"error":{"message":"未知错误","request_id":"seed-4","type":"auth_error"}}
--- error_log
auth verdict: deny (您的账户等级不支持 GPT-4 模型)



=== TEST 5: a stream through every seed script: events keep the client's model, usage at the end
--- request
POST /v1/chat/completions
{"model":"gpt-4","stream":true,"viplevel":3,"messages":[{"role":"user","content":"hi"}]}
--- more_headers
Authorization: Bearer sk-vip
X-Request-ID: seed-5
X-Mock-Chunks: 6
--- response_headers
X-LLMProxy-Backend: ultra
X-Seen-Model: llama-3-70b-instruct
Content-Type: text/event-stream
--- response_body_like
\A(data: \{(?=[^\n]*"model":"gpt-4")(?![^\n]*"usage")[^\n]*\}\n\n){7}data: \[DONE\]\n\n\z
--- error_log
usage of request seed-5 on 'ultra': {"billable_tokens":5,"completion_tokens":6,"discount":0.5,"prompt_tokens":5,"total_tokens":11,"viplevel":3}
--- no_error_log
[error]



=== TEST 6: every backend fails: the seed's error_handler gives its backend_error message
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-vip
X-Request-ID: seed-6
X-Mock-Status: 502
--- error_code: 502
--- response_body chomp
{"error":{"message":"后端服务异常","request_id":"seed-6","type":"backend_error"}}



=== TEST 7: a slow backend: the seed's error_handler gives its timeout message
--- yaml
gateway:
  retry: {max_retries: 0}
  timeouts: {first_byte_ms: 150, idle_ms: 150}
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-vip
X-Request-ID: seed-7
X-Mock-Delay-Ms: 800
--- error_code: 504
--- response_body chomp
{"error":{"message":"请求超时","request_id":"seed-7","type":"timeout"}}



=== TEST 8: no key: the example's auth leaves it to the standard checks: the gateway's 401 (error_handler serves identified callers only)
--- request
POST /v1/chat/completions
{"model":"gpt-4","viplevel":1}
--- more_headers
X-Request-ID: seed-8
--- error_code: 401
--- response_body chomp
{"error":{"message":"invalid or missing API key","type":"auth_error","code":"invalid_api_key"}}
--- no_error_log
auth hook failed for request

