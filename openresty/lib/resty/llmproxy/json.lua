--- JSON string literals for the error bodies the module writes itself.
--
-- Everything else the module sends or stores as JSON is serialized in
-- Rust (the core's error bodies and script results, the usage record).
--
-- @module resty.llmproxy.json

local fmt = string.format
local gsub = string.gsub
local char = string.char

local _M = { _VERSION = "0.2.0" }

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
function _M.quote(s)
    return '"' .. gsub(s, '[%c"\\]', ESCAPES) .. '"'
end

return _M
