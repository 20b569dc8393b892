# The usage ledger from nginx (docs/adr/028): every admitted request
# leaves one row in the standalone gateway's schema, written by the
# module's writer thread off the request path, readable by
# `llmproxy usage --config FILE`; quotas are charged (billable_tokens, else
# total_tokens) in the shared dict and persisted in the same database.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();
my $bin = $ENV{LLMPROXY_BIN} // repo_root() . '/target/debug/llmproxy';
plan skip_all => "the llmproxy binary is not built ($bin): cargo build -p llmproxy-server --bin llmproxy"
    unless -x $bin;

add_block_preprocessor(sub {
    my $block = shift;
    return unless exists $block->{config};
    my $config = $block->config;
    $config =~ s/\@LLMPROXY_BIN\@/$bin/g;
    $block->set_value('config', $config);
});
gateway_setup();
run_tests();

__DATA__

=== TEST 1: 5 admitted requests (one refused) give 5 ledger rows; `llmproxy usage` reads them; the quota is charged
--- yaml
keys:
  - {key: sk-l1, user_id: ledger-user, total_quota: 1000}
ledger: {path: $TEST_NGINX_SERVROOT/html/usage.db, flush_ms: 10}
--- hooks
  usage:
    script: |
      return {prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens,
              total_tokens = usage.total_tokens, billable_tokens = 10}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local statuses = {}
            for i = 1, 5 do
                statuses[i] = drive.chat(port, '{"model":"gpt-4"}', { Authorization = "Bearer sk-l1" })
            end
            statuses[6] = drive.chat(port, '{"model":"gpt-4"}', { Authorization = "Bearer sk-nope" })
            ngx.say("statuses: ", table.concat(statuses, " "))
            ngx.sleep(0.5)
            local conf = ngx.config.prefix() .. "html/llmproxy.yaml"
            local p = io.popen("@LLMPROXY_BIN@ usage --config " .. conf .. " --records 2>&1")
            local out = p:read("*a")
            p:close()
            local n = select(2, out:gsub('"request_id"', ""))
            local users = select(2, out:gsub('"user_id":%s*"ledger%-user"', ""))
            local fps = select(2, out:gsub('"key":%s*"sha256:%x+"', ""))
            ngx.say("records: ", n, ", ledger-user: ", users, ", key fingerprints: ", fps)
            p = io.popen("@LLMPROXY_BIN@ usage --config " .. conf .. " 2>&1")
            out = p:read("*a")
            p:close()
            ngx.say("summary: ", out:match('"billable_tokens":%s*(%d+)'))
            local m, _, text = drive.metrics(port)
            ngx.say("metrics: written ", m and m["llmproxy_ledger_records_total"],
                ", dropped ", m and m["llmproxy_ledger_dropped_total"])
            -- The ledger's families too are core's catalog's.
            local problems = require("llmproxy").metric_problems(text or "")
            ngx.say("catalog problems: ", #problems, table.concat(problems, "; "))
        }
    }
--- request
GET /drive
--- response_body
statuses: 200 200 200 200 200 401
records: 5, ledger-user: 5, key fingerprints: 5
summary: 50
metrics: written 5, dropped 0
catalog problems: 0



=== TEST 2: the quota in the shared dict: 50 of 1000 used; a key with 20 left is refused once charged past it
--- yaml
keys:
  - {key: sk-l2, user_id: quota-user, total_quota: 70}
ledger: {path: $TEST_NGINX_SERVROOT/html/usage.db, flush_ms: 10}
--- hooks
  usage:
    script: |
      return {billable_tokens = 40}
--- more_headers
Authorization: Bearer sk-l2
--- request eval
[("POST /v1/chat/completions\n{\"model\":\"gpt-4\"}") x 3]
--- error_code eval
[200, 200, 429]
--- response_body_like eval
[qr/"choices"/, qr/"choices"/, qr/"code":"quota_exhausted"/]



=== TEST 3: a fresh shared dict (as after a restart): the key's usage comes back from the ledger (80 of 70: refused)
--- http_config
    lua_shared_dict llmproxy_limits_fresh 1m;
--- init_opts
{ limits_dict = "llmproxy_limits_fresh" }
--- yaml
keys:
  - {key: sk-l2, user_id: quota-user, total_quota: 70}
