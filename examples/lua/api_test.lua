--- The LuaJIT module's API, beyond the conformance cases.
--
--   luajit examples/lua/api_test.lua
--
-- Table-driven: each test names what it shows. Prints "N passed, N failed"
-- and exits 1 on a failure. Run from the repository root (or set
-- LLMP_LIB_DIR to the directory holding libllmproxy.so).

local lib_dir = os.getenv("LLMP_LIB_DIR") or "ffi/target/release"
package.cpath = lib_dir .. "/lib?.so;" .. package.cpath

local llmproxy = require "llmproxy"

local ROUTING = [[
scripts:
  routing:
    script: |
      local v = request.body.viplevel
      if v == "loop" then while true do end end
      if v == "boom" then error("boom") end
      if v == "big" then local t = {} for i = 1, 1e8 do t[i] = i end end
      if v == nil then return nil end
      return v >= 3 and "ultra" or "standard"
    timeout_ms: 50
    memory_mb: 2
  request_transform:
    script: "return { body = request.body }"
]]

local BACKENDS = { ultra = { url = "http://u" }, standard = { url = "http://s" } }

local function routing_input(body)
  return { request = { id = "r1", body = body }, backends = BACKENDS }
end

local engine = assert(llmproxy.new(ROUTING))

--- Run the request_transform echo: what the engine saw as request.body.
local function echo(body)
  local res, err = engine:run("request_transform", { request = { id = "r2", body = body } })
  return res and res.body, err
end

local function is_array(t)
  return type(t) == "table" and getmetatable(t) == llmproxy.array_mt
end

local function expect_error(kind, res, err)
  assert(res == nil, "expected no result")
  assert(type(err) == "table", "expected an error table, got " .. tostring(err))
  assert(err.kind == kind, ("expected kind %s, got %s"):format(kind, tostring(err)))
  assert(tostring(err) == err.kind .. ": " .. err.message, "__tostring")
  return err
end

