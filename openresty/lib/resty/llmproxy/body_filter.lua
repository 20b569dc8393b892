--- The body filter phase: error bodies, event streams (usage capture,
-- per-event transform), buffered JSON bodies.
-- @module resty.llmproxy.body_filter

-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx
local sse = require "resty.llmproxy.sse"

local type = type
local pairs = pairs
local concat = table.concat
local find = string.find
local ngx_log = ngx.log
local WARN = ngx.WARN
local BODY_JSON = require("resty.llmproxy.hook").BODY_JSON
local log_hook_error = require("resty.llmproxy.hook").log_error
local run_hook = require("resty.llmproxy.hook").run
local denied_failure = require("resty.llmproxy.failure").denied
local error_body = require("resty.llmproxy.failure").body
local latency_ms = require("resty.llmproxy.util").latency_ms
local title_case = require("resty.llmproxy.util").title_case

local _M = {}

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

--- Run the body filter phase for this request (`resty.llmproxy.body_filter()`, which checks
-- the phase, documents it).
function _M.run()
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

return _M
