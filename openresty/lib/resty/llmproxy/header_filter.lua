--- The header filter phase: errors shaped while the status can change,
-- and what the body filter will do with the response.
-- @module resty.llmproxy.header_filter

-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx
local metrics = require "resty.llmproxy.metrics"
local W = require "resty.llmproxy.worker"
local note_upstream = require("resty.llmproxy.capture").note_upstream

local type = type
local ngx_log = ngx.log
local WARN = ngx.WARN
local ngx_now = ngx.now
local ngx_header = ngx.header
local req_get_headers = ngx.req.get_headers
local resp_get_headers = ngx.resp.get_headers
local MAX_HEADERS = require("resty.llmproxy.util").MAX_HEADERS
local request_id = require("resty.llmproxy.util").request_id
local apply_response_headers = require("resty.llmproxy.failure").apply_response_headers
local classify_error = require("resty.llmproxy.failure").classify
local decide_error = require("resty.llmproxy.failure").decide
local error_body = require("resty.llmproxy.failure").body
local failure_facts = require("resty.llmproxy.failure").facts
local known_failure = require("resty.llmproxy.failure").known

local _M = {}

-- The answer's headers as nginx gives them: the core puts them in the
-- form scripts see.
local function response_headers()
    return resp_get_headers(MAX_HEADERS)
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
local function shape_failure(ctx, f, replace, status)
    ctx.failure = f
    local state = ctx.state
    local facts = failure_facts(ctx, f)
    facts.source = replace and "gateway" or "upstream"
    -- Whether the answer is JSON is for the core to read (it parses the
    -- buffered body and passes what is not JSON through as it came, as the
    -- gateway does), whatever its Content-Type says; only a compressed
    -- one cannot be read.
    facts.json_body = not ngx_header["Content-Encoding"]
    facts.response_transform = (state.enabled.response_transform and ctx.api and ctx.h) and true or false
    local step = state.llmproxy.failure_step(facts)
    if step == "error_handler" and not replace and ngx.is_subrequest then
        -- The answer is read in a subrequest and its head waits
        -- (`capture`): error_handler runs once the body is in, on the
        -- answer's own error message, as in the gateway (body_filter).
        ctx.deferred, ctx.status = facts, status
        ctx.response_headers = response_headers()
        ctx.chunks, ctx.nbytes = {}, 0
        ngx_header["Content-Length"] = nil
        return
    end
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

-- A status >= 400 after access(): a backend's error answer, or nginx's
-- own error page.
local function handle_error(ctx, status)
    local f, replace = classify_error(ctx, status)
    return shape_failure(ctx, f, replace, status)
end

--- Run the header filter phase for this request (`resty.llmproxy.header_filter()`, which checks
-- the phase, documents it).
function _M.run()
    local ctx = ngx.ctx.llmproxy
    local status = ngx.status
    if not ctx then
        if status < 400 or not W.current then
            return
        end
        -- An error nginx found before access() (e.g. 413 from
        -- client_max_body_size): shape it like the gateway's.
        local headers = req_get_headers(MAX_HEADERS)
        ctx = { state = W.current, id = request_id(headers), started = ngx_now() }
        ngx.ctx.llmproxy = ctx
    end
    ngx_header["X-Request-ID"] = ctx.id
    if ctx.tried and ctx.backend then
        ngx_header["X-LLMProxy-Backend"] = ctx.backend.name
    end
    if ctx.handled then
        return -- written by access() itself
    end
    if ngx.is_subrequest then
        note_upstream(ctx) -- for log(), which runs in the main request
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
    if type(content_type) ~= "string" then
        content_type = nil -- absent, or sent twice
    end
    local transform = state.enabled.response_transform
    if ctx.h:answer_is_stream(status, content_type) then
        ctx.sse = state.llmproxy.sse_parser(state.max_event_bytes)
        ngx_header["Content-Length"] = nil
        if transform then
            ctx.sse_transform = true
            ctx.response_headers = response_headers()
        end
        ctx.h:stream(status, ctx.response_headers)
        if W.store then
            metrics.streams(W.store, 1)
            ctx.stream_counted = true
        end
        return
    end
    -- An answer larger than the bound is refused, as the gateway refuses
    -- it (502, through error_handler), while the status can still change:
    -- when its length is declared. (One sent in chunks past the bound is
    -- passed through, not read: see json_filter.)
    local length = tonumber(ngx_header["Content-Length"])
    if length and length > state.max_response_bytes then
        local f = known_failure("response_too_large")
        f.backend_url, f.retry_count = ctx.backend.url, ctx.tries - 1
        ctx.backend_failed = true
        return shape_failure(ctx, f, true, status)
    end
    -- Whatever its Content-Type says, the answer is read whole: the core
    -- parses it for response_transform and reads its usage when it holds
    -- JSON (a backend that labels its JSON text/plain is still charged),
    -- as the gateway does.
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

return _M
