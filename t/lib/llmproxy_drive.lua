--- A tiny HTTP/1.1 client over cosockets for the nginx tests (t/*.t):
-- drive many requests from inside nginx and read /metrics.
-- luacheck: std ngx_lua

local ngx = ngx
local tonumber = tonumber

local _M = {}

-- Decode a chunked body.
local function dechunk(body)
    local out, pos = {}, 1
    while true do
        local size_end = body:find("\r\n", pos, true)
        if not size_end then
            break
        end
        local size = tonumber(body:sub(pos, size_end - 1):match("^%x+"), 16)
        if not size or size == 0 then
            break
        end
        out[#out + 1] = body:sub(size_end + 2, size_end + 1 + size)
        pos = size_end + 2 + size + 2
    end
    return table.concat(out)
end

--- Send one request to 127.0.0.1:`port` (Connection: close) and leave
-- its answer unread; `headers`: name -> value, or a list of values (the
-- header sent once per value).
-- @treturn table the connected cosocket, or nil and an error
function _M.send(port, method, path, headers, body)
    local sock = ngx.socket.tcp()
    sock:settimeout(10000)
    local ok, err = sock:connect("127.0.0.1", port)
    if not ok then
        return nil, err
    end
    local req = { method, " ", path, " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" }
    for k, v in pairs(headers or {}) do
        if type(v) == "table" then -- sent once per value
            for i = 1, #v do
                req[#req + 1] = k .. ": " .. v[i] .. "\r\n"
            end
        else
            req[#req + 1] = k .. ": " .. v .. "\r\n"
        end
    end
    if body then
        req[#req + 1] = "Content-Length: " .. #body .. "\r\n"
    end
    req[#req + 1] = "\r\n"
    req[#req + 1] = body or ""
    assert(sock:send(table.concat(req)))
    return sock
end

--- One request to 127.0.0.1:`port` (Connection: close), as `send` sends
-- it, and its answer.
-- @treturn number status
-- @treturn table headers (lower-case names; the last value of a repeated one)
-- @treturn string body
-- @treturn table every value of each header, in order (lower-case names)
function _M.request(port, method, path, headers, body)
    local sock, err = _M.send(port, method, path, headers, body)
    if not sock then
        return nil, err
    end
    local raw = {}
    while true do
        local data = sock:receiveany(65536)
        if not data then
            break
        end
        raw[#raw + 1] = data
    end
    sock:close()
    raw = table.concat(raw)
    local head_end = raw:find("\r\n\r\n", 1, true)
    if not head_end then
        return nil, "no response head"
    end
    local head, rest = raw:sub(1, head_end - 1), raw:sub(head_end + 4)
    local status = tonumber(head:match("^HTTP/1%.%d (%d+)"))
    local h, all = {}, {}
    for name, value in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do
        name = name:lower()
        h[name] = value
        local values = all[name]
        if not values then
            values = {}
            all[name] = values
        end
        values[#values + 1] = value
    end
    if (h["transfer-encoding"] or ""):find("chunked") then
        rest = dechunk(rest)
    end
    return status, h, rest, all
end

--- POST a chat completion with `body` (JSON text).
function _M.chat(port, body, headers)
    return _M.request(port, "POST", "/v1/chat/completions", headers, body)
end

--- /metrics, parsed: `values["name{labels}"] = number`, the worker pid
-- that answered, the text, and the lines that are not valid exposition
-- format.
function _M.metrics(port)
    local status, h, text = _M.request(port, "GET", "/metrics")
    if status ~= 200 then
        return nil, "metrics: status " .. tostring(status)
    end
    local values, bad = {}, {}
    for line in text:gmatch("[^\n]+") do
        if line:find("^# HELP [%w_]+ ") or line:find("^# TYPE [%w_]+ %a+$") then -- luacheck: ignore 542
        else
            local key, value = line:match('^([%a_][%w_]*%b{}) (%S+)$')
            if not key then
                key, value = line:match("^([%a_][%w_]*) (%S+)$")
            end
            local n = tonumber(value) or (value == "+Inf" and math.huge) or nil
            if key and n then
                values[key] = n
            else
                bad[#bad + 1] = line
            end
        end
    end
    return values, h["x-worker-pid"], text, bad
end

--- A connection to the Redis on 127.0.0.1:`port` (lua-resty-redis, as
-- `resty.redis` or Debian's `nginx.redis`).
function _M.redis(port)
    local found, redis = pcall(require, "resty.redis")
    if not found then
        redis = require "nginx.redis"
    end
    local red = redis:new()
    assert(red:connect("127.0.0.1", port))
    return red
end

--- The statuses of the ledger's rows, oldest first, as `BIN usage
-- --records` reads them from this nginx's html/llmproxy.yaml.
-- @tparam string bin the llmproxy binary
-- @treturn string the statuses, space-separated
function _M.ledger_statuses(bin)
    local conf = ngx.config.prefix() .. "html/llmproxy.yaml"
    local p = io.popen(bin .. " usage --config " .. conf .. " --records 2>&1")
    local out = p:read("*a")
    p:close()
    local rows = {}
    for s in out:gmatch('"status":%s*(%d+)') do
        rows[#rows + 1] = s
    end
    return table.concat(rows, " ")
end

return _M
