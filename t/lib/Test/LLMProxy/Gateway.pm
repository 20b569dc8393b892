package Test::LLMProxy::Gateway;

# The common setup of the t/*.t files that run resty.llmproxy as a gateway:
# three mock backends (t/lib/llmproxy_mock.lua) on $TEST_NGINX_PORT_1..3
# named standard, high-performance and ultra, the balancer upstream, the
# metrics dict, an init_worker that loads html/llmproxy.yaml, and a
# /v1/ location with every phase handler plus /metrics and /healthz.
#
#   use Test::LLMProxy::Gateway;
#   gateway_setup();          # installs a block preprocessor
#
# Block sections it reads (besides the harness's):
#   --- hooks         YAML under `scripts:` of the generated llmproxy.yaml
#   --- yaml          more top-level YAML (e.g. a `gateway:` section)
#   --- backends      replaces the three backends of the YAML (`backends:` list items)
#   --- init_opts     Lua table text: init_worker's opts (default `nil`)
#   --- location      more directives inside `location /v1/`
#   --- http_config / --- config   appended to the generated ones

use strict;
use warnings;
use Test::LLMProxy::Nginx;

my @EXPORTS = qw(gateway_setup mock_servers);

sub import {
    my $caller = caller;
    no strict 'refs';
    *{"${caller}::$_"} = \&{$_} for @EXPORTS;
    return;
}

my $default_backends = <<'YAML';
  - {name: standard,         url: "http://127.0.0.1:$TEST_NGINX_PORT_1", weight: 10}
  - {name: high-performance, url: "http://127.0.0.1:$TEST_NGINX_PORT_2", weight: 10}
  - {name: ultra,            url: "http://127.0.0.1:$TEST_NGINX_PORT_3", weight: 5}
YAML

# The mock servers, one per (name, port number) pair.
sub mock_servers {
    my @pairs = @_ ? @_ : (['standard', 1], ['high-performance', 2], ['ultra', 3]);
    my $out = '';
    for my $m (@pairs) {
        my ($name, $n) = @$m;
        $out .= <<"CONF";
    server {
        listen 127.0.0.1:\$TEST_NGINX_PORT_$n;
        location / { content_by_lua_block { require("llmproxy_mock").chat("$name") } }
    }
CONF
    }
    return $out;
}

# A section's value, or undef when the block has none (Test::Base only
# makes accessors for sections some block has).
sub _sec {
    my ($block, $name) = @_;
    return undef unless exists $block->{$name};
    return $block->$name;
}

sub gateway_setup {
    my (%opts) = @_;
    known_sections(qw(hooks yaml backends init_opts location));
    my $mocks = mock_servers();
    add_block_preprocessor(sub {
        my $block = shift;
        my $init_opts = _sec($block, 'init_opts') // 'nil';
        $init_opts =~ s/\s+\z//;
        my $extra_http = _sec($block, 'http_config') // '';
        my $location = _sec($block, 'location') // '';
        my $extra = _sec($block, 'config') // '';
        $block->set_value('http_config', <<"CONF" . $mocks . $extra_http);
    lua_shared_dict llmproxy_metrics 1m;
    lua_shared_dict llmproxy_limits 1m;
    lua_check_client_abort on;
    upstream llmproxy_backends {
        server 0.0.0.1;   # never used: the balancer sets the peer
        balancer_by_lua_block { require("resty.llmproxy").balancer() }
        keepalive 8;
    }
    init_worker_by_lua_block {
        require("resty.llmproxy").init_worker("\$TEST_NGINX_SERVROOT/html/llmproxy.yaml", $init_opts)
    }
CONF
        $block->set_value('config', <<"CONF" . $extra);
    location /v1/ {
        access_by_lua_block        { require("resty.llmproxy").access() }
        header_filter_by_lua_block { require("resty.llmproxy").header_filter() }
        body_filter_by_lua_block   { require("resty.llmproxy").body_filter() }
        log_by_lua_block           { require("resty.llmproxy").log() }
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Accept-Encoding "";
        proxy_buffering off;
        proxy_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent;
$location
        proxy_pass http://llmproxy_backends;
    }
    location = /metrics {
        content_by_lua_block { require("resty.llmproxy").metrics() }
    }
    location = /healthz {
        content_by_lua_block { require("resty.llmproxy").healthz() }
    }
    error_page 400 414 /llmproxy/refused;
    error_page 494 =431 /llmproxy/refused;
    location = /llmproxy/refused {
        internal;
        content_by_lua_block { require("resty.llmproxy").refused() }
        log_by_lua_block     { require("resty.llmproxy").log() }
    }
CONF
        unless (defined _sec($block, 'user_files')) {
            my $hooks = _sec($block, 'hooks');
            my $scripts = defined $hooks && $hooks =~ /\S/ ? "scripts:\n$hooks" : "scripts: {}\n";
            my $backends = _sec($block, 'backends') // $default_backends;
            my $yaml = _sec($block, 'yaml') // '';
            $block->set_value('user_files', ">>> llmproxy.yaml\nbackends:\n$backends$yaml$scripts");
        }
    });
    return;
}

1;
