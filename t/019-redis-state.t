# `state: {backend: redis}` from nginx (docs/adr/047): the limiter's
# buckets, the concurrency slots and the keys' quota usage in Redis, with
# the core's key layout and scripts (the standalone gateway's), so nginx
# nodes and gateways on one Redis share one limit and one quota. A private
# redis-server runs for this file.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;
use Test::LLMProxy::Redis;
use IO::Socket::INET;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

start_redis();
# The standalone gateway of TEST 7 (the debug build make test-openresty
# makes), on a free port, stopped at the end whatever happens.
my $bin = $ENV{LLMPROXY_BIN} // repo_root() . '/target/debug/llmproxy';
$ENV{TEST_NGINX_LLMPROXY_BIN} = $bin;
{
    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1) or die "$!\n";
    $ENV{TEST_NGINX_GW_PORT} = $s->sockport;
}
END {
    my $pidfile = servroot() . '/gw.pid';
    if (open my $fh, '<', $pidfile) {
        my $pid = <$fh>;
        kill 'TERM', $pid if $pid && $pid =~ /^\d+$/;
    }
}
gateway_setup();
run_tests();

__DATA__

=== TEST 1: key_rpm 3 in Redis: the 4th request gets 429 key_rate_limit with the bucket's Retry-After (60/3 s)
--- yaml
keys:
  - {key: sk-r1, user_id: a}
limits: {key_rpm: 3}
state: {backend: redis, url: "redis://127.0.0.1:$TEST_NGINX_REDIS_PORT", prefix: "t1:"}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local h = { Authorization = "Bearer sk-r1" }
            for _ = 1, 4 do
                local status, headers, body = drive.chat(port, '{"model":"gpt-4"}', h)
                ngx.say(status, " ", headers["retry-after"] or "-", " ",
                    status == 200 and "choices" or body)
                ngx.sleep(0.02) -- the slot comes back in a timer after log()
            end
        }
    }
--- request
GET /drive
--- response_body_like
^200 - choices
200 - choices
200 - choices
429 (19|20) \{"error":\{"message":"this API key's request rate limit is reached","type":"rate_limit","code":"key_rate_limit"\}\}
$
--- no_error_log
[error]



=== TEST 2: the bucket is where the gateway keeps it (prefix:k:<fingerprint>:rpm, fields t, ts, c), and the slots were given back
--- yaml
keys:
  - {key: sk-r1, user_id: a}
limits: {key_rpm: 3}
state: {backend: redis, url: "redis://127.0.0.1:$TEST_NGINX_REDIS_PORT", prefix: "t1:"}
--- config
    location = /peek {
        content_by_lua_block {
            local red = require("llmproxy_drive").redis($TEST_NGINX_REDIS_PORT)
            local keys = red:keys("t1:k:*:rpm")
            ngx.say("buckets: ", #keys)
            local v = red:hmget(keys[1], "t", "ts", "c")
            ngx.say("tokens below 1: ", tonumber(v[1]) < 1, ", limit: ", v[3])
            local slots = red:keys("t1:k:*:slots")
            local held = 0
            for _, k in ipairs(slots) do
                local h = red:hgetall(k)
                for i = 2, #h, 2 do held = held + tonumber(h[i]) end
            end
            ngx.say("slots held: ", held)
            ngx.say("workers announced: ", #red:keys("t1:inst:*") > 0)
        }
    }
--- request
GET /peek
--- response_body
buckets: 1
tokens below 1: true, limit: 3
slots held: 0
workers announced: true



=== TEST 3: the quota lives in Redis: charged there, and a usage another node wrote there is enforced
--- yaml
keys:
  - {key: sk-r3, user_id: q, total_quota: 1000}
state: {backend: redis, url: "redis://127.0.0.1:$TEST_NGINX_REDIS_PORT", prefix: "t3:"}
--- hooks
  usage:
    script: |
      return {billable_tokens = 40}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local h = { Authorization = "Bearer sk-r3" }
            local s1 = drive.chat(port, '{"model":"gpt-4"}', h)
            ngx.sleep(0.2) -- the charge runs in a timer after log()
            local red = drive.redis($TEST_NGINX_REDIS_PORT)
            local q = red:keys("t3:q:*")[1]
            ngx.say(s1, " used: ", red:hget(q, "used"))
            -- Another node (a gateway, say) charged the rest.
            red:hset(q, "used", 1000)
            local s2, _, b2 = drive.chat(port, '{"model":"gpt-4"}', h)
            ngx.say(s2, " ", b2)
        }
    }
--- request
GET /drive
--- response_body
200 used: 40
429 {"error":{"message":"API key quota is exhausted","type":"auth_error","code":"quota_exhausted"}}



=== TEST 4: Redis unreachable with on_error: allow: admitted uncounted (fail open)
--- yaml
keys:
  - {key: sk-r5, user_id: a}
limits: {key_rpm: 1}
state: {backend: redis, url: "redis://127.0.0.1:1", prefix: "t5:", on_error: allow}
--- more_headers
Authorization: Bearer sk-r5
--- request eval
[("POST /v1/chat/completions\n{\"model\":\"gpt-4\"}") x 2]
--- error_code eval
[200, 200]



