--- LLMProxy in OpenResty: the hook engine (`llmproxy.so`) in nginx's phases.
--
-- One function per phase; each checks that it runs in its phase. The hook
-- semantics live in the Rust core: this module only translates between
-- nginx and the engine, and applies each hook's failure policy, the way the
-- standalone gateway (`llmproxy serve`) does.
--
--     lua_shared_dict llmproxy_metrics 1m;
--     init_worker_by_lua_block  { require("resty.llmproxy").init_worker("/etc/llmproxy/llmproxy.yaml") }
--     upstream llmproxy_backends {
--         server 0.0.0.1;   # placeholder, never used
--         balancer_by_lua_block { require("resty.llmproxy").balancer() }
--     }
--     location /v1/ {
--         access_by_lua_block        { require("resty.llmproxy").access() }
--         header_filter_by_lua_block { require("resty.llmproxy").header_filter() }
--         body_filter_by_lua_block   { require("resty.llmproxy").body_filter() }
--         log_by_lua_block           { require("resty.llmproxy").log() }
--         proxy_buffering off;
--         proxy_pass http://llmproxy_backends;
--     }
--     location = /healthz { content_by_lua_block { require("resty.llmproxy").healthz() } }
--     location = /metrics {
--         allow 127.0.0.1;
--         deny all;
--         content_by_lua_block { require("resty.llmproxy").metrics() }
--     }
--
-- `lua_code_cache` must stay on: the worker's engine lives in this
-- module's state. A hook runs on the worker's event loop: a script that
-- runs to its `timeout_ms` stalls every request of the worker.
--
-- Per request, the request (and its body) is parsed once, in Rust, into an
-- `llmproxy.request` handle that every hook of the request runs on; the
-- routing hook's `backends` global is one `llmproxy.globals` handle per
-- worker, rebuilt when a backend's health changes.
--
-- A complete example: `nginx-conf/nginx.conf`; a guide:
-- `openresty/README.md`; design notes: `docs/adr/020-openresty-host.md` and
-- 022-029.
--
-- Admission is the standalone gateway's: the config's keys (Bearer or
-- x-api-key, never forwarded), core's standard checks and the auth script;
-- the limiter in `lua_shared_dict llmproxy_limits` (one limit for every
-- worker) and the rate_limit script; quota charging and the usage ledger
-- (a writer thread in the module) in log(). docs/adr/028, 029.
--
-- @module resty.llmproxy

-- The request-scoped fields this module writes (the repo's .luacheckrc
-- makes all of `ngx` read-only for openresty/).
-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx
local balancer = require "ngx.balancer"
local json = require "resty.llmproxy.json"
local sse = require "resty.llmproxy.sse"
local metrics = require "resty.llmproxy.metrics"
local backends = require "resty.llmproxy.backends"
local limits = require "resty.llmproxy.limits"

local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local require = require
local tostring = tostring
local tonumber = tonumber
local error = error
local concat = table.concat
local min = math.min
local max = math.max
local fmt = string.format
local find = string.find
local sub = string.sub
local lower = string.lower
local upper = string.upper
local gsub = string.gsub
local match = string.match
local gmatch = string.gmatch
local io_open = io.open

local ngx_log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local NOTICE = ngx.NOTICE
local INFO = ngx.INFO
local get_phase = ngx.get_phase
local worker_exiting = ngx.worker.exiting
local ngx_now = ngx.now
local ngx_time = ngx.time
local ngx_exit = ngx.exit
local ngx_print = ngx.print
local ngx_var = ngx.var
local ngx_header = ngx.header
local req_read_body = ngx.req.read_body
local req_get_body_data = ngx.req.get_body_data
local req_get_body_file = ngx.req.get_body_file
local req_set_body_data = ngx.req.set_body_data
local req_get_headers = ngx.req.get_headers
local req_get_method = ngx.req.get_method
local req_set_header = ngx.req.set_header
local req_clear_header = ngx.req.clear_header
local resp_get_headers = ngx.resp.get_headers
local set_current_peer = balancer.set_current_peer
local set_more_tries = balancer.set_more_tries
local set_timeouts = balancer.set_timeouts
local get_last_failure = balancer.get_last_failure

-- The error_log level of the request (usage lines are logged at NOTICE:
-- encoded only when they would be written).
local log_level
do
    local ok, errlog = pcall(require, "ngx.errlog")
    if ok then
        log_level = errlog.get_sys_filter_level
    else
        log_level = function()
            return NOTICE
        end
    end
end

local _M = { _VERSION = "0.2.0" }

local MAX_HEADERS = 100
local MAX_REQUEST_ID = 128
local DEFAULT_RETRY_AFTER = 60 -- seconds, as the gateway's rate limit refusals
local UNLIMITED = 2147483647 -- the gateway's "no limit" in rate_limit_status
local POOL_STATS_EVERY = 1 -- seconds between two copies of this worker's pool stats
local LEDGER_EXIT_WAIT = 5 -- seconds an exiting worker waits for the ledger's commits

-- Headers a script may not set (nginx computes them), as in the gateway.
local PROTECTED_HEADERS = {
    ["content-length"] = true,
    ["transfer-encoding"] = true,
    ["connection"] = true,
    ["host"] = true,
}

-- `engine:run*` option: results' `body` as JSON text, from Rust.
local BODY_JSON = { body_json = true }

-- Per-worker state. Replaced as a whole by `load`, so a request that
-- started on one engine finishes on it (it keeps `ctx.state`).
local current
-- This worker's metrics store (nil without the shared dict).
local store
local pool_stats_at = 0

---------------------------------------------------------------- helpers

-- Where each phase's code is written, for error messages.
local PHASE_WHERE = {
    init_worker = "init_worker_by_lua*",
    access = "access_by_lua*",
    balancer = "balancer_by_lua*",
    header_filter = "header_filter_by_lua*",
    body_filter = "body_filter_by_lua*",
    log = "log_by_lua*",
    timer = "an ngx.timer callback",
    content = "content_by_lua*",
}

-- Every public function starts here: a clear error in the wrong phase.
local function check_phase(fn, want)
    local phase = get_phase()
    if phase ~= want then
        error(fmt("resty.llmproxy.%s() must be called from %s, not in the %s phase", fn, PHASE_WHERE[want], phase), 3)
    end
end

-- A monotonic clock in seconds with sub-microsecond resolution, for hook
-- latency (ngx.now() is cached per event loop turn and has ms resolution).
local clock
do
    local ok, ffi = pcall(require, "ffi")
    if ok then
        ok = pcall(ffi.cdef, [[
            typedef struct { long tv_sec; long tv_nsec; } llmproxy_timespec_t;
            int clock_gettime(int clk_id, llmproxy_timespec_t *tp);
        ]])
    end
    if ok then
        local ts = ffi.new("llmproxy_timespec_t")
        local C = ffi.C
        clock = function()
            C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
            return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
        end
    else
        clock = function()
            ngx.update_time()
            return ngx_now()
        end
    end
end

local function describe_config(config)
    if type(config) == "string" and not find(config, "\n", 1, true) then
        return config
    end
    return "inline YAML"
end

-- "kind: message (script:line)" for logs.
local function describe_error(err)
    if type(err) ~= "table" then
        return tostring(err)
    end
    local where = ""
    if err.script then
        where = " (" .. tostring(err.script) .. (err.line and (":" .. tostring(err.line)) or "") .. ")"
    end
    return tostring(err.kind) .. ": " .. tostring(err.message) .. where
end

local function log_hook_error(hook, ctx, err, policy)
    ngx_log(ERR, "llmproxy: ", hook, " hook failed for request ", ctx.id, ": ", describe_error(err), "; ", policy)
end

-- `content-type` -> `Content-Type`, as the standalone gateway shows them;
-- the first 512 names seen are remembered (clients choose names freely).
local titles, ntitles = {}, 0
local function title_case(name)
    local t = titles[name]
    if t then
        return t
    end
    t = gsub(lower(name), "^%l", upper):gsub("%-%l", upper)
    if ntitles < 512 then
        titles[name] = t
        ntitles = ntitles + 1
    end
    return t
end

