--- The log phase: the concurrency slot, passive health, usage, quota, the
-- ledger and the request's metrics.
-- @module resty.llmproxy.accounting

-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx
local metrics = require "resty.llmproxy.metrics"
local backends = require "resty.llmproxy.backends"
local limits = require "resty.llmproxy.limits"
local W = require "resty.llmproxy.worker"

local pairs = pairs
local tonumber = tonumber
local ngx_log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local NOTICE = ngx.NOTICE
local worker_exiting = ngx.worker.exiting
local ngx_now = ngx.now
local entries = require("resty.llmproxy.util").entries
local log_level = require("resty.llmproxy.util").log_level
local flush_ledger = require("resty.llmproxy.install").flush_ledger
local key_id = require("resty.llmproxy.admission").key_id
local step = require("resty.llmproxy.hook").step
local ngx_var = ngx.var
local upstream_vars = require("resty.llmproxy.capture").upstream_vars

local _M = {}

local POOL_STATS_EVERY = 1 -- seconds between two copies of this worker's pool stats
local pool_stats_at = 0

-- What happens when the usage hook fails: `{fallback, deny}` (it never
-- denies: the answer is sent).
local USAGE = { "recording the raw usage", "recording the raw usage" }

-- How a stream the body filter never saw end ended: "client" when the
-- client left first (the request did not complete), "backend" when the
-- backend broke it off (nginx completed the request and closes the
-- client's connection); nil for any other request.
local function stream_cut(ctx)
    if not ctx.sse or ctx.sse_ended then
        return nil
    end
    return ngx_var.request_completion == "OK" and "backend" or "client"
end

-- The status a request is charged and recorded with when it is not
-- `otherwise`, as the gateway's: 499 when the client left a stream before
-- its end (nginx's status is the 200 that went out with the head; the
-- request did not complete, and the body filter never saw the stream's
-- end) or left while its answer was read in a subrequest; the backend's
-- when response_transform changed the one the client got on a successful
-- answer (a failure records the client's).
local function served_status(ctx, otherwise)
    if ctx.client_left or stream_cut(ctx) == "client" then
        return 499
    end
    if ctx.head_status and not ctx.failure then
        return ctx.status
    end
    return otherwise
end

-- The handle's usage step (core's: the usage hook on the backend's usage,
-- an estimate from the content events relayed for a stream whose usage
-- never came, zeros when it reported none, and the charge that follows);
-- the record (JSON text from core) goes to the log, the charge to the quota
-- (shared dict or Redis) and the metrics; the handle keeps both for the
-- ledger row.
local function record_usage(state, ctx)
    local backend = ctx.backend
    local charge = step(ctx, "usage", USAGE, ctx.h.usage, served_status(ctx, ctx.status or ngx.status),
        ctx.sse_relayed)
    if not charge then
        return
    end
    if charge.estimated and W.store then
        metrics.usage_estimated(W.store)
    end
    ctx.usage_json = charge.record_json
    local billable = charge.billable_tokens
    local dict = state.limits_dict
    if state.redis then
        local id = ctx.key and ctx.key.fp or (ctx.limits and ctx.limits.id)
        if id then
            state.redis:charge(id, ctx.key and billable or 0, charge.limit_tokens, state.admission.key_tpm,
                ngx_now() * 1000)
        end
    elseif dict and ctx.key and billable > 0 then
        local _, err = dict:incr("q:" .. ctx.key.fp, billable, ctx.key.configured_used)
        if err then
            ngx_log(ERR, "llmproxy: request ", ctx.id, ": cannot charge the quota: ", err)
        end
    end
    if not state.redis and dict and state.admission.key_tpm > 0 and ctx.limits and ctx.limits.id then
        limits.charge_tokens(dict, state.limiter, ctx.limits.id, charge.limit_tokens, ngx_now())
    end
    if W.store and backend then
        local name = backend.name
        for kind, v in pairs(charge.metrics) do
            metrics.usage(W.store, name, kind, v)
        end
    end
    if log_level() >= NOTICE then
        ngx_log(NOTICE, "llmproxy: usage of request ", ctx.id, " on '", backend and backend.name or "-", "': ",
            ctx.usage_json)
    end
end

-- Health and upstream latency of every try, from nginx's `$upstream_*`
-- (the subrequest's, for an answer read in one).
local function record_attempts(state, ctx)
    local attempts = ctx.attempts
    if not attempts then
        return
    end
    local set = state.backends
    local n = #attempts
    local status_v, time_v, head_v = upstream_vars(ctx)
    local status, time, head = tonumber(status_v), tonumber(time_v), tonumber(head_v)
    if n > 1 or not (status and time and head) then
        -- Several tries, or one whose values are not plain numbers: lists
        -- to split ("0.001, 0.002 : 0.003"), the last entry the last try's.
        local statuses, times, heads = entries(status_v), entries(time_v), entries(head_v)
        for i = 1, n - 1 do
            local t = tonumber(times[i])
            if W.store and t then
                metrics.upstream_latency(W.store, attempts[i].name, t)
            end
        end
        status, time, head = tonumber(statuses[n]), tonumber(times[n]), tonumber(heads[n])
    end
    local last = attempts[n]
    local t = ctx.sse and head or time -- streams: to the first event
    if W.store and t then
        metrics.upstream_latency(W.store, last.name, t)
    end
    local verdict, latency_ms
    if not head and ngx.status == 499 then -- luacheck: ignore 542
        -- the client left before the backend answered: no verdict on it
    elseif not head or not status or status >= 500 or ctx.backend_failed then
        -- (also an answer the module refused or cut on a bound, as the
        -- gateway counts it)
        verdict = "failure"
    else
        -- The latency the balancer weighs is the one the metric reports:
        -- to the whole answer, or to a stream's start (the gateway's).
        verdict, latency_ms = "success", (t or head) * 1000
    end
    local healthy, ewma, active = backends.finish(set, last, verdict, latency_ms)
    if W.store then
        if n > 1 then
            metrics.retries(W.store, n - 1)
        end
        metrics.backend(W.store, last.name, last.usable and healthy, ewma, active)
    end
end

-- The ledger row of an admitted request, queued for the module's writer
-- thread: core builds it from the request handle and what its usage step
-- charged (zero usage when none ran); nginx adds what only it knows. Never
-- waits (a full queue drops the row and counts it).
local function write_ledger(state, ctx)
    local backend = ctx.tried and ctx.backend
    local ok = ctx.h:ledger({
        node = state.node,
        key_fp = key_id(state, ctx),
        backend = backend and backend.name or nil,
        status = served_status(ctx, ngx.status),
        is_stream = ctx.sse ~= nil,
        latency_ms = (ngx_now() - ctx.started) * 1000,
    })
    if ok == false then
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": the ledger queue is full; usage record dropped (counted)")
    end
