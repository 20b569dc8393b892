--- The shared conformance cases (conformance/cases/*.json) inside nginx,
-- through the code path resty.llmproxy's phases use (`hook.run_input`: a request
-- handle plus the other globals). For t/010-conformance.t.
-- luacheck: std ngx_lua
--
-- Each case: an engine from the case's script and limits, the case's
-- input, the result compared strictly with the expectation (arrays stay
-- arrays, null stays null; the core's bad_input is the hosts'
-- invalid_argument), as examples/lua/conformance.lua does outside nginx.

local llmproxy = require "llmproxy"
local casejson = require "casejson"
local run = require("resty.llmproxy.hook").run_input

local _M = {}

local function kind_of(core_kind)
    return core_kind == "bad_input" and "invalid_argument" or core_kind
end

local function config_for(c)
    local fields = { '"script": ' .. casejson.quote(table.concat(c.script, "\n")) }
    if type(c.limits) == "table" then
        for k, v in pairs(c.limits) do
            fields[#fields + 1] = casejson.quote(k) .. ": " .. tostring(v)
        end
    end
    return '{"scripts": {' .. casejson.quote(c.hook) .. ": {" .. table.concat(fields, ", ") .. "}}}"
end

local function check(c, res, err)
    local want = c.expect
    if want.error then
        if res ~= nil or not err then
            return false, "expected error " .. want.error .. ", got " .. casejson.show(res)
        end
        if err.kind ~= kind_of(want.error) then
            return false, "expected error " .. want.error .. ", got " .. tostring(err)
        end
        return true
    end
    if err then
        return false, "expected result " .. casejson.show(want.result) .. ", got error " .. tostring(err)
    end
    if want.result == llmproxy.null then
        if res ~= nil then
            return false, "expected nil, got " .. casejson.show(res)
        end
        return true
    end
    if not casejson.same(want.result, res) then
        return false, "expected " .. casejson.show(want.result) .. ", got " .. casejson.show(res)
    end
    return true
end

--- Run the case file `path`: true, or false and why.
function _M.run_case(path)
    local ok, c = pcall(casejson.read_file, path)
    if not ok then
        return false, "cannot read case: " .. tostring(c)
    end
    local engine, err = llmproxy.new(config_for(c))
    if not engine then
        return false, "engine: " .. tostring(err)
    end
    local input = c.input
    if type(input) ~= "table" then
        return false, "the case's input is not an object"
    end
    return check(c, run(engine, c.hook, input))
end

--- Run every case under `dir`; print a line per case and a summary.
function _M.run_all(dir)
    local files = {}
    local p = assert(io.popen("ls " .. dir .. "/*.json"))
    for f in p:lines() do
        files[#files + 1] = f
    end
    p:close()
    local passed, failed = 0, 0
    for _, path in ipairs(files) do
        local name = path:match("[^/]*$")
        local ok, why = _M.run_case(path)
        if ok then
            passed = passed + 1
            ngx.say("ok   ", name)
        else
            failed = failed + 1
            ngx.say("FAIL ", name, ": ", why)
        end
    end
    ngx.say(passed, " passed, ", failed, " failed")
end

return _M
