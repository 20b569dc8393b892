--- A small JSON reader and writer for the LuaJIT host tests.
--
-- Decodes with the module's own markers, so nothing is lost on the way
-- into `engine:run`: arrays get `llmproxy.array_mt` (an empty array stays
-- an array), `null` is `llmproxy.null`. lua-cjson 2.1.0 (Debian) has no
-- array marker, which is why the tests do not use it.
-- @module casejson

local llmproxy = require "llmproxy"

local byte, char, sub, find = string.byte, string.char, string.sub, string.find
local concat, tonumber, setmetatable = table.concat, tonumber, setmetatable
local floor = math.floor

local _M = {}

local escapes = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function utf8_char(cp)
  if cp < 0x80 then return char(cp) end
  if cp < 0x800 then return char(0xC0 + floor(cp / 0x40), 0x80 + cp % 0x40) end
  if cp < 0x10000 then
    return char(0xE0 + floor(cp / 0x1000), 0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
  end
  return char(0xF0 + floor(cp / 0x40000), 0x80 + floor(cp / 0x1000) % 0x40,
    0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

local decode_value

local function skip(s, i)
  local _, e = find(s, "^[ \t\r\n]*", i)
  return e + 1
end

local function decode_string(s, i)
  local out, n = {}, 0
  i = i + 1
  while true do
    local j = find(s, '["\\]', i)
    if not j then error("unterminated string") end
    n = n + 1
    out[n] = sub(s, i, j - 1)
    if byte(s, j) == 34 then return concat(out), j + 1 end
    local e = sub(s, j + 1, j + 1)
    if e == "u" then
      local cp = tonumber(sub(s, j + 2, j + 5), 16)
      i = j + 6
      if cp >= 0xD800 and cp <= 0xDBFF and sub(s, i, i + 1) == "\\u" then
        local lo = tonumber(sub(s, i + 2, i + 5), 16)
        cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
        i = i + 6
      end
      n = n + 1
      out[n] = utf8_char(cp)
    else
      n = n + 1
      out[n] = escapes[e] or error("bad escape \\" .. e)
      i = j + 2
    end
  end
end

decode_value = function(s, i)
  i = skip(s, i)
  local c = sub(s, i, i)
  if c == "{" then
    local t = {}
    i = skip(s, i + 1)
    if sub(s, i, i) == "}" then return t, i + 1 end
    while true do
      local k
      k, i = decode_string(s, skip(s, i))
      i = skip(s, i)
      if sub(s, i, i) ~= ":" then error("expected ':' at " .. i) end
      t[k], i = decode_value(s, i + 1)
      i = skip(s, i)
      c = sub(s, i, i)
      if c == "}" then return t, i + 1 end
      if c ~= "," then error("expected ',' or '}' at " .. i) end
      i = i + 1
    end
  elseif c == "[" then
    local t, n = setmetatable({}, llmproxy.array_mt), 0
    i = skip(s, i + 1)
    if sub(s, i, i) == "]" then return t, i + 1 end
    while true do
      n = n + 1
      t[n], i = decode_value(s, i)
      i = skip(s, i)
      c = sub(s, i, i)
      if c == "]" then return t, i + 1 end
      if c ~= "," then error("expected ',' or ']' at " .. i) end
      i = i + 1
    end
  elseif c == '"' then
    return decode_string(s, i)
  elseif sub(s, i, i + 3) == "true" then
    return true, i + 4
  elseif sub(s, i, i + 4) == "false" then
    return false, i + 5
  elseif sub(s, i, i + 3) == "null" then
    return llmproxy.null, i + 4
  end
  local _, e = find(s, "^-?%d+%.?%d*[eE]?[-+]?%d*", i)
  if not e then error("unexpected character at " .. i) end
  return tonumber(sub(s, i, e)), e + 1
end

--- Decode JSON text.
-- @tparam string s JSON text
-- @return the value (arrays marked, null as `llmproxy.null`)
function _M.decode(s)
  local v, i = decode_value(s, 1)
  if skip(s, i) <= #s then error("trailing data at " .. i) end
  return v
end

--- Read and decode a JSON file.
-- @tparam string path
function _M.read_file(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("*a")
  f:close()
  return _M.decode(text)
end

--- A JSON string literal for `s` (enough for config text).
-- @tparam string s
function _M.quote(s)
  return '"' .. s:gsub('[%c"\\]', function(ch)
    return ({ ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" })[ch]
      or string.format("\\u%04x", byte(ch))
  end) .. '"'
end

--- Deep equality of decoded values: arrays only equal arrays, numbers by value.
function _M.same(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) ~= "table" then return a == b end
  if (getmetatable(a) == llmproxy.array_mt) ~= (getmetatable(b) == llmproxy.array_mt) then return false end
  for k, v in pairs(a) do
    if b[k] == nil or not _M.same(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

--- A readable one-line rendering of a decoded value (for failure messages).
function _M.show(v)
  if v == llmproxy.null then return "null" end
  if type(v) == "string" then return _M.quote(v) end
  if type(v) ~= "table" then return tostring(v) end
  local parts = {}
  if getmetatable(v) == llmproxy.array_mt then
    for i = 1, #v do parts[i] = _M.show(v[i]) end
    return "[" .. concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  for i, k in ipairs(keys) do parts[i] = _M.quote(k) .. ":" .. _M.show(v[k]) end
  return "{" .. concat(parts, ",") .. "}"
end

return _M
