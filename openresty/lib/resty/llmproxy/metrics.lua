--- Prometheus metrics of resty.llmproxy, kept in a `lua_shared_dict` so
-- that every worker counts into the same numbers and any worker renders
-- them (docs/adr/025-openresty-metrics.md). The page is
-- resty.llmproxy.metrics_render's.
--
-- Names, types, help texts, labels, bucket bounds and label values are
-- core's metric catalog (`policy::metrics`, through
-- `llmproxy.metric_headers()` and `llmproxy.metric_values()`), which the
-- standalone gateway prints from too. A request's counts go
-- to a per-worker Lua table first and are added to the shared dict (`incr`
-- with an initial value: atomic across workers) by a timer every
-- `sync_interval` seconds: a request costs table updates, not a few dozen
-- dict locks (docs/adr/035-openresty-hot-path.md). Gauges that describe one
-- worker (backend health as it sees it, its in-flight requests and
-- streams, its VM pool) are kept per worker id and merged when rendered:
-- sums for counts, the minimum for `healthy`, the mean for the latency
-- EWMA.
--
--     lua_shared_dict llmproxy_metrics 1m;
--
-- @module resty.llmproxy.metrics

local ngx = ngx
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local find = string.find
local sub = string.sub
local clear = require "table.clear"

local _M = {}

local SEP = "\31" -- between the parts of a key (never in a label value we write)

-- The catalog's bucket bounds and label values (core's `policy::metrics`,
-- which the gateway writes from too). Empty when the module cannot load:
-- `init_worker` then says why, and nothing is counted.
local values
do
    local ok, llmproxy = pcall(require, "llmproxy")
    values = ok and llmproxy.metric_values() or {}
end

--- Upper bounds (seconds) of the upstream latency histogram, and their
-- `le` labels.
local UPSTREAM_BUCKETS = values.upstream_buckets or {}
local UPSTREAM_LE = values.upstream_le or {}
--- Upper bounds (seconds) of the hook latency histogram, and their `le`
-- labels.
local HOOK_BUCKETS = values.hook_buckets or {}
local HOOK_LE = values.hook_le or {}

--- The hooks, in the order of the seed's table (`HookName::index`).
_M.HOOKS = values.hooks or {}
--- Error kinds (`ErrorKind::ALL`).
_M.KINDS = values.kinds or {}
local KNOWN_KIND = {}
for _, k in ipairs(_M.KINDS) do
    KNOWN_KIND[k] = true
end
--- Label of requests that reached no backend.
_M.NO_BACKEND = "none"
local POOL_STATS = { "capacity", "alive", "idle", "created", "discarded", "recycled" }
-- `engine:ledger_stats()` field, metric name (help and type: the catalog).
local LEDGER_STATS = {
    { "written", "llmproxy_ledger_records_total" },
    { "batches", "llmproxy_ledger_batches_total" },
    { "failed", "llmproxy_ledger_failed_total" },
    { "dropped", "llmproxy_ledger_dropped_total" },
    { "pending", "llmproxy_ledger_pending" },
}

-- What the page (resty.llmproxy.metrics_render) reads from the keys.
_M.SEP = SEP
_M.UPSTREAM_LE = UPSTREAM_LE
_M.HOOK_LE = HOOK_LE
_M.POOL_STATS = POOL_STATS
_M.LEDGER_STATS = LEDGER_STATS

--- Seconds between two syncs of a worker's counts into the shared dict.
_M.SYNC_INTERVAL = 0.1

--- The metrics store over shared dict `dict_name`.
-- @tparam string dict_name the `lua_shared_dict` to use
-- @tparam[opt] number sync_interval seconds between two syncs (default
--   `SYNC_INTERVAL`); `sync_timer` starts them
-- @treturn table|nil the store, or nil and an error when the dict is missing
-- @phases init_worker
function _M.new(dict_name, sync_interval)
    local dict = ngx.shared[dict_name]
    if not dict then
        return nil, "lua_shared_dict " .. dict_name .. " is not defined"
    end
    local wid = ngx.worker.id() or 0
    return {
        dict = dict,
        name = dict_name,
        wid = tostring(wid),
        warned = false,
        interval = sync_interval or _M.SYNC_INTERVAL,
        counts = {}, -- key -> amount not yet in the dict
        gauges = {}, -- key -> latest value not yet in the dict
        backend_keys = {}, -- backend -> its gauges' keys for this worker
        dirty = false,
    }