=== TEST 5: Redis unreachable: 503 state_unavailable by default (fail closed), said in the log
--- yaml
keys:
  - {key: sk-r4, user_id: a}
limits: {key_rpm: 3}
state: {backend: redis, url: "redis://127.0.0.1:1", prefix: "t4:"}
--- more_headers
Authorization: Bearer sk-r4
--- request
POST /v1/chat/completions
{"model":"gpt-4"}
--- error_code: 503
--- response_body chomp
{"error":{"message":"the gateway's rate limit and quota store is unavailable","type":"backend_error","code":"state_unavailable"}}
--- error_log
cannot connect to 127.0.0.1:1



=== TEST 6: the failed calls are counted (llmproxy_state_errors_total, as the gateway's)
--- config
    location = /count {
        content_by_lua_block {
            ngx.sleep(0.3) -- workers sync their counts every 0.1 s
            local m = require("llmproxy_drive").metrics(ngx.var.server_port)
            ngx.say("state errors counted: ", (m and m.llmproxy_state_errors_total or 0) > 0)
        }
    }
--- request
GET /count
--- response_body
state errors counted: true



=== TEST 7: key_concurrency 1 in Redis: a second request in flight is refused; slots come back after each request
--- yaml
keys:
  - {key: sk-r6, user_id: a}
limits: {key_concurrency: 1}
state: {backend: redis, url: "redis://127.0.0.1:$TEST_NGINX_REDIS_PORT", prefix: "t6:"}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local h = { Authorization = "Bearer sk-r6", ["X-Mock-Delay-Ms"] = "300" }
            local slow = ngx.thread.spawn(drive.chat, port, '{"model":"gpt-4"}', h)
            ngx.sleep(0.1)
            local s2 = drive.chat(port, '{"model":"gpt-4"}', { Authorization = "Bearer sk-r6" })
            local _, s1 = ngx.thread.wait(slow)
            ngx.sleep(0.05) -- the slot is given back in a timer after log()
            local s3 = drive.chat(port, '{"model":"gpt-4"}', { Authorization = "Bearer sk-r6" })
            ngx.sleep(0.05)
            local s4 = drive.chat(port, '{"model":"gpt-4"}', { Authorization = "Bearer sk-r6" })
            ngx.say(s1, " ", s2, " ", s3, " ", s4)
        }
    }
--- request
GET /drive
--- response_body
200 429 200 200
--- no_error_log
[error]



=== TEST 8: one limit for nginx and a standalone gateway on the same Redis and prefix: key_rpm N = 5, 2N requests alternating between them admit exactly N (the gateway in mode: exact, as nginx counts)
--- yaml
keys:
  - {key: sk-r7, user_id: a}
limits: {key_rpm: 5}
state: {backend: redis, url: "redis://127.0.0.1:$TEST_NGINX_REDIS_PORT", prefix: "t7:"}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local root = "$TEST_NGINX_SERVROOT"
            local gw = $TEST_NGINX_GW_PORT
            local f = assert(io.open(root .. "/gw.yaml", "w"))
            f:write([[
listen: "127.0.0.1:$TEST_NGINX_GW_PORT"
backends:
  - {name: standard, url: "http://127.0.0.1:$TEST_NGINX_PORT_1"}
keys:
  - {key: sk-r7, user_id: a}
limits: {key_rpm: 5}
state: {backend: redis, url: "redis://127.0.0.1:$TEST_NGINX_REDIS_PORT", prefix: "t7:", mode: exact}
]])
            f:close()
            os.execute("$TEST_NGINX_LLMPROXY_BIN serve --config " .. root .. "/gw.yaml >" .. root
                .. "/gw.log 2>&1 & echo $! > " .. root .. "/gw.pid")
            local up
            for _ = 1, 100 do
                local st = drive.request(gw, "GET", "/healthz", {}, nil)
                if st == 200 then up = true break end
                ngx.sleep(0.05)
            end
            if not up then
                ngx.say("the gateway did not start: see gw.log")
                return
            end
            local h = { Authorization = "Bearer sk-r7" }
            local port = ngx.var.server_port
            local out = {}
            local admitted = 0
            for i = 1, 10 do
                local p = i % 2 == 1 and port or gw
                local status = drive.chat(p, '{"model":"gpt-4"}', h)
                out[#out + 1] = (p == gw and "gw " or "nginx ") .. status
                admitted = admitted + (status == 200 and 1 or 0)
                ngx.sleep(0.02) -- slots come back after the response
            end
            local pf = io.open(root .. "/gw.pid")
            local pid = pf and pf:read("*l")
            if pf then pf:close() end
            if pid then os.execute("kill " .. pid) end
            ngx.say(table.concat(out, ", "))
            ngx.say("admitted: ", admitted)
        }
    }
--- request
GET /drive
--- response_body
nginx 200, gw 200, nginx 200, gw 200, nginx 200, gw 429, nginx 429, gw 429, nginx 429, gw 429
admitted: 5



