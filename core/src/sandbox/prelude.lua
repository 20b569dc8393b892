--- Sandbox prelude: builds the wrapped base functions of a sandbox VM.
-- Runs once per VM, before any script, with the raw functions passed in as
-- arguments; scripts never see this chunk or its upvalues.
-- @module llmproxy.prelude

local raw = ...

local raw_pcall = raw.pcall
local raw_xpcall = raw.xpcall
local raw_next = raw.next
local raw_pairs = raw.pairs
local raw_rawget = raw.rawget
local raw_error = raw.error
local raw_setmetatable = raw.setmetatable
local raw_getmetatable = raw.getmetatable
local raw_collectgarbage = raw.collectgarbage
local poisoned = raw.poisoned
local materialize = raw.materialize
local log_info = raw.log_info

-- proxy -> real table, for every read-only library proxy.
local proxies = raw_setmetatable({}, { __mode = "k" })

local _M = {}

--- Wrap `real` in a read-only proxy.
-- @tparam table real the library table
-- @tparam string name its global name, for the error message
-- @treturn table the proxy
function _M.readonly(real, name)
    local function deny()
        raw_error("attempt to modify read-only table '" .. name .. "'", 2)
    end
    local proxy = raw_setmetatable({}, { __index = real, __newindex = deny, __metatable = false })
    proxies[proxy] = real
    return proxy
end

local function reraise(ok, ...)
    if not ok and poisoned((...)) then
        raw_error((...), 0)
    end
    return ok, ...
end

--- `pcall` that cannot swallow a timeout or a memory error.
function _M.pcall(f, ...)
    return reraise(raw_pcall(f, ...))
end

--- `xpcall` that cannot swallow a timeout or a memory error, even when the
-- handler replaces the error value.
function _M.xpcall(f, handler, ...)
    local first
    local function record(e)
        first = e
        -- A timeout is raised from a hook, and LuaJIT runs the
        -- handler before unwinding, with the hook still marked active: the
        -- hook cannot fire inside the handler. Never run it for a timeout
        -- or a memory error.
        if poisoned(e) then
            return e
        end
        return handler(e)
    end
    local function check(ok, ...)
        if not ok and poisoned(first) then
            raw_error(first, 0)
        end
        return ok, ...
    end
    return check(raw_xpcall(f, record, ...))
end

-- Nesting of C functions that call back into Lua (`tostring`,
-- `string.format`, `table.sort`, `string.gsub`, `print`, `log.*`). LuaJIT
-- bounds Lua recursion but not this C recursion, which would overflow the
-- host thread's stack (2 MB for Rust threads) long before LuaJIT notices.
local MAX_NESTING = raw.max_nesting
local nesting = 0

local function leave(ok, ...)
    nesting = nesting - 1
    if not ok then
        -- Re-raised as a plain error: record a memory error first (the
        -- host cannot tell it from the message afterwards).
        poisoned((...))
        raw_error((...), 0)
    end
    return ...
end

--- Wrap a C function that may call back into Lua so that its nesting is
-- bounded: past `MAX_NESTING` levels it raises "C stack overflow".
-- @tparam function f the function
-- @treturn function the guarded function
function _M.guard(f)
    return function(...)
        if nesting >= MAX_NESTING then
            raw_error("C stack overflow (callbacks nested deeper than " .. MAX_NESTING .. " levels)", 2)
        end
        nesting = nesting + 1
        return leave(raw_pcall(f, ...))
    end
end

--- `pairs` that materialises lazy bodies and iterates read-only libraries
-- without handing out the real table.
function _M.pairs(t)
    local real = proxies[t]
    if real then
        return function(_, k)
            return raw_next(real, k)
        end, t, nil
    end
    materialize(t)
    return raw_pairs(t)
end

--- `next`, with the same view as `pairs`.
function _M.next(t, k)
    local real = proxies[t]
    if real then
        return raw_next(real, k)
    end
    materialize(t)
    return raw_next(t, k)
end

--- `rawget`, with the same view as `pairs`.
function _M.rawget(t, k)
    local real = proxies[t]
    if real then
        return raw_rawget(real, k)
    end
    materialize(t)
    return raw_rawget(t, k)
end

--- `setmetatable`, on the plain table a lazy input turns into first.
-- @tparam table t the table
-- @tparam ?table mt its new metatable
-- @treturn table t
function _M.setmetatable(t, mt)
    materialize(t)
    return raw_setmetatable(t, mt)
end

--- `getmetatable`, with the same view as `setmetatable`: a lazy input
-- has none.
-- @param v any value
-- @return its metatable, or its `__metatable` field
function _M.getmetatable(v)
    materialize(v)
    return raw_getmetatable(v)
end

--- `collectgarbage("count")` only.
function _M.collectgarbage(opt)
    if opt == "count" then
        return raw_collectgarbage("count")
    end
    raw_error("collectgarbage: only \"count\" is allowed in scripts", 2)
end

--- `print` writes to the gateway log at info level.
_M.print = log_info

return _M