end

local function warn_once(m, err)
    if not m.warned then
        m.warned = true
        ngx.log(ngx.WARN, "llmproxy: metrics: lua_shared_dict ", m.name, ": ", err,
            " (further errors are not logged)")
    end
end

--- Add this worker's pending counts and gauges to the shared dict.
-- @tparam table m the store
-- @phases any
function _M.sync(m)
    if not m.dirty then
        return
    end
    m.dirty = false
    local dict = m.dict
    for key, value in pairs(m.counts) do
        local _, err = dict:incr(key, value, 0)
        if err then
            warn_once(m, err)
        end
    end
    clear(m.counts)
    for key, value in pairs(m.gauges) do
        local ok, err = dict:set(key, value)
        if not ok then
            warn_once(m, err)
        end
    end
    clear(m.gauges)
end

--- Start this worker's sync timer (also syncs once more when the worker
-- exits).
-- @tparam table m the store
-- @treturn boolean|nil true, or nil and an error
-- @phases init_worker
function _M.sync_timer(m)
    return ngx.timer.every(m.interval, function()
        _M.sync(m)
    end)
end

local function incr(m, key, value)
    local counts = m.counts
    counts[key] = (counts[key] or 0) + value
    m.dirty = true
end

local function set(m, key, value)
    m.gauges[key] = value
    m.dirty = true
end

-- Keys are label values joined by SEP; built once (a few hundred at most:
-- hooks, kinds, backends and statuses are bounded).
local key_cache = {}
local function key_of(a, b, c)
    local t = key_cache[a]
    if not t then
        t = {}
        key_cache[a] = t
    end
    if c == nil then
        local k = t[b]
        if not k then
            k = a .. SEP .. b
            t[b] = k
        end
        return k
    end
    local t2 = t[b]
    if not t2 then
        t2 = {}
        t[b] = t2
    end
    local k = t2[c]
    if not k then
        k = a .. SEP .. b .. SEP .. c
        t2[c] = k
    end
    return k
end

-- A histogram is one key per bucket (`kind SEP label SEP i`), a sum (`s`)
-- and a count (`n`).
local function observe(m, kind, label, bounds, seconds)
    for i = 1, #bounds do
        if seconds <= bounds[i] then
            incr(m, key_of(kind, label, i), 1)
            break
        end
    end
    incr(m, key_of(kind, label, "s"), seconds)
    incr(m, key_of(kind, label, "n"), 1)
end

--- One hook call: latency and how it ended.
-- @tparam table m the store
-- @tparam string hook the hook
-- @tparam number seconds how long the call took
-- @tparam[opt] string kind the error kind when it failed (the module's
--   `invalid_argument` counts as `bad_input`)
-- @phases any
function _M.hook_call(m, hook, seconds, kind)
    incr(m, key_of("hc", hook), 1)
    observe(m, "hd", hook, HOOK_BUCKETS, seconds)
    if kind then
        if kind == "invalid_argument" then
            kind = "bad_input"
        elseif not KNOWN_KIND[kind] then
            kind = "internal"
        end
        incr(m, key_of("he", hook, kind), 1)
    end
end

--- One answered request.
-- @tparam table m the store
-- @tparam string|nil backend the backend that answered (nil: none)
-- @tparam number status the status the client got
-- @phases any
function _M.request(m, backend, status)
    incr(m, key_of("rq", backend or _M.NO_BACKEND, status), 1)
end

--- Upstream latency of one attempt on `backend`.
-- @phases any
function _M.upstream_latency(m, backend, seconds)
    observe(m, "ul", backend, UPSTREAM_BUCKETS, seconds)
end

--- Attempts retried on another backend.
-- @phases any
function _M.retries(m, n)
    incr(m, "rt", n)
end

--- Usage recorded after the usage hook (tokens, cost).
-- @phases any
function _M.usage(m, backend, kind, amount)
    incr(m, key_of("us", backend, kind), amount)
end

