--- A mock OpenAI-style backend for the nginx tests (t/*.t).
-- luacheck: std ngx_lua
--
-- `chat(name)` answers like `llmproxy mock-backend` (proxy/src/mock.rs)
-- in the shapes that matter to the tests, with hand-written JSON (exact
-- bytes: `[]` stays `[]`, keys keep their order):
--
-- - a chat completion (`choices: []` by default, or one message with
--   `X-Mock-Message: 1`), with `usage`;
-- - `"stream": true`: `X-Mock-Chunks` (3) content events `X-Mock-Chunk-Delay-Ms`
--   (0) apart, each flushed on its own, a final event, the usage event when
--   `stream_options.include_usage` is set (and `"usage":null` in every
--   other event, as OpenAI does), then `data: [DONE]`; `X-Mock-Split: 1`
--   writes every event in two pieces (split inside the JSON);
-- - `/embeddings`: two dimensions per input, with usage.
--
-- Steering headers: `X-Mock-Status: N` answers N with an OpenAI-style
-- error; `X-Mock-Delay-Ms` sleeps before the head; `X-Mock-Body: bad-json`
-- answers `{not json`; `X-Mock-Break: 1` sends the first half of a chat
-- completion (of a stream: its first event), then closes the connection.
-- What the backend saw is reported in `X-Seen-*` response headers
-- (`X-Seen-Body`: bodies up to 512 bytes), so tests can check the
-- rewritten request with `--- response_headers`.
local cjson = require "cjson.safe"

local ngx = ngx
local type = type
local tostring = tostring
local tonumber = tonumber

local _M = {}

-- The request body, also when nginx spooled it to a file.
local function read_body()
    ngx.req.read_body()
    local data = ngx.req.get_body_data()
    if data then
        return data
    end
    local path = ngx.req.get_body_file()
    if not path then
        return ""
    end
    local f = assert(io.open(path, "rb"))
    data = f:read("*a")
    f:close()
    return data
end

local function seen(name, value)
    ngx.header["X-Seen-" .. name] = value ~= nil and tostring(value) or "-"
end

local function error_status(status)
    local kind = "server_error"
    if status == 401 or status == 403 then
        kind = "authentication_error"
    elseif status == 429 then
        kind = "rate_limit_error"
    elseif status >= 400 and status < 500 then
        kind = "invalid_request_error"
    end
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.print('{"error":{"message":"mock error ', status, '","type":"', kind, '","code":"', status, '"}}')
end

local WORDS = { "Hello", " from", " the", " mock", " backend", ",", " friend", "." }

local function stream(model, include_usage, headers)
    local chunks = tonumber(headers["x-mock-chunks"]) or 3
    local delay = (tonumber(headers["x-mock-chunk-delay-ms"]) or 0) / 1000
    local split = headers["x-mock-split"] == "1"
    ngx.header["Content-Type"] = "text/event-stream"
    ngx.header["Cache-Control"] = "no-cache"
    local tail = include_usage and ',"usage":null}' or "}"
    local head = '{"id":"chatcmpl-s","object":"chat.completion.chunk","model":' .. cjson.encode(model) .. ',"choices":['
    local function send(event, last)
        if split then
            local cut = math.floor(#event / 2)
            ngx.print(event:sub(1, cut))
            ngx.flush(true)
            ngx.print(event:sub(cut + 1))
        else
            ngx.print(event)
        end
        ngx.flush(true)
        if delay > 0 and not last then
            ngx.sleep(delay)
        end
    end
    for i = 1, chunks do
        local word = WORDS[(i - 1) % #WORDS + 1]
        local delta = i == 1 and ('{"role":"assistant","content":' .. cjson.encode(word) .. "}")
            or ('{"content":' .. cjson.encode(word) .. "}")
        send("data: " .. head .. '{"index":0,"delta":' .. delta .. ',"finish_reason":null}]' .. tail .. "\n\n")
        if headers["x-mock-break"] == "1" then
            return ngx.exit(444) -- the connection closes after the first event
        end
    end
    send("data: " .. head .. '{"index":0,"delta":{},"finish_reason":"stop"}]' .. tail .. "\n\n")
    if include_usage then
        send("data: " .. head .. '],"usage":{"prompt_tokens":5,"completion_tokens":' .. chunks
            .. ',"total_tokens":' .. (5 + chunks) .. "}}\n\n")
    end
    send("data: [DONE]\n\n", true)
end

--- Answer as backend `name`; `opts.status` and `opts.body` override.
function _M.chat(name, opts)
    opts = opts or {}
    local raw = read_body()
    local body = cjson.decode(raw)
    local headers = ngx.req.get_headers()
    local model = type(body) == "table" and type(body.model) == "string" and body.model or "unknown"
    local delay = tonumber(headers["x-mock-delay-ms"])
    if delay then
        ngx.sleep(delay / 1000)
    end
    seen("Backend", name)
    seen("Model", model)
    seen("Length", #raw)
    if #raw <= 512 then
        seen("Body", raw)
    end
    seen("Request-ID", headers["x-request-id"])
    seen("Original-Model", headers["x-original-model"])
    seen("Authorization", headers["authorization"])
    seen("Api-Key", headers["x-api-key"])
    seen("Debug", headers["x-debug"])
    seen("Proxy-Authorization", headers["proxy-authorization"])
    local status = tonumber(headers["x-mock-status"]) or opts.status
    if status and status >= 400 then
        return error_status(status)
    end
    ngx.status = status or 200
    if headers["x-mock-body"] == "bad-json" or opts.body then
        ngx.header["Content-Type"] = "application/json"
        ngx.print(opts.body or "{not json")
        return
    end
    if type(body) == "table" and body.stream == true then
        local so = body.stream_options
        return stream(model, type(so) == "table" and so.include_usage == true, headers)
    end
    ngx.header["Content-Type"] = "application/json"
    if ngx.var.uri:find("/embeddings$") then
        ngx.print('{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,-0.25]}],',
            '"model":', cjson.encode(model), ',"usage":{"prompt_tokens":3,"total_tokens":3}}')
        return
    end
    local choices = headers["x-mock-message"] == "1"
        and '[{"index":0,"message":{"role":"assistant","content":"Hello from the mock backend."},'
            .. '"finish_reason":"stop"}]'
        or "[]"
    local answer = '{"id":"chatcmpl-1","object":"chat.completion","model":' .. cjson.encode(model)
        .. ',"choices":' .. choices .. ',"usage":{"prompt_tokens":15,"completion_tokens":42,"total_tokens":57}}'
    if headers["x-mock-break"] == "1" then
        ngx.print(answer:sub(1, math.floor(#answer / 2)))
        ngx.flush(true)
        return ngx.exit(444)
    end
    ngx.print(answer)
end

return _M
