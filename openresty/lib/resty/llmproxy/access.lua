--- The access phase: the request parsed, admitted, routed and rewritten for
-- its backend.
-- @module resty.llmproxy.access

-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx
local metrics = require "resty.llmproxy.metrics"
local backends = require "resty.llmproxy.backends"
local limits = require "resty.llmproxy.limits"
local W = require "resty.llmproxy.worker"
local capture = require "resty.llmproxy.capture"

local new_tab = require "table.new"

local pairs = pairs
local tostring = tostring
local ngx_log = ngx.log
local ERR = ngx.ERR
local WARN = ngx.WARN
local ngx_now = ngx.now
local ngx_var = ngx.var
local ngx_header = ngx.header
local req_set_body_data = ngx.req.set_body_data
local req_get_method = ngx.req.get_method
local req_set_header = ngx.req.set_header
local req_clear_header = ngx.req.clear_header
local step = require("resty.llmproxy.hook").step
local describe_error = require("resty.llmproxy.util").describe_error
local admit = require("resty.llmproxy.admission").admit
local denied_failure = require("resty.llmproxy.failure").denied
local error_body = require("resty.llmproxy.failure").body
local fail = require("resty.llmproxy.failure").fail
local known_failure = require("resty.llmproxy.failure").known
local no_engine = require("resty.llmproxy.failure").no_engine
local send_local = require("resty.llmproxy.failure").send_local
local prepare_request = require("resty.llmproxy.request").prepare
local canonical_path = require("resty.llmproxy.request").canonical_path

local _M = {}

-- Hash slots of a request's context table.
local CTX_FIELDS = 32

-- What happens when a hook of this phase fails: `{fallback, deny}`.
local ROUTING = { "using the default balancer", "refusing the request" }
local REQUEST_TRANSFORM = { "sending the request unchanged", "refusing the request" }

-- The routing step (core's: the hook and its failure policy), then the
-- default balancer. Returns the backend, or nil and a failure.
local function route(state, ctx)
    local set = state.backends
    local name
    if state.enabled.routing then
        local g, gerr = backends.routing_globals(set, state.llmproxy)
        if not g then
            ngx_log(ERR, "llmproxy: cannot build the routing globals: ", describe_error(gerr))
        else
            local err
            name, err = step(ctx, "routing", ROUTING, ctx.h.route, g)
            if err then
                return nil, denied_failure("routing", err)
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

-- Set (or, for false and json.null, remove) one upstream header: a
-- script's (the core dropped those no script may set) or the backend
-- config's (checked when the config loaded).
local function set_request_header(ctx, name, value)
    if value == false or value == ctx.state.null then
        req_clear_header(name)
    else
        req_set_header(name, tostring(value))
    end
end

-- The upstream step (core's: request_transform with `request.backend_url`,
-- then the body to send: the script's or the client's, and for a stream
-- whose client did not ask for `stream_options.include_usage`, the body
-- asking for it; the usage chunk is removed before the client sees it).
-- Sets the headers and the body to send. Returns a failure when the
-- request cannot go on.
local function prepare_upstream(ctx, backend)
    local up, err = step(ctx, "request_transform", REQUEST_TRANSFORM, ctx.h.upstream, backend.url)
    if err then
        return denied_failure("request_transform", err)
    end
    if not up then
        return nil
    end
    ctx.asks_stream = up.stream
    if up.headers then
        for name, value in pairs(up.headers) do
            set_request_header(ctx, name, value)
        end
    end
    if up.body then
        req_set_body_data(up.body)
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

--- Run the access phase for this request (`resty.llmproxy.access()`, which checks
-- the phase, documents it).
function _M.run()
    local state = W.current
    local path, path_error
    if state then
        path, path_error = canonical_path(state)
        if path == "/v1/models" and req_get_method() == "GET" then
            return send_local(200, state.models_body) -- the gateway's: no auth, no backend
        end
    end
    -- Sized for the fields the phases add (~20 for a proxied request), so
    -- that it is not rehashed four times on the way.
    local ctx = new_tab(0, CTX_FIELDS)
    ctx.state, ctx.started = state, ngx_now()
    -- Refused (invalid_path) once the caller is known, as in the gateway.
    ctx.path, ctx.path_error = path, path_error
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
            if W.store then
                metrics.auth_throttled(W.store)
            end
            local f = known_failure("auth_throttled", wait)
            ngx_header["Retry-After"] = wait
            return send_local(f.status, error_body(f.message, f.kind, f.code))
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
    f = prepare_upstream(ctx, backend)
    if f then
        return fail(ctx, f)
    end
    if capture.wanted(state, ctx) then
        return capture.relay(ctx)
    end
end

return _M
