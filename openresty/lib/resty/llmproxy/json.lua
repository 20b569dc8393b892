--- JSON text for values that come back from the `llmproxy` module.
--
-- The module hands script results back as Lua values with its own markers:
-- arrays carry `llmproxy.array_mt` (empty ones too), `llmproxy.empty_array`
-- stands for `[]`, and `llmproxy.null` (a NULL light userdata, the same
-- value as `cjson.null`) for `null`. Debian's lua-cjson knows none of the
-- array markers and writes numbers with 14 significant digits, so it would
-- turn `[]` into `{}` and change large integers; this encoder keeps them
-- (docs/adr/020-openresty-host.md).
--
-- Numbers: integral values within +-2^53 are written as integers, others
-- with the fewest digits (15 to 17) that read back as the same double; NaN
-- and infinities are refused, like the core.
--
-- @module resty.llmproxy.json

local type = type
local next = next
local pairs = pairs
local tostring = tostring
local tonumber = tonumber
local getmetatable = getmetatable
local floor = math.floor
local huge = math.huge
local concat = table.concat
local sort = table.sort
local fmt = string.format
local gsub = string.gsub
local char = string.char

local _M = { _VERSION = "0.1.0" }

local MAX_DEPTH = 200
local MAX_SAFE_INT = 2 ^ 53

local ESCAPES = {
    ['"'] = '\\"',
    ["\\"] = "\\\\",
    ["\b"] = "\\b",
    ["\f"] = "\\f",
    ["\n"] = "\\n",
    ["\r"] = "\\r",
    ["\t"] = "\\t",
    ["\127"] = "\\u007f",
}
for i = 0, 31 do
    local c = char(i)
    if not ESCAPES[c] then
        ESCAPES[c] = fmt("\\u%04x", i)
    end
end

--- A JSON string literal for `s` (bytes are kept; no UTF-8 check).
-- @tparam string s
-- @treturn string
-- @phases any
local function quote(s)
    return '"' .. gsub(s, '[%c"\\]', ESCAPES) .. '"'
end
_M.quote = quote

--- A JSON number for `n`, or `nil, err` for NaN and infinities.
-- @tparam number n
-- @treturn string|nil
-- @treturn string|nil err
-- @phases any
local function number(n)
    if n ~= n or n == huge or n == -huge then
        return nil, "cannot encode " .. tostring(n) .. " as JSON"
    end
    if floor(n) == n and n <= MAX_SAFE_INT and n >= -MAX_SAFE_INT then
        return fmt("%d", n)
    end
    -- The shortest of 15..17 significant digits that reads back the same.
    for digits = 15, 16 do
        local s = fmt("%." .. digits .. "g", n)
        if tonumber(s) == n then
            return s
        end
    end
    return fmt("%.17g", n)
end
_M.number = number

-- Object keys in the order of their JSON names.
local function by_name(a, b)
    return tostring(a) < tostring(b)
end

-- Whether a table without the array marker is a non-empty sequence 1..n.
local function is_sequence(t)
    local n = #t
    if n == 0 then
        return false
    end
    local count = 0
    for _ in pairs(t) do
        count = count + 1
        if count > n then
            return false
        end
    end
    return count == n
end

--- An encoder bound to a module's markers.
-- @tparam table markers `{null = ..., empty_array = ..., array_mt = ...}`
--   (`require("llmproxy")` itself has these fields)
-- @tparam[opt] table opts `{sort_keys = true}` writes object keys sorted
--   (stable output for logs and tests; costs a sort per object)
-- @treturn function `encode(value) -> text | nil, err`
-- @phases any
-- @usage local encode = require("resty.llmproxy.json").encoder(require("llmproxy"))
function _M.encoder(markers, opts)
    local null = markers.null
    local empty_array = markers.empty_array
    local array_mt = markers.array_mt
    local sort_keys = opts and opts.sort_keys

    local encode_value

    local function encode_pair(k, v, buf, n, first, depth)
        local kt = type(k)
        if kt ~= "string" and kt ~= "number" then
            return nil, "cannot encode a " .. kt .. " key as JSON"
        end
        if not first then
            n = n + 1
            buf[n] = ","
        end
        n = n + 1
        buf[n] = quote(tostring(k))
        n = n + 1
        buf[n] = ":"
        return encode_value(v, buf, n, depth + 1)
    end

    local function encode_table(t, buf, n, depth)
        if depth > MAX_DEPTH then
            return nil, "nesting deeper than " .. MAX_DEPTH .. " levels (or a cycle)"
        end
        local err
        if (array_mt and getmetatable(t) == array_mt) or is_sequence(t) then
            local len = #t
            if len == 0 then
                buf[n + 1] = "[]"
                return n + 1
            end
            n = n + 1
            buf[n] = "["
            for i = 1, len do
                if i > 1 then
                    n = n + 1
                    buf[n] = ","
                end
                n, err = encode_value(t[i], buf, n, depth + 1)
                if not n then
                    return nil, err
                end
            end
            n = n + 1
            buf[n] = "]"
            return n
        end
        if next(t) == nil then
            buf[n + 1] = "{}"
            return n + 1
        end
        local keys
        if sort_keys then
            keys = {}
            for k in pairs(t) do
                keys[#keys + 1] = k
            end
            sort(keys, by_name)
        end
        n = n + 1
        buf[n] = "{"
        local first = true
        if keys then
            for i = 1, #keys do
                local k = keys[i]
                n, err = encode_pair(k, t[k], buf, n, first, depth)
                if not n then
                    return nil, err
                end
                first = false
            end
        else
            for k, v in pairs(t) do
                n, err = encode_pair(k, v, buf, n, first, depth)
                if not n then
                    return nil, err
                end
                first = false
            end
        end
        n = n + 1
        buf[n] = "}"
        return n
    end

    encode_value = function(v, buf, n, depth)
        local vt = type(v)
        if vt == "string" then
            buf[n + 1] = quote(v)
            return n + 1
        elseif vt == "number" then
            local s, err = number(v)
            if not s then
                return nil, err
            end
            buf[n + 1] = s
            return n + 1
        elseif vt == "boolean" then
            buf[n + 1] = v and "true" or "false"
            return n + 1
        elseif vt == "table" then
            return encode_table(v, buf, n, depth)
        elseif v == null or v == nil then
            buf[n + 1] = "null"
            return n + 1
        elseif v == empty_array then
            buf[n + 1] = "[]"
            return n + 1
        end
        return nil, "cannot encode a " .. vt .. " as JSON"
    end

    return function(value)
        local buf = {}
        local n, err = encode_value(value, buf, 0, 1)
        if not n then
            return nil, err
        end
        return concat(buf, "", 1, n)
    end
end

return _M
