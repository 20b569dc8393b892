--- The standard rate limiter's store across nginx workers:
-- `lua_shared_dict llmproxy_limits` (docs/adr/047).
--
-- The rule is the core's (`engine:limiter()`, the gateway's token buckets:
-- a limit of N per minute admits a burst of N, then one request per 60/N
-- s); this module only loads the buckets, hands them to it and saves what
-- it returns. A load-decide-save runs under one lock in the dict, so two
-- workers never decide on the same bucket at once: the section does no
-- I/O and lasts microseconds, so a waiter spins, then (where the phase may
-- yield) sleeps a millisecond at a time. Concurrency slots are counters
-- changed with atomic `incr`: a slot taken in access() is given back in
-- log() on every path without the lock.
--
-- Keys: `g` (the global bucket), `r:<id>`, `t:<id>` (the key's request and
-- token buckets), `c:<id>` (its requests in flight), `a:<address>` (the
-- auth throttle's bucket of a client), `lock`.
--
-- @module resty.llmproxy.limits

local ngx = ngx
local sleep = ngx.sleep
local timer_at = ngx.timer.at
local log = ngx.log
local ERR = ngx.ERR
local pcall = pcall

local _M = {}

local LOCK = "lock"
local LOCK_TTL = 0.5 -- seconds: a lock left by a crashed worker expires
local SPINS = 1000 -- tries before a waiter sleeps (~0.1 ms)
local NAPS = 200 -- 1 ms sleeps before a waiter gives up

-- Take the dict's lock; `can_sleep`: the phase may yield.
local function lock(dict, can_sleep)
    for _ = 1, SPINS do
        local ok, err = dict:add(LOCK, true, LOCK_TTL)
        if ok then
            return true
        end
        if err ~= "exists" then
            return nil, err
        end
    end
    if not can_sleep then
        return nil, "the limiter's lock is busy"
    end
    for _ = 1, NAPS do
        sleep(0.001)
        local ok, err = dict:add(LOCK, true, LOCK_TTL)
        if ok then
            return true
        end
        if err ~= "exists" then
            return nil, err
        end
    end
    return nil, "the limiter's lock stayed busy for " .. NAPS .. " ms"
end

-- Run f(...) under the lock; its results, or nil and an error.
local function locked(dict, can_sleep, f, ...)
    local ok, err = lock(dict, can_sleep)
    if not ok then
        return nil, err
    end
    local done, res, ferr = pcall(f, ...)
    dict:delete(LOCK)
    if not done then
        return nil, res
    end
    return res, ferr
end

local function put(dict, key, value, ttl)
    if value then
        local ok, err = dict:set(key, value, ttl)
        if not ok then
            return nil, err
        end
    end
    return true
end

local function acquire_locked(dict, limiter, id, now, force)
    local r_key, t_key, c_key
    local r, t, c
    if id then
        r_key, t_key, c_key = "r:" .. id, "t:" .. id, "c:" .. id
        r, t, c = dict:get(r_key), dict:get(t_key), dict:get(c_key)
    end
    local took, kind, retry_after, global_remaining, key_remaining, in_flight, g, g_ttl, r2, r_ttl, t2, t_ttl =
        limiter:acquire(now * 1000, id ~= nil, force, dict:get("g"), r, t, c)
    local ok, err = put(dict, "g", g, g_ttl)
    if ok and id then
        ok, err = put(dict, r_key, r2, r_ttl)
        if ok then
            ok, err = put(dict, t_key, t2, t_ttl)
        end
        if ok and took then
            ok, err = dict:incr(c_key, 1, 0)
        end
    end
    if not ok then
        return nil, err
    end
    local acq = {
        status = {
            global_remaining = global_remaining,
            key_remaining = key_remaining,
            concurrent_count = in_flight,
        },
        took = took,
        id = id,
    }
    if kind then
        local code, message = limiter:describe(kind)
        acq.denial = { kind = kind, code = code, message = message, retry_after = retry_after }
    end
    return acq
end

--- Check every limit and, when all pass (or `force`), take a request from
-- the global and the key's bucket and a concurrency slot.
-- @param dict the shared dict
-- @param limiter the core's rule (`engine:limiter()`)
-- @tparam string|nil id the caller's key id (its fingerprint), nil: global only
-- @tparam number now seconds (`ngx.now()`)
-- @tparam boolean force take even when a limit refuses
-- @treturn table|nil `{status, denial?, took, id}` (`denial`: `{kind, code,
--   message, retry_after}`), or nil and an error
function _M.acquire(dict, limiter, id, now, force)
    return locked(dict, true, acquire_locked, dict, limiter, id, now, force)
end

local function refund_locked(dict, limiter, id)
    local r_key = id and "r:" .. id
    local g, g_ttl, r, r_ttl = limiter:refund(id ~= nil, dict:get("g"), r_key and dict:get(r_key))
    local ok, err = put(dict, "g", g, g_ttl)
    if ok and id then
        ok, err = put(dict, r_key, r, r_ttl)
        if ok then
            ok, err = dict:incr("c:" .. id, -1, 0)
        end
    end
    return ok, err
end

--- Give back what `acquire` took (a rate_limit script refused a request
-- the limits allowed).
-- @treturn boolean|nil true, or nil and an error
function _M.refund(dict, limiter, acq)
    if not acq.took then
        return true
    end
    acq.took = false
    return locked(dict, true, refund_locked, dict, limiter, acq.id)
end

--- A request ended: free the concurrency slot `acquire` took for it.
function _M.release(dict, acq)
    if acq.took and acq.id then
        acq.took = false
        dict:incr("c:" .. acq.id, -1, 0)
    end
end

local function charge_locked(dict, limiter, id, tokens, now)
    local key = "t:" .. id
    local t, ttl = limiter:charge(now * 1000, dict:get(key), tokens)
    return put(dict, key, t, ttl)
end

local charge_later

local function charge(dict, limiter, id, tokens, now, can_sleep)
    local ok, err = locked(dict, can_sleep, charge_locked, dict, limiter, id, tokens, now)
    if ok then
        return true
    end
    if not can_sleep then
        -- The log phase cannot wait for the lock: a timer can.
        local queued, terr = timer_at(0, charge_later, dict, limiter, id, tokens, now)
        if queued then
            return true
        end
        err = err .. "; no timer to retry: " .. tostring(terr)
    end
    log(ERR, "llmproxy: ", tokens, " tokens of key ", id, " not charged to its token limit: ", tostring(err))
    return nil, err
end

charge_later = function(premature, dict, limiter, id, tokens, now)
    if not premature then
        charge(dict, limiter, id, tokens, now, true)
    end
end

--- Charge a finished request's `tokens` to the key's tokens-per-minute
-- bucket (called from log(): never yields; a busy lock hands the charge to
-- a timer).
-- @treturn boolean|nil true, or nil and an error (logged)
function _M.charge_tokens(dict, limiter, id, tokens, now)
    if tokens <= 0 then
        return true
    end
    return charge(dict, limiter, id, tokens, now, false)
end

--- May the client at `ip` try a key now (the auth throttle)? A read: a
-- recovered client's bucket is dropped, nothing else is written.
-- @param throttle the core's rule (`engine:auth_throttle()`)
-- @tparam string ip the client's address
-- @tparam number now seconds
-- @treturn number|nil seconds to wait (429), or nil
function _M.throttle_check(dict, throttle, ip, now)
    local key = throttle:client_key(ip)
    if not key then
        return nil
    end
    key = "a:" .. key
    local stored = dict:get(key)
    if stored == nil then
        return nil
    end
    local wait, recovered = throttle:check(now * 1000, stored)
    if recovered then
        dict:delete(key)
    end
    return wait
end

local function throttle_failed_locked(dict, throttle, key, now)
    local value, ttl = throttle:failed(now * 1000, dict:get(key))
    return put(dict, key, value, ttl)
end

--- The client at `ip` failed a key check (the standard 401).
-- @treturn boolean|nil true, or nil and an error
function _M.throttle_failed(dict, throttle, ip, now)
    local key = throttle:client_key(ip)
    if not key then
        return true
    end
    return locked(dict, true, throttle_failed_locked, dict, throttle, "a:" .. key, now)
end

return _M
