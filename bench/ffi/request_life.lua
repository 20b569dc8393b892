--- One request's whole data path, through the C ABI's request handle and
-- hand-written in plain LuaJIT, in one process (make bench-ffi).
--
--   luajit bench/ffi/request_life.lua ROOT [N]
--
-- The request: a small chat completion (viplevel 3) and its backend's
-- answer (a completion with usage). Both cases run the seed's four
-- data-path rules (routing, request_transform, response_transform, usage)
-- and end with what a host sends and stores: the upstream body, the client
-- body and the usage record, each as a Lua string.
--
-- - `handle(c_abi)`: llmp_handle_new (the body parsed once) + route +
--   upstream + respond + usage + free, called through LuaJIT's FFI on
--   libllmproxy; the seed scripts run sandboxed, as given; the header
--   changes come back as JSON and are decoded, as a host must.
-- - `handwritten(cjson)`: what an OpenResty user would write instead:
--   the same four rules as plain local functions, lua-cjson to decode the
--   body and the answer and to encode the upstream body, the client body
--   and the record; unsandboxed, JIT on.
--
-- Times N requests (default 100000) one by one after N/10 warm-up requests
-- and prints the median, p99 and mean in ns, in bench_lua.lua's format.

local root = arg[1] or "."
local n = tonumber(arg[2]) or 100000
local lib_dir = os.getenv("LLMP_LIB_DIR") or (root .. "/ffi/target/release")

package.path = root .. "/bench/ffi/?.lua;" .. package.path

local ffi = require "ffi"
local cjson = require "cjson.safe"
local timer = require "timer"

ffi.cdef [[
  typedef struct llmp_engine llmp_engine;
  typedef struct llmp_error llmp_error;
  typedef struct llmp_globals llmp_globals;
  typedef struct llmp_handle llmp_handle;
  int llmp_engine_new(const char *yaml, size_t len, llmp_engine **out, llmp_error **err);
  int llmp_globals_new(const char *json, size_t len, llmp_globals **out, llmp_error **err);
  const char *llmp_error_message(const llmp_error *err);
  int llmp_handle_new(const llmp_engine *engine, const char *request_json, size_t request_len,
                      const char *body, size_t body_len, llmp_handle **out, llmp_error **err);
  int llmp_handle_route(const llmp_engine *engine, llmp_handle *handle, const llmp_globals *globals,
                        const char **backend, llmp_error **err);
  int llmp_handle_upstream(const llmp_engine *engine, llmp_handle *handle, const char *backend_url,
                           const char **body, size_t *body_len, const char **headers, int *stream,
                           llmp_error **err);
  int llmp_handle_respond(const llmp_engine *engine, llmp_handle *handle, uint16_t status,
                          const char *headers_json, size_t headers_len, const char *body, size_t body_len,
                          double latency_ms, uint16_t *out_status, const char **out_body,
                          size_t *out_body_len, const char **out_headers, llmp_error **err);
  int llmp_handle_usage(const llmp_engine *engine, llmp_handle *handle, const char **json,
                        size_t *json_len, llmp_error **err);
  void llmp_handle_free(llmp_handle *handle);
]]
local lib = ffi.load(lib_dir .. "/libllmproxy.so")

local BODY = '{"model":"gpt-4","messages":[{"role":"system","content":"You are a helpful assistant."},'
  .. '{"role":"user","content":"Say hello in three languages."}],"temperature":0.7,"max_tokens":64,"viplevel":3}'
local REQUEST = '{"id":"req-1","user_id":"user_001","path":"/v1/chat/completions"}'
local ANSWER = '{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"llama-3-70b-instruct",'
  .. '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! Bonjour! Hola!"},'
  .. '"finish_reason":"stop","logprobs":null}],'
  .. '"usage":{"prompt_tokens":15,"completion_tokens":42,"total_tokens":57}}'
local ANSWER_HEADERS = '{"Content-Type":"application/json"}'
local BACKENDS = {
  standard = "http://127.0.0.1:9001",
  ["high-performance"] = "http://127.0.0.1:9002",
  ultra = "http://127.0.0.1:9003",
}

-- ---- the C ABI's request handle -------------------------------------------

local yaml = table.concat({
  "scripts:",
  "  routing: {script_file: " .. root .. "/examples/scripts/routing.lua}",
  "  request_transform: {script_file: " .. root .. "/examples/scripts/request_transform.lua}",
  "  response_transform: {script_file: " .. root .. "/examples/scripts/response_transform.lua}",
  "  usage: {script_file: " .. root .. "/examples/scripts/usage.lua}",
}, "\n")
local errp = ffi.new("llmp_error*[1]")
local function must(rc, what)
  if rc ~= 0 then
    error(what .. ": " .. ffi.string(lib.llmp_error_message(errp[0])))
  end
