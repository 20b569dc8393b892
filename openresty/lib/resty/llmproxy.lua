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
-- This module is the public face: one function per phase, each checking
-- that it runs in its phase, then handing over to the phase's module
-- (`resty.llmproxy.access`, `.upstream`, `.header_filter`,
-- `.body_filter`, `.accounting`); the engine's installation is
-- `resty.llmproxy.install`, failures and error bodies
-- `resty.llmproxy.failure`, hook calls `resty.llmproxy.hook`.
--
-- @module resty.llmproxy

-- luacheck: globals ngx.status ngx.header ngx.ctx

local ngx = ngx
local W = require "resty.llmproxy.worker"
local metrics = require "resty.llmproxy.metrics"
local metrics_render = require "resty.llmproxy.metrics_render"
local failure = require "resty.llmproxy.failure"
local install = require "resty.llmproxy.install"
local access = require "resty.llmproxy.access"
local upstream = require "resty.llmproxy.upstream"
local header_filter = require "resty.llmproxy.header_filter"
local body_filter = require "resty.llmproxy.body_filter"
local accounting = require "resty.llmproxy.accounting"

local ipairs = ipairs
local tonumber = tonumber
local request_path = require("resty.llmproxy.util").request_path
local error = error
local fmt = string.format
local get_phase = ngx.get_phase
local ngx_header = ngx.header
local ngx_print = ngx.print
local send_local = failure.send_local
local no_engine = failure.no_engine

local _M = { _VERSION = "0.2.0" }

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
    return install.init_worker(config, opts)
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
    return install.install(config, opts)
end

--- The loaded engine's description, or nil (for tests and status pages).
-- @treturn table|nil `{version, config, hooks, backends}`
-- @phases any
function _M.status()
    local state = W.current
    if not state then
        return nil
    end
    local names = {}
    for i, n in ipairs(state.backend_names) do
        names[i] = n
    end
    return { version = state.version, config = state.config, hooks = state.enabled_names, backends = names }
end

--- The gateway's error body: `{"error": {"message", "type", "code"}}`,
-- byte for byte as the gateway writes it (serde_json, keys in this order).
-- @tparam string message what happened
-- @tparam string kind the error type (`bad_request`, `backend_error`, ...)
-- @tparam string code a stable machine-readable code
-- @treturn string the JSON text
-- @phases any
_M.error_body = failure.body

--- Admit, route and rewrite the request for its backend.
--
-- Reads the body (also when spooled to a file) and parses the request
-- once, in Rust, into the core's request handle (`id` from a sane
-- `X-Request-ID` or a new `req_` id as the gateway makes them, title-cased
-- headers, client_ip, path, api_key from a Bearer token or x-api-key, the
-- body). Admission as the
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
    return access.run()
end

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
    return upstream.run()
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
    return header_filter.run()
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
    return body_filter.run()
end

--- Account for the request: the concurrency slot, passive health, usage,
-- quota, the ledger, metrics.
--
-- Frees the request's concurrency slot (on every path); runs the `usage`
-- hook on the usage captured from the response (the final usage chunk for
-- streams; a failing script records the raw usage), keeps the record as
-- JSON text in `ngx.ctx.llmproxy.usage_json`, logs it at NOTICE level and charges
-- the key's quota (`billable_tokens`, else `total_tokens`) and tokens per
-- minute; queues the ledger row of an admitted request (never waits,
-- except in a worker that is exiting: then until it is committed);
-- updates this worker's view of backend health from every try; counts the
-- request, its tries and latencies in the metrics.
-- @phases log
-- @usage log_by_lua_block { require("resty.llmproxy").log() }
function _M.log()
    check_phase("log", "log")
    return accounting.run()
end

