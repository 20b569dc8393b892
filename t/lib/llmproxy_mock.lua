--- A mock OpenAI-style backend for the nginx tests (t/*.t).
-- luacheck: std ngx_lua
--
-- `chat(name)` answers a chat completion with hand-written JSON (exact
-- bytes: `[]` stays `[]`, keys keep their order) and reports what it saw
-- in `X-Seen-*` response headers (`X-Seen-Body`: bodies up to 512 bytes),
-- so tests can check the rewritten request with `--- response_headers`.
local cjson = require "cjson.safe"

local ngx = ngx
local type = type
local tostring = tostring

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

--- Answer as backend `name`; `opts.status` and `opts.body` override.
function _M.chat(name, opts)
    opts = opts or {}
    local raw = read_body()
    local body = cjson.decode(raw)
    local headers = ngx.req.get_headers()
    local model = type(body) == "table" and type(body.model) == "string" and body.model or "unknown"
    ngx.status = opts.status or 200
    ngx.header["Content-Type"] = "application/json"
    seen("Backend", name)
    seen("Model", model)
    seen("Length", #raw)
    if #raw <= 512 then
        seen("Body", raw)
    end
    seen("Request-ID", headers["x-request-id"])
    seen("Original-Model", headers["x-original-model"])
    seen("Authorization", headers["authorization"])
    seen("Debug", headers["x-debug"])
    if opts.body then
        ngx.print(opts.body)
        return
    end
    ngx.print('{"id":"chatcmpl-1","object":"chat.completion","model":', cjson.encode(model),
        ',"choices":[],"usage":{"prompt_tokens":15,"completion_tokens":42,"total_tokens":57}}')
end

return _M