end

--- Run the log phase for this request (`resty.llmproxy.log()`, which checks
-- the phase, documents it).
function _M.run()
    local ctx = ngx.ctx.llmproxy
    if not ctx then
        return
    end
    local state = ctx.state
    if not state then
        if W.store then
            metrics.request(W.store, nil, ngx.status)
        end
        return
    end
    local acq = ctx.limits
    if acq and state.redis then
        state.redis:release(acq)
    elseif acq and state.limits_dict then
        limits.release(state.limits_dict, acq)
    end
    if stream_cut(ctx) == "backend" then
        -- A failure of the backend, for its health, as the gateway counts
        -- a stream it broke off (nginx has logged why).
        ctx.backend_failed = true
    end
    record_attempts(state, ctx)
    if ctx.admitted then
        record_usage(state, ctx)
    end
    if state.ledger and ctx.admitted then
        write_ledger(state, ctx)
        if worker_exiting() then
            flush_ledger(state) -- the writer thread ends with the worker
        end
    end
    if W.store then
        metrics.request(W.store, ctx.tried and ctx.backend and ctx.backend.name or nil, ngx.status)
        if ctx.stream_counted then
            metrics.streams(W.store, -1)
        end
        local now = ngx_now()
        if worker_exiting() then
            metrics.sync(W.store) -- the sync timer has run its last time
        end
        -- Exact, not sampled: a request that added an ignored field shows
        -- in the next sync (one integer compared per request).
        local ignored = state.engine:ignored_fields_total()
        if ignored ~= state.ignored_seen then
            state.ignored_seen = ignored
            metrics.ignored_fields(W.store, state.engine:ignored_fields())
        end
        if now - pool_stats_at >= POOL_STATS_EVERY then
            pool_stats_at = now
            metrics.pool(W.store, state.engine:pool_stats())
            if state.ledger then
                metrics.ledger(W.store, state.engine:ledger_stats())
            end
        end
    end
end

return _M
