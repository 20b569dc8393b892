--- Answers read whole before their head goes out: with response_transform
-- configured, a request that does not ask for a stream goes to its backend
-- in a subrequest of its own location
-- (`ngx.location.capture`, the request's context shared), whose header
-- and body filters run as they run for any answer (errors shaped, the
-- answer read whole, response_transform on it; error_handler on a
-- backend's error answer once its body is in), and the access phase sends
-- the result. The head goes out after the hooks ran, so their status and
-- header changes apply, as in the gateway (docs/adr/072).
-- @module resty.llmproxy.capture

-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx

local pairs = pairs
local lower = string.lower
local ngx_var = ngx.var
local ngx_header = ngx.header
local ngx_print = ngx.print
local ngx_exit = ngx.exit
local ngx_on_abort = ngx.on_abort
local location_capture = ngx.location.capture
local apply_response_headers = require("resty.llmproxy.failure").apply_response_headers
local known_failure = require("resty.llmproxy.failure").known
local fail = require("resty.llmproxy.failure").fail

local _M = {}

-- Headers of the subrequest's answer not copied to the client's: nginx
-- frames the client's answer itself (its length is set from the body).
local NOT_COPIED = {
    ["content-length"] = true,
    ["transfer-encoding"] = true,
    ["connection"] = true,
    ["keep-alive"] = true,
}

--- Whether this request's answer is read whole before its head goes out:
-- an API call, not asking for a stream, with response_transform
-- configured (whose status and header changes then apply, and
-- error_handler then sees a backend's error answer's own message). Not
-- for error_handler alone: the module buffers an answer for
-- response_transform anyway, so the subrequest costs it nothing
-- measurable, while reading every answer whole for error_handler's sake
-- costs about a third more CPU per request (docs/adr/072).
-- @tparam table state the engine state the request runs on
-- @tparam table ctx the request's context (`asks_stream` from the upstream step)
-- @treturn boolean
-- @phases access
function _M.wanted(state, ctx)
    return state.enabled.response_transform == true and ctx.api ~= nil and ctx.asks_stream == false
end

--- Note the subrequest's `$upstream_*` values for the log phase, which
-- runs in the main request only (where nginx leaves them empty).
-- @tparam table ctx the request's context
-- @phases header_filter, body_filter (of the subrequest)
function _M.note_upstream(ctx)
    local u = ctx.upstream_vars
    if not u then
        u = {}
        ctx.upstream_vars = u
    end
    u.status, u.response_time, u.header_time = ngx_var.upstream_status, ngx_var.upstream_response_time,
        ngx_var.upstream_header_time
end

--- The request's `$upstream_status`, `$upstream_response_time` and
-- `$upstream_header_time`: nginx's, or those the subrequest noted.
-- @tparam table ctx the request's context
-- @return the three values (strings, or nil)
-- @phases log
function _M.upstream_vars(ctx)
    local u = ctx.upstream_vars
    if u then
        return u.status, u.response_time, u.header_time
    end
    return ngx_var.upstream_status, ngx_var.upstream_response_time, ngx_var.upstream_header_time
end

--- Keep the head a hook asked for once the answer's body was read
-- (response_transform, or error_handler), to be sent when the subrequest
-- ends (only while one runs: else the head has left).
-- @tparam table ctx the request's context
-- @tparam[opt] number status the status it asked for
-- @tparam[opt] table headers the header changes (false or null: remove)
-- @tparam[opt] boolean error_body the body is now an error this module
-- wrote (`Content-Type: application/json`, no `Content-Encoding`, before
-- `headers` apply)
-- @treturn boolean whether the head is still to be sent
-- @phases body_filter
function _M.keep_head(ctx, status, headers, error_body)
    if not ngx.is_subrequest then
        return false
    end
    ctx.head_status, ctx.head_headers, ctx.head_error_body = status, headers, error_body
    return true
end

--- Send the request to its backend in a subrequest, then its answer to
-- the client: the subrequest's status, headers and body (the phases'
-- work on them done there), with response_transform's head changes
-- applied. An answer cut short, or one found larger than
-- `gateway.max_response_bytes`, is the gateway's 502 instead.
-- @tparam table ctx the request's context
-- @phases access
function _M.relay(ctx)
    -- A client that leaves while its answer is read is a client that
    -- left, as in the gateway and in nginx's proxy: the request ends (its
    -- subrequest and the backend's connection with it) and is recorded as
    -- 499. nginx says so only with `lua_check_client_abort on`; without
    -- it, the answer goes out to the closed connection and counts as sent.
    ngx_on_abort(function()
        ctx.client_left = true
        return ngx_exit(499)
    end)
    local res = location_capture(ngx_var.uri, {
        method = ngx.HTTP_POST, -- (an API call is a POST: core's `http::api`)
        args = ngx_var.args,
        ctx = ngx.ctx,
        always_forward_body = true,
    })
    ctx.relayed = true
    local body = res.body
    if ctx.error_body and not ctx.error_sent then
        -- nginx's own error (no backend answered), shaped by the
        -- subrequest's header filter: nginx sends a subrequest's error
        -- page no body, so its body filter never wrote this one.
        body = ctx.error_body
    elseif ctx.too_large or res.truncated then
        local f = known_failure(ctx.too_large and "response_too_large" or "backend_failed",
            "the answer was cut short")
        local backend = ctx.backend
        if backend then
            f.backend_url, f.retry_count = backend.url, (ctx.tries or 1) - 1
        end
        ctx.backend_failed = true
        return fail(ctx, f)
    end
    ctx.handled = true
    ngx.status = ctx.head_status or res.status
    for name, value in pairs(res.header) do
        if not NOT_COPIED[lower(name)] then
            ngx_header[name] = value
        end
    end
    if ctx.head_error_body then
        ngx_header["Content-Type"] = "application/json"
        ngx_header["Content-Encoding"] = nil
    end
    apply_response_headers(ctx, ctx.head_headers)
    ngx_header["Content-Length"] = #body
    ngx_print(body)
    return ngx_exit(ngx.HTTP_OK)
end

return _M
