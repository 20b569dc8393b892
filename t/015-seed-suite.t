# The seed suite in nginx: the seed design's unified config
# (examples/seed/config.yaml) and each of its example scripts, unchanged
# (examples/seed/scripts/), with its keys (examples/seed/keys.yaml), against
# the mock backends; the outcomes the seed documents, as the gateway's
# proxy/tests/seed_suite.rs asserts them. The auth example ends with
# `return {allow = true}` and still cannot let a disabled, expired or
# unknown key in unless the config opts in (docs/adr/040).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

my $repo = repo_root();
open my $fh, '<', "$repo/examples/seed/config.yaml" or die "examples/seed/config.yaml: $!\n";
my $seed = do { local $/; <$fh> };
close $fh;
my %port = (9001 => '$TEST_NGINX_PORT_1', 9002 => '$TEST_NGINX_PORT_2', 9003 => '$TEST_NGINX_PORT_3');
($seed =~ s/127\.0\.0\.1:$_"/127.0.0.1:$port{$_}"/g) or die "no port $_ in the seed config\n" for sort keys %port;
($seed =~ s{script_file: "scripts/}{script_file: "\$TEST_NGINX_REPO/examples/seed/scripts/}g) or die "no script_file\n";
($seed =~ s{keys_file: keys\.yaml}{keys_file: \$TEST_NGINX_REPO/examples/seed/keys.yaml}) or die "no keys_file\n";

# A fixed offset where it is $hour:00 now (the seed's peak hours are 9-18).
sub zone_at {
    my $hour = shift;
    my $off = ($hour - (gmtime)[2] + 24) % 24;
    $off -= 24 if $off > 12;
    return sprintf('%s%02d:00', $off < 0 ? '-' : '+', abs $off);
}

gateway_setup();

# After gateway_setup's preprocessor: the seed config instead of the
# generated one. The limiter's dict outlives the blocks: the peak-hour
# blocks come first, while the 100k key's bucket is full. Blocks named "peak hour" run at noon, the rest at 03:00;
# blocks named "opt-in" let the auth script overrule `disabled`.
add_block_preprocessor(sub {
    my $block = shift;
    my $yaml = $seed;
    my $zone = zone_at($block->name =~ /peak hour/ ? 12 : 3);
    ($yaml =~ s{  # time_zone: local[^\n]*}{  time_zone: "$zone"}) or die "no time_zone line\n";
    if ($block->name =~ /opt-in/) {
        ($yaml =~ s{(script_file: "[^"]*/auth\.lua"\n)}{$1    may_override: [disabled]\n}) or die "no auth\n";
    }
    $block->set_value('user_files', ">>> llmproxy.yaml\n$yaml");
});

run_tests();

__DATA__

=== TEST 1: peak hour: a 100k key with fewer than 10 requests left is refused; error_handler's message
--- request eval
[("POST /v1/chat/completions\n{\"model\":\"gpt-3.5\"}") x 4]
--- more_headers
Authorization: Bearer sk-seed-basic
--- error_code eval
[200, 200, 429, 429]
--- response_body_like eval
[qr/"choices"/, qr/"choices"/, qr/"message":"请求过于频繁"/, qr/"message":"请求过于频繁"/]
--- error_log
rate_limit verdict: deny (高峰期限流，请稍后重试)



=== TEST 2: peak hour: an unlimited key is not throttled by the rule
--- request eval
[("POST /v1/chat/completions\n{\"model\":\"gpt-3.5\"}") x 4]
--- more_headers
Authorization: Bearer sk-seed-unlimited
--- error_code eval
[200, 200, 200, 200]



=== TEST 3: VIP key, viplevel 3, gpt-4: ultra, llama upstream, gpt-4 back, usage at 50%
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"你好"}],"viplevel":3}
--- more_headers
Authorization: Bearer sk-seed-vip
X-Request-ID: seed-1
--- error_code: 200
--- response_headers
X-LLMProxy-Backend: ultra
X-Seen-Model: llama-3-70b-instruct
X-Seen-Original-Model: gpt-4
--- response_body_like
"model":"gpt-4"
--- error_log
auth verdict: allow
rate_limit verdict: standard
"discount":0.5
--- no_error_log
[error]



=== TEST 4: a 100k key, viplevel 1, gpt-3.5: high-performance, qwen upstream, usage at 80%
--- request
POST /v1/chat/completions
{"model":"gpt-3.5","messages":[{"role":"user","content":"你好"}],"viplevel":1}
--- more_headers
Authorization: Bearer sk-seed-basic
--- error_code: 200
--- response_headers
X-LLMProxy-Backend: high-performance
X-Seen-Model: qwen-72b-chat
--- response_body_like
"model":"gpt-3.5"
--- error_log
"discount":0.8
--- no_error_log
[error]



=== TEST 5: an unlimited key is the top tier: gpt-4 allowed (key_info.total_quota 2^53-1)
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"你好"}]}
--- more_headers
Authorization: Bearer sk-seed-unlimited
--- error_code: 200
--- response_headers
X-LLMProxy-Backend: standard
--- no_error_log
[error]



=== TEST 6: a 100k key asking for gpt-4: the seed's auth denies with 403
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"你好"}]}
--- more_headers
Authorization: Bearer sk-seed-basic
--- error_code: 403
--- error_log
auth verdict: deny (您的账户等级不支持 GPT-4 模型)



=== TEST 7: a disabled VIP key: the script's allow does not overrule the standard 403
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"你好"}]}
--- more_headers
Authorization: Bearer sk-seed-disabled
--- error_code: 403
--- response_headers
!X-LLMProxy-Backend
--- error_log
auth verdict: allow (API key is disabled)



=== TEST 8: an expired VIP key: the standard 403
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"你好"}]}
--- more_headers
Authorization: Bearer sk-seed-expired
--- error_code: 403
--- error_log
(API key has expired)



=== TEST 9: an unknown key: the standard 401 (the script fails on a nil key_info, auth fails closed)
--- request
POST /v1/chat/completions
{"model":"gpt-3.5","messages":[{"role":"user","content":"你好"}]}
--- more_headers
Authorization: Bearer sk-seed-nope
--- error_code: 401



=== TEST 10: every backend fails: the seed's error_handler gives its backend_error message
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-seed-vip
X-Request-ID: seed-11
X-Mock-Status: 502
--- error_code: 502
--- response_body chomp
{"error":{"message":"后端服务异常","request_id":"seed-11","type":"backend_error"}}



=== TEST 11: opt-in (may_override: [disabled]): the script's allow wins for a disabled key
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-seed-disabled
--- error_code: 200
--- error_log
auth verdict: allow



=== TEST 12: opt-in (may_override: [disabled]) does not reach an expired key
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- more_headers
Authorization: Bearer sk-seed-expired
--- error_code: 403
--- error_log
auth verdict: allow (API key has expired)
