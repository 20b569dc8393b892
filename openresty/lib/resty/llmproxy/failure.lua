--- Failures of a request: the gateway's error bodies, error_handler in
-- core's order (`llmproxy.failure_step`), the answers this module writes
-- itself.
-- @module resty.llmproxy.failure

-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx

local type = type
local pairs = pairs
local pcall = pcall
local require = require
local tostring = tostring
local tonumber = tonumber
local ngx_log = ngx.log
local ERR = ngx.ERR
local ngx_exit = ngx.exit
local ngx_print = ngx.print
local ngx_var = ngx.var
local ngx_header = ngx.header
local BODY_JSON = require("resty.llmproxy.hook").BODY_JSON
local run_step = require("resty.llmproxy.hook").run_step
local last_entry = require("resty.llmproxy.util").last_entry
local request_of = require("resty.llmproxy.util").request_of

local _M = {}

--- The error body of a failure the module answers itself:
-- `{"error": {"message", "type", "code"}}`, written by the core (the
-- gateway's bodies, byte for byte).
-- @tparam string message what happened
-- @tparam string kind the error type (`bad_request`, `backend_error`, ...)
-- @tparam string code a stable machine-readable code
-- @treturn string the JSON text
-- @phases any
local function error_body(message, kind, code)
    return require("llmproxy").error_body(tostring(message), tostring(kind), tostring(code))
end

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

-- What happens when error_handler fails: `{fallback, deny}`.
local ERROR_HANDLER = { "sending the default error", "refusing the request" }

-- A hook failed under `on_error: deny`: 503, not shaped by error_handler
-- (the gateway's `denied`).
local function denied_failure(hook, err)
    local f = known_failure("hook_failed", hook, tostring(err and err.kind or "internal"))
    f.denied = true
    return f
end

-- Headers of an error_handler result: set, or remove with false/null (the
-- core dropped those no script may set).
local function apply_response_headers(ctx, headers)
    if type(headers) ~= "table" then
        return
    end
    for name, value in pairs(headers) do
        if value == false or value == ctx.state.null then
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
    local req = request_of(ctx) or bare_request(ctx)
    local res, denied, fell = run_step(state, ctx, "error_handler", ERROR_HANDLER, req, {
        error = {
            type = f.kind,
            message = f.message,
            status_code = f.status,
            backend_url = f.backend_url,
            retry_count = f.retry_count or 0,
        },
    }, BODY_JSON)
    if denied then
        local d = denied_failure("error_handler", denied)
        return d.status, error_body(d.message, d.kind, d.code), nil, "denied"
    end
    if fell or res == nil then
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
-- Why the worker has no engine, when the module can tell.
local function no_engine_reason(llmproxy)
    if llmproxy.installed and llmproxy.installed() then
        return "lua_code_cache is off: each request runs in a new Lua VM, without the engine init_worker loaded;"
            .. " set lua_code_cache on"
    end
    return nil
end

-- The 503 when not even the module loads (the core writes every other body;
-- init_worker has logged why).
local NO_MODULE_BODY = '{"error":{"message":"the gateway has no engine loaded (the llmproxy module did not load)",'
    .. '"type":"backend_error","code":"engine_unavailable"}}'

-- 503 `engine_unavailable`, with the reason when there is one (also
-- logged).
local function no_engine()
    local ok, llmproxy = pcall(require, "llmproxy")
    if not ok then
        return send_local(503, NO_MODULE_BODY)
    end
    local reason = no_engine_reason(llmproxy)
    local message = "the gateway has no engine loaded"
    if reason then
        message = message .. " (" .. reason .. ")"
        ngx_log(ERR, "llmproxy: request ", ngx_var.request_id, " gets 503: ", reason)
    end
    return send_local(503, error_body(message, "backend_error", "engine_unavailable"))
end

_M.body = error_body
_M.new = failure
_M.known = known_failure
_M.of_status = of_status
_M.denied = denied_failure
_M.apply_response_headers = apply_response_headers
_M.facts = failure_facts
_M.decide = decide_error
_M.fail = fail
_M.classify = classify_error
_M.send_local = send_local
_M.no_engine = no_engine

return _M
