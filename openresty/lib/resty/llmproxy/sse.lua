--- Server-sent events: split a byte stream into events, read and replace
-- an event's `data`. The same rules as the standalone gateway
-- (proxy/src/gateway/sse.rs): an event ends at the first blank line
-- (`\n\n` or `\r\n\r\n`), several `data:` lines join with `\n`, and a
-- rewritten event keeps its other fields (`event:`, `id:`, comments).
--
-- Pure Lua, no nginx API: usable in any phase.
--
-- @module resty.llmproxy.sse

local find = string.find
local sub = string.sub
local byte = string.byte
local concat = table.concat

local _M = {}

local CR, SPACE = 13, 32

--- A parser for one stream.
-- @treturn table the parser state (pass it to `push`)
-- @phases any
function _M.new()
    return { buf = "" }
end

--- Add bytes; return the complete events they finished.
--
-- Bytes of an unfinished event are kept in the parser (a partial event
-- only, never the whole stream).
-- @tparam table p a parser from `new`
-- @tparam string chunk bytes as they came from upstream
-- @treturn table events (each with its terminating blank line)
-- @treturn number how many
-- @phases any
function _M.push(p, chunk)
    local buf = p.buf
    if buf ~= "" then
        buf = buf .. chunk
    else
        buf = chunk
    end
    local events, n, pos = {}, 0, 1
    while true do
        local lf = find(buf, "\n\n", pos, true)
        local crlf = find(buf, "\r\n\r\n", pos, true)
        local last -- inclusive end of the event
        if lf and crlf then
            last = (lf + 1 < crlf + 3) and lf + 1 or crlf + 3
        elseif lf then
            last = lf + 1
        elseif crlf then
            last = crlf + 3
        else
            break
        end
        n = n + 1
        events[n] = sub(buf, pos, last)
        pos = last + 1
    end
    p.buf = pos > #buf and "" or sub(buf, pos)
    return events, n
end

--- Whatever is left at the end of the stream (an unterminated event).
-- @tparam table p a parser
-- @treturn string|nil the rest, or nil when nothing is left
-- @phases any
function _M.finish(p)
    local rest = p.buf
    p.buf = ""
    if rest == "" then
        return nil
    end
    return rest
end

-- The lines of an event without their `\r\n` / `\n`.
local function each_line(event, fn)
    local pos, len = 1, #event
    while pos <= len do
        local nl = find(event, "\n", pos, true)
        local last = nl and nl - 1 or len
        local stop = last
        if stop >= pos and byte(event, stop) == CR then
            stop = stop - 1
        end
        fn(sub(event, pos, stop))
        if not nl then
            break
        end
        pos = nl + 1
    end
end

--- The `data` of an event, or nil when it has no `data:` line.
-- @tparam string event one event
-- @treturn string|nil its data (several lines joined by `\n`)
-- @phases any
function _M.data(event)
    -- Fast path: one `data: ...` line, the usual shape of LLM streams.
    if sub(event, 1, 5) == "data:" then
        local nl = find(event, "\n", 6, true)
        if nl and (sub(event, nl, nl + 1) == "\n\n" or sub(event, nl - 1, nl + 2) == "\r\n\r\n") then
            local first = byte(event, 6) == SPACE and 7 or 6
            local last = nl - 1
            if byte(event, last) == CR then
                last = last - 1
            end
            return sub(event, first, last)
        end
    end
    local parts, n = nil, 0
    each_line(event, function(line)
        if sub(line, 1, 5) == "data:" then
            n = n + 1
            parts = parts or {}
            parts[n] = sub(line, byte(line, 6) == SPACE and 7 or 6)
        end
    end)
    if not parts then
        return nil
    end
    return concat(parts, "\n", 1, n)
end

--- The event with its data replaced by `data` (one line of JSON).
-- @tparam string event one event
-- @tparam string data the new data
-- @treturn string the new event
-- @phases any
function _M.with_data(event, data)
    if sub(event, 1, 5) == "data:" and not find(event, "\n[^\r\n]", 1) then
        return "data: " .. data .. "\n\n" -- only a data line and the blank line
    end
    local out, n = {}, 0
    each_line(event, function(line)
        if line ~= "" and sub(line, 1, 5) ~= "data:" then
            n = n + 1
            out[n] = line .. "\n"
        end
    end)
    n = n + 1
    out[n] = "data: " .. data .. "\n\n"
    return concat(out, "", 1, n)
end

--- An event carrying `data: <data>`.
-- @tparam string data the data (one line)
-- @treturn string the event
-- @phases any
function _M.data_event(data)
    return "data: " .. data .. "\n\n"
end

return _M
