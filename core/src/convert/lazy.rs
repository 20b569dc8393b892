//! Lazy tables: views of a call's input that convert a field the first time
//! a script reads it.
//!
//! A lazy table is an empty table `t` whose metatable sends reads to a cache
//! table; the cache's own `__index` converts the field from the table's
//! source ([`load_field`]) and keeps it. Writing a new key into `t`,
//! iterating it, `rawget`, `getmetatable` and `setmetatable` first turn `t`
//! into a plain table holding every field (`materialize` in `lazy.lua`,
//! with [`load_missing`]), so
//! scripts see ordinary Lua semantics. Encoding a lazy table re-uses the
//! source's JSON for every field the script did not read.
//!
//! The tables are built in Lua (`lazy.lua`), inside the call's one protected
//! call: a hook registers its inputs as sources ([`defer`]), and the VM runs
//! `run(chunk, env, generation, name, slot, ...)`, which sets the lazy
//! globals and tail-calls the script. Sources belong to one call:
//! [`CallSources`] (VM app data) holds them, a cache holds the index of its
//! source and the call's generation, and the VM forgets them when the call
//! ends ([`end_call`]). No userdata, no mlua reference and no protected call
//! of its own per table: with those, building the inputs cost as much as
//! the routing script they fed.

use std::ffi::{c_int, c_void, CStr};
use std::sync::Arc;

use mlua::ffi::{self, lua_State};
use mlua::{Function, LightUserData, Lua, Table, Value as LuaValue};
use serde_json::Value;

use super::fields::{self, Field, Fields, PushTo};

const LAZY_LUA: &str = include_str!("lazy.lua");

/// The hidden key under which a cache keeps the index of its source.
const SOURCE_KEY: LightUserData = LightUserData(2 as *mut c_void);
/// The hidden key under which a cache keeps the generation of its call.
const GENERATION_KEY: LightUserData = LightUserData(3 as *mut c_void);
/// Most lazy globals one call sets (`request` and `backends` or `response`).
const MAX_DEFERRED: usize = 2;
/// The globals that can be lazy. `run` gets a global's index in this list,
/// not its name: pushing a string while the call's memory limit is armed
/// costs mlua a protected call.
const LAZY_GLOBALS: [&str; 3] = ["request", "response", "backends"];

