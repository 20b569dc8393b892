--- The body filter phase: error bodies, event streams and buffered JSON
-- bodies through the request handle's `event` and `respond` steps.
-- @module resty.llmproxy.body_filter

-- luacheck: globals ngx.status ngx.ctx ngx.header ngx.arg

local ngx = ngx

local next = next
local concat = table.concat
local find = string.find
local ngx_log = ngx.log
local WARN = ngx.WARN
local step = require("resty.llmproxy.hook").step
local denied_failure = require("resty.llmproxy.failure").denied
local decide_error = require("resty.llmproxy.failure").decide
local error_body = require("resty.llmproxy.failure").body
local known_failure = require("resty.llmproxy.failure").known
local latency_ms = require("resty.llmproxy.util").latency_ms
local is_json = require("resty.llmproxy.util").is_json
local metrics = require "resty.llmproxy.metrics"
local W = require "resty.llmproxy.worker"
local capture = require "resty.llmproxy.capture"

local _M = {}

-- What happens when response_transform fails: `{fallback, deny}`.
local RESPONSE_TRANSFORM = { "passing the response through", "stopping the response" }

-- Whether a transform asks for another status or other headers than the
-- response has (the seed's example returns them as given). The core hands
-- back only the headers that change (an echoed one is no change).
local function changes_head(ctx, status, headers)
    if status ~= nil and status ~= ctx.status then
        return true
    end
    return headers ~= nil and next(headers) ~= nil
end

-- A transform's changes to the status and headers: kept for the head
-- when the answer is read in a subrequest (`capture`), which sends it
-- after; else the head went out before the body, and this says once that
-- they could not apply.
local function head_changes(ctx, status, headers)
    if not changes_head(ctx, status, headers) or capture.keep_head(ctx, status, headers) then
        return
    end
    if not ctx.head_warned then
        ctx.head_warned = true
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": response_transform changed the status or headers; ",
            "they were already sent (only the body can change in body_filter)")
    end
end

-- The body of a response the transform's denial stopped; its status and
-- type when the head is still to be sent.
local function denied_body(ctx, err)
    local f = denied_failure("response_transform", err)
    capture.keep_head(ctx, f.status, nil, true)
    return error_body(f.message, f.kind, f.code)
end

-- A backend's error answer whose error_handler waited for its body (read
-- in a subrequest, header_filter): error_handler on the answer's own
-- message, then core's next step. Returns the bytes to send, or nil when
-- response_transform is to run on the answer.
local function handle_error_answer(ctx, body)
    local facts, f, llmproxy = ctx.deferred, ctx.failure, ctx.state.llmproxy
    ctx.deferred = nil
    f.message = llmproxy.upstream_message(ctx.status, body)
    local status, replaced, headers
    status, replaced, headers, facts.handled = decide_error(ctx, f)
    if llmproxy.failure_step(facts) == "response_transform" then
        ctx.transform = true
        return nil
    end
    if not status then
        return body -- the backend's answer, as it came
    end
    capture.keep_head(ctx, status, headers, true)
    return replaced
end

-- One SSE event (its `data`, or false without a data line) through the
-- handle's event step (core's: usage capture, the usage chunk only the
-- module asked for removed, response_transform). Returns the bytes to send
-- (nil: drop the event).
local function process_event(ctx, event, data)
    if not data or data == "[DONE]" then
        return event
    end
    if not ctx.sse_transform and not find(data, '"usage"', 1, true) then
        return event -- no usage to read, no transform: nothing to do
    end
    local ev, err = step(ctx, "response_transform", RESPONSE_TRANSFORM, ctx.h.event, data, latency_ms(ctx))
    if err then
        ctx.sse_stopped = true
        return ctx.state.llmproxy.sse_data_event(error_body(
            "the stream was stopped: the response_transform hook failed", "hook_error", "hook_failed"))
    end
    if not ev then
        return event
    end
    if ev.drop then
        return nil
    end
    head_changes(ctx, ev.status, ev.headers)
    if ev.data then
        return ctx.state.llmproxy.sse_with_data(event, ev.data)
    end
    return event
end

-- Count a content event of the stream (a `data` but `[DONE]`: core's
-- `http::sse::is_content`, written out here because only this loop knows
-- which events it relayed: none after a stop), as the gateway counts them:
-- what the core's estimate charges when the stream's usage never comes
-- (the client left first, or the backend sent none).
local function relayed(ctx, data)
    if data and data ~= "[DONE]" then
        ctx.sse_relayed = (ctx.sse_relayed or 0) + 1
    end
