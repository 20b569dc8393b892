--- Lazy tables: the Lua half of `convert/lazy.rs`.
-- Loaded once per VM with the Rust loaders and a few raw base functions;
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
local lower = rust.lower
local ARRAY_MT = rust.array_mt
local CALL_DATA = rust.call_data
local encode_result = rust.encode_result
local push_staged = rust.push_staged
-- LuaJIT's `table.clear` (which the JIT compiler compiles), where the
-- host's LuaJIT has it.
local clear = rust.clear or function(t)
    for key in next, t do
        rawset(t, key, nil)
    end
end

-- Marks the metatable of a lazy table. Scripts cannot reach it: the
-- sandbox's `getmetatable` materialises a lazy table first, which removes
-- the metatable. (A weak table from lazy table to metatable was the other
-- way; LuaJIT clears weak tables only at the end of a GC cycle, and one
-- entry per input per call grew the heap by ~0.5 KB a call.)
local LAZY = {}

local lazy

-- Metatable of `request.headers` and `response.headers`: a name not found
-- as written is looked up case-insensitively, as `ngx.req.get_headers()`
-- does. Shared by every headers table of the VM, hence protected.
local headers_mt = { __metatable = false }

function headers_mt.__index(headers, name)
    if type(name) ~= "string" then
        return nil
    end
    local wanted = lower(name)
    for key, value in next, headers do
        if type(key) == "string" and lower(key) == wanted then
            return value
        end
    end
    return nil
end

-- Put a view at each index `views` lists ({index, slot, ...}) of `array`:
-- the objects of a JSON array stay lazy too.
local function fill(array, views, generation)
    for i = 1, #views, 2 do
        rawset(array, views[i], lazy(views[i + 1], generation))
    end
end

-- Where the JIT compiler is on: the field read it can compile, a C
-- function called through the FFI (`fast_field.rs`) for numbers, booleans,
-- short strings, absent fields and objects; `load_field` (which ends a
-- compiled trace) reads the rest. `found.kind` says what the call found.
-- The call data goes as a pointer: the compiler cannot pass a light
-- userdata as one.
local fast_field, found, ffi_string, KIND, CALL_DATA_P
if rust.ffi then
    local ffi = rust.ffi
    ffi.cdef(rust.fast_field_declarations)
    fast_field = ffi.cast(rust.fast_field_type, rust.fast_field)
    found = ffi.new("struct llmproxy_found")
    ffi_string = ffi.string
    CALL_DATA_P = ffi.cast("void *", CALL_DATA)
    KIND = rust.fast_kinds
end
local FAST_NIL = KIND and KIND["nil"]
local FAST_NUMBER = KIND and KIND.number
local FAST_STRING = KIND and KIND.string
local FAST_TRUE = KIND and KIND["true"]
local FAST_FALSE = KIND and KIND["false"]
local FAST_OBJECT = KIND and KIND.object

-- A cache's own metatable (one per view, so that emptying the cache keeps
-- it): `__index`, shared by every cache, converts a field not cached yet;
-- the hidden keys `SOURCE` and `GENERATION` say where from.
local function read_field(cache, key)
    if type(key) ~= "string" then
        return nil
    end
    local where = getmetatable(cache)
    local generation = rawget(where, GENERATION)
    local slot = rawget(where, SOURCE)
    if fast_field then
        local x = fast_field(CALL_DATA_P, slot, generation, key, #key, found)
        local kind = found.kind
        local value
        if kind == FAST_NUMBER then
            value = x
        elseif kind == FAST_STRING then
            value = ffi_string(found.text, found.len)
        elseif kind == FAST_OBJECT then
            value = lazy(x, generation)
        elseif kind == FAST_TRUE then
            value = true
        elseif kind == FAST_FALSE then
            value = false
        elseif kind == FAST_NIL then
            return nil
        end
        if value ~= nil then
            rawset(cache, key, value)
            return value
        end
    end
    local value, child, views = load_field(slot, generation, key, ARRAY_MT, headers_mt, CALL_DATA)
    if child then
        value = lazy(child, generation)
    elseif views then
        fill(value, views, generation)
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
    -- The fields read so far, then the others straight into `t` (which
    -- `load_missing` skips where present): each field goes into one
    -- growing table, not into the cache and then into `t`.
    for key, value in next, cache do
        rawset(t, key, value)
    end
    local where = getmetatable(cache)
    local generation = rawget(where, GENERATION)
    local children, views = load_missing(t, rawget(where, SOURCE), generation, ARRAY_MT, headers_mt, CALL_DATA)
    if children then
        for i = 1, #children, 2 do
            rawset(t, children[i], lazy(children[i + 1], generation))
        end
    end
    if views then
        -- {field, index, slot, ...}: the objects of the array fields.
        for i = 1, #views, 3 do
            rawset(rawget(t, views[i]), views[i + 1], lazy(views[i + 2], generation))
        end
    end
end

local function newindex(t, key, value)
    materialize(t)
    rawset(t, key, value)
end

-- A new view over source `slot` of the call `generation`: the (empty)
-- table, its metatable and its cache.
local function fresh(slot, generation)
    local cache = setmetatable({}, { __index = read_field, [SOURCE] = slot, [GENERATION] = generation })
    local mt = { __index = cache, __newindex = newindex, [LAZY] = true }
    return setmetatable({}, mt), mt, cache
end

-- Empty `cache` and point it at source `slot` of the call `generation`.
-- `clear` is LuaJIT's `table.clear`, which the JIT compiler compiles: no
-- loop here, nor anywhere else on a call's path through `run` (a loop on
-- it would keep `run`, and the script with it, from being compiled). The
-- hidden keys live in the cache's metatable, where `clear` leaves their
-- slots: storing them again does not insert keys.
local function rearm(cache, slot, generation)
    clear(cache)
    local where = getmetatable(cache)
    rawset(where, SOURCE, slot)
    rawset(where, GENERATION, generation)
