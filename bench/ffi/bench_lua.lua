--- Per-call cost of engine:run in the LuaJIT module (make bench-ffi).
--
--   luajit bench/ffi/bench_lua.lua ROOT [N]
--
-- Engine: conformance case 001's routing script. Input: the request of
-- bench/ffi/routing-input-10k.json (a ~10 KB body) in five forms:
-- - `run_prepared`: engine:run_prepared with the request (body as body_raw
--   text) parsed once by llmproxy.request and the backends once by
--   llmproxy.globals, outside the loop (the C ABI's prepared path);
-- - `request_handle`: the request (body as body_raw text) parsed once by
--   llmproxy.request outside the loop, passed as input.request; the backends
--   as a Lua table, converted on every call;
-- - `body_raw`: the body as JSON text in request.body_raw (what an nginx host
--   has: the raw request body), the rest as tables; parsed on every call;
-- - `json_text`: the whole input as one JSON string;
-- - `table`: the whole input as Lua tables (the body converted on every call).
-- Times N calls (default 100000) one by one after N/10 warm-up calls and
-- prints the median, p99 and mean in ns.

local root = arg[1] or "."
local n = tonumber(arg[2]) or 100000
local lib_dir = os.getenv("LLMP_LIB_DIR") or (root .. "/ffi/target/release")
package.cpath = lib_dir .. "/lib?.so;" .. package.cpath
package.path = root .. "/examples/lua/?.lua;" .. root .. "/bench/ffi/?.lua;" .. package.path

local timer = require "timer"
local llmproxy = require "llmproxy"
local casejson = require "casejson"

local case = casejson.read_file(root .. "/conformance/cases/001-seed-routing-viplevel-3.json")
local engine = assert(llmproxy.new('{"scripts": {"routing": {"script": '
  .. casejson.quote(table.concat(case.script, "\n")) .. "}}}"))

local f = assert(io.open(root .. "/bench/ffi/routing-input-10k.json", "rb"))
local input_text = f:read("*a")
f:close()

-- The body's JSON text, cut out of the input text verbatim.
local body_text = input_text:match('"body":(%b{})')
local as_table = casejson.decode(input_text)
local with_raw = casejson.decode(input_text)
with_raw.request.body = nil
with_raw.request.body_raw = body_text

local function bench(name, input, run)
  run = run or function(inp) return engine:run("routing", inp) end
  local res, err = run(input)
  assert(res == "ultra", tostring(err))
  timer.measure(name, n, function() return run(input) end)
end

local request = assert(llmproxy.request(with_raw.request))
local globals = assert(llmproxy.globals({ backends = with_raw.backends }))
local with_handle = { request = request, backends = with_raw.backends }

bench("run_prepared", nil, function() return engine:run_prepared("routing", request, globals) end)
bench("request_handle", with_handle)
bench("body_raw", with_raw)
bench("json_text", input_text)
bench("table", as_table)
