--- The standard rate limiter across nginx workers, in
-- `lua_shared_dict llmproxy_limits` (docs/adr/028).
--
-- Requests per minute (global and per key) are counted in fixed one-minute
-- windows with atomic `incr` (init 0, ttl one window): a limit of N admits
-- N requests per window over all workers, and a refusal's `Retry-After` is
-- the rest of the window. Tokens per minute are charged after the
-- response into the key's window; a key whose window is spent waits for
-- the next. Concurrency counts requests in flight per key: a slot taken in
-- access() is given back in log() (on every path). Every check first takes
-- (incr) and gives back (incr -1) what it took when a limit refuses, so
-- the counters are right without a lock; two racing requests at the limit
-- may both be refused, never both admitted over it.
--
-- The standalone gateway's local limiter refills token buckets
-- continuously (a burst of N, then one per 60/N s); the totals per minute
-- are the same, the shape within the minute differs.
--
-- @module resty.llmproxy.limits

local floor = math.floor
local max = math.max

local _M = {}

local WINDOW = 60 -- seconds
local UNLIMITED = 2147483647 -- the gateway's "no limit" in rate_limit_status
_M.UNLIMITED = UNLIMITED

-- What the client is told, and the error code, per limit (the gateway's
-- `LimitKind`).
_M.KINDS = {
    global_rpm = { code = "global_rate_limit", message = "the gateway's request rate limit is reached" },
    key_rpm = { code = "key_rate_limit", message = "this API key's request rate limit is reached" },
    key_tpm = { code = "key_token_limit", message = "this API key's token rate limit is reached" },
    key_concurrency = { code = "key_concurrency_limit", message = "this API key has too many requests in flight" },
}

local function undo(dict, taken, n)
    for i = n, 1, -1 do
        dict:incr(taken[i], -1)
    end
end

--- Check every limit and, when all pass (or `force`), take a request from
-- the global and the key's window and a concurrency slot.
-- @param dict the shared dict
-- @tparam table l the limits (`global_rpm`, `key_rpm`, `key_tpm`,
--   `key_concurrency`; 0 = unlimited)
-- @tparam string|nil id the caller's key id (its fingerprint), nil: global only
-- @tparam number now seconds
-- @tparam boolean force take even when a limit refuses
-- @treturn table|nil `{status, denial?, taken, n, slot?}`, or nil and an error
function _M.acquire(dict, l, id, now, force)
    local win = floor(now / WINDOW)
    local wait = (win + 1) * WINDOW - now
    local taken, n = {}, 0
    local denial
    local status = { global_remaining = UNLIMITED, key_remaining = UNLIMITED, concurrent_count = 0 }
    if l.global_rpm > 0 then
        local k = "g:" .. win
        local v, err = dict:incr(k, 1, 0, WINDOW + 1)
        if not v then
            return nil, err
        end
        n = n + 1
        taken[n] = k
        if v > l.global_rpm then
            denial = { kind = "global_rpm", retry_after = wait }
        end
        status.global_remaining = max(0, l.global_rpm - v)
    end
    local slot
    if id then
        if l.key_rpm > 0 then
            local k = "r:" .. id .. ":" .. win
            local v, err = dict:incr(k, 1, 0, WINDOW + 1)
            if not v then
                undo(dict, taken, n)
                return nil, err
            end
            n = n + 1
            taken[n] = k
            if v > l.key_rpm and not denial then
                denial = { kind = "key_rpm", retry_after = wait }
            end
            status.key_remaining = max(0, l.key_rpm - v)
        end
        if l.key_tpm > 0 and not denial then
            local used = dict:get("t:" .. id .. ":" .. win) or 0
            if used >= l.key_tpm then
                denial = { kind = "key_tpm", retry_after = wait }
            end
        end
        slot = "c:" .. id
        local v, err = dict:incr(slot, 1, 0)
        if not v then
            undo(dict, taken, n)
            return nil, err
        end
        n = n + 1
        taken[n] = slot
        if l.key_concurrency > 0 and v > l.key_concurrency and not denial then
            denial = { kind = "key_concurrency", retry_after = 1 }
        end
        status.concurrent_count = v
    end
    if denial and not force then
        undo(dict, taken, n)
        if slot then
            status.concurrent_count = status.concurrent_count - 1
        end
        return { status = status, denial = denial, taken = taken, n = 0 }
    end
    return { status = status, taken = taken, n = n, slot = slot }
end

--- Give back what `acquire` took (a rate_limit script refused a request
-- the limits allowed).
function _M.refund(dict, acq)
    undo(dict, acq.taken, acq.n)
    acq.n = 0
    acq.slot = nil
end

--- A request ended: free its concurrency slot.
function _M.release(dict, slot)
    dict:incr(slot, -1, 0)
end

--- Charge `tokens` to the key's tokens-per-minute window.
function _M.charge_tokens(dict, id, tokens, now)
    if tokens > 0 then
        local win = floor(now / WINDOW)
        dict:incr("t:" .. id .. ":" .. win, tokens, 0, WINDOW + 1)
    end
end

return _M
