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
local ngx_time = ngx.time
local ngx_var = ngx.var
local req_clear_header = ngx.req.clear_header
local denied_failure = require("resty.llmproxy.failure").denied
local failure = require("resty.llmproxy.failure").new
local known_failure = require("resty.llmproxy.failure").known
local run_step = require("resty.llmproxy.hook").run_step
local request_of = require("resty.llmproxy.util").request_of

-- What happens when a hook of admission fails: `{fallback, deny}`.
local AUTH = { "using the standard verdict", "refusing the request" }
local AUTH_OVER_DENIAL = { "using the standard verdict", "refusing the request with the standard verdict" }
local RATE_LIMIT = { "using the standard verdict", "refusing the request" }

local _M = {}

local UNLIMITED = 2147483647 -- the gateway's "no limit" in rate_limit_status

-- The clock as rate_limit scripts see it: core's current_time in the
-- YAML's `limits.time_zone` (default: the machine's local zone, `TZ`;
-- nginx keeps TZ for its workers), as the gateway's. Built once per
-- second (and engine); the engine copies it per call.
local clock_at, clock_engine, clock_table
local function current_time(engine)
    local now = ngx_time()
    if now ~= clock_at or engine ~= clock_engine then
        clock_table = engine:current_time(now)
        clock_at, clock_engine = now, engine
    end
    return clock_table
end

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

-- `llmproxy_auth_denied_total` reasons of
-- a refusal's code (the gateway's).
local AUTH_REASON = {
    invalid_api_key = "invalid_key", key_disabled = "disabled", key_expired = "expired",
    ip_not_allowed = "ip_not_allowed", quota_exhausted = "quota_exhausted", denied_by_script = "script",
    hook_failed = "hook_failed",
}

-- The auth stage, as the gateway's (proxy/src/gateway/admission.rs): the
-- standard checks (core's, with the key's live usage), then the auth
-- script: nil keeps the standard verdict, a deny is final, an allow
-- overrules only the checks the config lists in may_override. A script
-- that fails under `on_error: deny` fails closed: the standard denial when
-- there is one, else 503.
local function authenticate(state, ctx, entry, used)
    local checks, status, message, code = state.engine:standard_checks(ctx.api_key, ctx.fields.client_ip, used)
    local standard = status and failure("auth_error", status, code, message) or nil
    if not state.enabled.auth then
        if standard and W.store then
            metrics.auth_denied(W.store, AUTH_REASON[code])
        end
        return standard
    end
    local res, denied, fell = run_step(state, ctx, "auth", standard and AUTH_OVER_DENIAL or AUTH, request_of(ctx), {
        key_info = entry and entry.info or state.null,
        standard_checks = checks,
    })
    local err = denied or fell
    local refusal
    if denied then
        refusal = standard or denied_failure("auth", denied)
    elseif fell then
        refusal = standard
    else
        -- Core's decision (admission::decide): nil keeps the standard
        -- verdict, a deny is final, an allow overrules only the failed
        -- checks listed in scripts.auth.may_override (docs/adr/040).
        local dstatus, dmessage, dcode = state.engine:auth_decision(checks, res)
        refusal = dstatus and failure("auth_error", dstatus, dcode, dmessage) or nil
    end
    ngx_log(INFO, "llmproxy: request ", ctx.id, ": auth verdict: ",
        err and "failed" or (res == nil and "standard" or (res.allow == false and "deny" or "allow")),
        refusal and (" (" .. refusal.message .. ")") or "")
    if refusal and W.store then
        metrics.auth_denied(W.store, AUTH_REASON[refusal.code] or "hook_failed")
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

local UNLIMITED_STATUS = { global_remaining = UNLIMITED, key_remaining = UNLIMITED, concurrent_count = 0 }


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

-- The rate limit stage, as the gateway's: the standard limiter checks and
-- takes (atomically, across workers); the rate_limit script sees
-- `rate_limit_status` and `current_time` and may overrule it either way
-- (requests are then taken or given back). The concurrency slot is freed
-- in log().
local function limit(state, ctx, entry)
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
            acq = { status = UNLIMITED_STATUS, took = false }
        end
    else
        acq = { status = UNLIMITED_STATUS, took = false }
    end
    ctx.limits = acq
    local res, verdict = nil, "standard"
    if state.enabled.rate_limit then
        local denied, fell
        res, denied, fell = run_step(state, ctx, "rate_limit", RATE_LIMIT, request_of(ctx), {
            key_info = entry and entry.info or state.null,
            rate_limit_status = acq.status,
            current_time = current_time(state.engine),
        })
        if denied then
            if acq.took then
                give_back_refused(state, ctx, acq)
            end
            return denied_failure("rate_limit", denied)
        elseif fell then
            verdict = "failed"
        elseif res ~= nil then
            verdict = res.allow == false and "deny" or "allow"
        end
    end
    -- Core's decision (`policy::rate_stage`, the gateway's too).
    local admit_it, a2, code, message, retry_after, reason = state.llmproxy.rate_step(res, acq.took == true, acq.denial)
    if admit_it then
        if a2 and counted then
            -- The script allowed what a limit refused: take it unchecked.
            local forced, ferr = take(state, id, true)
            if not forced then
                ngx_log(ERR, "llmproxy: request ", ctx.id, ": the limiter's store failed: ",
                    tostring(ferr), " (admitted uncounted: the rate_limit script allowed it)")
            end
            ctx.limits = forced or acq
        end
        ngx_log(INFO, "llmproxy: request ", ctx.id, ": rate_limit verdict: ", verdict)
        return nil
    end
    if a2 then
        give_back_refused(state, ctx, acq)
    end
    ngx_log(INFO, "llmproxy: request ", ctx.id, ": rate_limit verdict: ", verdict, " (", message, ")")
    if W.store then
        metrics.rate_limited(W.store, reason)
    end
    local f = failure("rate_limit", 429, code, message)
    f.retry_after = retry_after
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
    if entry then
        entry.info.used_quota = used
    end
    if adm.auth then
        req_clear_header("Authorization")
        req_clear_header("X-Api-Key")
        local refusal = authenticate(state, ctx, entry, used)
        if refusal then
            if refusal.code == "invalid_api_key" and W.store then
                metrics.auth_failed(W.store)
            end
            if refusal.code == "invalid_api_key" and state.throttle_on and state.limits_dict then
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
        return limit(state, ctx, entry)
    end
    return nil
end

_M.admit = admit
_M.key_id = key_id

return _M
