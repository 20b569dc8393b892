# The harness with workers(2): both workers start, and a reload between
# blocks replaces both (their init_worker lines belong to the new block).

use strict;
use warnings;
# TEST 2 is about reloads: always reload here.
BEGIN { delete $ENV{TEST_NGINX_NO_RELOAD} }
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;

workers(2);

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value('http_config', <<'CONF') unless defined $block->http_config;
    lua_shared_dict sanity 1m;
    init_worker_by_lua_block {
        ngx.shared.sanity:incr("started", 1, 0)
        ngx.log(ngx.NOTICE, "sanity worker ", ngx.worker.id(), " of ", ngx.worker.count(), " up, pid ", ngx.worker.pid())
    }
CONF
});

run_tests();

__DATA__

=== TEST 1: two workers, each ran init_worker
--- config
    location = /t {
        content_by_lua_block { ngx.say(ngx.worker.count(), " workers") }
    }
--- request
GET /t
--- response_body
2 workers
--- error_log
sanity worker 0 of 2 up
sanity worker 1 of 2 up
--- no_error_log
[error]



=== TEST 2: after a reload both workers are new (shared dict survives, counts 4 starts)
--- config
    location = /t {
        content_by_lua_block { ngx.say(ngx.shared.sanity:get("started")) }
    }
--- request
GET /t
--- response_body
4
--- error_log
sanity worker 0 of 2 up
sanity worker 1 of 2 up
--- no_error_log
[error]
