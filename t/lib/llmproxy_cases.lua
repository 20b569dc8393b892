--- Run a file of shared cases (`conformance/*.json`, a `cases` array) through
-- one of the core's host-neutral functions, for Test::Nginx blocks: one
-- `FAIL name: problem` line per failed case, then `N cases, F failed`.
-- luacheck: std ngx_lua
-- @module llmproxy_cases

local casejson = require "casejson"
local llmproxy = require "llmproxy"

local ngx_say = ngx.say

local _M = {}

--- A decoded value with JSON null as nil (what the functions take and give).
-- @param v a value from `casejson`
function _M.value(v)
    if v == llmproxy.null then
        return nil
    end
    return v
end

--- A problem text when `got` is not `want` (deep, both ways), else nil.
-- @tparam string what what is compared
-- @param got the function's value
-- @param want the case's value (null means nil)
function _M.differ(what, got, want)
    want = _M.value(want)
    if got == nil and want == nil or casejson.same(got, want) then
        return nil
    end
    return what .. " " .. casejson.show(got) .. ", want " .. casejson.show(want)
end

--- Check every case of the file at `path`.
-- @tparam string path the JSON file
-- @tparam function check `check(case)`: nil when the case passes, else
--   a problem text
function _M.run(path, check)
    local doc = casejson.read_file(path)
    local failed = 0
    for _, c in ipairs(doc.cases) do
        local problem = check(c)
        if problem then
            failed = failed + 1
            ngx_say("FAIL ", c.name, ": ", problem)
        end
    end
    ngx_say(#doc.cases, " cases, ", failed, " failed")
end

return _M
