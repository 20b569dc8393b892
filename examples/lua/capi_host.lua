--- A LuaJIT host of the C ABI through LuaJIT's FFI (`ffi.load`), the way
-- lua-resty-core calls nginx: the `luajit` CLI's own LuaJIT and the one
-- libllmproxy brings for its sandbox VMs live in one process
-- (docs/adr/073-the-c-library-brings-its-own-luajit.md).
--
--   LLMP_CAPI_DIR=ffi/target/capi/release luajit examples/lua/capi_host.lua
--
-- Checks that the library compiles scripts (unless LLMPROXY_SANDBOX_JIT
-- says otherwise), that a compiled endless loop and a `pcall` around one
-- still stop at the deadline, and that a script's answer comes back; then
-- that the host's own LuaJIT still runs. Exits 1 when a check fails.

local ffi = require "ffi"

local lib_dir = os.getenv("LLMP_CAPI_DIR") or "ffi/target/capi/release"

ffi.cdef [[
  typedef struct llmp_engine llmp_engine;
  typedef struct llmp_error llmp_error;
  int llmp_engine_new(const char *yaml, size_t len, llmp_engine **out, llmp_error **err);
  int llmp_engine_run(const llmp_engine *engine, const char *hook, const char *input_json,
                      size_t input_len, char **out_json, size_t *out_len, llmp_error **err);
  void llmp_engine_free(llmp_engine *engine);
  void llmp_string_free(char *s);
  const char *llmp_error_message(const llmp_error *err);
  void llmp_error_free(llmp_error *err);
  const char *llmp_sandbox_jit(void);
]]
local lib = ffi.load(lib_dir .. "/libllmproxy.so")

local LLMP_OK, LLMP_TIMEOUT = 0, 2000

local failures = 0
local function check(ok, what)
    print((ok and "ok   " or "FAIL ") .. what)
    if not ok then
        failures = failures + 1
    end
end

--- Build an engine whose routing script is `script` (30 ms budget).
local function engine_of(script)
    local yaml = "scripts:\n  routing:\n    timeout_ms: 30\n    script: |\n      " .. script .. "\n"
    local out = ffi.new("llmp_engine *[1]")
    local err = ffi.new("llmp_error *[1]")
    if lib.llmp_engine_new(yaml, #yaml, out, err) ~= LLMP_OK then
        error("engine: " .. ffi.string(lib.llmp_error_message(err[0])))
    end
    return ffi.gc(out[0], lib.llmp_engine_free)
end

local INPUT = '{"request":{"id":"r-1","body":{"model":"gpt-4","viplevel":3}},"backends":{'
    .. '"standard":{"url":"http://127.0.0.1:9001","healthy":true,"weight":1},'
    .. '"ultra":{"url":"http://127.0.0.1:9002","healthy":true,"weight":1}}}'

--- Run the routing hook: the result code, the output text (or nil) and the
-- error message (or nil).
local function route(engine)
    local out, len = ffi.new("char *[1]"), ffi.new("size_t[1]")
    local err = ffi.new("llmp_error *[1]")
    local rc = lib.llmp_engine_run(engine, "routing", INPUT, #INPUT, out, len, err)
    local text, message
    if rc == LLMP_OK then
        text = ffi.string(out[0], len[0])
        lib.llmp_string_free(out[0])
    elseif err[0] ~= nil then
        message = ffi.string(lib.llmp_error_message(err[0]))
        lib.llmp_error_free(err[0])
    end
    return rc, text, message
end

local mode = ffi.string(lib.llmp_sandbox_jit())
local wanted = os.getenv("LLMPROXY_SANDBOX_JIT") or "everything"
check(mode == wanted, "the library's sandbox compiles '" .. mode .. "' (wanted '" .. wanted .. "')")

local routed = engine_of([[if request.body.viplevel >= 3 then return "ultra" end return "standard"]])
for _ = 1, 200 do -- past LuaJIT's hot-loop threshold: the script is compiled
    local rc, text = route(routed)
    if rc ~= LLMP_OK or text ~= '"ultra"' then
        check(false, "a routing script answers (" .. tostring(rc) .. ", " .. tostring(text) .. ")")
        break
    end
end
check(failures == 0, "a routing script answers 200 times")

local cases = {
    { "a compiled endless loop", "local x = 0 while true do x = x + 1 end" },
    { "a pcall around a compiled endless loop",
        "local x = 0 for _ = 1, 3 do pcall(function() while true do x = x + 1 end end) end return x" },
}
for _, case in ipairs(cases) do
    local started = os.clock()
    local rc, _, message = route(engine_of(case[2]))
    local spent_ms = (os.clock() - started) * 1000
    check(rc == LLMP_TIMEOUT and spent_ms < 1000,
        string.format("%s stops at the deadline (%d, %.0f ms CPU: %s)", case[1], rc, spent_ms, tostring(message)))
end

-- The host's LuaJIT is untouched by the library's: its JIT compiler still
-- runs this loop.
local sum = 0
for i = 1, 1e6 do
    sum = sum + i
end
check(sum == 500000500000 and require("jit").status(), "the host's LuaJIT still runs and compiles")

if failures > 0 then
    print(failures .. " check(s) failed")
    os.exit(1)
end
print("capi_host: all checks passed")
