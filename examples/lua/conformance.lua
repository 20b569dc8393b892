--- Run the shared conformance cases through the LuaJIT module.
--
--   luajit examples/lua/conformance.lua conformance/cases/*.json
--
-- `require "llmproxy"` finds libllmproxy.so through `package.cpath`
-- (`LLMP_LIB_DIR`, default `ffi/target/release`, with the `lib?.so`
-- pattern). Each case's input table goes through the module's Lua -> JSON
-- conversion, each result comes back through JSON -> Lua, and is compared
-- strictly with the expectation (arrays stay arrays, null stays null).
-- Each case runs twice: `table` passes the input table as is; `request`
-- first parses its `request` once with llmproxy.request and passes that
-- handle as `input.request` (a failure there counts as the call's outcome).
-- Prints one line per case and path, and "N passed, N failed" (counting
-- both paths); exits 1 on a failure.

local lib_dir = os.getenv("LLMP_LIB_DIR") or "ffi/target/release"
package.cpath = lib_dir .. "/lib?.so;" .. package.cpath
package.path = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/?.lua;" .. package.path

local llmproxy = require "llmproxy"
local casejson = require "casejson"

local function kind_of(core_kind)
  -- The hosts report the core's bad_input as invalid_argument.
  return core_kind == "bad_input" and "invalid_argument" or core_kind
end

local function config_for(c)
  local fields = { '"script": ' .. casejson.quote(table.concat(c.script, "\n")) }
  if type(c.limits) == "table" then
    for k, v in pairs(c.limits) do fields[#fields + 1] = casejson.quote(k) .. ": " .. tostring(v) end
  end
  return '{"scripts": {' .. casejson.quote(c.hook) .. ": {" .. table.concat(fields, ", ") .. "}}}"
end

--- The case's input with its request parsed once by llmproxy.request.
local function with_request_handle(input)
  if type(input) ~= "table" or input.request == nil then return input end
  local req, err = llmproxy.request(input.request)
  if not req then return nil, err end
  local copy = {}
  for k, v in pairs(input) do copy[k] = v end
  copy.request = req
  return copy
end

local function check(c, res, rerr)
  local want = c.expect
  if want.error then
    if res ~= nil or not rerr then return false, "expected error " .. want.error .. ", got " .. casejson.show(res) end
    if rerr.kind ~= kind_of(want.error) then
      return false, "expected error " .. want.error .. ", got " .. tostring(rerr)
    end
    if tostring(rerr) ~= rerr.kind .. ": " .. rerr.message then return false, "error __tostring: " .. tostring(rerr) end
    return true
  end
  if rerr then return false, "expected result " .. casejson.show(want.result) .. ", got error " .. tostring(rerr) end
  if want.result == llmproxy.null then
    if res ~= nil then return false, "expected nil, got " .. casejson.show(res) end
    return true
  end
  if not casejson.same(want.result, res) then
    return false, "expected " .. casejson.show(want.result) .. ", got " .. casejson.show(res)
  end
  return true
end

local PATHS = { "table", "request" }

local function run_case(path, mode)
  local ok, c = pcall(casejson.read_file, path)
  if not ok then return false, "cannot read case: " .. tostring(c) end
  local engine, err = llmproxy.new(config_for(c))
  if not engine then return false, "engine: " .. tostring(err) end
  local input = c.input
  if mode == "request" then
    local perr
    input, perr = with_request_handle(c.input)
    if not input then return check(c, nil, perr) end
  end
  return check(c, engine:run(c.hook, input))
end

print(("llmproxy %s (%s): %d conformance cases x 2 paths (table, request)"):format(llmproxy.version, jit.version, #arg))
local passed, failed = 0, 0
for _, path in ipairs(arg) do
  local name = path:match("[^/]*$")
  for _, mode in ipairs(PATHS) do
    local ok, why = run_case(path, mode)
    if ok then
      passed = passed + 1
      print("ok   " .. name .. " [" .. mode .. "]")
    else
      failed = failed + 1
      print("FAIL " .. name .. " [" .. mode .. "]: " .. why)
    end
  end
end
print(("%d passed, %d failed"):format(passed, failed))
os.exit(failed == 0 and 0 or 1)
