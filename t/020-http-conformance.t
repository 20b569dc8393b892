# The HTTP conformance suite (conformance/http.json) against nginx with the
# module: the same cases the standalone gateway runs
# (proxy/tests/http_conformance.rs), with the same `llmproxy mock-backend`s
# as backends. One nginx worker: each case installs its config with
# reload() (from a timer, as a config watcher would) after clearing the
# limiter's dict, then drives its requests through real sockets.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Socket::INET;
use Time::HiRes qw(sleep);
use Test::LLMProxy::Nginx;
use Test::LLMProxy::Gateway;

plan skip_all => 'libllmproxy.so not built (' . llmproxy_lib() . '): make ffi, or set LLMP_LIB_DIR'
    unless -f llmproxy_lib();
my $bin = $ENV{LLMPROXY_BIN} // repo_root() . '/target/debug/llmproxy';
plan skip_all => "$bin not built (cargo build -p llmproxy-server, or set LLMPROXY_BIN)" unless -x $bin;

sub free_port {
    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1) or die "$!\n";
    return $s->sockport;
}

# One mock per backend name the cases use; `unreachable` gets a port
# nothing listens on.
my (@mocks, @pids);
for my $name (qw(standard ultra)) {
    my $port = free_port();
    my $pid = fork // die "fork: $!\n";
    if ($pid == 0) {
        open STDOUT, '>', '/dev/null';
        open STDERR, '>', '/dev/null';
        exec $bin, 'mock-backend', '--listen', "127.0.0.1:$port", '--name', $name or die "exec: $!\n";
    }
    push @pids, $pid;
    push @mocks, "$name=http://127.0.0.1:$port";
    my $up;
    for (1 .. 100) {
        last if ($up = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port));
        sleep 0.05;
    }
    die "mock-backend $name did not start\n" unless $up;
}
push @mocks, 'unreachable=http://127.0.0.1:' . free_port();
$ENV{TEST_NGINX_MOCKS} = join ',', @mocks;
$ENV{TEST_NGINX_LLMPROXY_BIN} = $bin;
END { kill 'TERM', @pids if @pids; waitpid $_, 0 for @pids }

gateway_setup();
run_tests();

__DATA__