/// Where a lazy table's fields come from.
#[derive(Clone)]
enum Source {
    /// A parsed body, shared by every hook of the request.
    Json(Arc<Value>),
    /// Host data borrowed for the current call only (see [`defer`]).
    Borrowed(*const (dyn Fields + 'static)),
}

impl Source {
    fn fields(&self) -> &dyn Fields {
        match self {
            Source::Json(v) => &**v,
            // SAFETY: `defer`'s contract: the data outlives the call, and
            // `source_at` hands out sources of the current call only.
            Source::Borrowed(p) => unsafe { &**p },
        }
    }
}

/// The sources of the lazy tables of the current call (VM app data).
#[derive(Default)]
pub(crate) struct CallSources {
    generation: u64,
    sources: Vec<Source>,
    /// Lazy globals registered for the call (index in [`LAZY_GLOBALS`]),
    /// with their source.
    deferred: [Option<(usize, usize)>; MAX_DEFERRED],
}

impl CallSources {
    fn push(&mut self, source: Source) -> usize {
        self.sources.push(source);
        self.sources.len() - 1
    }
}

/// The Lua half of lazy tables, for the VM and the sandbox.
pub(crate) struct LazyLua {
    /// `run(chunk, env, generation, name1, slot1, name2, slot2)`.
    pub run: Function,
    /// `materialize(t)`, for the sandbox's `pairs`, `next`, `rawget`, ... .
    pub materialize: Function,
}

/// Install lazy tables in a VM: the per-call source list, the Rust
/// callbacks and the Lua half. Takes raw base functions from the globals,
/// so it runs before the sandbox empties them.
pub(crate) fn install(lua: &Lua) -> mlua::Result<LazyLua> {
    lua.set_app_data(CallSources::default());
    let g = lua.globals();
    let rust = lua.create_table()?;
    for name in ["rawget", "rawset", "setmetatable", "getmetatable", "type", "next"] {
        rust.raw_set(name, g.raw_get::<LuaValue>(name)?)?;
    }
    rust.raw_set("lower", g.raw_get::<Table>("string")?.raw_get::<LuaValue>("lower")?)?;
    rust.raw_set("names", LAZY_GLOBALS)?;
    rust.raw_set("source_key", SOURCE_KEY)?;
    rust.raw_set("generation_key", GENERATION_KEY)?;
    // SAFETY: both are raw C functions that follow the Lua C API and raise
    // errors only with nothing of their own left to drop (see `load_field`).
    unsafe {
        rust.raw_set("load_field", lua.create_c_function(load_field)?)?;
        rust.raw_set("load_missing", lua.create_c_function(load_missing)?)?;
    }
    rust.raw_set("array_mt", super::markers(lua)?.array_mt.clone())?;
    rust.raw_set("max_globals", crate::vm::MAX_REUSED_GLOBALS)?;
    let module: Table = lua.load(LAZY_LUA).set_name("=llmproxy.lazy").call(rust)?;
    lua.set_app_data(HeadersMt(module.raw_get("headers_mt")?));
    Ok(LazyLua {
        run: module.raw_get("run")?,
        materialize: module.raw_get("materialize")?,
    })
}

/// The metatable of headers tables (VM app data).
struct HeadersMt(Table);

/// The metatable that makes a headers table's lookups case-insensitive
/// (`None` in a state without lazy tables).
pub(crate) fn headers_metatable(lua: &Lua) -> Option<Table> {
    lua.app_data_ref::<HeadersMt>().map(|m| m.0.clone())
}

/// Start a call: lazy tables built from here on belong to it.
pub(crate) fn begin_call(lua: &Lua) {
    end_call(lua);
}

/// End a call: its sources are dropped, and any lazy table of it that
/// survived (nothing should) fails loudly instead of reading freed data.
pub(crate) fn end_call(lua: &Lua) {
    if let Some(mut s) = lua.app_data_mut::<CallSources>() {
        s.sources.clear();
        s.deferred = [None; MAX_DEFERRED];
        s.generation = s.generation.wrapping_add(1);
    }
}

/// Register `fields` as the lazy global `name` of the current call: `run`
/// sets it in the environment as the script starts.
///
/// # Safety
/// `fields` must stay alive and unchanged until the VM's current call ends
/// ([`end_call`]): the view keeps a pointer to it, not a copy.
pub(crate) unsafe fn defer<'a>(lua: &Lua, name: &str, fields: &'a (dyn Fields + 'a)) -> mlua::Result<()> {
    let name = LAZY_GLOBALS
        .iter()
        .position(|n| *n == name)
        .ok_or_else(|| mlua::Error::runtime(format!("llmproxy: '{name}' cannot be a lazy global")))?;
    let p: *const (dyn Fields + 'a) = fields;
    // SAFETY: only the lifetime bound of the trait object changes; the
    // caller keeps the data alive for as long as the pointer is reachable.
    let p: *const (dyn Fields + 'static) = unsafe { std::mem::transmute(p) };
    let mut s = sources_mut(lua)?;
    let slot = s.push(Source::Borrowed(p));
    let free = s
        .deferred
        .iter_mut()
        .find(|d| d.is_none())
        .ok_or_else(|| mlua::Error::runtime("llmproxy: too many lazy globals for one call"))?;
    *free = Some((name, slot));
    Ok(())
}

/// `run`'s arguments after `chunk` and `env`: the call's generation and its
/// lazy globals (1-based index in `LAZY_GLOBALS`, 0 for none) with their
/// sources.
pub(crate) fn run_args(lua: &Lua) -> mlua::Result<[f64; 1 + 2 * MAX_DEFERRED]> {
    let s = lua
        .app_data_ref::<CallSources>()
        .ok_or_else(|| mlua::Error::runtime("llmproxy: lazy sources missing"))?;
    let mut args = [0.0; 1 + 2 * MAX_DEFERRED];
    args[0] = s.generation as f64;
    for (i, (name, slot)) in s.deferred.iter().flatten().enumerate() {
        args[1 + 2 * i] = (name + 1) as f64;
        args[2 + 2 * i] = *slot as f64;
    }
    Ok(args)
}

fn sources_mut(lua: &Lua) -> mlua::Result<mlua::AppDataRefMut<'_, CallSources>> {
    lua.app_data_mut::<CallSources>()
        .ok_or_else(|| mlua::Error::runtime("llmproxy: lazy sources missing"))
}

/// The cache table of a lazy table, or `None` for any other table.
pub(super) fn cache_of(t: &Table) -> Option<Table> {
    let mt = t.metatable()?;
    let cache: Table = mt.raw_get("__index").ok()?;
    matches!(
        cache.raw_get::<LuaValue>(SOURCE_KEY),
        Ok(LuaValue::Number(_) | LuaValue::Integer(_))
    )
    .then_some(cache)
}

/// The source behind `cache`.
fn source_of(lua: &Lua, cache: &Table) -> mlua::Result<Source> {
    source_at(lua, cache.raw_get(SOURCE_KEY)?, cache.raw_get(GENERATION_KEY)?)
}

/// Source `slot` of the call `generation`; an error for another call's.
fn source_at(lua: &Lua, slot: f64, generation: f64) -> mlua::Result<Source> {
    source_in(lua, slot, generation).map_err(|e| mlua::Error::runtime(e.to_string_lossy()))
}

/// [`source_at`], with its error as a static text: the raw loaders raise it
/// with nothing owned on their frames.
fn source_in(lua: &Lua, slot: f64, generation: f64) -> Result<Source, &'static CStr> {
    let s = lua
        .app_data_ref::<CallSources>()
        .ok_or(c"llmproxy: lazy sources missing")?;
    if generation != s.generation as f64 {
        return Err(c"llmproxy: a lazy table outlived its call");
    }
    s.sources
        .get(slot as usize)
        .cloned()
        .ok_or(c"llmproxy: a lazy table lost its source")
}

/// Stack positions of the raw loaders' arguments after their own three.
const ARRAY_MT_ARG: c_int = 4;
const HEADERS_MT_ARG: c_int = 5;

/// `load_field(slot, generation, key, array_mt, headers_mt)`, the loader
/// behind every cache's `__index`: field `key` of source `slot`, converted;
/// or `nil` and the slot of a new source when the field is a JSON object,
/// which `lazy.lua` turns into a lazy table.
///
/// A raw C function, not an mlua callback: the callback's argument
/// conversion, its own protection and the registry references of the
/// values it returned cost several times the conversion.
///
/// # Safety
/// Called by Lua only, as `lazy.lua` does. Errors are raised with a static
/// message after everything this frame owns is dropped; an allocation
/// failure while pushing (the memory limit is lifted, so only a real
/// out-of-memory) unwinds through frames that own at most a `Source` and
/// the number lists, which unwinding drops.
unsafe extern "C-unwind" fn load_field(state: *mut lua_State) -> c_int {
    // SAFETY: the function's contract; `key_at` reads a string argument
    // that stays on the stack below everything pushed here.
    unsafe {
        let Some(name) = key_at(state, 3) else {
            ffi::lua_pushnil(state);
            return 1;
        };
        let lua = Lua::get_or_init_from_ptr(state);
        let source = match source_in(lua, ffi::lua_tonumber(state, 1), ffi::lua_tonumber(state, 2)) {
            Ok(source) => source,
            Err(message) => return ffi::luaL_error(state, message.as_ptr()),
        };
        let field = source.fields().field(name);
        if let Field::Object(object) = field {
            let child = push_source(lua, Source::Json(Arc::clone(object)));
            drop(source);
            return match child {
                Ok(child) => {
                    ffi::lua_pushnil(state);
                    ffi::lua_pushnumber(state, child as f64);
                    2
                }
                Err(message) => ffi::luaL_error(state, message.as_ptr()),
            };
        }
        if field.allocates() {
            push_outside_limit(lua, |to| fields::push(state, &field, to));
        } else {
            push_in_place(lua, state, &field);
        }
        1
    }
}

/// `load_missing(cache, slot, generation, array_mt, headers_mt)`: load
/// every field of source `slot` that `cache` lacks into it, in one call (a
/// script iterating a body would otherwise cross into Rust once per field).
/// JSON objects come back as `{name, slot, ...}` for `lazy.lua` to wrap;
/// `nil` when there are none.
///
/// # Safety
/// As [`load_field`].
unsafe extern "C-unwind" fn load_missing(state: *mut lua_State) -> c_int {
    // SAFETY: the function's contract; the cache is argument 1.
    unsafe {
        let lua = Lua::get_or_init_from_ptr(state);
        let source = match source_in(lua, ffi::lua_tonumber(state, 2), ffi::lua_tonumber(state, 3)) {
            Ok(source) => source,
            Err(message) => return ffi::luaL_error(state, message.as_ptr()),
        };
        let fields = source.fields();
        let mut children = Vec::new();
        push_outside_limit(lua, |to| {
            for name in fields.names() {
                ffi::luaL_checkstack(state, 2, std::ptr::null());
                fields::push_str(state, name);
                if ffi::lua_rawget(state, 1) != ffi::LUA_TNIL {
                    ffi::lua_pop(state, 1);
                    continue;
                }
                ffi::lua_pop(state, 1);
                match fields.field(name) {
                    Field::Object(object) => children.push((name, Arc::clone(object))),
                    field => {
                        fields::push_str(state, name);
                        fields::push(state, &field, to);
                        ffi::lua_rawset(state, 1);
                    }
                }
            }
        });
        if children.is_empty() {
            ffi::lua_pushnil(state);
            return 1;
        }
        let slots: Result<Vec<(&str, usize)>, _> = children
            .into_iter()
            .map(|(name, object)| push_source(lua, Source::Json(object)).map(|slot| (name, slot)))
            .collect();
        let slots = match slots {
            Ok(slots) => slots,
            Err(message) => {
                drop(source);
                return ffi::luaL_error(state, message.as_ptr());
            }
        };
        ffi::lua_createtable(state, c_int::try_from(slots.len() * 2).unwrap_or(0), 0);
        for (i, (name, slot)) in slots.iter().enumerate() {
            fields::push_str(state, name);
            ffi::lua_rawseti(state, -2, (2 * i + 1) as ffi::lua_Integer);
            ffi::lua_pushnumber(state, *slot as f64);
            ffi::lua_rawseti(state, -2, (2 * i + 2) as ffi::lua_Integer);
        }
        1
    }
}

/// The string argument at `index` when it is valid UTF-8.
///
/// # Safety
/// `state` is live; the returned text borrows the argument, which must stay
/// on the stack while the text is used.
unsafe fn key_at<'a>(state: *mut lua_State, index: c_int) -> Option<&'a str> {
    // SAFETY: the caller's contract; `lua_tolstring` is only called on a
    // string, so it converts nothing.
    unsafe {
        if ffi::lua_type(state, index) != ffi::LUA_TSTRING {
            return None;
        }
        let mut len = 0usize;
        let p = ffi::lua_tolstring(state, index, &mut len);
        if p.is_null() {
            return None;
        }
        std::str::from_utf8(std::slice::from_raw_parts(p.cast::<u8>(), len)).ok()
    }
}

/// Add a source to the current call; its slot.
fn push_source(lua: &Lua, source: Source) -> Result<usize, &'static CStr> {
    let mut s = lua
        .app_data_mut::<CallSources>()
        .ok_or(c"llmproxy: lazy sources missing")?;
    Ok(s.push(source))
}

/// Push a field that allocates nothing in the Lua heap, with the memory
/// limit as it is, and record its number.
///
/// # Safety
/// As [`push_outside_limit`].
unsafe fn push_in_place(lua: &Lua, state: *mut lua_State, field: &Field<'_>) {
    let mut texts = Vec::new();
    let mut plain = Vec::new();
    // SAFETY: the caller's contract.
    unsafe {
        fields::push(
            state,
            field,
            &mut PushTo {
                array_mt: ARRAY_MT_ARG,
                headers_mt: HEADERS_MT_ARG,
                texts: &mut texts,
                plain: &mut plain,
            },
        );
    }
    super::record_texts(lua, texts, &plain);
}

/// Run `push` with the memory limit lifted (see [`outside_limit`]) and the
/// loaders' metatable arguments, then record the numbers it converted.
///
/// # Safety
/// `push` pushes on a stack whose arguments 4 and 5 are the array marker
/// and the headers metatable.
unsafe fn push_outside_limit(lua: &Lua, push: impl FnOnce(&mut PushTo<'_>)) {
    let mut texts = Vec::new();
    let mut plain = Vec::new();
    let _ = outside_limit(lua, || {
        push(&mut PushTo {
            array_mt: ARRAY_MT_ARG,
            headers_mt: HEADERS_MT_ARG,
            texts: &mut texts,
            plain: &mut plain,
        });
        Ok(())
    });
    super::record_texts(lua, texts, &plain);
}

/// The fields of a lazy table for the encoder: each name with the Lua value
/// a script read (`Ok`), or the source's JSON when none did (`Err`).
pub(super) fn encoding_fields(lua: &Lua, cache: &Table) -> mlua::Result<Vec<(String, Result<LuaValue, Value>)>> {
    let source = source_of(lua, cache)?;
    let fields = source.fields();
    let mut out = Vec::new();
    for name in fields.names() {
        let cached: LuaValue = cache.raw_get(name)?;
        if !cached.is_nil() {
            out.push((name.to_owned(), Ok(cached)));
        } else if let Some(original) = fields.json(name) {
            out.push((name.to_owned(), Err(original)));
        }
    }
    Ok(out)
}

/// Run a conversion of input data with the memory limit lifted, then put
/// the limit back, raised by what the conversion allocated. While a limit is
/// set mlua protects every API call, which made lazy conversion ~4x slower;
/// lifting it is safe here because what is converted is bounded by the
/// hook's input limits (each field converts once), not by the script. The
/// script's own allowance is unchanged.
fn outside_limit<R>(lua: &Lua, convert: impl FnOnce() -> mlua::Result<R>) -> mlua::Result<R> {
    let before = lua.used_memory();
    let limit = lua.set_memory_limit(0)?;
    let result = convert();
    if limit != 0 {
        let grown = lua.used_memory().saturating_sub(before);
        lua.set_memory_limit(limit.saturating_add(grown))?;
    }
    result
}
