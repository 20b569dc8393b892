# One limit for the whole nginx, not one per worker: with workers(2),
# concurrent requests spread over both workers (the listen socket uses
# reuseport) are admitted as one token bucket admits them: the limit's
# burst, plus what refills while the test runs, and no more.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();

workers(2);
gateway_setup();
run_tests();

__DATA__

=== TEST 1: 10 rpm across 2 workers: 10 pass, not 20 (and both workers answered)
--- listen_opts
reuseport
--- yaml
limits: {global_rpm: 10}
--- location
        add_header X-Worker $pid always;
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            local threads = {}
            for i = 1, 20 do
                threads[i] = ngx.thread.spawn(drive.chat, port, '{"model":"gpt-4"}', {})
            end
            local count, pids, npids = {}, {}, 0
            for i = 1, 20 do
                local _, status, h = ngx.thread.wait(threads[i])
                count[status] = (count[status] or 0) + 1
                local pid = h and h["x-worker"]
                if pid and not pids[pid] then
                    pids[pid] = true
                    npids = npids + 1
                end
            end
            ngx.say("200: ", count[200] or 0, ", 429: ", count[429] or 0, ", workers: ", npids)
        }
    }
--- request
GET /drive
--- response_body
200: 10, 429: 10, workers: 2
--- no_error_log
[error]



=== TEST 2: 200 concurrent requests of one key, key_rpm 100 across 2 workers: the burst of 100 and what refilled, not more
--- listen_opts
reuseport
--- yaml
keys:
  - {key: sk-race, user_id: a}
limits: {key_rpm: 100}
--- location
        add_header X-Worker $pid always;
--- config
    location = /drive {
        content_by_lua_block {
            local drive = require "llmproxy_drive"
            local port = ngx.var.server_port
            ngx.update_time()
            local t0 = ngx.now()
            local threads = {}
            for i = 1, 200 do
                threads[i] = ngx.thread.spawn(drive.chat, port, '{"model":"gpt-4"}',
                    { Authorization = "Bearer sk-race" })
            end
            local count, pids, npids = {}, {}, 0
            for i = 1, 200 do
                local _, status, h = ngx.thread.wait(threads[i])
                count[status] = (count[status] or 0) + 1
                local pid = h and h["x-worker"]
                if pid and not pids[pid] then
                    pids[pid] = true
                    npids = npids + 1
                end
            end
            ngx.update_time()
            -- 100 per minute refills one request per 0.6 s.
            local refilled = math.floor((ngx.now() - t0) / 0.6)
            local ok = count[200] >= 100 and count[200] <= 100 + refilled
            ngx.say(ok and "within the bucket" or "over or under", ", 429: ", count[429] and "some" or "none",
                ", workers: ", npids)
            if not ok then
                ngx.say("200: ", count[200], ", refilled: ", refilled)
            end
        }
    }
--- request
GET /drive
--- response_body
within the bucket, 429: some, workers: 2
--- no_error_log
[error]
