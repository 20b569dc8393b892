--- A worker's engine: built from the YAML, installed as a whole (a
-- request keeps the state it started with), the ledger flushed when the
-- worker exits.
-- @module resty.llmproxy.install

local ngx = ngx
local metrics = require "resty.llmproxy.metrics"
local probe = require "resty.llmproxy.probe"
local backends = require "resty.llmproxy.backends"
local W = require "resty.llmproxy.worker"

local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local require = require
local tostring = tostring
local tonumber = tonumber
local concat = table.concat
local find = string.find
local sub = string.sub
local io_open = io.open
local ngx_log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local NOTICE = ngx.NOTICE
local ngx_now = ngx.now
local describe_config = require("resty.llmproxy.util").describe_config
local describe_error = require("resty.llmproxy.util").describe_error

local _M = {}

local LEDGER_EXIT_WAIT = 5 -- seconds an exiting worker waits for the ledger's commits

-- The host name, for ledger records' `node` (as the gateway's default).
local function ngx_var_hostname()
    local f = io_open("/proc/sys/kernel/hostname", "r")
    if not f then
        return "nginx"
    end
    local host = f:read("*l") or "nginx"
    f:close()
    return host
end

local HOOKS = metrics.HOOKS

local function is_file(path)
    local f = io_open(path, "r")
    if f then
        f:close()
        return true
    end
    return false
end

-- A relative config path is relative to nginx's prefix (`-p`, where
-- nginx.conf's own relative paths point), not to the worker's working
-- directory. `config` is a path when `llmproxy.new` takes it as one: one
-- line without a ':', or one line naming a file.
local function resolve_config(config)
    local prefix = ngx.config and ngx.config.prefix and ngx.config.prefix()
    if not prefix or prefix == "" then
        return config
    end
    local function under_prefix(path)
        if type(path) ~= "string" or find(path, "\n", 1, true) or sub(path, 1, 1) == "/" or path == "" then
            return nil
        end
        local full = prefix .. path
        if find(path, ":", 1, true) and not is_file(full) then
            return nil -- YAML text
        end
        return full
    end
    if type(config) == "table" and config.file then
        local full = under_prefix(config.file)
        if full then
            return { file = full }
        end
        return config
    end
    return under_prefix(config) or config
end

-- nginx decides whether a failed try is retried (proxy_next_upstream)
-- before the balancer runs: `gateway.retry` reaches it only through that
-- directive. The setup's line is the default policy's; say which line
-- another policy needs, and what nginx cannot retry.
local function warn_retry(retry)
    if not retry.next_upstream_is_default then
        ngx_log(WARN, "llmproxy: gateway.retry is not the default: nginx retries what ",
            "proxy_next_upstream says; for this policy set `proxy_next_upstream ", retry.next_upstream,
            ";` in the location")
    end
    local unsupported = retry.next_upstream_unsupported
    if #unsupported > 0 then
        ngx_log(WARN, "llmproxy: gateway.retry.on_status ", concat(unsupported, ", "),
            ": proxy_next_upstream cannot name these statuses, so nginx does not retry them")
    end
end