ledger: {path: $TEST_NGINX_SERVROOT/html/usage.db, flush_ms: 10}
--- more_headers
Authorization: Bearer sk-l2
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 429
--- response_body chomp
{"error":{"message":"API key quota is exhausted","type":"auth_error","code":"quota_exhausted"}}



=== TEST 4: a changed configured used_quota resets the key's usage (as the gateway's reload): 10 of 70, two more requests of 40
--- yaml
keys:
  - {key: sk-l2, user_id: quota-user, total_quota: 70, used_quota: 10}
ledger: {path: $TEST_NGINX_SERVROOT/html/usage.db, flush_ms: 10}
--- hooks
  usage:
    script: |
      return {billable_tokens = 40}
--- more_headers
Authorization: Bearer sk-l2
--- request eval
[("POST /v1/chat/completions\n{\"model\":\"gpt-4\"}") x 3]
--- error_code eval
[200, 200, 429]



=== TEST 5: two requests, then a graceful stop at once (QUIT): the exiting worker commits their rows first
--- yaml
ledger: {path: $TEST_NGINX_SERVROOT/html/quit.db, flush_ms: 100}
--- request eval
[("POST /v1/chat/completions\n{\"model\":\"gpt-4\"}") x 2]
--- error_code eval
[200, 200]
--- stop_after
--- no_error_log
[error]



=== TEST 6: a fresh nginx reads the stopped one's ledger: both rows are there
--- yaml
ledger: {path: $TEST_NGINX_SERVROOT/html/quit.db, flush_ms: 100}
--- config
    location = /rows {
        content_by_lua_block {
            local conf = ngx.config.prefix() .. "html/llmproxy.yaml"
            local p = io.popen("@LLMPROXY_BIN@ usage --config " .. conf .. " --records 2>&1")
            local out = p:read("*a")
            p:close()
            ngx.say("rows: ", select(2, out:gsub('"request_id"', "")))
        }
    }
--- request
GET /rows
--- response_body
rows: 2



=== TEST 7: a client that leaves a stream before its end is recorded as 499, as the gateway records it; a stream read to its end as 200
--- yaml
ledger: {path: $TEST_NGINX_SERVROOT/html/left.db, flush_ms: 10}
--- config
    location = /leave {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local body = '{"model":"gpt-4","stream":true,"messages":[]}'
            local sock = assert(drive.send(port, "POST", "/v1/chat/completions", {
                ["Content-Type"] = "application/json", ["X-Mock-Chunks"] = "6", ["X-Mock-Chunk-Delay-Ms"] = "150",
            }, body))
            repeat
                local line = assert(sock:receive("*l"))
            until line:find("^data:")
            sock:close() -- the client leaves after the first event
            ngx.sleep(1.5) -- the stream's end reaches nginx, then its log phase
            local status = drive.chat(port, body, { ["X-Mock-Chunks"] = "2" })
            ngx.sleep(0.3)
            ngx.say("second stream: ", status, "; rows' statuses: ", drive.ledger_statuses("@LLMPROXY_BIN@"))
        }
    }
--- request
GET /leave
--- response_body
second stream: 200; rows' statuses: 499 200
--- timeout: 10
--- no_error_log
[error]



=== TEST 8: a client that leaves while its whole answer is read in a subrequest (response_transform on) is recorded as 499, as the gateway records it; the next request is served
--- yaml
ledger: {path: $TEST_NGINX_SERVROOT/html/left-capture.db, flush_ms: 10}
--- hooks
  response_transform:
    script: |
      return nil
--- config
    location = /leave {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local body = '{"model":"gpt-4","messages":[]}'
            local sock = assert(drive.send(port, "POST", "/v1/chat/completions", {
                ["Content-Type"] = "application/json", ["X-Mock-Delay-Ms"] = "600",
            }, body))
            ngx.sleep(0.2)
            sock:close() -- the client leaves while the backend has not answered yet
            ngx.sleep(1.2) -- the backend's answer reaches nginx, then the log phase
            local status = drive.chat(port, body, {})
            ngx.sleep(0.3)
            ngx.say("next: ", status, "; rows' statuses: ", drive.ledger_statuses("@LLMPROXY_BIN@"))
        }
    }
--- request
GET /leave
--- response_body
next: 200; rows' statuses: 499 200
--- timeout: 10
--- no_error_log
[error]