end

-- The stream's last event when an event grew past gateway.max_event_bytes
-- without ending (the gateway's: the stream ends with this error).
local function too_large_event(ctx)
    ctx.sse_stopped, ctx.backend_failed = true, true
    ngx_log(WARN, "llmproxy: request ", ctx.id, ": the backend sent a stream event larger than ",
        ctx.state.max_event_bytes, " bytes; the stream was ended")
    if W.store then
        metrics.events_too_large(W.store)
    end
    local f = known_failure("event_too_large")
    return ctx.state.llmproxy.sse_data_event(error_body(f.message, f.kind, f.code))
end

-- Relay an event stream: complete events are processed and sent as they
-- come (the core's parser, `llmproxy.sse_parser`); only an unfinished
-- event is held back, up to gateway.max_event_bytes.
local function stream_filter(ctx)
    local chunk, eof = ngx.arg[1], ngx.arg[2]
    if ctx.sse_stopped then
        ngx.arg[1] = nil
        return
    end
    local out, n = {}, 0
    local events, datas, count, overflowed = ctx.sse:push(chunk)
    for i = 1, count do
        relayed(ctx, datas[i])
        local bytes = process_event(ctx, events[i], datas[i])
        if bytes then
            n = n + 1
            out[n] = bytes
        end
        if ctx.sse_stopped then
            break
        end
    end
    if overflowed and not ctx.sse_stopped then
        n = n + 1
        out[n] = too_large_event(ctx)
    end
    if ctx.sse_stopped then
        ngx.arg[2] = true -- truncate: nothing after the error event
        ctx.sse_ended = true
    elseif eof then
        ctx.sse_ended = true
        local rest, data = ctx.sse:finish()
        if rest then
            relayed(ctx, data)
            local bytes = process_event(ctx, rest, data)
            if bytes then
                n = n + 1
                out[n] = bytes
            end
        end
    end
    ngx.arg[1] = n > 0 and concat(out, "", 1, n) or nil
end

-- Stop buffering a response that grew past the bound without declaring
-- its length (one that declared it was refused in header_filter, as the
-- gateway refuses it). Read in a subrequest, it is dropped and refused
-- when the subrequest ends (`capture`); else the status has gone out, so
-- what was held back and the rest pass through, unread (no
-- response_transform, no usage).
local function give_up_buffering(ctx, chunk)
    if ngx.is_subrequest then
        ctx.too_large, ctx.chunks = true, nil
        return nil
    end
    ngx_log(WARN, "llmproxy: request ", ctx.id, ": response larger than ", ctx.state.max_response_bytes,
        " bytes sent without a Content-Length; passed through without response_transform or usage")
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
        if ctx.transform or ctx.deferred then
            ngx.arg[1] = nil
        end
    end
    if not eof then
        return
    end
    local body = concat(ctx.chunks)
    ctx.chunks = nil
    if ctx.deferred then
        local out = handle_error_answer(ctx, body)
        if out then
            ngx.arg[1] = out
            return
        end
    end
    if body == "" then
        return -- HEAD, 204, 304: nothing to transform
    end
    local h = ctx.h
    local a, err = step(ctx, "response_transform", RESPONSE_TRANSFORM, h.respond, ctx.status,
        ctx.response_headers, body, latency_ms(ctx))
    if not ctx.transform then
        return -- the usage was read; the body went out as it came
    end
    if err then
        ngx.arg[1] = denied_body(ctx, err)
        return
    end
    if not h:answer_parsed() and is_json(ngx.header["Content-Type"]) then
        ngx_log(WARN, "llmproxy: request ", ctx.id, ": the backend's JSON response is not valid JSON; ",
            "passed through")
    end
    if a then
        head_changes(ctx, a.status, a.headers)
    end
    ngx.arg[1] = a and a.body or body
end

--- Run the body filter phase for this request (`resty.llmproxy.body_filter()`, which checks
-- the phase, documents it).
function _M.run()
    local ctx = ngx.ctx.llmproxy
    if not ctx or ctx.relayed then
        return -- (relayed: the main request of an answer read in a subrequest)
    end
    if ngx.is_subrequest then
        if ctx.too_large then
            ngx.arg[1] = nil
            return
        end
        if ngx.arg[2] then
            capture.note_upstream(ctx)
        end
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
        return stream_filter(ctx)
    end
    if ctx.chunks then
        return json_filter(ctx.state, ctx)
    end
end

return _M