local tests = {
  { "version is a string", function()
    assert(type(llmproxy.version) == "string" and #llmproxy.version > 0)
  end },
  { "allocator names where the library allocates; LLMPROXY_ALLOCATOR=system picks malloc", function()
    local want = os.getenv("LLMPROXY_ALLOCATOR") == "system" and { system = true }
      or { mimalloc = true, system = true }
    assert(want[llmproxy.allocator], tostring(llmproxy.allocator))
  end },
  { "sandbox_jit: on the host's LuaJIT scripts run interpreted (ADR 073)", function()
    local want = os.getenv("LLMPROXY_SANDBOX_JIT") == "off" and "off" or "sandbox"
    assert(llmproxy.sandbox_jit == want, tostring(llmproxy.sandbox_jit))
  end },
  { "null is a NULL light userdata, equal to cjson.null when lua-cjson is installed", function()
    assert(type(llmproxy.null) == "userdata")
    local ok, cjson = pcall(require, "cjson")
    if ok then assert(cjson.null == llmproxy.null) end
  end },
  { "hop_by_hop names the headers that stay on the client's hop, as core's rule says", function()
    local drop = assert(llmproxy.hop_by_hop({
      host = "h", connection = { "close, X-Secret", "x-other" }, ["x-secret"] = "s", ["x-other"] = "o",
      ["proxy-authorization"] = "p", te = "trailers", ["x-kept"] = "k", [1] = "not a header",
    }))
    table.sort(drop)
    assert(table.concat(drop, " ") == "connection proxy-authorization te x-other x-secret", table.concat(drop, " "))
    assert(llmproxy.hop_by_hop({ host = "h", ["content-type"] = "application/json" }) == nil)
    drop = assert(llmproxy.hop_by_hop({ connection = "keep-alive", ["Keep-Alive"] = "timeout=5" }))
    table.sort(drop)
    assert(table.concat(drop, " ") == "Keep-Alive connection", table.concat(drop, " "))
  end },
  { "canonical_path is core's path rule: the form a host matches on and sends upstream", function()
    local cases = {
      { "/v1/chat/completions", "/v1/chat/completions" },
      { "/v1//x/../chat/./%63ompletions", "/v1/chat/completions" },
      { "/v1/a%3fb", "/v1/a%3Fb" },
      { "/v1/chat%2Fcompletions", nil, "encoded '/'" },
      { "/v1/../../x", nil, "above the root" },
      { "/v1/\xff", nil, "percent-encoded" },
    }
    for _, c in ipairs(cases) do
      local path, err = llmproxy.canonical_path(c[1])
      assert(path == c[2], c[1] .. ": " .. tostring(path))
      assert((err == nil) == (c[3] == nil) and (c[3] == nil or err:find(c[3], 1, true)), c[1] .. ": " .. tostring(err))
    end
  end },
  { "shown_path is core's cut of a refused request's path: 256 bytes at most, at a character boundary", function()
    assert(llmproxy.shown_path("/v1/x") == "/v1/x")
    assert(llmproxy.shown_path("/" .. ("a"):rep(400)) == "/" .. ("a"):rep(255))
    -- 254 bytes, then a 3-byte character across the bound: it is left out
    local cut = llmproxy.shown_path("/" .. ("a"):rep(253) .. "\xe4\xbd\xa0" .. "b")
    assert(cut == "/" .. ("a"):rep(253), #cut)
    assert(llmproxy.shown_path("/\xff") == "/\xef\xbf\xbd", "not UTF-8: U+FFFD")
  end },
  { "a string result comes back as a string, with a nil error", function()
    local res, err = engine:run("routing", routing_input({ viplevel = 3 }))
    assert(res == "ultra" and err == nil)
  end },
  { "a nil result is nil, nil (two values)", function()
    local n = select("#", engine:run("routing", routing_input({})))
    local res, err = engine:run("routing", routing_input({}))
    assert(n == 2 and res == nil and err == nil)
  end },
  { "request.body_raw (JSON text) is parsed by the engine", function()
    local res = engine:run("routing", { request = { id = "r", body_raw = '{"viplevel": 5}' }, backends = BACKENDS })
    assert(res == "ultra")
  end },
  { "the input may be JSON text", function()
    local res = engine:run("routing", '{"request": {"body": {"viplevel": 1}}, "backends": {"standard": {"url": "x"}}}')
    assert(res == "standard")
  end },
  { "a script error is {kind, message, hook, script, line} with __tostring", function()
    local err = expect_error("script_error", engine:run("routing", routing_input({ viplevel = "boom" })))
    assert(err.hook == "routing" and err.script == "scripts.routing" and err.line == 3, tostring(err))
  end },
  { "a loop is a timeout, and the engine keeps working", function()
    expect_error("timeout", engine:run("routing", routing_input({ viplevel = "loop" })))
    assert(engine:run("routing", routing_input({ viplevel = 3 })) == "ultra")
  end },
  { "memory_mb limits the sandbox state (separate states inside a module)", function()
    expect_error("memory", engine:run("routing", routing_input({ viplevel = "big" })))
    assert(engine:run("routing", routing_input({ viplevel = 3 })) == "ultra")
  end },
  { "a backend not in backends is bad_output", function()
    expect_error("bad_output", engine:run("routing", { request = { body = { viplevel = 3 } }, backends = {} }))
  end },
  { "an unknown hook is invalid_argument", function()
    expect_error("invalid_argument", engine:run("nope", routing_input({})))
  end },
  { "a hook that is not enabled is invalid_argument", function()
    expect_error("invalid_argument", engine:run("auth", routing_input({})))
  end },
  { "a non-string hook is invalid_argument", function()
    expect_error("invalid_argument", engine:run(42, routing_input({})))
  end },
  { "an input that is not a table is invalid_argument", function()
    expect_error("invalid_argument", engine:run("routing", 42))
    expect_error("invalid_argument", engine:run("routing", nil))
  end },
  { "truncated JSON text is invalid_argument", function()
    expect_error("invalid_argument", engine:run("routing", '{"request": {'))
  end },
  { "a non-UTF-8 string is invalid_argument, naming its path", function()
    local err = expect_error("invalid_argument", engine:run("routing", { request = { id = "\255" } }))
    assert(err.message:find("input.request.id", 1, true), err.message)
  end },
  { "a function in the input is invalid_argument", function()
    expect_error("invalid_argument", engine:run("routing", { request = { body = { f = print } } }))
  end },
  { "NaN is invalid_argument", function()
    expect_error("invalid_argument", engine:run("routing", { request = { body = { x = 0 / 0 } } }))
  end },
  { "a table that contains itself is invalid_argument, not a stack overflow", function()
    local t = {}
    t.self = t
    expect_error("invalid_argument", engine:run("routing", { request = { body = t } }))
  end },
  { "{} is an object; empty_array and array_mt tables are arrays", function()
    local body = assert(echo({ a = {}, b = llmproxy.empty_array, c = setmetatable({}, llmproxy.array_mt) }))
    assert(type(body.a) == "table" and not is_array(body.a) and next(body.a) == nil, "a")
    assert(is_array(body.b) and #body.b == 0, "b")
    assert(is_array(body.c) and #body.c == 0, "c")
  end },
  { "sequences are arrays; sparse tables and number keys are objects", function()
    local body = assert(echo({ seq = { 1, 2, 3 }, sparse = { [1] = "a", [3] = "c" }, nums = { [2.5] = "x" } }))
    assert(is_array(body.seq) and #body.seq == 3 and body.seq[3] == 3, "seq")
    assert(not is_array(body.sparse) and body.sparse["1"] == "a" and body.sparse["3"] == "c", "sparse")
    assert(body.nums["2.5"] == "x", "nums")
  end },
  { "null in a result is llmproxy.null; nested arrays carry array_mt", function()
    local body = assert(echo({ n = llmproxy.null, deep = { { 1 }, { 2 } } }))
    assert(body.n == llmproxy.null, "null")
    assert(is_array(body.deep) and is_array(body.deep[1]) and body.deep[2][1] == 2, "deep")
  end },
  { "integers and floats survive", function()
    local body = assert(echo({ i = 9007199254740992, f = 0.1, neg = -3 }))
    assert(body.i == 9007199254740992 and body.f == 0.1 and body.neg == -3)
  end },
  { "engine:enabled", function()
    assert(engine:enabled("routing") and engine:enabled("request_transform"))
    assert(not engine:enabled("auth") and not engine:enabled("nope"))
  end },
  { "new: invalid YAML is a config error", function()
    expect_error("config", llmproxy.new("scripts: [\n"))
  end },
  { "new: a script that does not compile is a config error", function()
    expect_error("config", llmproxy.new("scripts:\n  routing:\n    script: 'return ('\n"))
  end },
  { "new: a missing file is a config error", function()
    local err = expect_error("config", llmproxy.new("/nonexistent/llmproxy.yaml"))
    assert(err.message:find("cannot read", 1, true), err.message)
  end },
  { "new: a config file path, with script_file relative to it", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir) == 0)
    local f = assert(io.open(dir .. "/route.lua", "w"))
    f:write("return 'ultra'\n")
    f:close()
    f = assert(io.open(dir .. "/llmproxy.yaml", "w"))
    f:write("scripts:\n  routing:\n    script_file: route.lua\n")
    f:close()
    local e1 = assert(llmproxy.new(dir .. "/llmproxy.yaml"))
    local e2 = assert(llmproxy.new({ file = dir .. "/llmproxy.yaml" }))
    assert(e1:run("routing", routing_input({})) == "ultra")
    assert(e2:run("routing", routing_input({})) == "ultra")
    os.execute("rm -rf " .. dir)
  end },
  { "new{yaml = ...}", function()
    local e = assert(llmproxy.new({ yaml = "scripts:\n  routing:\n    script: return 'standard'\n" }))
    assert(e:run("routing", routing_input({})) == "standard")
  end },
  { "new: a wrong argument is invalid_argument", function()
    expect_error("invalid_argument", llmproxy.new(42))
    expect_error("invalid_argument", llmproxy.new({}))
  end },
  { "engines are garbage-collected", function()
    for _ = 1, 50 do
      local e = assert(llmproxy.new(ROUTING))
      assert(e:run("routing", routing_input({ viplevel = 1 })) == "standard")
    end
    collectgarbage()
    collectgarbage()
  end },
  { "engine:backends() lists the config's backends in order", function()
    local e = assert(llmproxy.new("backends:\n  - {name: a, url: 'http://127.0.0.1:1', weight: 3,"
      .. " headers: {X-Key: k}}\n  - {name: b, url: 'http://127.0.0.1:2'}\n"))
    local list = e:backends()
    assert(is_array(list) and #list == 2, "array of 2")
    assert(list[1].name == "a" and list[1].url == "http://127.0.0.1:1" and list[1].weight == 3, "a")
    assert(list[1].headers["X-Key"] == "k" and list[2].name == "b" and list[2].weight == 1, "b")
    assert(is_array(engine:backends()) and #engine:backends() == 0, "none")
  end },
  { "llmproxy.request: a table, used as input.request by several hooks", function()
    local req = assert(llmproxy.request({ id = "r1", body = { viplevel = 3 } }))
    assert(engine:run("routing", { request = req, backends = BACKENDS }) == "ultra")
    local res = assert(engine:run("request_transform", { request = req }))
    assert(res.body.viplevel == 3)
  end },
  { "llmproxy.request: JSON text with body_raw (the body parsed once, here)", function()
    local req = assert(llmproxy.request('{"id": "r2", "body_raw": "{\\"viplevel\\": 1}"}'))
    assert(engine:run("routing", { request = req, backends = BACKENDS }) == "standard")
  end },
  { "llmproxy.request: a table with body_raw", function()
    local req = assert(llmproxy.request({ id = "r3", body_raw = '{"viplevel": 5}' }))
    assert(engine:run("routing", { request = req, backends = BACKENDS }) == "ultra")
  end },
  { "a request handle gives the same results as the table it came from", function()
    for _, body in ipairs({ { viplevel = 0 }, { viplevel = 2 }, { viplevel = 7 }, {} }) do
      local input = routing_input(body)
      local want, werr = engine:run("routing", input)
      local req = assert(llmproxy.request(input.request))
      local got, gerr = engine:run("routing", { request = req, backends = BACKENDS })
      assert(want == got and werr == nil and gerr == nil, tostring(want) .. " vs " .. tostring(got))
    end
  end },
  { "a request handle is reusable and shared between engines", function()
    local req = assert(llmproxy.request({ body = { viplevel = 3 } }))
    local other = assert(llmproxy.new("scripts:\n  routing:\n    script: return 'standard'\n"))
    for _ = 1, 100 do
      assert(engine:run("routing", { request = req, backends = BACKENDS }) == "ultra")
      assert(other:run("routing", { request = req, backends = BACKENDS }) == "standard")
    end
  end },
  { "script errors and limits work the same with a request handle", function()
    local boom = assert(llmproxy.request({ body = { viplevel = "boom" } }))
    local err = expect_error("script_error", engine:run("routing", { request = boom, backends = BACKENDS }))
    assert(err.hook == "routing" and err.line == 3, tostring(err))
    local loop = assert(llmproxy.request({ body = { viplevel = "loop" } }))
    expect_error("timeout", engine:run("routing", { request = loop, backends = BACKENDS }))
    local ultra = assert(llmproxy.request({ body = { viplevel = 3 } }))
    expect_error("bad_output", engine:run("routing", { request = ultra, backends = {} }))
  end },
  { "the hook's max_depth applies to a request handle", function()
    local tight = assert(llmproxy.new("scripts:\n  routing:\n    script: return 'ultra'\n    max_depth: 3\n"))
    local deep = assert(llmproxy.request({ body = { a = { b = { c = 1 } } } }))
    expect_error("invalid_argument", tight:run("routing", { request = deep, backends = BACKENDS }))
    assert(engine:run("routing", { request = deep, backends = BACKENDS }) == nil)
  end },
  { "with a request handle, the other globals' problems are invalid_argument, naming the global", function()
    local req = assert(llmproxy.request({ body = { viplevel = 3 } }))
    local err = expect_error("invalid_argument", engine:run("routing", { request = req, [1] = "x" }))
    assert(err.message:find("a number key cannot name a global", 1, true), err.message)
    err = expect_error("invalid_argument", engine:run("routing", { request = req, ["\255"] = 1 }))
    assert(err.message:find("not valid UTF-8", 1, true), err.message)
    err = expect_error("invalid_argument", engine:run("routing", { request = req, backends = { f = print } }))
    assert(err.message:find("input.backends.f", 1, true), err.message)
    err = expect_error("invalid_argument", engine:run("routing", { request = req, extra = { 0 / 0 } }))
    assert(err.message:find("input.extra[1]", 1, true), err.message)
    err = expect_error("invalid_argument", llmproxy.globals({ request = { id = "r" } }))
    assert(err.message:find("pass it as an llmproxy.request", 1, true), err.message)
    local g = assert(llmproxy.globals({ backends = BACKENDS }))
    assert(engine:run_prepared("routing", req, g) == "ultra")
  end },
  { "llmproxy.request: a table and the same request as JSON text give the same request", function()
    -- error_handler returns the request it sees: its JSON shows every field.
    local echoes = assert(llmproxy.new("scripts:\n  error_handler:\n    script: "
      .. "'return { status_code = 500, body = request }'\n"))
    local function seen(req)
      local res = assert(echoes:run("error_handler", { request = req, error = { type = "t", message = "m" } },
        { body_json = true }))
      return res.body
    end
    local cases = {
      { { id = "r1", client_ip = "127.0.0.1", path = "/v1/chat/completions", api_key = "sk-1",
          headers = { ["Content-Type"] = "application/json", ["X-Tag"] = "a, b" },
          body_raw = '{"model":"m","messages":[{"role":"user","content":"hi"}],"n":1.5}' },
        '{"id":"r1","client_ip":"127.0.0.1","path":"/v1/chat/completions","api_key":"sk-1",'
          .. '"headers":{"Content-Type":"application/json","X-Tag":"a, b"},'
          .. '"body_raw":"{\\"model\\":\\"m\\",\\"messages\\":[{\\"role\\":\\"user\\",'
          .. '\\"content\\":\\"hi\\"}],\\"n\\":1.5}"}' },
      { { id = "r2", user_id = "u", backend_url = "http://b", body = { a = { 1, 2, 3 } }, tier = 2 },
        '{"id":"r2","user_id":"u","backend_url":"http://b","body":{"a":[1,2,3]},"tier":2}' },
      -- Read by the JSON path: a number id, a header that is not a string,
      -- headers given as an array, both body and body_raw.
      { { id = 5, headers = { ["X-N"] = 7 } }, '{"id":5,"headers":{"X-N":7}}' },
      { { headers = { "a" } }, '{"headers":["a"]}' },
      { { body = { x = 1 }, body_raw = '{"y":2}' }, nil },
      { {}, "{}" },
    }
    for i, c in ipairs(cases) do
      local from_table = seen(assert(llmproxy.request(c[1])))
      if c[2] then
        local from_text = seen(assert(llmproxy.request(c[2])))
        assert(from_table == from_text, ("case %d: %s vs %s"):format(i, from_table, from_text))
      end
    end
    local err = expect_error("invalid_argument", llmproxy.request({ id = "r", body_raw = "{oops" }))
    assert(err.message:find("body_raw", 1, true), err.message)
    expect_error("invalid_argument", llmproxy.request({ body_raw = "\255" }))
    local tight = assert(llmproxy.new("scripts:\n  routing:\n    script: return 'ultra'\n    max_depth: 3\n"))
    local deep = assert(llmproxy.request({ body_raw = '{"a":{"b":{"c":{"d":1}}}}' }))
    expect_error("invalid_argument", tight:run("routing", { request = deep, backends = BACKENDS }))
  end },
  { "headers_raw and an answer's headers as nginx gives them reach scripts in the core's form", function()
    -- The answer's body lists what response_transform sees, sorted.
    local lists = assert(llmproxy.new("scripts:\n  response_transform:\n    script: |\n"
      .. "      local function list(h)\n"
      .. "        local out = {}\n"
      .. "        for k, v in pairs(h) do out[#out + 1] = k .. '=' .. v end\n"
      .. "        table.sort(out)\n"
      .. "        return table.concat(out, ';')\n"
      .. "      end\n"
      .. "      return {body = {request = list(request.headers), response = list(response.headers)}}\n"))
    -- ngx.req.get_headers()'s form: lower-case names, a table for a header
    -- sent twice. The fast path (a table) and the JSON path (text) agree.
    local raw = { ["content-type"] = "application/json", ["x-tag"] = { "a", "b" }, ["X-API-KEY"] = "k" }
    local raw_json = '{"headers_raw":{"content-type":"application/json","x-tag":["a","b"],"X-API-KEY":"k"}}'
    local want_request = "Content-Type=application/json;X-Api-Key=k;X-Tag=a, b"
    local echoes = assert(llmproxy.new("scripts:\n  error_handler:\n    script: "
      .. "'return { status_code = 500, body = request.headers }'\n"))
    for _, fields in ipairs({ { headers_raw = raw }, raw_json }) do
      local req = assert(llmproxy.request(fields))
      local res = assert(echoes:run("error_handler", { request = req, error = { type = "t", message = "m" } },
        { body_json = true }))
      assert(res.body:find('"X-Tag":"a, b"', 1, true) and res.body:find('"X-Api-Key":"k"', 1, true)
        and res.body:find('"Content-Type":"application/json"', 1, true), res.body)
    end
    local h = assert(lists:handle({ path = "/v1/chat/completions", headers_raw = raw }, '{"model":"m"}'))
    assert(h:upstream("http://b"))
    -- An answer's Content-Length and hop-by-hop headers are the host's:
    -- scripts see only what they could set back.
    local a = assert(h:respond(200, { ["set-cookie"] = { "a=1", "b=2" }, ["content-length"] = 42,
      connection = "close", ["x-latin"] = "caf\233" }, "{}", 1))
    assert(a.body == '{"request":"' .. want_request
      .. '","response":"Set-Cookie=a=1, b=2;X-Latin=caf\239\191\189"}', a.body)
    -- What the JSON path refuses, with its words; `headers` as given stays as given.
    for _, bad in ipairs({ { ["x-n"] = 7 }, { ["x-n"] = { "a", 2 } }, { ["x-n"] = { k = "v" } } }) do
      local err = expect_error("invalid_argument", llmproxy.request({ headers_raw = bad }))
      assert(err.message:find("'x-n' must be a string or an array of strings", 1, true), err.message)
    end
    expect_error("invalid_argument", llmproxy.request({ headers_raw = "x" }))
    -- Bytes that are not UTF-8 (HTTP allows them) read as U+FFFD, as the
    -- gateway reads them: the request is served.
    local latin = assert(llmproxy.request({ headers_raw = { ["x-latin"] = { "caf\233", "ok" } } }))
    local res_latin = assert(echoes:run("error_handler", { request = latin, error = { type = "t", message = "m" } },
      { body_json = true }))
    assert(res_latin.body == '{"X-Latin":"caf\239\191\189, ok"}', res_latin.body)
    local given = assert(llmproxy.request({ headers = { ["x-lower"] = "1" } }))
    local res = assert(lists:run("response_transform", { request = given, response = { status_code = 200 } },
      { body_json = true }))
    assert(res.body == '{"request":"x-lower=1","response":""}', res.body)
  end },
  { "llmproxy.request: wrong arguments are invalid_argument", function()
    expect_error("invalid_argument", llmproxy.request(42))
    expect_error("invalid_argument", llmproxy.request(nil))
    expect_error("invalid_argument", llmproxy.request("{not json"))
    expect_error("invalid_argument", llmproxy.request("[1, 2]"))
    expect_error("invalid_argument", llmproxy.request({ body_raw = "{oops" }))
    expect_error("invalid_argument", llmproxy.request({ body = { f = print } }))
    local t = {}
    t.self = t
    expect_error("invalid_argument", llmproxy.request({ body = t }))
  end },
  { "with a request handle, the other globals are checked as before", function()
    local req = assert(llmproxy.request({ body = { viplevel = 3 } }))
    local err = expect_error("invalid_argument", engine:run("routing", { request = req, backends = { x = print } }))
    assert(err.message:find("input.backends.x", 1, true), err.message)
    expect_error("invalid_argument", engine:run("routing", { request = req, [1] = "x" }))
  end },
  { "llmproxy.globals + engine:run_prepared, from tables and from JSON text", function()
    local req = assert(llmproxy.request({ body = { viplevel = 3 } }))
    local g1 = assert(llmproxy.globals({ backends = BACKENDS }))
    local g2 = assert(llmproxy.globals('{"backends": {"ultra": {"url": "http://u"}}}'))
    local res, err = engine:run_prepared("routing", req, g1)
    assert(res == "ultra" and err == nil, tostring(err))
    assert(engine:run_prepared("routing", req, g2) == "ultra")
    local low = assert(llmproxy.request({ body = { viplevel = 1 } }))
    assert(engine:run_prepared("routing", low, g1) == "standard")
    local echo_res = assert(engine:run_prepared("request_transform", req, nil))
    assert(echo_res.body.viplevel == 3)
  end },
  { "run_prepared: nil request or globals, and failures", function()
    local g = assert(llmproxy.globals({ backends = BACKENDS }))
    local req = assert(llmproxy.request({ body = { viplevel = 3 } }))
    expect_error("script_error", engine:run_prepared("routing", nil, g))
    expect_error("bad_output", engine:run_prepared("routing", req, nil))
    local boom = assert(llmproxy.request({ body = { viplevel = "boom" } }))
    expect_error("script_error", engine:run_prepared("routing", boom, g))
    expect_error("invalid_argument", engine:run_prepared("auth", req, g))
    expect_error("invalid_argument", engine:run_prepared(42, req, g))
    expect_error("invalid_argument", engine:run_prepared("routing", g, g))
    expect_error("invalid_argument", engine:run_prepared("routing", req, req))
    expect_error("invalid_argument", engine:run_prepared("routing", { body = {} }, g))
    expect_error("invalid_argument", engine:run_prepared("routing", req, { backends = BACKENDS }))
    assert(engine:run_prepared("routing", req, g) == "ultra")
  end },
  { "llmproxy.globals: wrong arguments are invalid_argument", function()
    expect_error("invalid_argument", llmproxy.globals(42))
    expect_error("invalid_argument", llmproxy.globals("[1]"))
    expect_error("invalid_argument", llmproxy.globals("{oops"))
    expect_error("invalid_argument", llmproxy.globals({ request = { id = "r" } }))
    expect_error("invalid_argument", llmproxy.globals({ backends = { f = print } }))
    expect_error("invalid_argument", llmproxy.globals({ response = { status_code = "x" } }))
    assert(tostring(assert(llmproxy.globals({}))) == "llmproxy.globals")
  end },
  { "req:with adds fields; the body is shared, the original handle unchanged", function()
    local t = assert(llmproxy.new("scripts:\n  request_transform:\n    script: |\n"
      .. "      return {headers = {u = request.backend_url or 'none', m = request.body.model,"
      .. " t = tostring(request.tier)}}\n"))
    local req = assert(llmproxy.request({ id = "r1", body_raw = '{"model": "gpt-4"}' }))
    local routed = assert(req:with({ backend_url = "http://b:1", tier = 2 }))
    assert(tostring(routed) == "llmproxy.request")
    local res = assert(t:run_prepared("request_transform", routed, nil))
    assert(res.headers.u == "http://b:1" and res.headers.m == "gpt-4" and res.headers.t == "2", "routed")
    res = assert(t:run_prepared("request_transform", req, nil))
    assert(res.headers.u == "none" and res.headers.t == "nil", "original unchanged")
    local json_fields = assert(req:with('{"backend_url": "http://c:2"}'))
    assert(t:run_prepared("request_transform", json_fields, nil).headers.u == "http://c:2", "JSON text")
    local rebodied = assert(req:with({ body_raw = '{"model": "llama"}' }))
    assert(t:run_prepared("request_transform", rebodied, nil).headers.m == "llama", "body_raw")
  end },
  { "req:with: wrong arguments are invalid_argument", function()
    local req = assert(llmproxy.request({ id = "r1" }))
    expect_error("invalid_argument", req:with(42))
    expect_error("invalid_argument", req:with("[1]"))
    expect_error("invalid_argument", req:with("{oops"))
    expect_error("invalid_argument", req:with({ body_raw = "{oops" }))
    expect_error("invalid_argument", req:with({ f = print }))
  end },
  { "req:body_get reads one field by JSON pointer", function()
    local req = assert(llmproxy.request({ body_raw = '{"stream": true, "o": {"a": [1, {"b": null}]}, "e": []}' }))
    assert(req:body_get("/stream") == true)
    assert(req:body_get("/o/a/0") == 1 and req:body_get("/o/a/1/b") == llmproxy.null, "0-based indices")
    assert(req:body_get("/missing") == nil and req:body_get("/o/a/9") == nil)
    assert(is_array(req:body_get("/e")) and is_array(req:body_get("/o/a")))
    assert(req:body_get("").stream == true)
    expect_error("invalid_argument", req:body_get("stream"))
    expect_error("invalid_argument", req:body_get(1))
    assert(assert(llmproxy.request({ id = "x" })):body_get("/stream") == nil, "no body")
  end },
  { "req:body_json: the body as sent (key order kept), or with a merge patch", function()
    local text = '{"z":1,"stream":true,"a":[],"o":{},"n":null,"stream_options":{"x":1}}'
    local req = assert(llmproxy.request({ body_raw = text }))
    assert(req:body_json() == text, req:body_json())
    local patched = req:body_json({ stream_options = { include_usage = true }, z = llmproxy.null, new = "v" })
    assert(patched == '{"stream":true,"a":[],"o":{},"n":null,"stream_options":{"x":1,"include_usage":true},'
      .. '"new":"v"}', patched)
    assert(req:body_json({ stream_options = 5 }):find('"stream_options":5', 1, true))
    expect_error("invalid_argument", req:body_json({ f = print }))
  end },
  { "response.body_raw is parsed in Rust, in run and in globals", function()
    local t = assert(llmproxy.new("scripts:\n  response_transform:\n    script: |\n"
      .. "      return {body = {m = response.body.model, s = response.is_stream, e = response.body.e}}\n"))
    local req = assert(llmproxy.request({ id = "r1" }))
    local response = { status_code = 200, headers = {}, is_stream = true, body_raw = '{"model": "x", "e": []}' }
    local res = assert(t:run("response_transform", { request = req, response = response, backend_url = "u",
      latency_ms = 1 }))
    assert(res.body.m == "x" and res.body.s == true and is_array(res.body.e), "run with a handle")
    res = assert(t:run("response_transform", { request = { id = "r" }, response = response, backend_url = "u",
      latency_ms = 1 }))
    assert(res.body.m == "x", "run with a table")
    local g = assert(llmproxy.globals({ response = response, backend_url = "u", latency_ms = 1 }))
    assert(t:run_prepared("response_transform", req, g).body.m == "x", "globals")
    local bad = { status_code = 200, body_raw = "{oops" }
    expect_error("invalid_argument", t:run("response_transform", { request = req, response = bad }))
    expect_error("invalid_argument", llmproxy.globals({ response = bad }))
    expect_error("invalid_argument", llmproxy.globals({ response = { status_code = 200, body = {}, body_raw = "1" } }))
  end },
  { "response.body_raw counts against max_input_bytes", function()
    local t = assert(llmproxy.new("scripts:\n  response_transform:\n    script: return nil\n"
      .. "    max_input_bytes: 1024\n"))
    local req = assert(llmproxy.request({ id = "r1" }))
    local big = '{"x": "' .. string.rep("a", 2000) .. '"}'
    local err = expect_error("invalid_argument", t:run("response_transform", { request = req,
      response = { status_code = 200, body_raw = big } }))
    assert(err.message:find("over the limit", 1, true), err.message)
  end },
  { "opts.body_json: a result's body comes back as JSON text", function()
    local t = assert(llmproxy.new("scripts:\n  request_transform:\n    script: |\n"
      .. "      return {body = {a = json.empty_array, n = json.null}, headers = {X = '1'}}\n"
      .. "  error_handler:\n    script: return {status_code = 418, body = 'teapot'}\n"))
    local req = assert(llmproxy.request({ id = "r1" }))
    local res = assert(t:run_prepared("request_transform", req, nil, { body_json = true }))
    assert(res.body == '{"a":[],"n":null}' and res.headers.X == "1", tostring(res.body))
    res = assert(t:run("request_transform", { request = req }, { body_json = true }))
    assert(res.body == '{"a":[],"n":null}', "run")
    res = assert(t:run_prepared("error_handler", req, assert(llmproxy.globals({ error = { type = "timeout",
      message = "m", status_code = 504 } })), { body_json = true }))
    assert(res.status_code == 418 and res.body == '"teapot"', tostring(res.body))
    assert(type(t:run_prepared("request_transform", req, nil, { body_json = false }).body) == "table")
    expect_error("invalid_argument", t:run_prepared("request_transform", req, nil, { nope = true }))
    expect_error("invalid_argument", t:run_prepared("request_transform", req, nil, 5))
  end },
  { "engine:gateway() and engine:backends() timeouts: the config's settings, defaults filled in", function()
    local e = assert(llmproxy.new("backends:\n  - {name: a, url: 'http://127.0.0.1:1', timeouts: {connect_ms: 7}}\n"
      .. "gateway:\n  max_body_bytes: 1000\n  balancer: least_connections\n"
      .. "  retry: {max_retries: 1, on_status: [502]}\n  timeouts: {idle_ms: 5}\n"))
    local g = e:gateway()
    assert(g.max_body_bytes == 1000 and g.max_response_bytes == 64 * 1024 * 1024, "sizes")
    assert(g.balancer == "least_connections", g.balancer)
    assert(g.retry.max_retries == 1 and is_array(g.retry.on_status) and g.retry.on_status[1] == 502, "retry")
    assert(g.retry.on_connect_error == true and g.retry.on_timeout == true, "retry flags")
    assert(g.timeouts.connect_ms == 2000 and g.timeouts.idle_ms == 5, "timeouts")
    assert(g.health.failures_to_unhealthy == 3 and g.health.probe_path == "/healthz", "health")
    local t = e:backends()[1].timeouts
    assert(t.connect_ms == 7 and t.first_byte_ms == 60000 and t.idle_ms == 5, "backend timeouts")
  end },
  { "engine:gateway().retry.next_upstream: the proxy_next_upstream line of the config's retry policy", function()
    local cases = {
      { "", "error timeout http_500 http_502 http_503 http_504 non_idempotent", true, "" },
      { "{on_status: [429, 502, 429], on_timeout: false}", "error http_429 http_502 non_idempotent", false, "" },
      { "{on_status: [500, 501, 418]}", "error timeout http_500 non_idempotent", false, "418,501" },
      { "{on_status: [], on_connect_error: false, on_timeout: false}", "off", false, "" },
      { "{max_retries: 0}", "off", false, "" },
    }
    for _, c in ipairs(cases) do
      local yaml = c[1] == "" and "gateway: {}\n" or ("gateway:\n  retry: " .. c[1] .. "\n")
      local r = assert(llmproxy.new(yaml)):gateway().retry
      assert(r.next_upstream == c[2], c[1] .. ": " .. r.next_upstream)
      assert(r.next_upstream_is_default == c[3], c[1])
      assert(is_array(r.next_upstream_unsupported) and table.concat(r.next_upstream_unsupported, ",") == c[4], c[1])
    end
    -- The setup nginx users copy carries the default policy's line, and
    -- the error pages that make nginx's own refusals JSON errors.
    local lines = { "proxy_next_upstream " .. cases[1][2] .. ";", "error_page 400 414 /llmproxy/refused;",
      "error_page 494 =431 /llmproxy/refused;" }
    for _, path in ipairs({ "openresty/README.md", "nginx-conf/nginx.conf", "t/lib/Test/LLMProxy/Gateway.pm" }) do
      local f = assert(io.open(path, "rb"))
      local text = f:read("*a")
      f:close()
      for _, line in ipairs(lines) do
        assert(text:find(line, 1, true), path .. " lacks: " .. line)
      end
    end
  end },
  { "engine:on_error(hook): the failure policy, nil when the hook is off", function()
    local e = assert(llmproxy.new("scripts:\n  auth: {script: 'return nil'}\n"
      .. "  routing: {script: 'return nil', on_error: deny}\n  usage: {script: 'return nil'}\n"))
    assert(e:on_error("auth") == "deny", "auth fails closed by default")
    assert(e:on_error("routing") == "deny" and e:on_error("usage") == "standard")
    assert(e:on_error("error_handler") == nil and e:on_error("nope") == nil)
  end },
  { "engine:pool_stats() counts the engine's VMs", function()
    local s = engine:pool_stats()
    assert(s.capacity > 0 and s.alive >= 1 and s.created >= 1 and s.discarded >= 1, "after a timeout")
    assert(type(s.idle) == "number" and type(s.recycled) == "number")
  end },
  { "request handles are garbage-collected; tostring(request)", function()
    for i = 1, 200 do
      local req = assert(llmproxy.request({ id = tostring(i), body_raw = '{"viplevel": 3}' }))
      assert(tostring(req) == "llmproxy.request")
    end
    collectgarbage()
    collectgarbage()
  end },
  { "engine:key, h:auth and h:rate_limit: the config's keys, core's checks, admission decisions", function()
    local sk_h_sha256 = "324c89d5f74d2f012bf8dfbba24159f1f7aef4dbfaf56be28c935a2016704728" -- sha256("sk-h")
    local e = assert(llmproxy.new("keys:\n"
      .. "  - {key: sk-a, user_id: u1, total_quota: 100, allowed_ips: ['10.0.0.0/8']}\n"
      .. "  - {key: sk-off, user_id: u2, status: disabled}\n"
      -- stored as its SHA-256 (docs/adr/039): found by the key, same fingerprint
      .. "  - {key_sha256: " .. sk_h_sha256 .. ", user_id: u3}\n"))
    local hinfo, hfp = e:key("sk-h")
    assert(hinfo and hinfo.user_id == "u3" and hinfo.key == nil, "a hashed key is found")
    assert(hfp == e:key_fingerprint("sk-h"), tostring(hfp))
    assert(e:key(sk_h_sha256) == nil, "the hash itself is not a key")
    local info, fp = e:key("sk-a")
    assert(info.user_id == "u1" and info.total_quota == 100 and info.status == "active", "key_info")
    assert(fp == e:key_fingerprint("sk-a") and fp:match("^sha256:%x+$") and #fp == 19, tostring(fp))
    assert(e:key("sk-nope") == nil and e:key(nil) == nil, "unknown keys")
    -- h:auth: core's standard checks with the key's live usage, and its
    -- refusal (status, code, message, the metric's reason).
    local function auth(eng, key, ip, used)
      local h = assert(eng:handle({ id = "a", path = "/v1/chat/completions", api_key = key, client_ip = ip }, "{}"))
      return h:auth(used)
    end
    assert(auth(e, "sk-a", "10.1.2.3", 99) == nil, "every check passed")
    for _, c in ipairs({
      { "sk-a", "10.1.2.3", 100, 429, "quota_exhausted", "quota_exhausted" },
      { "sk-a", "192.168.0.1", 0, 403, "ip_not_allowed", "ip_not_allowed" },
      { "sk-off", nil, 0, 403, "key_disabled", "disabled", "API key is disabled" },
      { nil, "10.0.0.1", 0, 401, "invalid_api_key", "invalid_key" },
    }) do
      local r = auth(e, c[1], c[2], c[3])
      assert(r.status == c[4] and r.code == c[5] and r.reason == c[6], r.code)
      assert(r.throttles == (c[4] == 401), "only a standard 401 counts in the auth throttle")
      assert(c[7] == nil or r.message == c[7], r.message)
    end
    -- core's keys::identifies_caller: the checks before the quota
    assert(e:caller_identified("sk-a", "10.1.2.3") == true, "a known key")
    assert(e:caller_identified("sk-a", "192.168.0.1") == false, "an address the key may not use")
    assert(e:caller_identified("sk-off", nil) == false and e:caller_identified(nil, nil) == false, "disabled, none")
    assert(e:caller_identified("sk-nope", "10.1.2.3") == false, "unknown")
    local a = e:admission()
    assert(a.auth == true and a.limits == false and a.keys == 3, "admission")
    local unrecorded = assert(e:handle({ id = "r0", path = "/v1/x" }, "", "POST"))
    assert(e:ledger_stats() == nil and unrecorded:ledger({}) == nil, "no ledger configured")
    local z = assert(llmproxy.new("limits: {key_rpm: 5, time_zone: '+08:00'}\n"))
    a = z:admission()
    assert(a.auth == false and a.limits == true and a.key_rpm == 5, "limits")
    -- 2024-01-16T08:00:00Z is 16:00 on a Tuesday in +08:00 (ADR 041).
    -- core's admission::decide_step with the auth script: an allow
    -- overrules only the checks may_override lists (ADR 040); a deny is
    -- final; a script failing under on_error: deny gets the standard
    -- denial when a check failed, else the step is denied (503).
    local scripted = function(policy, may)
      return assert(llmproxy.new("scripts:\n  auth:\n    may_override: [" .. may .. "]\n    on_error: " .. policy
        .. "\n    script: |\n      if request.body.fail then error('boom') end\n"
        .. "      return {allow = request.body.allow, reason = 'r', status_code = 402}\n"
        .. "keys:\n  - {key: sk-off, user_id: u, status: disabled}\n  - {key: sk-on, user_id: v}\n"))
    end
    local function scripted_auth(eng, key, body)
      local h = assert(eng:handle({ id = "s", path = "/v1/chat/completions", api_key = key }, body))
      local r, err = h:auth(0)
      return r, err, h:verdict(), h:fell_back()
    end
    local o = scripted("deny", "disabled")
    assert(scripted_auth(o, "sk-off", '{"allow": true}') == nil, "may_override lets the script allow")
    local r, err, verdict = scripted_auth(o, "sk-on", '{"allow": false}')
    assert(r.status == 402 and r.code == "denied_by_script" and r.message == "r" and err == nil, "a deny is final")
    assert(verdict == "deny", verdict)
    r, err, verdict = scripted_auth(o, nil, '{"allow": true}')
    assert(r.status == 401 and err == nil and verdict == "allow", "unknown is not in may_override")
    r, err, verdict = scripted_auth(o, "sk-off", '{"fail": true}')
    assert(r.status == 403 and err == nil and verdict == "failed", "fails closed with the standard denial")
    r, err = scripted_auth(o, "sk-on", '{"fail": true}')
    assert(r == nil and err.kind == "script_error", "fails closed: 503")
    local fell
    r, err, verdict, fell = scripted_auth(scripted("standard", ""), "sk-on", '{"fail": true}')
    assert(r == nil and err == nil and verdict == "failed" and fell.kind == "script_error", "falls back: admitted")
    -- h:rate_limit: the script sees the limiter's status and the clock in
    -- limits.time_zone; core's policy::rate_stage decides.
    local rl = assert(llmproxy.new("limits: {key_rpm: 5, time_zone: '+08:00'}\nscripts:\n  rate_limit:\n"
      .. "    script: |\n      if rate_limit_status.key_remaining == 7 then return {allow = true} end\n"
      .. "      if key_info == nil and rate_limit_status.global_remaining == 1 then\n"
      .. "        return {allow = false, reason = current_time.hour .. ',' .. current_time.timestamp}\n"
      .. "      end\n      return nil\n"))
    local function limited(...)
      local h = assert(rl:handle({ id = "l", path = "/v1/chat/completions" }, "{}"))
      local out, lerr = h:rate_limit(0, ...)
      return out, lerr, h:verdict()
    end
    assert(limited(10, 3, 0, true) == nil, "standard: admitted")
    local out, _, v = limited(10, 7, 0, false, "key_rpm", 12)
    assert(out == "force" and v == "allow", "the script allowed what a limit refused")
    out, _, v = limited(10, 0, 0, false, "key_rpm", 12)
    assert(out.code == "key_rate_limit" and out.retry_after == 12 and out.refund == false and v == "standard",
      tostring(out.code))
    out, _, v = limited(1, 3, 0, true)
    local hour, ts = out.message:match("^(%d+),(%d+)$")
    assert(tonumber(hour) == math.floor(tonumber(ts) / 3600 + 8) % 24, "current_time in +08:00: " .. out.message)
    assert(out.code == "rate_limited_by_script" and out.refund == true and v == "deny",
      "a deny gives back what was taken")
  end },
  { "a script's log.* and print lines come back third from run/run_prepared, tagged; none: no third value", function()
    local e = assert(llmproxy.new("scripts:\n  routing:\n    script: |\n"
      .. "      log.warn('w', 1)\n      print('p')\n      log.error('e')\n      return nil\n"
      .. "  usage: {script: 'return nil'}\n"))
    local res, err, lines = e:run("routing", routing_input({}))
    assert(res == nil and err == nil and #lines == 3, "three lines")
    local l = lines[1]
    assert(l.level == "warn" and l.message == "w\t1" and l.request_id == "r1" and l.hook == "routing"
      and l.script == "scripts.routing", l.message)
    assert(lines[2].level == "info" and lines[2].message == "p", "print is info")
    assert(lines[3].level == "error" and lines[3].message == "e", "error")
    local req = assert(llmproxy.request({ id = "r9" }))
    res, err, lines = e:run_prepared("routing", req, assert(llmproxy.globals({ backends = BACKENDS })))
    assert(res == nil and err == nil and #lines == 3 and lines[1].request_id == "r9", "run_prepared")
    assert(select("#", e:run("usage", { request = { id = "r" }, usage = {} })) == 2, "a silent script")
  end },
  { "engine:models_body(), llmproxy.healthz_body: the gateway's GET /v1/models and /healthz bodies", function()
    local e = assert(llmproxy.new("backends:\n  - {name: a, url: 'http://a'}\n  - {name: b, url: 'http://b'}\n"))
    assert(e:models_body() == '{"object":"list","data":[{"id":"a","object":"model","created":0,"owned_by":"llmproxy"},'
      .. '{"id":"b","object":"model","created":0,"owned_by":"llmproxy"}]}', e:models_body())
    local m = assert(llmproxy.new("backends:\n  - {name: a, url: 'http://a'}\ngateway: {models: [gpt-4]}\n"))
    assert(m:models_body():find('"data":[{"id":"gpt-4",', 1, true), m:models_body())
    assert(llmproxy.healthz_body == '{"status":"ok"}')
  end },
  { "llmproxy.installed(): a process-wide mark, set once by a host", function()
    local before = llmproxy.installed()
    assert(before == false, "not yet")
    assert(llmproxy.installed(true) == true and llmproxy.installed() == true, "marked")
  end },
  { "engine:ledger_flush(secs): true once the queued rows are committed; nil without a ledger", function()
    assert(engine:ledger_flush(1) == nil, "no ledger")
    local path = os.tmpname()
    os.remove(path)
    local e = assert(llmproxy.new("ledger: {path: " .. path .. ", flush_ms: 100}\n"))
    local h = assert(e:handle({ id = "r1", path = "/v1/chat/completions", user_id = "u1" },
      '{"model":"gpt-4","messages":[]}', "POST"))
    assert(h:ledger({ node = "n", status = 200 }) == true, "queued")
    assert(e:ledger_flush(5) == true, "committed")
    local s = e:ledger_stats()
    assert(s.written == 1 and s.pending == 0, "written " .. tostring(s.written))
    for _, f in ipairs({ path, path .. "-wal", path .. "-shm" }) do
      os.remove(f)
    end
  end },
  { "tostring(engine)", function()
    assert(tostring(engine) == "llmproxy.engine")
  end },
  { "usage(text): the usage object and whether choices has entries, without the rest", function()
    local u, has = llmproxy.usage('{"choices":[{"message":{"content":"hi"}}],"usage":{"total_tokens":5,"x":[]}}')
    assert(u.total_tokens == 5 and is_array(u.x) and has == true, "body")
    u, has = llmproxy.usage('{"choices":[],"usage":{"total_tokens":7}}')
    assert(u.total_tokens == 7 and has == false, "final stream chunk")
    u, has = llmproxy.usage('{"choices":[{}],"usage":null}')
    assert(u == llmproxy.null and has == true, "usage null")
    u, has = llmproxy.usage('{"note":"\\"usage\\" inside a string"}')
    assert(u == nil and has == false, "no usage key")
    for _, bad in ipairs({ "[1]", '{"usage":', "", "nope" }) do
      u, has = llmproxy.usage(bad)
      assert(u == nil and has == false, "not an object: " .. bad)
    end
  end },
  { "a request handle runs the seed's data path over one parse of each body", function()
    local seed = assert(llmproxy.new(table.concat({
      "scripts:",
      "  routing: {script_file: examples/scripts/routing.lua}",
      "  request_transform: {script_file: examples/scripts/request_transform.lua}",
      "  response_transform: {script_file: examples/scripts/response_transform.lua}",
      "  usage: {script_file: examples/scripts/usage.lua}",
    }, "\n")))
    local globals = assert(llmproxy.globals({ backends = {
      standard = { url = "http://s" }, ["high-performance"] = { url = "http://h" }, ultra = { url = "http://u" },
    } }))
    local fields = { id = "r1", path = "/v1/chat/completions", user_id = "user_001" }
    local h = assert(seed:handle(fields, '{"model":"gpt-4","viplevel":3,"messages":[]}'))
    assert(tostring(h) == "llmproxy.handle" and h:api() == "chat_completions")
    local name, err, lines, called, fell_back = h:route(globals)
    assert(name == "ultra" and err == nil and h:called(), tostring(err))
    -- A step also says what h:called() and h:fell_back() would.
    assert(lines == nil and called == true and fell_back == nil)
    -- Hooks outside the data path run on the handle's request (one parse).
    assert(seed:run_prepared("routing", h:request(), globals) == "ultra")
    local up = assert(h:upstream("http://u"))
    assert(up.body:find('"model":"llama-3-70b-instruct"', 1, true) and up.stream == false, up.body)
    assert(up.headers["X-Original-Model"] == "gpt-4" and up.headers["X-User-ID"] == "user_001")
    assert(h:fell_back() == nil)
    local answer = '{"model":"llama-3-70b-instruct","choices":[],'
      .. '"usage":{"prompt_tokens":15,"completion_tokens":42,"total_tokens":57}}'
    local a = assert(h:respond(200, { ["Content-Type"] = "application/json" }, answer, 9.5))
    assert(a.status == 200 and a.body:find('"model":"gpt-4"', 1, true), a.body)
    assert(h:called() and h:answer_parsed())
    local b, _, _, called_usage = h:usage()
    assert(b and called_usage == true)
    assert(b.billable_tokens == 28 and b.limit_tokens == 57 and b.record_json:find('"discount":0.5', 1, true),
      b.record_json)

    -- A stream: the forced usage is asked for, then hidden from the client.
    h = assert(seed:handle(fields, '{"model":"gpt-3.5","stream":true,"viplevel":1}'))
    up = assert(h:upstream("http://h"))
    assert(up.stream and up.body:find('"include_usage":true', 1, true), up.body)
    h:stream(200, { ["Content-Type"] = "text/event-stream" })
    local ev = assert(h:event('{"model":"qwen-72b-chat","choices":[{"delta":{}}],"usage":null}', 1))
    assert(ev.data:find('"model":"gpt-3.5"', 1, true) and not ev.data:find("usage", 1, true), ev.data)
    -- The seed echoes the response's headers: no header changes.
    assert(ev.drop == false and ev.status == 200 and ev.headers == nil)
    ev = assert(h:event('{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":9,"total_tokens":10}}'))
    assert(ev.drop == true and ev.data == nil)
    ev = assert(h:event("[DONE]"))
    assert(ev.drop == false and ev.data == nil and ev.status == nil and ev.headers == nil)
    assert(assert(h:usage()).billable_tokens == 8)
  end },
  { "a request handle applies each hook's failure policy", function()
    for _, policy in ipairs({ "standard", "deny" }) do
      local e = assert(llmproxy.new("scripts:\n  request_transform: {on_error: " .. policy
        .. ", script: \"error('boom')\"}\n"))
      local h = assert(e:handle({ path = "/v1/chat/completions" }, '{"model":"m"}'))
      local up, err, _, called, fell_back = h:upstream("http://b")
      assert(called == true)
      if policy == "standard" then
        assert(up and up.body == nil and err == nil, "the client's body goes")
        assert(h:fell_back().kind == "script_error" and fell_back.kind == "script_error")
      else
        expect_error("script_error", up, err)
        assert(fell_back == nil)
      end
    end
  end },
  { "engine:run_step applies the hook's failure policy, as the handle's steps do", function()
    for _, policy in ipairs({ "standard", "deny" }) do
      local e = assert(llmproxy.new("scripts:\n  error_handler: {on_error: " .. policy .. ", script: \""
        .. "log.info('x'); if error.type == 'boom' then error('boom') end; "
        .. "return {status_code = 418, body = 'teapot'}\"}\n"))
      local req = assert(llmproxy.request({ id = "r" }))
      local function run(kind)
        return e:run_step("error_handler", { request = req, error = { type = kind, message = "m" } })
      end
      local res, denied, lines, fell = run("t")
      assert(res.status_code == 418 and denied == nil and fell == nil and lines[1].message == "x")
      res, denied, lines, fell = run("boom")
      assert(res == nil and lines[1].hook == "error_handler")
      if policy == "standard" then
        assert(denied == nil and fell.kind == "script_error" and fell.hook == "error_handler")
      else
        assert(fell == nil and denied.kind == "script_error")
      end
    end
  end },
  { "a request handle refuses what a host answers 400", function()
    for _, c in ipairs({
      { { path = "/v1/models" }, "{}" },
      { { id = "r" }, "{}" },
      { '{"path":"/v1/embeddings","body":{}}', "{}" },
    }) do
      local h, err = engine:handle(c[1], c[2])
      expect_error("invalid_argument", h, err)
      assert(err.code == nil, "the host's fields, not the client's body")
    end
    -- The client's body: the gateway's 400, named.
    local chat = { path = "/v1/chat/completions" }
    for _, c in ipairs({
      { "{", "invalid_json" },
      { "[1]", "invalid_body" },
      { '{"stream":"yes"}', "invalid_field" },
    }) do
      for _, method in ipairs({ false, "POST" }) do
        local h, err = engine:handle(chat, c[1], method or nil)
        expect_error("invalid_argument", h, err)
        assert(err.status == 400 and err.type == "bad_request" and err.code == c[2], c[2])
      end
    end
  end },
  { "a client's key and request id: core's rules (llmproxy.api_key, request_id)", function()
    for _, c in ipairs({
      { nil, nil, nil }, { nil, " sk-b ", "sk-b" }, { "Bearer sk-a", "sk-b", "sk-a" },
      { "bearer \tsk-a ", nil, "sk-a" }, { "Bearer ", "sk-b", "sk-b" }, { "Basic dXNlcg==", nil, nil },
      { "Bearer \255", nil, nil },
      -- a header sent twice (a table, as ngx.req.get_headers() gives it) presents nothing
      { { "Bearer sk-a", "Bearer sk-c" }, "sk-b", "sk-b" }, { { "Bearer sk-a" }, nil, "sk-a" },
      { nil, { "sk-b", "sk-d" }, nil },
    }) do
      assert(llmproxy.api_key(c[1], c[2]) == c[3], tostring(c[1]) .. " " .. tostring(c[2]))
    end
    assert(llmproxy.request_id("abc-123") == "abc-123" and llmproxy.request_id(("x"):rep(128)) == ("x"):rep(128))
    local seen = {}
    for _, bad in ipairs({ false, "", "has space", ("x"):rep(129), "\255" }) do
      local id = llmproxy.request_id(bad or nil)
      assert(id:match("^req_%x+$") and #id == 28 and not seen[id], id)
      seen[id] = true
    end
  end },
  { "a handle says which answer is a stream: asked for, a success, text/event-stream", function()
    local h = assert(engine:handle({ path = "/v1/chat/completions" }, '{"model":"m","stream":true}'))
    assert(assert(h:upstream("http://b")).stream)
    assert(h:answer_is_stream(200, "Text/Event-Stream; charset=utf-8"))
    assert(not h:answer_is_stream(502, "text/event-stream") and not h:answer_is_stream(200, "application/json"))
    assert(not h:answer_is_stream(200, nil))
    h = assert(engine:handle({ path = "/v1/chat/completions" }, '{"model":"m"}'))
    assert(not assert(h:upstream("http://b")).stream and not h:answer_is_stream(200, "text/event-stream"))
  end },
  { "with a method, every request has a handle; only a POST to an API path is an API call", function()
    local seed = assert(llmproxy.new("scripts:\n"
      .. "  request_transform: {script_file: examples/scripts/request_transform.lua}\n"
      .. "  response_transform: {script_file: examples/scripts/response_transform.lua}\n"))
    for _, c in ipairs({
      { "/v1/models", "{}", "GET" },
      { "/v1/chat/completions", "{ not json", "GET" },
      { "/v1/files", "plain bytes", "POST" },
    }) do
      local h = assert(seed:handle({ path = c[1] }, c[2], c[3]))
      assert(h:api() == nil, c[1])
      local up = assert(h:upstream("http://b"))
      assert(up.body == nil and up.headers == nil and not h:called(), "relayed as is, no transform")
      local a = assert(h:respond(200, nil, '{"model":"m"}', 1))
      assert(a.body == nil and not h:called() and not h:answer_parsed())
    end
    local h = assert(seed:handle({ path = "/v1/files" }, '{"purpose":"x"}', "POST"))
    assert(h:request():body_get("/purpose") == "x", "scripts see a body that happens to be JSON")
    -- An API call whose answer is not JSON: the transform is not called.
    h = assert(seed:handle({ path = "/v1/chat/completions" }, '{"model":"gpt-4"}', "POST"))
    assert(h:api() == "chat_completions")
    local a = assert(h:respond(200, nil, "{not json", 1))
    assert(a.body == nil and not h:called() and not h:answer_parsed())
  end },
}

local passed, failed = 0, 0
for _, t in ipairs(tests) do
  local ok, err = pcall(t[2])
  if ok then
    passed = passed + 1
    print("ok   " .. t[1])
  else
    failed = failed + 1
    print("FAIL " .. t[1] .. ": " .. tostring(err))
  end
end
print(("%d passed, %d failed"):format(passed, failed))
os.exit(failed == 0 and 0 or 1)
