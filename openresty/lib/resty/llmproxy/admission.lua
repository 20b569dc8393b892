--- Admission: the auth stage (core's standard checks and the auth script)
-- and the rate limit stage (core's limiter over the shared dict or Redis,
-- and the rate_limit script).
-- @module resty.llmproxy.admission

local ngx = ngx
local metrics = require "resty.llmproxy.metrics"
local limits = require "resty.llmproxy.limits"
local W = require "resty.llmproxy.worker"

local tostring = tostring
local ngx_log = ngx.log
local ERR = ngx.ERR
local INFO = ngx.INFO
local ngx_now = ngx.now
local ngx_var = ngx.var
local req_clear_header = ngx.req.clear_header
local denied_failure = require("resty.llmproxy.failure").denied
local failure = require("resty.llmproxy.failure").new
local known_failure = require("resty.llmproxy.failure").known
local step = require("resty.llmproxy.hook").step
local log_level = require("resty.llmproxy.util").log_level

-- What happens when a hook of admission fails: `{fallback, deny}`. An
-- auth script that fails under `on_error: deny` when a standard check
-- failed too gets the standard verdict (core's `admission::decide_step`).
local AUTH = { "using the standard verdict", "refusing the request" }
local RATE_LIMIT = { "using the standard verdict", "refusing the request" }

local _M = {}


-- The key's live quota usage: `q:<fingerprint>` in the limits dict,
-- shared by the workers (charged in log()), else the configured
-- `used_quota`.
local function used_quota(state, entry)
    if not entry then
        return 0
    end
    if state.redis then
        return state.redis:used(entry.fp)
    end
    local dict = state.limits_dict
    local used = dict and dict:get("q:" .. entry.fp)
    return used or entry.configured_used
end

-- The auth stage on the request's handle (core's, as the gateway's):
-- the standard checks with the key's live usage, the auth script, and
-- the decision (`admission::decide_step`: nil keeps the standard verdict,
-- a deny is final, an allow overrules only the checks the config lists in
-- may_override; a script that fails under `on_error: deny` fails closed).
-- Returns the refusal, or nil.
local function authenticate(state, ctx, used)
    local r, denied, broken = step(ctx, "auth", AUTH, ctx.h.auth, used)
    local refusal
    if denied or broken then
        refusal = denied_failure("auth", denied or broken) -- fails closed
    elseif r then
        refusal = failure("auth_error", r.status, r.code, r.message)
        refusal.throttles = r.throttles
    end
    if state.enabled.auth and log_level() >= INFO then
        ngx_log(INFO, "llmproxy: request ", ctx.id, ": auth verdict: ", ctx.h:verdict(),
            refusal and (" (" .. refusal.message .. ")") or "")
    end
    if refusal and W.store then
        metrics.auth_denied(W.store, r and r.reason or "hook_failed")
    end
    return refusal
end

-- The caller's id for the limiter and the ledger: the fingerprint of the
-- presented key (known or not), nil without a key.
local function key_id(state, ctx)
    if ctx.key then
        return ctx.key.fp
    end
    if ctx.api_key then
        ctx.key_fp = ctx.key_fp or state.engine:key_fingerprint(ctx.api_key)
        return ctx.key_fp
    end
    return nil
end

-- What the rate_limit script sees where no limiter counted: core's
-- `UNLIMITED` remaining (the gateway's too), read from the module once.
local unlimited_status
local function no_limit(state)
    if not unlimited_status then
        local n = state.llmproxy.UNLIMITED
        unlimited_status = { global_remaining = n, key_remaining = n, concurrent_count = 0 }
    end
    return unlimited_status
end

-- The limiter's store: Redis (`state: {backend: redis}`) or the shared
-- dict; the rule is the core's either way.
local function take(state, id, force)
    if state.redis then
        return state.redis:acquire(state.admission, id, force, 0)
    end
    return limits.acquire(state.limits_dict, state.limiter, id, ngx_now(), force)
end

local function give_back(state, acq)
    if state.redis then
        return state.redis:refund(state.admission, acq)
    end
    return limits.refund(state.limits_dict, state.limiter, acq)
end

-- The state store failed: 503 state_unavailable (`state.on_error: deny`,
-- the default, and always for the shared dict), or nil to let the request
-- through uncounted (`allow`), as the gateway's.
local function state_failed(state, ctx, what, err)
    -- A call the breaker skipped: the failures that opened it were logged.
    local skipped = state.redis and err == state.redis.CIRCUIT_OPEN
    ngx_log(skipped and INFO or ERR, "llmproxy: request ", ctx.id, ": ", what, tostring(err))
    if state.redis and state.state_on_error == "allow" then
        return nil
    end
    if W.store then
        metrics.rate_limited(W.store, "state_unavailable")
    end
    return known_failure("state_unavailable")
end

-- Give back what the limiter took for a request that is refused.
local function give_back_refused(state, ctx, acq)
    local ok, err = give_back(state, acq)
    if not ok then
        ngx_log(ERR, "llmproxy: request ", ctx.id, ": cannot give back a refused request: ", tostring(err))
    end
end

-- The rate limit stage on the request's handle, as the gateway's: the
-- standard limiter checks and takes (atomically, across workers); the
-- rate_limit script sees `rate_limit_status` and `current_time` and may
-- overrule it either way (requests are then taken or given back: core's
-- `policy::rate_stage`). The concurrency slot is freed in log().
local function limit(state, ctx, used)
    local counted = state.limits_dict or state.redis
    local id = key_id(state, ctx)
    local acq
    if counted then
        local err
        acq, err = take(state, id, false)
        if not acq then
            local refusal = state_failed(state, ctx, "the limiter's store failed: ", err)
            if refusal then
                return refusal
            end
            acq = { status = no_limit(state), took = false }
        end
    else
        acq = { status = no_limit(state), took = false }
    end
    ctx.limits = acq
    local st, denial = acq.status, acq.denial
    local r, denied, broken = step(ctx, "rate_limit", RATE_LIMIT, ctx.h.rate_limit, used, st.global_remaining,
        st.key_remaining, st.concurrent_count, acq.took == true, denial and denial.kind,
        denial and denial.retry_after)
    denied = denied or broken -- fails closed
    if denied then
        if acq.took then
            give_back_refused(state, ctx, acq)
        end
        return denied_failure("rate_limit", denied)
    end
    local verdict = state.enabled.rate_limit and log_level() >= INFO and ctx.h:verdict()
    if r == nil or r == "force" then
        if r and counted then
            -- The script allowed what a limit refused: take it unchecked.
            local forced, ferr = take(state, id, true)
            if not forced then
                ngx_log(ERR, "llmproxy: request ", ctx.id, ": the limiter's store failed: ",
                    tostring(ferr), " (admitted uncounted: the rate_limit script allowed it)")
            end
            ctx.limits = forced or acq
        end
        if verdict then
            ngx_log(INFO, "llmproxy: request ", ctx.id, ": rate_limit verdict: ", verdict)
        end
        return nil
    end
    if r.refund then
        give_back_refused(state, ctx, acq)
    end
    if verdict then
        ngx_log(INFO, "llmproxy: request ", ctx.id, ": rate_limit verdict: ", verdict, " (", r.message, ")")
    end
    if W.store then
        metrics.rate_limited(W.store, r.reason)
    end
    local f = failure("rate_limit", 429, r.code, r.message)
    f.retry_after = r.retry_after
    return f
end

-- Admission, as the gateway's: auth (when keys are configured or an auth
-- script is enabled), then the rate limit (when a limit is set or a
-- rate_limit script is enabled). The client's key never goes upstream
-- when auth runs.
local function admit(state, ctx)
    local adm = state.admission
    if not (adm.auth or adm.limits) then
        return nil
    end
    local entry = ctx.key
    local used, uerr = used_quota(state, entry)
    if not used then
        local refusal = state_failed(state, ctx, "cannot read the key's quota usage: ", uerr)
        if refusal then
            return refusal
        end
        used = 0
    end
    if adm.auth then
        req_clear_header("Authorization")
        req_clear_header("X-Api-Key")
        local refusal = authenticate(state, ctx, used)
        if refusal then
            if refusal.code == "invalid_api_key" and W.store then
                metrics.auth_failed(W.store)
            end
            if refusal.throttles and state.throttle_on and state.limits_dict then
                -- The standard 401 (no key, an unknown one) counts against
                -- the client's address (the auth throttle).
                local ok, terr = limits.throttle_failed(state.limits_dict, state.throttle, ngx_var.remote_addr,
                    ngx_now())
                if not ok then
                    ngx_log(ERR, "llmproxy: request ", ctx.id, ": cannot count a failed key check: ", tostring(terr))
                end
            end
            return refusal
        end
    end
    if adm.limits then
        return limit(state, ctx, used)
    end
    return nil
end

_M.admit = admit
_M.key_id = key_id

return _M