end

-- A view over source `slot` of the call `generation` made from a view
-- (`t`, its metatable `mt` and its cache) a call of this VM handed out:
-- - untouched (its metatable in place, and the table itself empty:
--   `table.insert` writes into it raw, without `__newindex`): the same
--   view, its cache emptied;
-- - materialized (its metatable gone: `materialize` detached it, and
--   nothing else holds it or the cache): a new table with that metatable
--   and cache;
-- - written into raw, or none: a new view.
local function renew(t, mt, cache, slot, generation)
    if t then
        if getmetatable(t) ~= mt then
            rearm(cache, slot, generation)
            return setmetatable({}, mt), mt, cache
        elseif next(t) == nil then
            rearm(cache, slot, generation)
            return t, mt, cache
        end
    end
    return fresh(slot, generation)
end

-- Most views a call hands out that the VM keeps for the next call: a call
-- over a long array of objects makes a view per object, and the VM would
-- keep them all for good.
local MAX_KEPT = 64

-- The views made for JSON objects inside the inputs (`request.body`,
-- `request.body.metadata`, ...), kept for the next call as the globals'
-- views are (see `arm`): `made_*` were handed out by this call (the table,
-- its metatable and its cache), `kept_*` by the last one. The n-th view a
-- call makes is renewed from the last call's n-th (`renew`), which costs
-- emptying its cache instead of four new tables, or one new table where
-- the script materialized it. What a kept cache holds stays alive until
-- the view is re-used or the call after next starts.
local made_t, made_mt, made_cache, made = {}, {}, {}, 0
local kept_t, kept_mt, kept_cache, kept = {}, {}, {}, 0

--- A lazy table over source `slot` of the call `generation`.
-- @tparam number slot the source's index in the call's source list
-- @tparam number generation the call's generation
-- @treturn table the (empty) lazy table
function lazy(slot, generation)
    local n = made + 1
    local t, mt, cache
    if n <= kept then
        t, mt, cache = kept_t[n], kept_mt[n], kept_cache[n]
    end
    t, mt, cache = renew(t, mt, cache, slot, generation)
    if n <= MAX_KEPT then
        made = n
        made_t[n], made_mt[n], made_cache[n] = t, mt, cache
    end
    return t
end

-- At the start of a call, the views the last call made become the ones to
-- re-use; those of the call before are dropped (`clear` empties the lists
-- without a loop).
local function turn_views()
    clear(kept_t)
    clear(kept_mt)
    clear(kept_cache)
    kept_t, made_t = made_t, kept_t
    kept_mt, made_mt = made_mt, kept_mt
    kept_cache, made_cache = made_cache, kept_cache
    kept, made = made, 0
end

-- The views of the lazy globals, kept from one call to the next by index in
-- `NAMES`: the table, its metatable and its cache, renewed for each call
-- (`renew`): an untouched view is re-armed (its cache emptied and pointed
-- at the new source), which saves four tables per global per call; one a
-- script materialized gets a new table. Scripts cannot reach a cache,
-- and cannot keep a view past their call (the environment is emptied), so
-- a re-armed view shows nothing of the previous call. What a cache held
-- stays alive until the next call on this VM.
local shell_t, shell_mt, shell_cache = {}, {}, {}