=== TEST 1: every case of conformance/http.json holds on nginx
--- config
    location = /conformance {
        content_by_lua_block {
            local cjson = require "cjson.safe"
            local drive = require "llmproxy_drive"
            local llmproxy = require "resty.llmproxy"
            local port = ngx.var.server_port
            local path = "$TEST_NGINX_SERVROOT/html/case.yaml"
            local urls = {}
            for name, url in ("$TEST_NGINX_MOCKS"):gmatch("([^=,]+)=([^,]+)") do
                urls[name] = url
            end
            local f = assert(io.open("$TEST_NGINX_REPO/conformance/http.json"))
            local doc = assert(cjson.decode(f:read("*a")))
            f:close()

            local function install(case, index)
                local config = case.config
                if case.ledger then
                    config.ledger = { path = "$TEST_NGINX_SERVROOT/html/ledger-" .. index .. ".db", flush_ms = 10 }
                end
                local backends = {}
                for i, name in ipairs(case.backends or { "standard" }) do
                    backends[i] = { name = name, url = assert(urls[name], name) }
                end
                config.backends = backends
                -- JSON is YAML; cjson escapes '/', which YAML need not read.
                local yaml = assert(cjson.encode(config)):gsub("\\/", "/")
                local out = assert(io.open(path, "w"))
                out:write(yaml)
                out:close()
                ngx.shared.llmproxy_limits:flush_all()
                local done, err
                assert(ngx.timer.at(0, function()
                    done, err = llmproxy.reload(path)
                    done = done or false
                end))
                while done == nil do
                    ngx.sleep(0.005)
                end
                return done, err
            end

            local function metrics()
                ngx.sleep(0.25) -- workers sync their counts every 0.1 s
                return assert(drive.metrics(port))
            end

            -- The rows of a ledger, oldest first, as `llmproxy usage
            -- --records` prints them (the reader the gateway's tests use).
            local function ledger_rows(db)
                local p = assert(io.popen("$TEST_NGINX_LLMPROXY_BIN usage --records --db " .. db .. " 2>/dev/null"))
                local rows = cjson.decode(p:read("*a"))
                p:close()
                return type(rows) == "table" and rows or {}
            end

            local failed, n, skipped = 0, 0, {}
            local function for_nginx(case)
                if not case.hosts then
                    return true
                end
                for _, h in ipairs(case.hosts) do
                    if h == "nginx" then
                        return true
                    end
                end
                skipped[#skipped + 1] = case.name .. " (" .. tostring(case.why) .. ")"
                return false
            end
            local function fail(...)
                failed = failed + 1
                ngx.say("FAIL ", ...)
            end
            -- Deep equality of decoded JSON values (objects as sets of fields,
            -- as the gateway's runner compares them).
            local same = require("casejson").same

            local function pointer(v, ptr)
                for part in ptr:gmatch("/([^/]*)") do
                    if type(v) ~= "table" then
                        return nil
                    end
                    local i = tonumber(part)
                    if i and v[1] ~= nil then
                        v = v[i + 1]
                    else
                        v = v[part]
                    end
                end
                return v
            end

            for _, case in ipairs(doc.cases) do
                if not for_nginx(case) then
                    goto next_case
                end
                n = n + 1
                local ok, err = install(case, n)
                if not ok then
                    fail(case.name, ": the config did not load: ", tostring(err))
                else
                    local before = case.metrics and metrics()
                    for i, req in ipairs(case.requests) do
                        local at = case.name .. ": request " .. i
                        if req.wait_ms then
                            ngx.sleep(req.wait_ms / 1000)
                        end
                        local method = req.method or "POST"
                        local headers = {}
                        for k, v in pairs(req.headers or {}) do
                            headers[k] = v
                        end
                        if req.key then
                            headers.Authorization = "Bearer " .. req.key
                        end
                        local pad = req.pad or {}
                        if pad.header then
                            headers["X-Pad"] = string.rep("a", pad.header)
                        end
                        local path = req.path or "/v1/chat/completions"
                        if pad.query then
                            path = path .. "?pad=" .. string.rep("a", pad.query)
                        end
                        local body = req.raw or (req.body and cjson.encode(req.body))
                        if not body and method ~= "GET" then
                            body = '{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}'
                        end
                        if body then
                            headers["Content-Type"] = "application/json"
                        end
                        local status, h, text, all = drive.request(port, method, path, headers, body)
                        local e = req.expect or {}
                        if e.status and status ~= e.status then
                            fail(at, ": status ", tostring(status), " ~= ", e.status, "; body ", tostring(text))
                        end
                        if e.json then
                            local got = cjson.decode(text or "")
                            for ptr, want in pairs(e.json) do
                                local v = got and pointer(got, ptr)
                                if v ~= want then
                                    fail(at, ": ", ptr, " is ", tostring(v), ", not ", tostring(want), "; body ", text)
                                end
                            end
                        end
                        for name, re in pairs(e.headers or {}) do
                            local v = h and h[name]
                            if not (v and ngx.re.find(v, re, "jo")) then
                                fail(at, ": header ", name, " is ", tostring(v), ", not /", re, "/")
                            end
                        end
                        for name, want in pairs(e.header_values or {}) do
                            local got = all and all[name] or {}
                            local same_values = #got == #want
                            for j = 1, #want do
                                same_values = same_values and got[j] == want[j]
                            end
                            if not same_values then
                                fail(at, ": header ", name, " came as ", cjson.encode(got), ", not ",
                                    cjson.encode(want))
                            end
                        end
                        for _, name in ipairs(e.no_headers or {}) do
                            if h and h[name] then
                                fail(at, ": header ", name, " should be absent, is ", h[name])
                            end
                        end
                        for _, s in ipairs(e.body_contains or {}) do
                            if not (text and text:find(s, 1, true)) then
                                fail(at, ": body lacks ", s, ": ", tostring(text))
                            end
                        end
                        for _, s in ipairs(e.body_lacks or {}) do
                            if text and text:find(s, 1, true) then
                                fail(at, ": body has ", s, ": ", text)
                            end
                        end
                    end
                    if case.ledger then
                        local rows = {}
                        for _ = 1, 100 do
                            rows = ledger_rows(case.config.ledger.path)
                            if #rows >= #case.ledger then
                                break
                            end
                            ngx.sleep(0.03)
                        end
                        if #rows ~= #case.ledger then
                            fail(case.name, ": ", #rows, " ledger rows, not ", #case.ledger)
                        end
                        for i, want in ipairs(case.ledger) do
                            for field, v in pairs(want) do
                                local got = rows[i] and rows[i][field]
                                if rows[i] and not same(got, v) then
                                    fail(case.name, ": ledger row ", i, ": ", field, " is ", cjson.encode(got),
                                        ", not ", cjson.encode(v))
                                end
                            end
                        end
                    end
                    if before then
                        local after = metrics()
                        for sample, want in pairs(case.metrics) do
                            local got = (after[sample] or 0) - (before[sample] or 0)
                            if got ~= want then
                                fail(case.name, ": ", sample, " rose by ", got, ", not ", want)
                            end
                        end
                    end
                end
                ::next_case::
            end
            for _, why in ipairs(skipped) do
                ngx.say("not for nginx: ", why)
            end
            ngx.say(n, " cases, ", failed, " failures")
        }
    }
--- request
GET /conformance
--- timeout: 60
--- diag_body
(cases|FAIL|not for)
--- response_body_like
\d+ cases, 0 failures$