-- The last entry of an `$upstream_*` list ("0.001, 0.002 : 0.003").
local function last_entry(list)
    if not list or list == "" then
        return nil
    end
    return match(list, "([^,:%s]+)%s*$")
end

-- Every entry of an `$upstream_*` list.
local function entries(list)
    local out = {}
    if list then
        for v in gmatch(list, "[^,:%s]+") do
            out[#out + 1] = v
        end
    end
    return out
end

--- The gateway's error body: `{"error": {"message", "type", "code"}}`,
-- byte for byte (proxy/src/gateway/errors.rs: serde_json, keys in this
-- order).
-- @tparam string message what happened
-- @tparam string kind the error type (`bad_request`, `backend_error`, ...)
-- @tparam string code a stable machine-readable code
-- @treturn string the JSON text
-- @phases any
local function error_body(message, kind, code)
    return '{"error":{"message":' .. json.quote(message) .. ',"type":' .. json.quote(kind)
        .. ',"code":' .. json.quote(code) .. "}}"
end
_M.error_body = error_body

-- A failure of the request, the gateway's `Failure`: `kind` is what
-- error_handler sees as `error.type`.
local function failure(kind, status, code, message)
    return { kind = kind, status = status, code = code, message = message }
end

-- One of the failures the core names (`llmproxy.gateway_error`): the
-- gateway's type, status, code and words. Failure paths only.
local function known_failure(name, arg, arg2)
    local kind, status, code, message = require("llmproxy").gateway_error(name, arg, arg2)
    return failure(kind, status, code, message)
end

-- The type of an upstream error status (core's, the gateway's).
local function of_status(status)
    return require("llmproxy").error_type(status)
end

-- Run `hook` on the request handle `req` with `globals` (an
-- `llmproxy.globals` handle, or a table of the other globals), counting
-- the call in the metrics. Failures the script never saw (the host's
-- input: e.g. a body that is not JSON) are not counted as hook calls.
-- Log levels of scripts' `log.*` lines (`print` is `log.info`).
local SCRIPT_LOG_LEVEL = { info = INFO, warn = WARN, error = ERR }

-- Write the lines a hook call's script logged to the error log, tagged as
-- the gateway tags them (request id, hook, script).
local function script_log(lines)
    for i = 1, #lines do
        local l = lines[i]
        ngx_log(SCRIPT_LOG_LEVEL[l.level] or INFO, "llmproxy: script log: ", l.message, " (request_id=",
            l.request_id, ", hook=", l.hook, ", script=", l.script, ")")
    end
end

local function run_hook(state, hook, req, globals, opts)
    local t0 = clock()
    local res, err, lines
    if type(globals) == "table" then
        globals.request = req
        res, err, lines = state.engine:run(hook, globals, opts)
    else
        res, err, lines = state.engine:run_prepared(hook, req, globals, opts)
    end
    if store and (not err or err.hook) then
        metrics.hook_call(store, hook, clock() - t0, err and err.kind)
    end
    if lines then
        script_log(lines)
    end
    return res, err
end

-- A hook failed under `on_error: deny`: 503, not shaped by error_handler
-- (the gateway's `denied`).
local function denied_failure(hook, err)
    local f = known_failure("hook_failed", hook, tostring(err and err.kind or "internal"))
    f.denied = true
    return f
end

---------------------------------------------------------------- engine

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
    local list = opts.backends or engine:backends()
    local set, berr = backends.new(list, gateway)
    if not set then
        return nil, berr
    end
    local enabled, on_error, names = {}, {}, {}
    for _, hook in ipairs(HOOKS) do
        enabled[hook] = engine:enabled(hook)
        on_error[hook] = engine:on_error(hook)
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
                if store then
                    metrics.state_error(store)
                end
            end,
            function()
                if store then
                    metrics.state_skipped(store)
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
        encode = json.encoder(llmproxy, { sort_keys = true }),
        config = describe_config(config),
        enabled = enabled,
        on_error = on_error,
        enabled_names = concat(names, ", "),
        backends = set,
        backend_names = names_list,
        max_retries = tonumber(opts.max_retries) or gateway.retry.max_retries,
        max_body_bytes = tonumber(opts.max_body_bytes) or gateway.max_body_bytes,
        max_response_bytes = tonumber(opts.max_response_bytes) or gateway.max_response_bytes,
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
        local redis = not premature and current and current.redis
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
        if current then
            ngx_log(ERR, "llmproxy: ", err, "; keeping the engine loaded from ", current.config)
        else
            ngx_log(ERR, "llmproxy: ", err, "; no engine: requests get 503")
        end
        return nil, err
    end
    current = state
    state.llmproxy.installed(true)
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

--- Build this worker's engine from the gateway's YAML config.
--
-- Loads `llmproxy.so` (via `lua_package_cpath`) and builds the engine once
-- per worker: engines hold threads and LuaJIT states, which must not be
-- created in the master and forked. The backends, retries, size limits
-- and timeouts come from the same YAML (`backends:`, `gateway:`). On
-- failure the error is logged and the worker keeps the engine it had
-- (none at startup: requests get 503). Metrics go to the shared dict
-- `llmproxy_metrics` when it exists. When the worker exits (quit, reload,
-- stop) it first waits, at most 5 s, for the ledger's queued rows to be
-- committed (the writer thread ends with the worker).
--
-- @tparam string config path of the YAML config (scripts are relative to
--   it; a relative path is relative to nginx's prefix), or YAML text
-- @tparam[opt] table opts overrides: `backends` (a list of `{name, url,
--   weight?, headers?}`; default `engine:backends()`), `max_retries`
--   (`gateway.retry.max_retries`), `max_body_bytes`
--   (`gateway.max_body_bytes`), `max_response_bytes`
--   (`gateway.max_response_bytes`), `timeouts = false` (keep nginx's
--   `proxy_*_timeout` instead of the YAML's), `metrics_dict`
--   (`"llmproxy_metrics"`), `limits_dict` (`"llmproxy_limits"`: the
--   limiter's counters and quota usage, shared by the workers),
--   `metrics_sync_interval` (seconds between two syncs of this worker's
--   counts into the metrics dict; default 0.1), `node` (ledger rows'
--   node; default: host name and worker pid)
-- @treturn boolean|nil true, or nil and an error message
-- @phases init_worker
-- @usage init_worker_by_lua_block { require("resty.llmproxy").init_worker("/etc/llmproxy/llmproxy.yaml") }
function _M.init_worker(config, opts)
    check_phase("init_worker", "init_worker")
    local dict = opts and opts.metrics_dict or "llmproxy_metrics"
    local m, merr = metrics.new(dict, opts and tonumber(opts.metrics_sync_interval))
    if m then
        store = m
        metrics.reset_worker(m, ngx.worker.count())
        local ok, terr = metrics.sync_timer(m)
        if not ok then
            ngx_log(ERR, "llmproxy: cannot start the metrics sync timer: ", terr)
        end
    else
        store = nil
        ngx_log(NOTICE, "llmproxy: metrics off: ", merr)
    end
    -- Runs (prematurely) when the worker starts to exit: commit the rows
    -- of the requests it has finished; log() does it for those still in
    -- flight then.
    local ok, terr = ngx.timer.every(3600, function(premature)
        if premature then
            flush_ledger(current)
        end
    end)
    if not ok then
        ngx_log(ERR, "llmproxy: cannot start the worker-exit timer (the ledger is not flushed on exit): ", terr)
    end
    return install(config, opts)
end

--- Replace this worker's engine (e.g. from a timer that watches the config).
--
-- Same arguments and failure behaviour as `init_worker`: a config that does
-- not build never replaces a working engine; requests in flight finish on
-- the engine they started with.
-- @tparam string config as for `init_worker`
-- @tparam[opt] table opts as for `init_worker`
-- @treturn boolean|nil true, or nil and an error message
-- @phases timer
function _M.reload(config, opts)
    check_phase("reload", "timer")
    return install(config, opts)
end

--- The loaded engine's description, or nil (for tests and status pages).
-- @treturn table|nil `{version, config, hooks, backends}`
-- @phases any
function _M.status()
    local state = current
    if not state then
        return nil
    end
    local names = {}
    for i, n in ipairs(state.backend_names) do
        names[i] = n
    end
    return { version = state.version, config = state.config, hooks = state.enabled_names, backends = names }
end

---------------------------------------------------------------- errors

-- Headers of an error_handler result: set, or remove with false/null.
local function apply_response_headers(ctx, headers)
    if type(headers) ~= "table" then
        return
    end
    for name, value in pairs(headers) do
        if PROTECTED_HEADERS[lower(name)] then
            ngx_log(WARN, "llmproxy: request ", ctx.id, ": a script may not set header ", name, "; ignored")
        elseif value == false or value == ctx.state.null then
            ngx_header[name] = nil
        else
            ngx_header[name] = tostring(value)
        end
    end
end

-- A request handle without a body for error_handler when access() did
-- not build one (a body that is not JSON, or an error nginx found before
-- access ran), as the gateway's `request` with a null body.
local function bare_request(ctx)
    local fields = ctx.fields or { id = ctx.id, client_ip = ngx_var.remote_addr, path = ngx_var.uri }
    fields.body_raw = nil
    return ctx.state.llmproxy.request(fields)
end

-- The facts core's failure policy (`llmproxy.failure_step`, docs/adr/042)
-- needs about failure `f` beyond its source: error_handler is enabled and
-- `f` is not a hook failure under `on_error: deny`; the caller is
-- identified (auth is off, the key passed the identity checks in
-- prepare_request, or admission let the request in).
local function failure_facts(ctx, f)
    local state = ctx.state
    return {
        error_handler = not f.denied and state.enabled.error_handler == true,
        caller_identified = ctx.identified == true or not state.admission.auth,
    }
end

-- The response for failure `f`: error_handler decides; nil means the
-- default (the backend's own response when it sent one, else the
-- gateway's error body). Returns status, body, headers (or nil) and how
-- error_handler ended, as core's failure policy names it: "not_run",
-- "kept", "replaced", "denied".
local function decide_error(ctx, f)
    local state = ctx.state
    if not state or state.llmproxy.failure_step(failure_facts(ctx, f)) ~= "error_handler" then
        return nil, nil, nil, "not_run"
    end
    local req = ctx.req or bare_request(ctx)
    local res, err = run_hook(state, "error_handler", req, {
        error = {
            type = f.kind,
            message = f.message,
            status_code = f.status,
            backend_url = f.backend_url,
            retry_count = f.retry_count or 0,
        },
    }, BODY_JSON)
    if err then
        if state.on_error.error_handler == "deny" then
            log_hook_error("error_handler", ctx, err, "refusing the request (on_error: deny)")
            local d = denied_failure("error_handler", err)
            return d.status, error_body(d.message, d.kind, d.code), nil, "denied"
        end
        log_hook_error("error_handler", ctx, err, "sending the default error")
        return nil, nil, nil, "kept"
    end
    if res == nil then
        return nil, nil, nil, "kept"
    end
    return tonumber(res.status_code) or f.status, res.body or "null", res.headers, "replaced"
end

-- End the request from the access phase with failure `f`, through
-- error_handler.
local function fail(ctx, f)
    ctx.failure = f
    ctx.handled = true
    local status, body, headers = decide_error(ctx, f)
    if not status then
        status, body = f.status, error_body(f.message, f.kind, f.code)
    end
    ngx.status = status
    ngx_header["Content-Type"] = "application/json"
    ngx_header["Content-Length"] = #body
    apply_response_headers(ctx, headers)
    if f.retry_after and not ngx_header["Retry-After"] then
        ngx_header["Retry-After"] = f.retry_after
    end
    ngx_print(body)
    return ngx_exit(ngx.HTTP_OK)
end

-- What went wrong, for a response of status >= 400 that access() did not
-- write itself: a failure, and whether the body is nginx's own error page
-- (to be replaced) rather than the backend's answer (passed through by
-- default).
local function classify_error(ctx, status)
    local retry_count = ctx.tries and ctx.tries - 1 or 0
    local backend = ctx.tried and ctx.backend
    local f
    if not backend then
        -- nginx answered before any backend: the body limit, a bad request,
        -- the balancer finding no backend, a Lua error.
        if status == 413 then
            -- nginx's own client_max_body_size (its value is not known here).
            f = failure("bad_request", 413, "body_too_large", "the request body is too large")
        elseif status == 503 then
            f = known_failure("no_backend")
        elseif status >= 500 then
            f = failure("backend_error", status, "internal_error", "the gateway failed to handle the request")
        else
            f = failure(of_status(status), status, "bad_request", "nginx refused the request (" .. status .. ")")
        end
        return f, true
    end
    local header_time = last_entry(ngx_var.upstream_header_time)
    if header_time == nil or header_time == "-" then
        -- No response head from the (last) backend: nginx's error page.
        if status == 504 then
            f = known_failure("backend_timeout", "first byte")
        elseif status == 502 and last_entry(ngx_var.upstream_connect_time) == "-" then
            f = known_failure("backend_unreachable", backend.name .. " (" .. backend.url .. ")")
        elseif status == 502 then
            f = known_failure("backend_failed", "see nginx's error log")
        else
            f = failure(of_status(status), status, "gateway_error", "the request failed (" .. status .. ")")
        end
        f.backend_url, f.retry_count = backend.url, retry_count
        return f, true
    end
    f = failure(of_status(status), status, "backend_status", "the backend answered " .. status)
    f.backend_url, f.retry_count = backend.url, retry_count
    return f, false
end

---------------------------------------------------------------- access

-- Answer from this module (not a backend) and end the request.
local function send_local(status, body)
    ngx.status = status
    ngx_header["Content-Type"] = "application/json"
    ngx_header["Content-Length"] = #body
    ngx_print(body)
    return ngx_exit(ngx.HTTP_OK)
end

-- Why this worker has no engine, when it can tell: with `lua_code_cache
-- off`, every request runs in a fresh Lua VM, without the module state
-- init_worker built (the library, loaded once per process, remembers that
-- an engine was installed).
local function no_engine_reason()
    local ok, llmproxy = pcall(require, "llmproxy")
    if ok and llmproxy.installed and llmproxy.installed() then
        return "lua_code_cache is off: each request runs in a new Lua VM, without the engine init_worker loaded;"
            .. " set lua_code_cache on"
    end
    return nil
end

-- 503 `engine_unavailable`, with the reason when there is one (also
-- logged).
local function no_engine()
    local reason = no_engine_reason()
    local message = "the gateway has no engine loaded"
    if reason then
        message = message .. " (" .. reason .. ")"
        ngx_log(ERR, "llmproxy: request ", ngx_var.request_id, " gets 503: ", reason)
    end
    return send_local(503, error_body(message, "backend_error", "engine_unavailable"))
end

-- The client's id if it is 1..128 visible ASCII characters, else nginx's.
local function request_id(headers)
    local id = headers["x-request-id"]
    if type(id) == "string" and #id <= MAX_REQUEST_ID and match(id, "^[\33-\126]+$") then
        return id
    end
    return ngx_var.request_id
end

-- The whole body as a string (also when nginx spooled it to a file), or
-- nil when there is none. Reading a spooled file blocks the worker (the
-- one blocking read of this module): nginx spools a body only above
-- client_body_buffer_size, so set that to gateway.max_body_bytes.
local function read_request_body()
    req_read_body()
    local data = req_get_body_data()
    if data then
        return data
    end
    local path = req_get_body_file()
    if not path then
        return nil
    end
    local f, err = io_open(path, "rb")
    if not f then
        return nil, "cannot read the spooled request body: " .. tostring(err)
    end
    data = f:read("*a")
    f:close()
    return data
end

-- Endpoints whose bodies are JSON (the gateway's `is_api`), by path suffix
-- so a location may sit under any prefix.
local function api_endpoint(method, uri)
    if method ~= "POST" then
        return nil
    end
    if find(uri, "/chat/completions$") then
        return "chat"
    elseif find(uri, "/completions$") then
        return "completions"
    elseif find(uri, "/embeddings$") then
        return "embeddings"
    end
    return nil
end

-- The hooks' `request` as a table, as the standalone gateway builds it.
local function request_fields(ctx, raw)
    local headers = {}
    for name, value in pairs(raw) do
        if type(value) == "table" then
            value = concat(value, ", ")
        end
        headers[title_case(name)] = value
    end
    local request = {
        id = ctx.id,
        headers = headers,
        client_ip = ngx_var.remote_addr,
        path = ngx_var.uri,
    }
    local auth = raw["authorization"]
    if type(auth) == "string" then
        local scheme, key = match(auth, "^(%S+)%s+(.-)%s*$")
        if scheme and lower(scheme) == "bearer" and key ~= "" then
            request.api_key = key
        end
    end
    if not request.api_key then
        local key = raw["x-api-key"]
        key = type(key) == "string" and match(key, "^%s*(.-)%s*$") or nil
        if key and key ~= "" then
            request.api_key = key
        end
    end
    return request
end

-- The configured key behind `api_key`: `{info, fp}` (info: the record as
-- a table, the scripts' `key_info`), or nil. Known keys are cached per
-- engine; unknown ones are not (a client could fill the cache).
local function key_entry(state, api_key)
    if not api_key then
        return nil
    end
    local e = state.keys[api_key]
    if e == nil then
        local info, fp = state.engine:key(api_key)
        if not info then
            return nil
        end
        e = { info = info, fp = fp, configured_used = tonumber(info.used_quota) or 0 }
        state.keys[api_key] = e
    end
    return e
end

-- Request headers nginx's proxy module writes itself.
local NGINX_FRAMED = { host = true, ["content-length"] = true, ["transfer-encoding"] = true }

-- Read the body and parse the request once into `ctx.req`. Returns a
-- failure when the request cannot go on.
local function prepare_request(state, ctx)
    local raw, truncated = req_get_headers(MAX_HEADERS)
    if truncated == "truncated" then
        ngx_log(WARN, "llmproxy: more than ", MAX_HEADERS, " request headers; scripts see the first ", MAX_HEADERS)
    end
    ctx.id = request_id(raw)
    req_set_header("X-Request-ID", ctx.id)
    -- Headers that describe the client's connection (the fixed hop-by-hop
    -- names and every name its Connection header lists) stay on this hop.
    -- nginx frames the upstream message itself (Host, Content-Length,
    -- Transfer-Encoding): those are left to it.
    local hop = state.llmproxy.hop_by_hop(raw)
    if hop then
        for i = 1, #hop do
            local name = hop[i]
            if not NGINX_FRAMED[name] then
                req_clear_header(name)
            end
        end
    end
    local fields = request_fields(ctx, raw)
    local entry = key_entry(state, fields.api_key)
    if entry then
        fields.user_id = entry.info.user_id
    end
    ctx.key = entry
    -- Settled by the headers before anything can fail, as in the gateway:
    -- only an identified caller's failures go through error_handler.
    ctx.identified = state.admission.auth and state.engine:caller_identified(fields.api_key, fields.client_ip)
    ctx.fields = fields -- error_handler's request if the body cannot be parsed
    local limit = state.max_body_bytes
    local declared = tonumber(raw["content-length"])
    if declared and declared > limit then
        return known_failure("body_too_large", limit)
    end
    local body, err = read_request_body()
    if err then
        ngx_log(ERR, "llmproxy: request ", ctx.id, ": ", err)
        return known_failure("body_unreadable", err)
    end
    if body and #body > limit then
        return known_failure("body_too_large", limit)
    end
    ctx.api_key = fields.api_key
    ctx.api = api_endpoint(req_get_method(), ngx_var.uri)
    local llmproxy = state.llmproxy
    if ctx.api then
        fields.body_raw = body or ""
        local req, perr = llmproxy.request(fields)
        if not req then
            local message = tostring(perr and perr.message or perr)
            message = gsub(message, "^request%.body_raw: ", "")
            return known_failure("invalid_json", message)
        end
        if not match(body, "^%s*{") then
            ctx.req = req
            return known_failure("invalid_body")
        end
        ctx.req = req
        -- `stream` and its options must have their OpenAI types (core's
        -- check, as the gateway): a "true" would stream upstream unbilled.
        local ferr = req:check_fields()
        if ferr then
            return known_failure("invalid_field", ferr)
        end
        return nil
    end
    -- Other endpoints: scripts see the body when it happens to be JSON.
    if body and body ~= "" then
        fields.body_raw = body
        ctx.req = llmproxy.request(fields)
        if ctx.req then
            return nil
        end
        fields.body_raw = nil
    end
    local req, rerr = llmproxy.request(fields)
    if not req then
        ngx_log(ERR, "llmproxy: request ", ctx.id, ": ", describe_error(rerr))
        return failure("bad_request", 400, "bad_request", "the request cannot be read: " .. tostring(rerr))
    end
    ctx.req = req
    return nil
end

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

-- `llmproxy_auth_denied_total` / `llmproxy_rate_limited_total` reasons of
-- a refusal's code (the gateway's).
local AUTH_REASON = {
    invalid_api_key = "invalid_key", key_disabled = "disabled", key_expired = "expired",
    ip_not_allowed = "ip_not_allowed", quota_exhausted = "quota_exhausted", denied_by_script = "script",
    hook_failed = "hook_failed",
}
local RATE_REASON = {
    global_rate_limit = "global_rpm", key_rate_limit = "key_rpm", key_token_limit = "key_tpm",
    key_concurrency_limit = "key_concurrency", rate_limited_by_script = "script",
    state_unavailable = "state_unavailable",
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
        if standard and store then
            metrics.auth_denied(store, AUTH_REASON[code])
        end
        return standard
    end
    local res, err = run_hook(state, "auth", ctx.req, {
        key_info = entry and entry.info or state.null,
        standard_checks = checks,
    })
    local refusal
    if err then
        if state.on_error.auth == "deny" then
            if standard then
                log_hook_error("auth", ctx, err, "refusing the request with the standard verdict (on_error: deny)")
                refusal = standard
            else
                log_hook_error("auth", ctx, err, "refusing the request (on_error: deny)")
                refusal = denied_failure("auth", err)
            end
        else
            log_hook_error("auth", ctx, err, "using the standard verdict")
            refusal = standard
        end
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
    if refusal and store then
        metrics.auth_denied(store, AUTH_REASON[refusal.code] or "hook_failed")
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

-- A standard limit refused: 429 with Retry-After, type rate_limit.
local function rate_failure(code, message, retry_after)
    local f = failure("rate_limit", 429, code, message)
    f.retry_after = max(1, math.ceil(retry_after))
    return f
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
    if store then
        metrics.rate_limited(store, "state_unavailable")
    end
    return known_failure("state_unavailable")
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
    local refusal
    local verdict = "standard"
    if state.enabled.rate_limit then
        local res, err = run_hook(state, "rate_limit", ctx.req, {
            key_info = entry and entry.info or state.null,
            rate_limit_status = acq.status,
            current_time = current_time(state.engine),
        })
        if err then
            verdict = "failed"
            if state.on_error.rate_limit == "deny" then
                log_hook_error("rate_limit", ctx, err, "refusing the request (on_error: deny)")
                refusal = denied_failure("rate_limit", err)
            else
                log_hook_error("rate_limit", ctx, err, "using the standard verdict")
            end
        elseif res ~= nil and res.allow == false then
            verdict = "deny"
            local d = acq.denial
            refusal = rate_failure("rate_limited_by_script",
                type(res.reason) == "string" and res.reason or "rate limited",
                tonumber(res.retry_after) or (d and d.retry_after) or DEFAULT_RETRY_AFTER)
        elseif res ~= nil then
            verdict = "allow"
            if not acq.took and counted then
                local forced, ferr = take(state, id, true)
                if not forced then
                    ngx_log(ERR, "llmproxy: request ", ctx.id, ": the limiter's store failed: ",
                        tostring(ferr), " (admitted uncounted: the rate_limit script allowed it)")
                end
                acq = forced or acq
                ctx.limits = acq
            end
        end
    end
    if verdict == "standard" and acq.denial then
        local d = acq.denial
        refusal = rate_failure(d.code, d.message, d.retry_after)
    end
    if refusal and acq.took then
        local ok, rerr = give_back(state, acq)
        if not ok then
            ngx_log(ERR, "llmproxy: request ", ctx.id, ": cannot give back a refused request: ", tostring(rerr))
        end
    end
    ngx_log(INFO, "llmproxy: request ", ctx.id, ": rate_limit verdict: ", verdict,
        refusal and (" (" .. refusal.message .. ")") or "")
    if refusal and store and RATE_REASON[refusal.code] then
        metrics.rate_limited(store, RATE_REASON[refusal.code])
    end
    return refusal
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
            if refusal.code == "invalid_api_key" and store then
                metrics.auth_failed(store)
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

-- The routing hook, then the default balancer. Returns the backend, or
-- nil and a failure.
local function route(state, ctx)
    local set = state.backends
    local name
    if state.enabled.routing then
        local g, gerr = backends.routing_globals(set, state.llmproxy)
        if not g then
            ngx_log(ERR, "llmproxy: cannot build the routing globals: ", describe_error(gerr))
        else
            local res, err = run_hook(state, "routing", ctx.req, g)
            if err then
                if state.on_error.routing == "deny" then
                    log_hook_error("routing", ctx, err, "refusing the request (on_error: deny)")
                    return nil, denied_failure("routing", err)
                end
                log_hook_error("routing", ctx, err, "using the default balancer")
            else
                name = res
            end
        end
    end
    local backend = name and set.by_name[name]
    if backend and not backend.usable then
        ngx_log(WARN, "llmproxy: routing chose backend '", name, "' for request ", ctx.id,
            ", which nginx cannot reach; using the default balancer")
        backend = nil
    end
    if backend then
        ctx.routed = true
    else
        backend = backends.pick(set)
    end
    if not backend then
        return nil, known_failure("no_backend")
    end
    ctx.backend = backend
    return backend
end

local function set_request_header(ctx, name, value)
    if PROTECTED_HEADERS[lower(name)] then
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": a script may not set header ", name, "; ignored")
        return
    end
    if value == false or value == ctx.state.null then
        req_clear_header(name)
    else
        req_set_header(name, tostring(value))
    end
end

-- request_transform (with `request.backend_url`), then the stream
-- options: for a stream whose client did not ask for
-- `stream_options.include_usage`, ask the backend for it (the usage chunk
-- is removed before the client sees it). Sets the body to send, if it
-- changed. Returns a failure when the request cannot go on.
local function prepare_upstream(state, ctx, backend)
    local text -- the body to send, when it is not the client's
    local effective = ctx.req
    if ctx.api and state.enabled.request_transform then
        local routed, werr = ctx.req:with({ backend_url = backend.url })
        local res, err
        if routed then
            res, err = run_hook(state, "request_transform", routed, nil, BODY_JSON)
        else
            err = werr
        end
        if err then
            if state.on_error.request_transform == "deny" then
                log_hook_error("request_transform", ctx, err, "refusing the request (on_error: deny)")
                return denied_failure("request_transform", err)
            end
            log_hook_error("request_transform", ctx, err, "sending the request unchanged")
        elseif res ~= nil then
            if type(res.body) == "string" and res.body ~= "null" then
                text = res.body
            end
            if type(res.headers) == "table" then
                for name, value in pairs(res.headers) do
                    set_request_header(ctx, name, value)
                end
            end
        end
    end
    if ctx.api == "chat" or ctx.api == "completions" then
        if text then
            -- Only a body that mentions "stream" can be a stream.
            effective = find(text, '"stream"', 1, true) and state.llmproxy.request({ body_raw = text }) or nil
        end
        local stream = effective ~= nil and effective:body_get("/stream") == true
        if stream and effective:body_get("/stream_options/include_usage") ~= true then
            text = effective:body_json({ stream_options = { include_usage = true } })
            ctx.strip_usage = true
        end
        ctx.stream = stream
    end
    if text then
        req_set_body_data(text)
    end
    return nil
end

-- Headers the backend's config adds (e.g. an upstream API key).
local function apply_backend_headers(ctx, backend)
    if backend.headers then
        for name, value in pairs(backend.headers) do
            set_request_header(ctx, name, value)
        end
    end
end

--- Admit, route and rewrite the request for its backend.
--
-- Reads the body (also when spooled to a file) and parses the request
-- once, in Rust, into an `llmproxy.request` handle (`id` from a sane
-- `X-Request-ID` or `$request_id`, title-cased headers, client_ip, path,
-- api_key from a Bearer token or x-api-key, the body). Admission as the
-- gateway's: the standard checks and `auth`, the shared limiter and
-- `rate_limit` (refusals: 401/403/429 through error_handler; the key is
-- removed before upstream), then `routing` (a failure falls
-- back to the default balancer) and `request_transform` (with
-- `request.backend_url`; a failure sends the request unchanged). A
-- stream's body asks the backend for usage. Failures (a body that is too
-- large or not JSON, no backend, a refusal) answer through
-- `error_handler` with the gateway's error bodies; 503 when no engine is
-- loaded (naming `lua_code_cache` when that is why). `GET /v1/models`
-- (that path exactly, as the gateway matches it; `models()` serves other
-- locations) is answered here: the config's model list, no admission, no
-- backend.
-- @phases access
-- @usage access_by_lua_block { require("resty.llmproxy").access() }
function _M.access()
    check_phase("access", "access")
    local state = current
    if state and req_get_method() == "GET" and ngx_var.uri == "/v1/models" then
        return send_local(200, state.models_body) -- the gateway's: no auth, no backend
    end
    local ctx = { state = state, started = ngx_now() }
    ngx.ctx.llmproxy = ctx
    if not state then
        ctx.id = ngx_var.request_id
        ctx.handled = true
        return no_engine()
    end
    local dict = state.limits_dict
    if dict and state.throttle_on then
        -- A client that failed too many key checks is refused before its
        -- key is looked at (the gateway's auth throttle, core's rule).
        local wait = limits.throttle_check(dict, state.throttle, ngx_var.remote_addr, ngx_now())
        if wait then
            ctx.id = ngx_var.request_id
            ctx.handled = true
            ngx_log(WARN, "llmproxy: refused: too many failed API key checks from ", ngx_var.remote_addr)
            if store then
                metrics.auth_throttled(store)
            end
            local f = known_failure("auth_throttled", wait)
            ngx_header["Retry-After"] = wait
            return send_local(f.status, state.encode({ error = { message = f.message, type = f.kind, code = f.code } }))
        end
    end
    local f = prepare_request(state, ctx)
    if f then
        return fail(ctx, f)
    end
    f = admit(state, ctx)
    if f then
        return fail(ctx, f)
    end
    ctx.admitted = true
    ctx.identified = true
    local backend
    backend, f = route(state, ctx)
    if not backend then
        return fail(ctx, f)
    end
    apply_backend_headers(ctx, backend)
    f = prepare_upstream(state, ctx, backend)
    if f then
        return fail(ctx, f)
    end
end

---------------------------------------------------------------- balancer

--- Send the request to its backend; on a retry, to another one.
--
-- The first try goes to the backend `access()` chose (routing or default
-- balancer) and allows up to `gateway.retry.max_retries` more tries over
-- backends that get the same upstream headers; each retry marks the failed
-- backend (passive health) and picks another untried one. Each try gets
-- the backend's timeouts from the YAML (`ngx.balancer.set_timeouts`).
-- @phases balancer
-- @usage balancer_by_lua_block { require("resty.llmproxy").balancer() }
function _M.balancer()
    check_phase("balancer", "balancer")
    local ctx = ngx.ctx.llmproxy
    local state = ctx and ctx.state or current
    if not state then
        ngx_log(ERR, "llmproxy: balancer: no engine loaded")
        return ngx_exit(503)
    end
    if not ctx then
        -- access() did not run for this location: default balancer only.
        ctx = { state = state, id = ngx_var.request_id, started = ngx_now() }
        ngx.ctx.llmproxy = ctx
    end
    local set = state.backends
    local backend
    if not ctx.tried then
        backend = ctx.backend or backends.pick(set)
        if not backend then
            ngx_log(ERR, "llmproxy: request ", ctx.id, ": no usable backend")
            return ngx_exit(503)
        end
        ctx.tried = { [backend.name] = true }
        ctx.attempts = { backend }
        ctx.tries = 1
        local more = min(state.max_retries, backends.alternatives(set, backend))
        if more > 0 then
            local ok, err = set_more_tries(more)
            if not ok then
                ngx_log(WARN, "llmproxy: set_more_tries: ", err)
            end
        end
    else
        local reason, code = get_last_failure()
        local previous = ctx.backend
        previous.active = max(0, previous.active - 1)
        backends.failure(set, previous)
        backend = backends.pick(set, ctx.tried, previous.signature)
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": backend '", previous.name, "' failed (", tostring(reason),
            code and (" " .. tostring(code)) or "", ")", backend and ("; retrying on '" .. backend.name .. "'") or "")
        if not backend then
            return ngx_exit(502)
        end
        ctx.tried[backend.name] = true
        ctx.attempts[#ctx.attempts + 1] = backend
        ctx.tries = ctx.tries + 1
    end
    ctx.backend = backend
    backend.active = backend.active + 1
    ctx.upstream_started = ngx_now()
    if store then
        metrics.backend(store, backend.name, backend.usable and backend.healthy, backend.ewma, backend.active)
        local previous = ctx.attempts[#ctx.attempts - 1]
        if previous then
            metrics.backend(store, previous.name, previous.usable and previous.healthy, previous.ewma, previous.active)
        end
    end
    if state.apply_timeouts and (backend.connect_timeout or backend.read_timeout) then
        local ok, err = set_timeouts(backend.connect_timeout, backend.send_timeout, backend.read_timeout)
        if not ok then
            ngx_log(WARN, "llmproxy: set_timeouts: ", err)
        end
    end
    local ok, err = set_current_peer(backend.host, backend.port)
    if not ok then
        ngx_log(ERR, "llmproxy: request ", ctx.id, ": cannot use backend '", backend.name, "': ", err)
        return ngx_exit(502)
    end
end

---------------------------------------------------------------- response

local function is_json(content_type)
    return type(content_type) == "string" and find(lower(content_type), "^%s*application/[%w.+-]*json") ~= nil
end

local function is_event_stream(content_type)
    return type(content_type) == "string" and find(lower(content_type), "^%s*text/event%-stream") ~= nil
end

local function response_headers()
    local raw = resp_get_headers(MAX_HEADERS)
    local headers = {}
    for name, value in pairs(raw) do
        if type(value) == "table" then
            value = concat(value, ", ")
        end
        headers[title_case(name)] = value
    end
    return headers
end

local function latency_ms(ctx)
    return (ngx_now() - (ctx.upstream_started or ctx.started)) * 1000
end

-- Buffer a backend's JSON answer for response_transform in body_filter
-- (status and headers go out now; a transform can change only the body).
local function buffer_for_transform(ctx, status)
    ctx.status = status
    ctx.chunks, ctx.nbytes = {}, 0
    ctx.transform = true
    ctx.response_headers = response_headers()
    ngx_header["Content-Length"] = nil
end

-- Shape the response to a failure found after access(), in core's order
-- (`llmproxy.failure_step`, docs/adr/042): error_handler first; when it
-- keeps a backend's JSON error answer, response_transform runs on it in
-- body_filter as on any answer. Without either: nginx's error page
-- replaced by the gateway's error body; the backend's own error response
-- passed through.
local function handle_error(ctx, status)
    local f, replace = classify_error(ctx, status)
    ctx.failure = f
    local state = ctx.state
    local facts = failure_facts(ctx, f)
    facts.source = replace and "gateway" or "upstream"
    facts.json_body = is_json(ngx_header["Content-Type"]) and not ngx_header["Content-Encoding"]
    facts.response_transform = (state.enabled.response_transform and ctx.api and ctx.req) and true or false
    local step = state.llmproxy.failure_step(facts)
    local new_status, body, headers
    if step == "error_handler" then
        new_status, body, headers, facts.handled = decide_error(ctx, f)
        step = state.llmproxy.failure_step(facts)
    end
    if step == "response_transform" then
        return buffer_for_transform(ctx, status)
    end
    if not new_status then
        if not replace then
            return -- the backend's answer, as it came
        end
        new_status, body = f.status, error_body(f.message, f.kind, f.code)
    end
    ngx.status = new_status
    ngx_header["Content-Type"] = "application/json"
    ngx_header["Content-Length"] = #body
    ngx_header["Content-Encoding"] = nil
    apply_response_headers(ctx, headers)
    ctx.error_body = body
end

--- Decide what the body filter does with this response.
--
-- Adds `X-Request-ID` and `X-LLMProxy-Backend`. An error (status >= 400)
-- goes through `error_handler` here, where status and headers can still
-- change: nginx's own error pages (backend unreachable, timeout, retries
-- exhausted, body too large) become the gateway's error bodies; a
-- backend's error response passes through unless the script replaces it.
-- An event stream is relayed event by event; a JSON response that
-- `response_transform` or usage capture needs is buffered (`Content-Length`
-- is removed when a transform will run).
-- @phases header_filter
function _M.header_filter()
    check_phase("header_filter", "header_filter")
    local ctx = ngx.ctx.llmproxy
    local status = ngx.status
    if not ctx then
        if status < 400 or not current then
            return
        end
        -- An error nginx found before access() (e.g. 413 from
        -- client_max_body_size): shape it like the gateway's.
        local headers = req_get_headers(MAX_HEADERS)
        ctx = { state = current, id = request_id(headers), started = ngx_now() }
        ngx.ctx.llmproxy = ctx
    end
    ngx_header["X-Request-ID"] = ctx.id
    if ctx.tried and ctx.backend then
        ngx_header["X-LLMProxy-Backend"] = ctx.backend.name
    end
    if ctx.handled then
        return -- written by access() itself
    end
    local state = ctx.state
    if not state then
        return
    end
    if status >= 400 then
        return handle_error(ctx, status)
    end
    if not (ctx.api and ctx.tried) then
        return -- not an API response from a backend: relayed as is
    end
    ctx.status = status
    local content_type = ngx_header["Content-Type"]
    local transform = state.enabled.response_transform
    if is_event_stream(content_type) then
        ctx.sse = sse.new()
        ngx_header["Content-Length"] = nil
        if transform then
            ctx.sse_transform = true
            ctx.response_headers = response_headers()
        end
        if store then
            metrics.streams(store, 1)
            ctx.stream_counted = true
        end
        return
    end
    if not is_json(content_type) then
        return
    end
    if ngx_header["Content-Encoding"] then
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": compressed response, not transformed ",
            "(proxy_set_header Accept-Encoding \"\")")
        return
    end
    ctx.chunks, ctx.nbytes = {}, 0
    if transform then
        ctx.transform = true
        ctx.response_headers = response_headers()
        ngx_header["Content-Length"] = nil
    end
end

-- Whether a response_transform result asks for another status or other
-- headers than the response has (the seed's example returns them as given).
local function changes_head(ctx, res)
    if res.status_code ~= nil and res.status_code ~= ctx.status then
        return true
    end
    if type(res.headers) == "table" then
        local have = ctx.response_headers
        for name, value in pairs(res.headers) do
            if have[title_case(name)] ~= value then
                return true
            end
        end
    end
    return false
end

-- response_transform on `data` (JSON text: a whole body, or one event).
-- Returns the new text (or nil: unchanged) and, under on_error: deny, the
-- failure that stops the response.
local function transform_response(state, ctx, data, is_stream)
    local res, err = run_hook(state, "response_transform", ctx.req, {
        response = {
            status_code = ctx.status,
            headers = ctx.response_headers,
            is_stream = is_stream,
            body_raw = data,
        },
        backend_url = ctx.backend.url,
        latency_ms = latency_ms(ctx),
    }, BODY_JSON)
    if err then
        if not err.hook then
            -- The host's input: the backend's body is not JSON.
            if not is_stream then
                ngx_log(WARN, "llmproxy: request ", ctx.id, ": the backend's JSON response is not valid JSON; ",
                    "passed through")
            end
            return nil
        end
        if state.on_error.response_transform == "deny" then
            log_hook_error("response_transform", ctx, err, "stopping the response (on_error: deny)")
            return nil, denied_failure("response_transform", err)
        end
        log_hook_error("response_transform", ctx, err, "passing the response through")
        return nil
    end
    if res == nil then
        return nil
    end
    if not ctx.head_warned and changes_head(ctx, res) then
        ctx.head_warned = true
        -- seam: a content-phase mode (subrequest) could apply these.
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": response_transform changed the status or headers; ",
            "they were already sent (only the body can change in body_filter)")
    end
    if type(res.body) ~= "string" or res.body == "null" then
        return nil
    end
    return res.body
end

-- Usage of a JSON text (a body or an event), read in Rust without
-- parsing the rest: the `usage` object (null, or nil when absent or the
-- text is not a JSON object) and whether `choices` is empty.
local function read_usage(state, text)
    local usage, has_choices = state.llmproxy.usage(text)
    return usage, not has_choices
end

-- One SSE event: usage capture (and removal when only the gateway asked
-- for it: core's rule, `llmproxy.sse_event`), then response_transform.
-- Returns the bytes to send (nil: drop the event).
local function process_event(state, ctx, event)
    local data = sse.data(event)
    if not data or data == "[DONE]" then
        return event
    end
    local transform = ctx.sse_transform
    local mentions_usage = find(data, '"usage"', 1, true) ~= nil
    if not transform and not mentions_usage then
        return event
    end
    local modified = false
    if mentions_usage then
        local relayed, usage = state.llmproxy.sse_event(data, ctx.strip_usage == true)
        if usage then
            ctx.usage = usage
            ctx.usage_body = data
        end
        if not relayed then
            return nil
        end
        modified = relayed ~= data
        data = relayed
    end
    if transform then
        local text, f = transform_response(state, ctx, data, true)
        if f then
            ctx.sse_stopped = true
            return sse.data_event(error_body("the stream was stopped: the response_transform hook failed",
                "hook_error", "hook_failed"))
        end
        if text then
            return sse.with_data(event, text)
        end
    end
    if modified then
        return sse.with_data(event, data)
    end
    return event
end

-- Relay an event stream: complete events are processed and sent as they
-- come; only an unfinished event is held back.
local function stream_filter(state, ctx)
    local chunk, eof = ngx.arg[1], ngx.arg[2]
    if ctx.sse_stopped then
        ngx.arg[1] = nil
        return
    end
    local out, n = {}, 0
    local events, count = sse.push(ctx.sse, chunk)
    for i = 1, count do
        local bytes = process_event(state, ctx, events[i])
        if bytes then
            n = n + 1
            out[n] = bytes
        end
        if ctx.sse_stopped then
            ngx.arg[2] = true -- truncate: nothing after the error event
            break
        end
    end
    if eof and not ctx.sse_stopped then
        local rest = sse.finish(ctx.sse)
        if rest then
            local bytes = process_event(state, ctx, rest)
            if bytes then
                n = n + 1
                out[n] = bytes
            end
        end
    end
    ngx.arg[1] = n > 0 and concat(out, "", 1, n) or nil
end

-- Stop buffering an oversized response: emit what was held back.
local function give_up_buffering(ctx, chunk)
    ngx_log(WARN, "llmproxy: request ", ctx.id, ": response larger than ", ctx.state.max_response_bytes,
        " bytes; passed through without response_transform or usage")
    local held = ctx.transform and concat(ctx.chunks) or ""
    ctx.chunks, ctx.transform = nil, nil
    return held .. chunk
end

-- A whole JSON body: usage capture and response_transform.
local function json_filter(state, ctx)
    local chunk, eof = ngx.arg[1], ngx.arg[2]
    if chunk ~= "" then
        if ctx.nbytes + #chunk > state.max_response_bytes then
            ngx.arg[1] = give_up_buffering(ctx, chunk)
            return
        end
        ctx.nbytes = ctx.nbytes + #chunk
        ctx.chunks[#ctx.chunks + 1] = chunk
        if ctx.transform then
            ngx.arg[1] = nil
        end
    end
    if not eof then
        return
    end
    local body = concat(ctx.chunks)
    ctx.chunks = nil
    if body == "" then
        return -- HEAD, 204, 304: nothing to transform
    end
    if find(body, '"usage"', 1, true) then
        local usage = read_usage(state, body)
        if type(usage) == "table" then
            ctx.usage = usage -- for log(): usage hook, quota, ledger
            ctx.usage_body = body
        end
    end
    if ctx.transform then
        local text, f = transform_response(state, ctx, body, false)
        if f then
            -- The status is already sent: the body says what happened.
            text = error_body(f.message, f.kind, f.code)
        end
        ngx.arg[1] = text or body
    end
end

--- Relay the response body: error bodies, event streams, JSON bodies.
--
-- An error shaped by `header_filter` replaces the body. An event stream
-- is relayed event by event (events split across chunks are joined; only
-- an unfinished event is held back): the usage chunk is captured (and
-- removed when the client did not ask for it), and `response_transform`
-- runs per event with `response.is_stream = true` (`[DONE]` passes). A
-- JSON body is buffered when a transform runs (copied when only usage is
-- read), up to `gateway.max_response_bytes`. A body that is not valid
-- JSON, a failing script or an oversized body passes through.
-- @phases body_filter
function _M.body_filter()
    check_phase("body_filter", "body_filter")
    local ctx = ngx.ctx.llmproxy
    if not ctx then
        return
    end
    if ctx.error_body then
        if ctx.error_sent then
            ngx.arg[1] = nil
        else
            ngx.arg[1] = ctx.error_body
            ctx.error_sent = true
        end
        return
    end
    if ctx.sse then
        return stream_filter(ctx.state, ctx)
    end
    if ctx.chunks then
        return json_filter(ctx.state, ctx)
    end
end

---------------------------------------------------------------- log

-- The usage hook on the captured usage; the record goes to the log, the
-- quota (shared dict), the ledger (in log()) and the metrics.
-- The usage of an answer that reported none (read-only).
local ZERO_USAGE = { prompt_tokens = 0, completion_tokens = 0, total_tokens = 0 }

local function record_usage(state, ctx)
    -- Every admitted request is accounted, as the gateway accounts it: an
    -- answer without usage (a backend error, no backend) with zero usage.
    local usage = ctx.usage or ZERO_USAGE
    local backend = ctx.backend
    local record
    local upstream = tonumber(match(ngx_var.upstream_response_time or "", "([%d.]+)%s*$"))
    if state.enabled.usage then
        local res, err = run_hook(state, "usage", ctx.req, {
            usage = usage,
            response = {
                status_code = ctx.status or ngx.status,
                body_raw = ctx.usage_body,
                is_stream = ctx.sse ~= nil,
            },
            metadata = {
                backend_url = backend and backend.url or "",
                latency_ms = upstream and upstream * 1000 or latency_ms(ctx),
                is_stream = ctx.sse ~= nil,
            },
        })
        if err then
            log_hook_error("usage", ctx, err, "recording the raw usage")
        elseif res ~= nil then
            record = res
        end
    end
    -- Quota, tokens per minute, ledger columns and metrics: core's rule
    -- (`policy::usage`), the gateway's.
    local charge = state.llmproxy.usage_charge(usage, record)
    record = record or usage
    ctx.usage_record = record
    ctx.charge = charge
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
    if store and backend then
        local name = backend.name
        for kind, v in pairs(charge.metrics) do
            metrics.usage(store, name, kind, v)
        end
    end
    if log_level() >= NOTICE then
        local text = state.encode(record) or "?"
        ctx.usage_text = text
        ngx_log(NOTICE, "llmproxy: usage of request ", ctx.id, " on '", backend and backend.name or "-", "': ", text)
    end
end

-- Health and upstream latency of every try, from nginx's `$upstream_*`.
local function record_attempts(state, ctx)
    local attempts = ctx.attempts
    if not attempts then
        return
    end
    local set = state.backends
    local n = #attempts
    local statuses, times, heads
    local status_v, time_v, head_v = ngx_var.upstream_status, ngx_var.upstream_response_time,
        ngx_var.upstream_header_time
    if n == 1 and tonumber(status_v) and tonumber(time_v) and tonumber(head_v) then
        statuses, times, heads = { status_v }, { time_v }, { head_v } -- one try: no list to split
    else
        statuses, times, heads = entries(status_v), entries(time_v), entries(head_v)
    end
    for i, b in ipairs(attempts) do
        local t = tonumber(times[i])
        if ctx.sse and i == n then
            t = tonumber(heads[i]) or t -- streams: to the first event
        end
        if store and t then
            metrics.upstream_latency(store, b.name, t)
        end
    end
    local last = attempts[n]
    last.active = max(0, last.active - 1)
    local status = tonumber(statuses[n])
    local head = tonumber(heads[n])
    if not head and ngx.status == 499 then -- luacheck: ignore 542
        -- the client left before the backend answered: no verdict on it
    elseif not head or not status or status >= 500 then
        backends.failure(set, last)
    else
        backends.success(set, last, head * 1000)
    end
    if store then
        if n > 1 then
            metrics.retries(store, n - 1)
        end
        metrics.backend(store, last.name, last.usable and last.healthy, last.ewma, last.active)
    end
end

local ZERO_CHARGE = { prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, billable_tokens = 0 }

-- The ledger row of an admitted request (the gateway's `LedgerRecord`),
-- queued for the module's writer thread; never waits (a full queue drops
-- the record and counts it).
local function write_ledger(state, ctx)
    local record = ctx.usage_record or ZERO_USAGE
    local charge = ctx.charge or ZERO_CHARGE
    local model = ctx.req and ctx.req:body_get("/model")
    local backend = ctx.tried and ctx.backend
    local ok = state.engine:ledger_record({
        request_id = ctx.id,
        node = state.node,
        key_fp = key_id(state, ctx),
        user_id = ctx.key and ctx.key.info.user_id or nil,
        backend = backend and backend.name or nil,
        model = type(model) == "string" and model or nil,
        path = ngx_var.uri,
        is_stream = ctx.sse ~= nil,
        status = ngx.status,
        prompt_tokens = charge.prompt_tokens,
        completion_tokens = charge.completion_tokens,
        total_tokens = charge.total_tokens,
        billable_tokens = charge.billable_tokens,
        cost = charge.cost,
        latency_ms = (ngx_now() - ctx.started) * 1000,
        record = ctx.usage_text or state.encode(record) or "{}",
    })
    if ok == false then
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": the ledger queue is full; usage record dropped (counted)")
    end
end

--- Account for the request: the concurrency slot, passive health, usage,
-- quota, the ledger, metrics.
--
-- Frees the request's concurrency slot (on every path); runs the `usage`
-- hook on the usage captured from the response (the final usage chunk for
-- streams; a failing script records the raw usage), keeps the record in
-- `ngx.ctx.llmproxy.usage_record`, logs it at NOTICE level and charges
-- the key's quota (`billable_tokens`, else `total_tokens`) and tokens per
-- minute; queues the ledger row of an admitted request (never waits,
-- except in a worker that is exiting: then until it is committed);
-- updates this worker's view of backend health from every try; counts the
-- request, its tries and latencies in the metrics.
-- @phases log
-- @usage log_by_lua_block { require("resty.llmproxy").log() }
function _M.log()
    check_phase("log", "log")
    local ctx = ngx.ctx.llmproxy
    if not ctx then
        return
    end
    local state = ctx.state
    if not state then
        if store then
            metrics.request(store, nil, ngx.status)
        end
        return
    end
    local acq = ctx.limits
    if acq and state.redis then
        state.redis:release(acq)
    elseif acq and state.limits_dict then
        limits.release(state.limits_dict, acq)
    end
    record_attempts(state, ctx)
    if ctx.usage or ctx.admitted then
        record_usage(state, ctx)
    end
    if state.ledger and ctx.admitted then
        write_ledger(state, ctx)
        if worker_exiting() then
            flush_ledger(state) -- the writer thread ends with the worker
        end
    end
    if store then
        metrics.request(store, ctx.tried and ctx.backend and ctx.backend.name or nil, ngx.status)
        if ctx.stream_counted then
            metrics.streams(store, -1)
        end
        local now = ngx_now()
        if worker_exiting() then
            metrics.sync(store) -- the sync timer has run its last time
        end
        -- Exact, not sampled: a request that added an ignored field shows
        -- in the next sync (one integer compared per request).
        local ignored = state.engine:ignored_fields_total()
        if ignored ~= state.ignored_seen then
            state.ignored_seen = ignored
            metrics.ignored_fields(store, state.engine:ignored_fields())
        end
        if now - pool_stats_at >= POOL_STATS_EVERY then
            pool_stats_at = now
            metrics.pool(store, state.engine:pool_stats())
            if state.ledger then
                metrics.ledger(store, state.engine:ledger_stats())
            end
        end
    end
end

---------------------------------------------------------------- metrics

--- Answer a Prometheus scrape: every worker's metrics, merged.
--
-- Needs `lua_shared_dict llmproxy_metrics` (or `opts.metrics_dict`);
-- without it, answers 503. Names and labels are the standalone gateway's.
-- @phases content
-- @usage location = /metrics { content_by_lua_block { require("resty.llmproxy").metrics() } }
function _M.metrics()
    check_phase("metrics", "content")
    if not store then
        ngx.status = 503
        ngx_header["Content-Type"] = "text/plain"
        ngx_print("llmproxy metrics are off: no lua_shared_dict llmproxy_metrics\n")
        return
    end
    local state = current
    if state then
        metrics.pool(store, state.engine:pool_stats())
        metrics.ignored_fields(store, state.engine:ignored_fields())
        if state.ledger then
            metrics.ledger(store, state.engine:ledger_stats())
        end
    end
    if ngx.worker.count() > 1 then
        -- The other workers' counts reach the dict within one sync interval.
        ngx.sleep(store.interval + 0.01)
    end
    local text = metrics.render(store, state and state.backend_names or {})
    ngx_header["Content-Type"] = "text/plain; version=0.0.4"
    ngx_print(text)
end

---------------------------------------------------------------- local endpoints

--- Answer `GET /healthz` as the gateway does: 200 `{"status":"ok"}`, or
-- 503 `engine_unavailable` while this worker has no engine.
-- @phases content
-- @usage location = /healthz { content_by_lua_block { require("resty.llmproxy").healthz() } }
function _M.healthz()
    check_phase("healthz", "content")
    local state = current
    if not state then
        return no_engine()
    end
    return send_local(200, state.llmproxy.healthz_body)
end

--- Answer `GET /v1/models` as the gateway does: the config's
-- `gateway.models`, else the backend names (core's rule), without auth.
-- `access()` answers it too, for a `location /v1/` that runs it; this is
-- for a location of its own.
-- @phases content
-- @usage location = /v1/models { content_by_lua_block { require("resty.llmproxy").models() } }
function _M.models()
    check_phase("models", "content")
    local state = current
    if not state then
        return no_engine()
    end
    return send_local(200, state.models_body)
end

---------------------------------------------------------------- tests

--- Run one hook the way the phases do (a request handle, other globals as
-- a table or an `llmproxy.globals` handle, metrics counted), on the
-- worker's engine or `engine`. For the nginx conformance tests.
-- @tparam userdata|nil engine an engine (nil: this worker's)
-- @tparam string hook the hook
-- @tparam table input the hook's globals, `request` as a table
-- @treturn any the result, or nil and an error
-- @phases any
function _M._run(engine, hook, input)
    local state = current
    if engine then
        state = { engine = engine, llmproxy = require "llmproxy" }
    end
    local globals = {}
    for k, v in pairs(input) do
        if k ~= "request" then
            globals[k] = v
        end
    end
    local req, err = state.llmproxy.request(input.request or {})
    if not req then
        return nil, err
    end
    return run_hook(state, hook, req, globals)
end

_M._parse_url = backends.parse_url
_M._title_case = title_case
_M._sse = sse

return _M
