--- Active health probes (`gateway.health.probe_interval_ms` > 0): every
-- interval, each worker asks each backend it can reach for
-- `health.probe_path` and hands the outcome to its balancer, as the
-- standalone gateway's probe loop does: a 2xx is a success, anything else
-- (no connection, a timeout, another status) a failure; successes and
-- failures count as requests' do (the core's health rules).
-- @module resty.llmproxy.probe

local ngx = ngx
local backends = require "resty.llmproxy.backends"
local metrics = require "resty.llmproxy.metrics"
local W = require "resty.llmproxy.worker"

local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local match = string.match
local find = string.find
local tcp = ngx.socket.tcp
local ngx_log = ngx.log
local ERR = ngx.ERR

local _M = {}

-- The probe request to `b` for `path`: GET with the backend's Host and its
-- config headers, as the gateway sends it.
local function request(b, path)
    local host = b.host
    if find(host, ":", 1, true) then
        host = "[" .. host .. "]" -- IPv6
    end
    if b.port ~= 80 then
        host = host .. ":" .. tostring(b.port)
    end
    local req, n = { "GET ", path, " HTTP/1.1\r\nHost: ", host, "\r\n" }, 5
    if b.headers then
        for k, v in pairs(b.headers) do
            req[n + 1], req[n + 2], req[n + 3], req[n + 4] = k, ": ", tostring(v), "\r\n"
            n = n + 4
        end
    end
    req[n + 1] = "Connection: close\r\n\r\n"
    return req
end

-- Whether `b` answers `path` with a 2xx, each step (connect, send, the
-- status line) within `timeout_ms`.
local function answers(b, path, timeout_ms)
    local sock = tcp()
    sock:settimeout(timeout_ms)
    if not sock:connect(b.host, b.port) then
        return false
    end
    local line
    if sock:send(request(b, path)) then
        line = sock:receive("*l")
    end
    sock:close()
    local status = line and tonumber(match(line, "^HTTP/%d%.%d (%d%d%d)"))
    return status ~= nil and status >= 200 and status < 300
end

local running = false

-- One round over the current engine's backends (a reload's new list is
-- the next round's); a round still running when the next is due is not
-- overlapped.
local function round(premature)
    local state = W.current
    local health = state and state.health
    if premature or running or not health or (tonumber(health.probe_interval_ms) or 0) <= 0 then
        return
    end
    running = true
    local set = state.backends
    for _, b in ipairs(set.list) do
        if b.usable then
            local ok = answers(b, health.probe_path, health.probe_timeout_ms)
            local healthy, ewma, active = backends.probed(set, b, ok and "success" or "failure")
            if W.store then
                metrics.backend(W.store, b.name, healthy, ewma, active)
            end
        end
    end
    running = false
end

local started = false

--- Probe every `interval_ms` from now on in this worker (once per worker:
-- later calls, from reloads, change nothing; each round reads the engine
-- loaded then, and skips when its config has probes off).
-- @tparam number interval_ms `health.probe_interval_ms` (0: no probes)
-- @phases init_worker
function _M.start(interval_ms)
    interval_ms = tonumber(interval_ms) or 0
    if started or interval_ms <= 0 then
        return
    end
    local ok, err = ngx.timer.every(interval_ms / 1000, round)
    if not ok then
        ngx_log(ERR, "llmproxy: cannot start the health probe timer: ", err)
        return
    end
    started = true
end

return _M