--- Answer a Prometheus scrape: every worker's metrics, merged.
--
-- Needs `lua_shared_dict llmproxy_metrics` (or `opts.metrics_dict`);
-- without it, answers 503. Names and labels are the standalone gateway's.
-- @phases content
-- @usage location = /metrics { content_by_lua_block { require("resty.llmproxy").metrics() } }
function _M.metrics()
    check_phase("metrics", "content")
    if not W.store then
        ngx.status = 503
        ngx_header["Content-Type"] = "text/plain"
        ngx_print("llmproxy metrics are off: no lua_shared_dict llmproxy_metrics\n")
        return
    end
    local state = W.current
    if state then
        metrics.pool(W.store, state.engine:pool_stats())
        metrics.ignored_fields(W.store, state.engine:ignored_fields())
        if state.ledger then
            metrics.ledger(W.store, state.engine:ledger_stats())
        end
    end
    if ngx.worker.count() > 1 then
        -- The other workers' counts reach the dict within one sync interval.
        ngx.sleep(W.store.interval + 0.01)
    end
    local text = metrics_render.render(W.store, state and state.backend_names or {})
    ngx_header["Content-Type"] = "text/plain; version=0.0.4"
    ngx_print(text)
end

--- Answer `GET /healthz` as the gateway does: 200 `{"status":"ok"}`, or
-- 503 `engine_unavailable` while this worker has no engine.
-- @phases content
-- @usage location = /healthz { content_by_lua_block { require("resty.llmproxy").healthz() } }
function _M.healthz()
    check_phase("healthz", "content")
    local state = W.current
    if not state then
        return no_engine()
    end
    return send_local(200, state.llmproxy.healthz_body)
end

-- nginx's status for a refused head -> core's error for it.
local REFUSED = { [414] = "uri_too_long", [431] = "headers_too_large" }

--- Answer a request nginx refused before any location ran: a request
-- target or a header over `large_client_header_buffers` (414, and 494,
-- which `error_page` maps to 431), a head it cannot parse or a header
-- that must be unique sent twice (400). The client gets the error the
-- standalone gateway gives such a request (core's `uri_too_long`,
-- `headers_too_large`, `malformed_request`) with an `X-Request-ID`, not
-- nginx's HTML page, through core's failure policy as any refusal: a
-- refused head identifies no caller (its headers are not read), so
-- error_handler shapes it only when auth is off. `log()` counts it.
-- The `error_page` target is a URI, not a named location: nginx cannot
-- redirect a request whose target it refused to a named location.
-- @phases content
-- @usage error_page 400 414 /llmproxy/refused;
-- error_page 494 =431 /llmproxy/refused;
-- location = /llmproxy/refused {
--     internal;
--     content_by_lua_block { require("resty.llmproxy").refused() }
--     log_by_lua_block     { require("resty.llmproxy").log() }
-- }
function _M.refused()
    check_phase("refused", "content")
    local state = W.current
    if not state then
        return no_engine()
    end
    local f = failure.known(REFUSED[tonumber(ngx.var.status)] or "malformed_request")
    local id = state.llmproxy.request_id(nil)
    -- The request as error_handler sees it: the start of the path it was
    -- sent to (this location's is /llmproxy/refused; core's rule, the
    -- gateway's), no headers, no body.
    local path = state.llmproxy.shown_path(request_path())
    local ctx = {
        state = state,
        id = id,
        started = ngx.now(),
        fields = { id = id, client_ip = ngx.var.remote_addr, path = path },
    }
    ngx.ctx.llmproxy = ctx
    ngx_header["X-Request-ID"] = id
    return failure.fail(ctx, f)
end

--- Answer `GET /v1/models` as the gateway does: the config's
-- `gateway.models`, else the backend names (core's rule), without auth.
-- `access()` answers it too, for a `location /v1/` that runs it; this is
-- for a location of its own.
-- @phases content
-- @usage location = /v1/models { content_by_lua_block { require("resty.llmproxy").models() } }
function _M.models()
    check_phase("models", "content")
    local state = W.current
    if not state then
        return no_engine()
    end
    return send_local(200, state.models_body)
end

return _M