end
local enginep = ffi.new("llmp_engine*[1]")
must(lib.llmp_engine_new(yaml, #yaml, enginep, errp), "engine")
local engine = enginep[0]
local backends_json = '{"backends":{"standard":{"url":"http://127.0.0.1:9001"},'
  .. '"high-performance":{"url":"http://127.0.0.1:9002"},"ultra":{"url":"http://127.0.0.1:9003"}}}'
local globalsp = ffi.new("llmp_globals*[1]")
must(lib.llmp_globals_new(backends_json, #backends_json, globalsp, errp), "globals")
local globals = globalsp[0]

local handlep = ffi.new("llmp_handle*[1]")
local namep = ffi.new("const char*[1]")
local bodyp, headersp = ffi.new("const char*[1]"), ffi.new("const char*[1]")
local lenp = ffi.new("size_t[1]")
local streamp = ffi.new("int[1]")
local statusp = ffi.new("uint16_t[1]")

local function via_handle()
  must(lib.llmp_handle_new(engine, REQUEST, #REQUEST, BODY, #BODY, handlep, errp), "new")
  local h = handlep[0]
  must(lib.llmp_handle_route(engine, h, globals, namep, errp), "route")
  local url = BACKENDS[ffi.string(namep[0])]
  must(lib.llmp_handle_upstream(engine, h, url, bodyp, lenp, headersp, streamp, errp), "upstream")
  local upstream = bodyp[0] ~= nil and ffi.string(bodyp[0], lenp[0]) or BODY
  local headers = headersp[0] ~= nil and cjson.decode(ffi.string(headersp[0])) or nil
  must(lib.llmp_handle_respond(engine, h, 200, ANSWER_HEADERS, #ANSWER_HEADERS, ANSWER, #ANSWER, 12.5,
    statusp, bodyp, lenp, headersp, errp), "respond")
  local client = bodyp[0] ~= nil and ffi.string(bodyp[0], lenp[0]) or ANSWER
  must(lib.llmp_handle_usage(engine, h, bodyp, lenp, errp), "usage")
  local record = ffi.string(bodyp[0], lenp[0])
  lib.llmp_handle_free(h)
  return upstream, headers, client, record
end

-- ---- hand-written: the seed's rules in plain LuaJIT + lua-cjson ------------

local function route(body)
  local viplevel = body.viplevel or 0
  if viplevel >= 3 then
    return "ultra"
  elseif viplevel >= 1 then
    return "high-performance"
  end
  return "standard"
end

local TO_BACKEND = { ["gpt-4"] = "llama-3-70b-instruct", ["gpt-3.5"] = "qwen-72b-chat" }
local TO_CLIENT = { ["llama-3-70b-instruct"] = "gpt-4", ["qwen-72b-chat"] = "gpt-3.5" }

local function transform_request(body, user_id)
  local model = body.model
  local new_body = {}
  for k, v in pairs(body) do
    new_body[k] = v
  end
  new_body.model = TO_BACKEND[model] or model
  return new_body, { ["X-User-ID"] = user_id, ["X-Original-Model"] = model }
end

local function transform_response(body)
  local model = body.model
  local new_body = {}
  for k, v in pairs(body) do
    new_body[k] = v
  end
  new_body.model = TO_CLIENT[model] or model
  return new_body
end

local floor = math.floor
local function usage(body, u)
  local viplevel = body.viplevel or 0
  local discount = 1.0
  if viplevel >= 3 then
    discount = 0.5
  elseif viplevel >= 1 then
    discount = 0.8
  end
  return {
    prompt_tokens = u.prompt_tokens,
    completion_tokens = u.completion_tokens,
    total_tokens = u.total_tokens,
    billable_tokens = floor(u.total_tokens * discount),
    discount = discount,
    viplevel = viplevel,
  }
end

local function handwritten()
  local body = cjson.decode(BODY)
  local url = BACKENDS[route(body)]
  local new_body, headers = transform_request(body, "user_001")
  local upstream = cjson.encode(new_body)
  local answer = cjson.decode(ANSWER)
  local client = cjson.encode(transform_response(answer))
  local record = cjson.encode(usage(body, answer.usage))
  assert(url)
  return upstream, headers, client, record
end

-- ---- both do the same -------------------------------------------------------

for name, run in pairs({ ["handle(c_abi)"] = via_handle, ["handwritten(cjson)"] = handwritten }) do
  local upstream, headers, client, record = run()
  local up, cl, rec = cjson.decode(upstream), cjson.decode(client), cjson.decode(record)
  assert(up.model == "llama-3-70b-instruct" and up.viplevel == 3 and #up.messages == 2, name .. ": upstream body")
  assert(headers["X-Original-Model"] == "gpt-4" and headers["X-User-ID"] == "user_001", name .. ": headers")
  assert(cl.model == "gpt-4" and cl.choices[1].message.content == "Hello! Bonjour! Hola!", name .. ": client body")
  local billed = rec.billable_tokens or (rec.record and rec.record.billable_tokens)
  assert(billed == 28, name .. ": usage record")
end

timer.measure("handwritten(cjson)", n, handwritten)
timer.measure("handle(c_abi)", n, via_handle)
