--- The baseline of `make bench-openresty`: the seed's auth, rate_limit,
-- routing and usage rules written by hand as plain OpenResty Lua, the way
-- an OpenResty user would write them without resty.llmproxy: lua-cjson,
-- the JIT on, no sandbox, a `lua_shared_dict` limiter with `incr` in
-- one-minute windows, one key table. The same checks and the same
-- outcomes as the module's run on the bench's config (one key with a
-- large quota, limits that never refuse), with none of its guarantees
-- (script time and memory limits, error bodies, metrics, usage records).
--
-- @module handwritten

-- luacheck: globals ngx.status ngx.ctx ngx.header

local cjson = require "cjson.safe"
local balancer = require "ngx.balancer"

local ngx = ngx
local decode = cjson.decode
local encode = cjson.encode
local floor = math.floor
local concat = table.concat
local os_date = os.date

local _M = {}

local KEYS = {
    ["sk-bench"] = { user_id = "bench", total_quota = 1000000000000 },
}
local LIMITS = { global_rpm = 1000000000, key_rpm = 1000000000, key_concurrency = 100000 }
local BACKENDS = { standard = true, ["high-performance"] = true, ultra = true }

local function reject(status, message, kind)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.say(encode({ error = { message = message, type = kind } }))
    return ngx.exit(status)
end

--- access: parse the body, check the key and its quota, the seed's auth
-- rule, the limiter and the seed's rate_limit rule, then the seed's
-- routing rule.
function _M.access()
    ngx.req.read_body()
    local body = decode(ngx.req.get_body_data() or "")
    if type(body) ~= "table" then
        return reject(400, "the request body is not valid JSON", "bad_request")
    end
    local auth = ngx.var.http_authorization
    local key = auth and auth:match("^Bearer%s+(.+)$")
    local info = key and KEYS[key]
    if not info then
        return reject(401, "invalid or missing API key", "auth_error")
    end
    local dict = ngx.shared.handwritten
    if (dict:get("q:" .. key) or 0) >= info.total_quota then
        return reject(429, "API key quota is exhausted", "auth_error")
    end
    -- The seed's auth rule.
    if info.total_quota < 1000000 and body.model == "gpt-4" then
        return reject(403, "您的账户等级不支持 GPT-4 模型", "auth_error")
    end
    -- The limiter: requests per minute, global and per key, and requests
    -- in flight per key.
    local win = floor(ngx.now() / 60)
    local g = dict:incr("g:" .. win, 1, 0, 61)
    local k = dict:incr("r:" .. key .. ":" .. win, 1, 0, 61)
    local c = dict:incr("c:" .. key, 1, 0)
    ngx.ctx.key = key
    if g > LIMITS.global_rpm or k > LIMITS.key_rpm or c > LIMITS.key_concurrency then
        return reject(429, "rate limit reached", "rate_limit")
    end
    -- The seed's rate_limit rule.
    local hour = tonumber(os_date("%H"))
    if hour >= 9 and hour <= 18 and info.total_quota < 1000000 and LIMITS.key_rpm - k < 10 then
        return reject(429, "高峰期限流，请稍后重试", "rate_limit")
    end
    -- The seed's routing rule.
    local vip = tonumber(body.viplevel) or 0
    local backend = vip >= 3 and "ultra" or (vip >= 1 and "high-performance" or "standard")
    if not BACKENDS[backend] then
        return reject(502, "no backend", "backend_error")
    end
    ngx.ctx.backend = backend
    ngx.ctx.viplevel = vip
    ngx.req.clear_header("Authorization")
end

--- balancer: every backend of the bench is the same mock.
function _M.balancer(port)
    local ok, err = balancer.set_current_peer("127.0.0.1", port)
    if not ok then
        ngx.log(ngx.ERR, "set_current_peer: ", err)
        return ngx.exit(502)
    end
end

--- body_filter: keep the answer to read its usage in log().
function _M.body_filter()
    local ctx = ngx.ctx
    local buf = ctx.buf
    if not buf then
        buf = {}
        ctx.buf = buf
    end
    buf[#buf + 1] = ngx.arg[1]
end

--- log: the seed's usage rule over the answer's usage, charged to the
-- key's quota; the concurrency slot back.
function _M.log()
    local ctx = ngx.ctx
    local key = ctx.key
    if not key then
        return
    end
    local dict = ngx.shared.handwritten
    dict:incr("c:" .. key, -1, 0)
    local res = ctx.buf and decode(concat(ctx.buf))
    local usage = type(res) == "table" and res.usage
    if type(usage) ~= "table" then
        return
    end
    local vip = ctx.viplevel or 0
    local discount = vip >= 3 and 0.5 or (vip >= 1 and 0.8 or 1.0)
    local billable = floor((tonumber(usage.total_tokens) or 0) * discount)
    dict:incr("q:" .. key, billable, 0)
end

return _M