-- Build a complete new state; nothing is replaced unless everything worked.
local function load(config, opts)
    opts = opts or {}
    config = resolve_config(config)
    local ok, llmproxy = pcall(require, "llmproxy")
    if not ok then
        return nil, "cannot load the llmproxy module (is libllmproxy.so on lua_package_cpath?): " .. tostring(llmproxy)
    end
    local engine, err = llmproxy.new(config)
    if not engine then
        return nil, "cannot build the engine from " .. describe_config(config) .. ": " .. describe_error(err)
    end
    local gateway = engine:gateway()
    warn_retry(gateway.retry)
    local list = opts.backends or engine:backends()
    local set, berr = backends.new(list, gateway, llmproxy)
    if not set then
        return nil, berr
    end
    local enabled, names = {}, {}
    for _, hook in ipairs(HOOKS) do
        enabled[hook] = engine:enabled(hook)
        if enabled[hook] then
            names[#names + 1] = hook
        end
    end
    local admission = engine:admission()
    local dict_name = opts.limits_dict or "llmproxy_limits"
    local dict = ngx.shared[dict_name]
    local any_limit = admission.global_rpm > 0 or admission.key_rpm > 0 or admission.key_tpm > 0
        or admission.key_concurrency > 0
    local state_cfg = engine:state()
    local limiter = engine:limiter()
    local throttle = engine:auth_throttle()
    local redis
    local node = opts.node or (ngx_var_hostname() .. "-" .. ngx.worker.pid())
    if state_cfg.backend == "redis" then
        local found, redis_state = pcall(require, "resty.llmproxy.redis_state")
        if not found then
            return nil, "state: {backend: redis} needs lua-resty-redis (Debian's lua-nginx-redis): " .. redis_state
        end
        -- One instance per worker and start: its slots count while it lives.
        redis = redis_state.new(engine, limiter, node .. "-" .. math.floor(ngx_now() * 1000),
            function()
                if W.store then
                    metrics.state_error(W.store)
                end
            end,
            function()
                if W.store then
                    metrics.state_skipped(W.store)
                end
            end)
    elseif any_limit and not dict then
        return nil, "limits: are set but there is no lua_shared_dict " .. dict_name
            .. " (the limiter's counters, shared by the workers)"
    end
    if admission.keys > 0 and not dict and not redis then
        ngx_log(WARN, "llmproxy: no lua_shared_dict ", dict_name, ": keys' quota usage is not charged ",
            "(the configured used_quota stays)")
    end
    local names_list = {}
    for i, b in ipairs(set.list) do
        names_list[i] = b.name
    end
    if opts.admission ~= nil and opts.admission ~= "enforce" then
        return nil, "opts.admission: only 'enforce' remains (the key store is the config's), got "
            .. tostring(opts.admission)
    end
    if opts.key_info ~= nil then
        return nil, "opts.key_info is gone: keys come from the config's keys: / keys_file:"
    end
    return {
        llmproxy = llmproxy,
        engine = engine,
        version = llmproxy.version,
        null = llmproxy.null,
        config = describe_config(config),
        enabled = enabled,
        enabled_names = concat(names, ", "),
        backends = set,
        backend_names = names_list,
        max_retries = tonumber(opts.max_retries) or gateway.retry.max_retries,
        max_body_bytes = tonumber(opts.max_body_bytes) or gateway.max_body_bytes,
        max_response_bytes = tonumber(opts.max_response_bytes) or gateway.max_response_bytes,
        max_event_bytes = gateway.max_event_bytes, -- an unfinished stream event's bound
        health = gateway.health, -- passive rules (the balancer's) and active probes (`probe`)
        apply_timeouts = opts.timeouts ~= false,
        -- What admission runs (auth, limits, the limits), as
        -- the gateway decides it; the keys are the config's.
        admission = admission,
        limits_dict = dict, -- nil: no counters (scripts see unlimited status)
        limiter = limiter, -- the core's rule for `limits:`
        throttle = throttle, -- the core's auth throttle (`gateway.auth_throttle`)
        throttle_on = throttle:enabled(),
        redis = redis, -- `state: {backend: redis}`: counters and quotas there
        state_on_error = state_cfg.on_error,
        ledger = engine:ledger_stats() ~= nil,
        node = node,
        keys = {}, -- known keys' {info, fp}, by secret
        models_body = engine:models_body(), -- GET /v1/models, as the gateway's
    }
end

-- Wait (bounded) until the ledger rows queued so far are committed: for
-- an exiting worker, whose writer thread dies with it.
local function flush_ledger(state)
    if not (state and state.ledger) then
        return
    end
    if not state.engine:ledger_flush(LEDGER_EXIT_WAIT) then
        ngx_log(ERR, "llmproxy: the ledger did not commit its queued rows within ", LEDGER_EXIT_WAIT,
            " s of the worker's exit; they are lost")
    end
end

-- Renew the loaded engine's Redis announcement every `every` seconds
-- (one timer per worker, whatever reloads install).
local heartbeat_started = false
local function start_heartbeat(every)
    if heartbeat_started then
        return
    end
    local ok, err = ngx.timer.every(every, function(premature)
        local redis = not premature and W.current and W.current.redis
        if redis then
            local _, herr = redis:heartbeat()
            if herr then
                ngx_log(WARN, "llmproxy: cannot renew this worker's announcement in Redis: ", herr)
            end
        end
    end)
    if not ok then
        ngx_log(ERR, "llmproxy: cannot start the Redis heartbeat timer (this worker's slots stop counting): ", err)
        return
    end
    heartbeat_started = true
end

local function install(config, opts)
    local state, err = load(config, opts)
    if not state then
        if W.current then
            ngx_log(ERR, "llmproxy: ", err, "; keeping the engine loaded from ", W.current.config)
        else
            ngx_log(ERR, "llmproxy: ", err, "; no engine: requests get 503")
        end
        return nil, err
    end
    W.current = state
    state.llmproxy.installed(true)
    probe.start(state.health.probe_interval_ms)
    local dict = state.limits_dict
    if state.redis then
        -- Redis holds the usage (started as the gateway starts it).
        state.redis:start(state.engine:key_quotas())
        start_heartbeat(state.redis.cfg.heartbeat_ms / 1000)
    elseif dict then
        -- Where each key's quota usage starts, as the gateway's local state:
        -- a key first seen starts at the ledger's count (else its configured
        -- `used_quota`); a key whose configured `used_quota` changed since
        -- (a reload) is reset to it. The dict outlives reloads; `qc:` holds
        -- the configured value last applied.
        local used
        if state.ledger then
            local lerr
            used, lerr = state.engine:ledger_sync()
            if not used then
                ngx_log(ERR, "llmproxy: cannot read the keys' usage from the ledger: ", lerr)
            end
        end
        for fp, configured in pairs(state.engine:key_quotas()) do
            local applied = dict:get("qc:" .. fp)
            if applied == nil then
                dict:add("q:" .. fp, used and used[fp] or configured)
                dict:add("qc:" .. fp, configured)
            elseif applied ~= configured then
                dict:set("q:" .. fp, configured)
                dict:set("qc:" .. fp, configured)
            end
        end
    end
    ngx_log(NOTICE, "llmproxy: engine ", state.version, " loaded from ", state.config, " (", #state.backends.list,
        " backends; hooks: ", state.enabled_names ~= "" and state.enabled_names or "none", ")")
    return true
end

--- Set up this worker (metrics, the exit flush) and install its engine
-- (`resty.llmproxy.init_worker()` documents it).
function _M.init_worker(config, opts)
    local dict = opts and opts.metrics_dict or "llmproxy_metrics"
    local m, merr = metrics.new(dict, opts and tonumber(opts.metrics_sync_interval))
    if m then
        W.store = m
        metrics.reset_worker(m, ngx.worker.count())
        local ok, terr = metrics.sync_timer(m)
        if not ok then
            ngx_log(ERR, "llmproxy: cannot start the metrics sync timer: ", terr)
        end
    else
        W.store = nil
        ngx_log(NOTICE, "llmproxy: metrics off: ", merr)
    end
    -- Runs (prematurely) when the worker starts to exit: commit the rows
    -- of the requests it has finished; log() does it for those still in
    -- flight then.
    local ok, terr = ngx.timer.every(3600, function(premature)
        if premature then
            flush_ledger(W.current)
        end
    end)
    if not ok then
        ngx_log(ERR, "llmproxy: cannot start the worker-exit timer (the ledger is not flushed on exit): ", terr)
    end
    return install(config, opts)
end

_M.install = install
_M.flush_ledger = flush_ledger

return _M
