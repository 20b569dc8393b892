# nginx-conf/nginx.conf, the documented example, runs as written: only its
# port, paths and log level are rewritten for the test, and it loads a copy
# of examples/llmproxy.yaml (all seven seed scripts) whose backends are the
# mock backends of t/lib/llmproxy_mock.lua (plus one key: the seed's auth
# script runs).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi-lib, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

my $repo = repo_root();

sub slurp {
    my ($path) = @_;
    open my $fh, '<', $path or die "cannot read $path: $!\n";
    local $/;
    return scalar <$fh>;
}

sub rewrite {
    my ($text, $from, $to) = @_;
    my $n = ($text =~ s/\Q$from\E/$to/g);
    die "nginx-conf/nginx.conf no longer contains '$from': update t/003-example-conf.t\n" unless $n;
    return $text;
}

my %port = (9001 => '$TEST_NGINX_PORT_1', 9002 => '$TEST_NGINX_PORT_2', 9003 => '$TEST_NGINX_PORT_3');

my $conf = slurp("$repo/nginx-conf/nginx.conf");
$conf = rewrite($conf, 'listen 8000;', 'listen 127.0.0.1:$TEST_NGINX_SERVER_PORT;');
$conf = rewrite($conf, 'worker_processes auto;', ($> == 0 ? 'user root; ' : '') . 'worker_processes 1;');
$conf = rewrite($conf, 'error_log logs/error.log warn;', 'error_log logs/error.log info;');
$conf = rewrite($conf, '"$prefix/../openresty/lib/?.lua;;"',
    '"$TEST_NGINX_REPO/openresty/lib/?.lua;$TEST_NGINX_REPO/t/lib/?.lua;;"');
$conf = rewrite($conf, '"$prefix/../ffi/target/release/lib?.so;;"', '"$TEST_NGINX_LIB_DIR/lib?.so;;"');
$conf = rewrite($conf, 'ngx.config.prefix() .. "../examples/llmproxy.yaml"',
    '"$TEST_NGINX_SERVROOT/html/llmproxy.yaml"');

my $mocks = '';
for my $m (['standard', 1], ['high-performance', 2], ['ultra', 3]) {
    my ($name, $n) = @$m;
    $mocks .= "    server {\n        listen 127.0.0.1:\$TEST_NGINX_PORT_$n;\n"
        . "        location / { content_by_lua_block { require(\"llmproxy_mock\").chat(\"$name\") } }\n    }\n";
}
$conf = rewrite($conf, "http {\n", "http {\n$mocks");

my $yaml = slurp("$repo/examples/llmproxy.yaml");
$yaml = rewrite($yaml, 'script_file: scripts/', 'script_file: $TEST_NGINX_REPO/examples/scripts/');
$yaml = rewrite($yaml, "127.0.0.1:$_\"", "127.0.0.1:$port{$_}\"") for sort keys %port;
# The example config runs the seed's auth script: clients need a key.
$yaml .= "keys:\n  - {key: sk-example, user_id: example, total_quota: 5000000}\n";

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value('nginx_conf', $conf);
    $block->set_value('user_files', ">>> llmproxy.yaml\n$yaml");
});

run_tests();

__DATA__

=== TEST 1: the example config serves the seed's scripts end to end
--- request
POST /v1/chat/completions
{"model":"gpt-4","messages":[{"role":"user","content":"hi"}],"viplevel":3}
--- more_headers
X-Request-ID: example-1
Authorization: Bearer sk-example
--- response_headers
X-LLMProxy-Backend: ultra
X-Request-ID: example-1
X-Seen-Model: llama-3-70b-instruct
X-Seen-Original-Model: gpt-4
!Content-Length
--- response_body_like
^\{(?=.*"model":"gpt-4")(?=.*"choices":\[\]).*\}$
--- error_log eval
[qr/llmproxy: engine \S+ loaded from \S+llmproxy.yaml \(3 backends; hooks: routing, auth, request_transform, response_transform, rate_limit, usage, error_handler\)/,
 qr/llmproxy: usage of request example-1 on 'ultra': \{.*"billable_tokens":28/]
--- no_error_log
[error]



=== TEST 2: viplevel 1 goes to high-performance through the example config
--- request
POST /v1/chat/completions
{"model":"gpt-3.5","viplevel":1}
--- more_headers
Authorization: Bearer sk-example
--- response_headers
X-LLMProxy-Backend: high-performance
X-Seen-Model: qwen-72b-chat
--- response_body_like
"model":"gpt-3.5"
--- no_error_log
[error]



=== TEST 3: the status location shows the worker's engine
--- request
GET /llmproxy/status
--- response_body_like
"hooks":"routing, auth, request_transform, response_transform, rate_limit, usage, error_handler"
--- no_error_log
[error]



=== TEST 4: /metrics answers in the gateway's names, for the requests of this file
--- request
GET /metrics
--- response_headers
Content-Type: text/plain; version=0.0.4
--- response_body_like eval
qr/^# HELP llmproxy_requests_total .*
llmproxy_requests_total\{backend="ultra",status="200"\} [1-9].*
llmproxy_hook_calls_total\{hook="routing"\} [1-9].*
llmproxy_hook_duration_seconds_bucket\{hook="usage",le="0.00001"\} \d+
.*llmproxy_vm_pool\{stat="capacity"\} [1-9]/s
--- no_error_log
[error]
