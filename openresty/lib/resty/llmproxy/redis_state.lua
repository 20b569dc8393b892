--- The limiter's counters and the keys' quota usage in Redis
-- (`state: {backend: redis}`), from nginx through cosockets
-- (lua-resty-redis: `resty.redis`, or `nginx.redis` as Debian's
-- lua-nginx-redis installs it).
--
-- The key layout and the scripts are the core's (`engine:state()`,
-- `engine:state_keys(id)`), the standalone gateway's too: nginx workers,
-- nginx nodes and gateways on one Redis and prefix share one limit and one
-- quota per key. Each worker is an instance: its concurrency slots count
-- while its announcement lives (renewed by a timer). Calls from log()
-- (releasing a slot, charging a response) run in a zero-delay timer, as
-- cosockets are not available there.
--
-- @module resty.llmproxy.redis_state

local found, redis = pcall(require, "resty.redis")
if not found then
    redis = require "nginx.redis"
end

local ngx = ngx
local log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local timer_at = ngx.timer.at
local sha1_bin = ngx.sha1_bin
local byte = string.byte
local find = string.find
local format = string.format
local concat = table.concat
local floor = math.floor
local max = math.max
local pairs = pairs
local select = select
local setmetatable = setmetatable
local tonumber = tonumber
local tostring = tostring

local _M = {}
local mt = { __index = _M }

--- The error of a call the breaker skipped.
_M.CIRCUIT_OPEN = "not called: the circuit to Redis is open (recent calls failed)"

local UNLIMITED = 2147483647 -- rate_limit_status for a limit that is off
local KEEPALIVE_MS = 60000
-- Cosockets do not pipeline requests: a worker keeps this many idle
-- connections at least (`state.connections` when larger).
local MIN_POOL = 32

local function hex(bin)
    local out = {}
    for i = 1, #bin do
        out[i] = format("%02x", byte(bin, i))
    end
    return concat(out)
end

--- The state of an engine whose config says `state: {backend: redis}`.
-- @param engine the engine (`engine:state()` gives the address and scripts)
-- @param limiter the core's limiter rule (`engine:limiter()`: names of refusals)
-- @tparam string instance this worker's unique name (node, pid, start time)
-- @tparam function on_error called once per failed call (the metric)
-- @tparam function on_skip called once per call the breaker skipped
-- @treturn table the state
function _M.new(engine, limiter, instance, on_error, on_skip)
    local cfg = engine:state()
    local shas = {}
    for name, src in pairs(cfg.scripts) do
        shas[name] = hex(sha1_bin(src))
    end
    return setmetatable({
        engine = engine,
        limiter = limiter,
        cfg = cfg,
        shas = shas,
        instance = instance,
        announcement = select(6, engine:state_keys(nil)) .. instance,
        pool = concat({ "llmproxy", cfg.host, cfg.port, cfg.db }, ":"),
        pool_size = max(cfg.connections, MIN_POOL),
        failed = on_error,
        skipped = on_skip,
        breaker = require("llmproxy").breaker(),
    }, mt)
end

local function connect(self)
    local c = self.cfg
    local red = redis:new()
    red:set_timeout(c.timeout_ms)
    local ok, err = red:connect(c.host, c.port, { pool = self.pool, pool_size = self.pool_size })
    if not ok then
        return nil, "cannot connect to " .. c.host .. ":" .. c.port .. ": " .. tostring(err)
    end
    if red:get_reused_times() == 0 then
        if c.password then
            -- An ACL user authenticates as `AUTH user password`.
            if c.username then
                ok, err = red:auth(c.username, c.password)
            else
                ok, err = red:auth(c.password)
            end
            if not ok then
                red:close()
                return nil, "AUTH: " .. tostring(err)
            end
        end
        if c.db ~= 0 then
            ok, err = red:select(c.db)
            if not ok then
                red:close()
                return nil, "SELECT: " .. tostring(err)
            end
        end
    end
    return red
end

-- The connection back to the pool after a reply; closed after a network
-- error (its state is unknown). `res` nil: network error, false: an error
-- reply (the connection is fine). The third result says Redis looked down.
local function done(self, red, op, res, err)
    if res == nil then
        red:close()
    else
        red:set_keepalive(KEEPALIVE_MS, self.pool_size)
    end
    if not res then
        self.failed()
        return nil, op .. ": " .. tostring(err), res == nil
    end
    return res
end

-- `call(...)` behind the breaker: skipped while it is open; a result of
-- Redis looking down (no connection, no answer) counts against it.
local function guarded(self, call, ...)
    local breaker = self.breaker
    if not breaker:allow(ngx.now() * 1000) then
        self.skipped()
        return nil, _M.CIRCUIT_OPEN
    end
    local res, err, down = call(...)
    if down then
        if breaker:failure(ngx.now() * 1000) then
            log(WARN, "llmproxy: Redis failed several calls in a row; this worker stops calling it for a ",
                "while (state.on_error applies), then probes")
        end
    else
        breaker:success()
    end
    return res, err
end

-- Run one of the core's scripts by its SHA, loading it on NOSCRIPT.
local function script(self, name, nkeys, ...)
    local red, err = connect(self)
    if not red then
        self.failed()
        return nil, err, true
    end
    local res, rerr = red:evalsha(self.shas[name], nkeys, ...)
    if not res and rerr and find(rerr, "NOSCRIPT", 1, true) then
        res, rerr = red:eval(self.cfg.scripts[name], nkeys, ...)
    end
    return done(self, red, name, res, rerr)
