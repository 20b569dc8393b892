# nginx-conf/nginx.conf, the documented example, run exactly as the README
# says: `scripts/nginx-demo up` (what `make nginx-up` runs) starts nginx with
# `-p nginx-conf/ -c nginx.conf` on examples/llmproxy.yaml, unmodified, and
# `llmproxy mock-backend`s on the example's backend addresses
# (127.0.0.1:9001-9003); the README's requests are then sent to :8000 and
# `scripts/nginx-demo down` stops everything. Nothing is rewritten, so the
# ports are the documented ones: the test fails (does not skip) when one of
# them is taken.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use HTTP::Tiny;

my $repo = "$FindBin::Bin/..";
my $lib = "$repo/ffi/target/release/libllmproxy.so";
my $bin = $ENV{LLMPROXY_BIN} // "$repo/target/release/llmproxy";

plan skip_all => "$lib not built (make ffi): nginx.conf loads the in-tree library" unless -f $lib;
plan skip_all => "$bin not built (make release, or set LLMPROXY_BIN)" unless -x $bin;

my $log = "$repo/nginx-conf/logs/error.log";
my $log_from = -s $log // 0;    # earlier runs' lines are not this run's
$ENV{LLMPROXY_BIN} = $bin;
$ENV{NGINX_DEMO_TTL} = 300;    # bounded even if this test dies before `down`
my $up = system("$repo/scripts/nginx-demo", 'up');
END { system("$repo/scripts/nginx-demo", 'down') if defined $up }
is($up, 0, 'scripts/nginx-demo up') or BAIL_OUT('the example did not start');

my $http = HTTP::Tiny->new(timeout => 30);
my $url = 'http://127.0.0.1:8000';

sub chat {
    my ($key, $body, %h) = @_;
    $h{Authorization} = "Bearer $key" if defined $key;
    return $http->post("$url/v1/chat/completions", { headers => \%h, content => $body });
}

# The README's request: a VIP key, viplevel 3.
my $r = chat('sk-example-vip', '{"model":"gpt-4","messages":[{"role":"user","content":"hi"}],"viplevel":3}',
    'X-Request-ID' => 'example-1');
is($r->{status}, 200, 'VIP key, viplevel 3: 200') or diag($r->{content});
is($r->{headers}{'x-llmproxy-backend'}, 'ultra', 'routing.lua picked ultra');
is($r->{headers}{'x-request-id'}, 'example-1', 'the request id is kept');
is($r->{headers}{'x-echo-x-original-model'}, 'gpt-4', 'request_transform.lua ran (the backend saw X-Original-Model)');
like($r->{content}, qr/"model":"gpt-4"/, 'response_transform.lua mapped the model back');

$r = chat('sk-example-basic', '{"model":"gpt-3.5","viplevel":1}');
is($r->{status}, 200, 'basic key, gpt-3.5: 200') or diag($r->{content});
is($r->{headers}{'x-llmproxy-backend'}, 'high-performance', 'viplevel 1: high-performance');

$r = chat('sk-example-basic', '{"model":"gpt-4"}');
is($r->{status}, 403, 'basic key, gpt-4: the seed auth rule denies') or diag($r->{content});

$r = chat(undef, '{"model":"gpt-4"}');
is($r->{status}, 401, 'no key: 401') or diag($r->{content});
like($r->{content}, qr/"type":"auth_error"/, 'an error body from error_handler.lua');

$r = $http->get("$url/llmproxy/status");
like($r->{content}, qr/"hooks":"routing, auth, request_transform, response_transform, rate_limit, usage, error_handler"/,
    'the status location shows the engine');

$r = $http->get("$url/healthz");
is("$r->{status} $r->{content}", '200 {"status":"ok"}', '/healthz as the gateway answers it');
$r = $http->get("$url/v1/models");
is($r->{content}, '{"object":"list","data":[' . join(',', map { qq({"id":"$_","object":"model","created":0,"owned_by":"llmproxy"}) }
    qw(standard high-performance ultra)) . ']}', 'GET /v1/models: the backend names, no key needed, as the gateway');

$r = $http->get("$url/metrics");
like($r->{content}, qr/llmproxy_requests_total\{backend="ultra",status="200"\} [1-9]/, '/metrics counts the requests');

open my $fh, '<', $log or die "$log: $!\n";
seek $fh, $log_from, 0;
my @bad = grep { /\[(?:error|crit|alert|emerg)\]/ } <$fh>;
close $fh;
is_deeply(\@bad, [], 'no error in nginx-conf/logs/error.log');

done_testing();