=== TEST 9: Redis stops answering (CLIENT PAUSE): after failed calls the breaker stops calling it (503 at once), and a probe once it answers again closes it without a restart
--- yaml
keys:
  - {key: sk-r9, user_id: a}
limits: {key_rpm: 1000}
state: {backend: redis, url: "redis://127.0.0.1:$TEST_NGINX_REDIS_PORT", prefix: "t9:", timeout_ms: 100}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local h = { Authorization = "Bearer sk-r9" }
            local function count(name)
                ngx.sleep(0.25) -- workers sync their counts every 0.1 s
                local m = drive.metrics(port)
                return m and m[name] or 0
            end
            ngx.say("up: ", (drive.chat(port, '{"model":"gpt-4"}', h)))
            local skipped0 = count("llmproxy_state_skipped_total")
            os.execute("redis-cli -p $TEST_NGINX_REDIS_PORT client pause 3000 ALL >/dev/null 2>&1")
            local statuses = {}
            for i = 1, 8 do
                statuses[i] = drive.chat(port, '{"model":"gpt-4"}', h)
            end
            ngx.say("paused: ", table.concat(statuses, " "))
            ngx.say("skipped some: ", count("llmproxy_state_skipped_total") - skipped0 >= 3)
            local status
            for _ = 1, 60 do
                ngx.sleep(0.1)
                status = drive.chat(port, '{"model":"gpt-4"}', h)
                if status == 200 then
                    break
                end
            end
            ngx.say("back: ", status)
        }
    }
--- request
GET /drive
--- timeout: 20
--- response_body
up: 200
paused: 503 503 503 503 503 503 503 503
skipped some: true
back: 200



=== TEST 10: an ACL user in the URL (redis://user:password@..., the password percent-encoded): the module authenticates as that user, as the gateway does
--- yaml
keys:
  - {key: sk-r10, user_id: a}
limits: {key_rpm: 2}
state: {backend: redis, url: "redis://llmacl:s3%3Acr%40t%25@127.0.0.1:$TEST_NGINX_REDIS_PORT", prefix: "t10:"}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            -- The user exists before the module's first connection; the
            -- default user has no password, so `AUTH <password>` alone
            -- would fail (the request would get 503), as would the
            -- password as written in the URL, undecoded.
            local red = drive.redis($TEST_NGINX_REDIS_PORT)
            assert(red:acl("setuser", "llmacl", "on", ">s3:cr@t%", "~*", "&*", "+@all"))
            local port = ngx.var.server_port
            local h = { Authorization = "Bearer sk-r10" }
            local out = {}
            for _ = 1, 3 do
                out[#out + 1] = drive.chat(port, '{"model":"gpt-4"}', h)
                ngx.sleep(0.02) -- the slot comes back in a timer after log()
            end
            local users = red:eval("return #redis.call('KEYS', 't10:k:*')", 0)
            ngx.say(table.concat(out, " "), "; counters in Redis: ", tostring(users > 0))
        }
    }
--- request
GET /drive
--- response_body
200 200 429; counters in Redis: true
--- no_error_log
[error]



=== TEST 11: with Redis state the ledger keeps the rows but not the quota (Redis holds it), as the gateway's ledger: a config over the same file with local state reads the key's configured usage
--- yaml
keys:
  - {key: sk-r11, user_id: l, total_quota: 1000, used_quota: 5}
state: {backend: redis, url: "redis://127.0.0.1:$TEST_NGINX_REDIS_PORT", prefix: "t11:"}
ledger: {path: $TEST_NGINX_SERVROOT/html/redis-usage.db, flush_ms: 10}
--- hooks
  usage:
    script: |
      return {billable_tokens = 40}
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local h = { Authorization = "Bearer sk-r11" }
            local s1 = drive.chat(port, '{"model":"gpt-4"}', h)
            local s2 = drive.chat(port, '{"model":"gpt-4"}', h)
            ngx.sleep(0.5)
            local prefix = ngx.config.prefix()
            local run = function(args)
                local p = io.popen("$TEST_NGINX_LLMPROXY_BIN " .. args .. " 2>&1")
                local out = p:read("*a")
                p:close()
                return out
            end
            local conf = prefix .. "html/llmproxy.yaml"
            local rows = run("usage --records --config " .. conf)
            local n = select(2, rows:gsub('"request_id"', ""))
            local billed = run("usage --config " .. conf):match('"billable_tokens":%s*(%d+)')
            -- The same keys and ledger, local state: `used_quota` is then the
            -- ledger's key_usage, else the configured value.
            local f = assert(io.open(prefix .. "html/local.yaml", "w"))
            f:write("keys:\n  - {key: sk-r11, user_id: l, total_quota: 1000, used_quota: 5}\n",
                "ledger: {path: ", prefix, "html/redis-usage.db}\n")
            f:close()
            local listed = run("keys list --config " .. prefix .. "html/local.yaml")
            ngx.say(s1, " ", s2, "; rows: ", n, ", billed: ", billed,
                "; the ledger's quota usage: ", listed:match("active%s+%d+%s+(%d+)"))
        }
    }
--- request
GET /drive
--- response_body
200 200; rows: 2, billed: 80; the ledger's quota usage: 5
--- no_error_log
[error]