end

local function later(what, f, ...)
    local ok, err = timer_at(0, function(premature, ...)
        local _, ferr = f(...)
        if ferr then
            log(WARN, "llmproxy: state backend call failed (", what, "): ", ferr)
        end
        return premature
    end, ...)
    if not ok then
        log(ERR, "llmproxy: cannot start a timer for the state backend (", what, "): ", err)
    end
end

local function hget_used(self, id)
    local red, err = connect(self)
    if not red then
        self.failed()
        return nil, err, true
    end
    local _, _, _, _, q = self.engine:state_keys(id)
    local res, rerr = red:hget(q, "used")
    return done(self, red, "used", res, rerr)
end

--- A key's quota usage.
-- @tparam string id the key's fingerprint
-- @treturn number|nil the usage, or nil and an error
function _M.used(self, id)
    local res, err = guarded(self, hget_used, self, id)
    if res == nil then
        return nil, err
    end
    return tonumber(res) or 0
end

local function remaining(v)
    v = tonumber(v) or -1
    if v < 0 then
        return UNLIMITED
    end
    return v
end

--- Check the limits (and with `quota_total` > 0 the quota) and take a
-- request, atomically in Redis.
-- @tparam table l the limits (`engine:admission()`)
-- @tparam string|nil id the caller's key id, nil: global only
-- @tparam boolean force take even when a limit refuses
-- @tparam number quota_total the key's quota to check (0: none)
-- @treturn table|nil `{status, denial?, took, id, used, quota_exhausted}`,
--   or nil and an error
function _M.acquire(self, l, id, force, quota_total)
    local g, r, t, slots, q, inst = self.engine:state_keys(id)
    local res, err = guarded(self, script, self, "acquire", 5, g, r, t, slots, q,
        l.global_rpm, l.key_rpm, l.key_tpm, l.key_concurrency, self.instance, inst,
        id and "1" or "0", quota_total or 0, force and "1" or "0")
    if not res then
        return nil, err
    end
    local verdict = res[1]
    local used = max(0, tonumber(res[6]) or 0)
    if verdict == "quota" then
        return {
            status = { global_remaining = UNLIMITED, key_remaining = UNLIMITED, concurrent_count = 0 },
            took = false, id = id, used = used, quota_exhausted = true,
        }
    end
    local acq = {
        status = {
            global_remaining = remaining(res[3]),
            key_remaining = (id and l.key_rpm > 0) and remaining(res[4]) or UNLIMITED,
            concurrent_count = tonumber(res[5]) or 0,
        },
        took = verdict == "ok",
        id = id,
        used = used,
    }
    if verdict ~= "ok" then
        local code, message = self.limiter:describe(verdict)
        acq.denial = { kind = verdict, code = code, message = message, retry_after = tonumber(res[2]) or 1 }
    end
    return acq
end

--- Give back what `acquire` took (a rate_limit script refused it).
-- @treturn boolean|nil true, or nil and an error
function _M.refund(self, l, acq)
    if not acq.took then
        return true
    end
    acq.took = false
    local g, r, _, slots = self.engine:state_keys(acq.id)
    return guarded(self, script, self, "refund", 3, g, r, slots, l.global_rpm, l.key_rpm, self.instance,
        acq.id and "1" or "0")
end

--- A request ended: free its concurrency slot (from log(): in a timer).
function _M.release(self, acq)
    if acq.took and acq.id then
        acq.took = false
        local _, _, _, slots = self.engine:state_keys(acq.id)
        later("release", script, self, "release", 1, slots, self.instance)
    end
end

--- Charge a finished request (from log(): in a timer): `billable` to the
-- key's quota unless it was reset after `answered_ms`, `tokens` to its
-- tokens-per-minute bucket.
function _M.charge(self, id, billable, tokens, key_tpm, answered_ms)
    if billable <= 0 and (tokens <= 0 or key_tpm <= 0) then
        return
    end
    local _, _, t, _, q = self.engine:state_keys(id)
    later("charge", script, self, "charge", 2, q, t, billable, tokens, key_tpm, floor(answered_ms))
end

local function sync_keys(self, quotas)
    for fp, configured in pairs(quotas) do
        local _, _, _, _, q = self.engine:state_keys(fp)
        local _, err = script(self, "sync_key", 1, q, configured)
        if err then
            return nil, err
        end
    end
    return true
end

local function heartbeat(self)
    local red, err = connect(self)
    if not red then
        self.failed()
        return nil, err
    end
    local res, rerr = red:set(self.announcement, "1", "PX", self.cfg.instance_ttl_ms)
    return done(self, red, "heartbeat", res, rerr)
end

--- Start the keys' quota usage where the config says (a key first seen,
-- or one whose configured `used_quota` changed), and announce this worker
-- now and every `heartbeat_ms` (init_worker and reloads: in timers).
-- @tparam table quotas configured usage by key fingerprint (`engine:key_quotas()`)
function _M.start(self, quotas)
    later("sync keys", sync_keys, self, quotas)
    later("heartbeat", heartbeat, self)
end

--- Renew this worker's announcement (a timer's body).
-- @treturn boolean|nil true, or nil and an error
_M.heartbeat = heartbeat

return _M