local function arm(index, slot, generation)
    local t, mt, cache = renew(shell_t[index], shell_mt[index], shell_cache[index], slot, generation)
    shell_t[index], shell_mt[index], shell_cache[index] = t, mt, cache
    return t
end

-- Most globals an environment may hold after a call, beyond the ones the
-- host set, and still be reused (the Rust side's `MAX_REUSED_GLOBALS`).
local MAX_GLOBALS = rust.max_globals

-- Set the lazy global `NAMES[index]` (none for 0) in `env`: its view
-- over source `slot` of the call `generation`.
local function set_view(env, index, slot, generation)
    if index ~= 0 then
        rawset(env, NAMES[index], arm(index, slot, generation))
    end
end

-- Set the call's globals in `env`: the staged ones (their names come
-- back, up to four) and the lazy ones.
local function prepare(env, generation, name1, slot1, name2, slot2, name3, slot3, name4, slot4, staged)
    turn_views()
    local s1, s2, s3, s4
    if staged ~= 0 then
        s1, s2, s3, s4 = push_staged(env, ARRAY_MT, CALL_DATA)
    end
    set_view(env, name1, slot1, generation)
    set_view(env, name2, slot2, generation)
    set_view(env, name3, slot3, generation)
    set_view(env, name4, slot4, generation)
    return s1, s2, s3, s4
end

-- Remove every key of `env` (what a script defined as globals): the rare
-- path, off the compiled one. The number of keys it removed.
local function empty(env)
    local n = 0
    for key in next, env do
        rawset(env, key, nil)
        n = n + 1
    end
    return n
end

-- Remove the global `name` from `env` (nothing for nil).
local function unset(env, name)
    if name then
        rawset(env, name, nil)
    end
end

-- Empty `env` for the next call: the globals `prepare` set by name, then
-- whatever else is left, and put `_G` back.
local function finish(env, name1, name2, name3, name4, s1, s2, s3, s4)
    -- `NAMES[0]` is nil, as are the names `push_staged` did not return.
    unset(env, NAMES[name1])
    unset(env, NAMES[name2])
    unset(env, NAMES[name3])
    unset(env, NAMES[name4])
    unset(env, s1)
    unset(env, s2)
    unset(env, s3)
    unset(env, s4)
    rawset(env, "_G", nil)
    local n = 0
    if next(env) ~= nil then
        n = empty(env)
    end
    rawset(env, "_G", env)
    return n <= MAX_GLOBALS
end

--- Run one call: set the call's globals in `env`, run the chunk, then
-- empty `env` for the next call (keeping `_G`). Nothing on this path
-- loops, so the JIT compiler can compile it with the script it runs; where
-- the script loops (which ends that trace), `prepare` and `finish` are
-- compiled on their own.
-- @tparam function chunk the compiled script (its environment is `env`)
-- @tparam table env the VM's environment
-- @tparam number generation the call's generation
-- @tparam number name1 first lazy global (index in `NAMES`, 0 for none),
-- with its source `slot1`
-- @tparam number name2 second lazy global, with its source `slot2`
-- @tparam number name3 third lazy global, with its source `slot3`
-- @tparam number name4 fourth lazy global, with its source `slot4`
-- @tparam number staged 1 when the host staged eager globals for the call
-- (`push_staged` sets them), else 0
-- @return the chunk's first result (nil when it was encoded here: see
-- `encode_result`), and whether `env` was emptied (false
-- when the call left more than `MAX_GLOBALS` globals: the VM is then
-- discarded, as emptying that table would walk all of it on every later
-- call). When the chunk raises, the VM empties `env` itself.
local function run(chunk, env, generation, name1, slot1, name2, slot2, name3, slot3, name4, slot4, staged)
    local s1, s2, s3, s4 = prepare(env, generation, name1, slot1, name2, slot2, name3, slot3, name4, slot4, staged)
    local result = chunk()
    local reusable = finish(env, name1, name2, name3, name4, s1, s2, s3, s4)
    -- The result is encoded here when the host asked for it (no second
    -- protected call, nor an mlua value, to read it back); then there is
    -- nothing to hand back.
    if result ~= nil and encode_result(result, ARRAY_MT, headers_mt, CALL_DATA) then
        result = nil
    end
    return result, reusable
end

return { materialize = materialize, run = run, headers_mt = headers_mt }