--- A stream of this worker started (+1) or ended (-1).
-- @phases any
function _M.streams(m, delta)
    incr(m, key_of("g", m.wid, "st"), delta)
end

--- This worker's view of one backend.
-- @tparam table m the store
-- @tparam string backend the backend
-- @tparam boolean healthy whether this worker considers it healthy
-- @tparam number ewma latency EWMA in ms
-- @tparam number active this worker's requests in flight on it
-- @phases any
function _M.backend(m, backend, healthy, ewma, active)
    local k = m.backend_keys[backend]
    if not k then
        local prefix = "g" .. SEP .. m.wid .. SEP
        k = { h = prefix .. "h" .. SEP .. backend, e = prefix .. "e" .. SEP .. backend,
            a = prefix .. "a" .. SEP .. backend }
        m.backend_keys[backend] = k
    end
    set(m, k.h, healthy and 1 or 0)
    set(m, k.e, ewma)
    set(m, k.a, active)
end

--- This worker's VM pool counters (`engine:pool_stats()`).
-- @phases any
function _M.pool(m, stats)
    local prefix = "g" .. SEP .. m.wid .. SEP .. "p" .. SEP
    for _, k in ipairs(POOL_STATS) do
        set(m, prefix .. k, tonumber(stats[k]) or 0)
    end
end

--- Why the auth stage refused a request (the catalog's `reason` values).
_M.AUTH_REASONS = values.auth_reasons or {}
--- Why the rate limit stage refused a request (the catalog's `reason` values).
_M.RATE_REASONS = values.rate_reasons or {}

--- The auth stage refused a request (`reason` from `AUTH_REASONS`).
-- @phases any
function _M.auth_denied(m, reason)
    incr(m, key_of("ad", reason), 1)
end

--- The rate limit stage refused a request (`reason` from `RATE_REASONS`).
-- @phases any
function _M.rate_limited(m, reason)
    incr(m, key_of("rl", reason), 1)
end

--- A client failed an API key check (the standard 401; the auth throttle
-- counts it against its address).
-- @phases any
function _M.auth_failed(m)
    incr(m, "af", 1)
end

--- The auth throttle refused a client before looking at its key.
-- @phases any
function _M.auth_throttled(m)
    incr(m, "at", 1)
end

--- A call to the state backend (`state: {backend: redis}`) failed.
-- @phases any
function _M.state_error(m)
    incr(m, "se", 1)
end

--- A call to the state backend was not made: its circuit breaker was open.
-- @phases any
function _M.state_skipped(m)
    incr(m, "ss", 1)
end

--- A usage record's tokens are the core's estimate (a stream's usage
-- never came).
-- @phases any
function _M.usage_estimated(m)
    incr(m, "ue", 1)
end

--- A backend's stream event grew past gateway.max_event_bytes (the
-- stream was ended).
-- @phases any
function _M.events_too_large(m)
    incr(m, "et", 1)
end

--- This worker's count of ignored result fields (`engine:ignored_fields()`).
-- @phases any
function _M.ignored_fields(m, stats)
    local prefix = "g" .. SEP .. m.wid .. SEP .. "i" .. SEP
    for _, h in ipairs(_M.HOOKS) do
        set(m, prefix .. h, tonumber(stats[h]) or 0)
    end
end

--- This worker's ledger counters (`engine:ledger_stats()`).
-- @phases any
function _M.ledger(m, stats)
    local prefix = "g" .. SEP .. m.wid .. SEP .. "l" .. SEP
    for _, k in ipairs(LEDGER_STATS) do
        set(m, prefix .. k[1], tonumber(stats[k[1]]) or 0)
    end
end

--- Forget this worker's gauges (a new worker with the same id starts
-- from zero) and those of worker ids beyond `count` (fewer workers after
-- a reload).
-- @phases init_worker
function _M.reset_worker(m, count)
    local me = "g" .. SEP .. m.wid .. SEP
    for _, key in ipairs(m.dict:get_keys(0)) do
        if sub(key, 1, 2) == "g" .. SEP then
            local wid = tonumber(sub(key, 3, (find(key, SEP, 3, true) or 0) - 1))
            if sub(key, 1, #me) == me or (wid and count and wid >= count) then
                m.dict:delete(key)
            end
        end
    end
end

return _M
