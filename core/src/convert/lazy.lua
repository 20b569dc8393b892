--- Lazy tables: the Lua half of `convert/lazy.rs`.
-- Loaded once per VM with the Rust callbacks and a few raw base functions;
-- scripts never see this chunk or its upvalues.
-- @module llmproxy.lazy

local rust = ...

local load_field = rust.load_field
local NAMES = rust.names
local load_missing = rust.load_missing
local SOURCE = rust.source_key
local GENERATION = rust.generation_key
local rawget = rust.rawget
local rawset = rust.rawset
local setmetatable = rust.setmetatable
local getmetatable = rust.getmetatable
local type = rust.type
local next = rust.next

-- Marks the metatable of a lazy table. Scripts cannot reach it: the
-- sandbox's `getmetatable` materialises a lazy table first, which removes
-- the metatable. (A weak table from lazy table to metatable was the other
-- way; LuaJIT clears weak tables only at the end of a GC cycle, and one
-- entry per input per call grew the heap by ~0.5 KB a call.)
local LAZY = {}

local lazy

-- Metatable of every cache: a read of a field not cached yet converts it.
local cache_mt = {}

function cache_mt.__index(cache, key)
    if type(key) ~= "string" then
        return nil
    end
    local generation = rawget(cache, GENERATION)
    local value, child = load_field(rawget(cache, SOURCE), generation, key)
    if child then
        value = lazy(child, generation)
    end
    if value ~= nil then
        rawset(cache, key, value)
    end
    return value
end

--- Turn a lazy table into a plain table holding every field; no-op for
-- any other value.
-- @param t any value
local function materialize(t)
    local mt = getmetatable(t)
    if type(mt) ~= "table" or not rawget(mt, LAZY) then
        return
    end
    local cache = rawget(mt, "__index")
    setmetatable(t, nil)
    local generation = rawget(cache, GENERATION)
    local children = load_missing(cache, rawget(cache, SOURCE), generation)
    if children then
        for i = 1, #children, 2 do
            rawset(cache, children[i], lazy(children[i + 1], generation))
        end
    end
    for key, value in next, cache do
        if type(key) == "string" then
            rawset(t, key, value)
        end
    end
end

local function newindex(t, key, value)
    materialize(t)
    rawset(t, key, value)
end

--- A lazy table over source `slot` of the call `generation`.
-- @tparam number slot the source's index in the call's source list
-- @tparam number generation the call's generation
-- @treturn table the (empty) lazy table
function lazy(slot, generation)
    local cache = setmetatable({ [SOURCE] = slot, [GENERATION] = generation }, cache_mt)
    return setmetatable({}, { __index = cache, __newindex = newindex, [LAZY] = true })
end

--- Run one call: set the call's lazy globals in `env`, then the chunk.
-- @tparam function chunk the compiled script (its environment is `env`)
-- @tparam table env the VM's environment
-- @tparam number generation the call's generation
-- @tparam number name1 first lazy global (index in `NAMES`, 0 for none),
-- with its source `slot1`
-- @tparam number name2 second lazy global, with its source `slot2`
-- @return what the chunk returns
local function run(chunk, env, generation, name1, slot1, name2, slot2)
    if name1 ~= 0 then
        rawset(env, NAMES[name1], lazy(slot1, generation))
    end
    if name2 ~= 0 then
        rawset(env, NAMES[name2], lazy(slot2, generation))
    end
    return chunk()
end

return { materialize = materialize, run = run }
