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
//! Inside a parsed body every object is a view of its own: a nested object
//! and each object item of an array (the array itself is a plain table, so
//! that `#` and `ipairs` work). A script that copies a body field by field,
//! as the seed's transforms do, then hands back views of `messages`' items
//! that encode as the client's JSON, with neither side converting them.
//! Host data (not a body) converts its JSON fields whole (ADR 059).
//!
//! The tables are built in Lua (`lazy.lua`), inside the call's one protected
//! call: a hook registers its inputs as sources ([`defer`]), and the VM runs
//! `run(chunk, env, generation, name, slot, ...)`, which sets the lazy
//! globals, runs the script and empties the environment. Sources belong to
//! one call: [`CallData`] (VM app data) holds them, a cache holds the index
//! of its source and the call's generation, and the VM forgets them when
//! the call ends ([`end_call`]). No userdata, no mlua reference and no
//! protected call of its own per table: with those, building the inputs
//! cost as much as the routing script they fed. Fields are read by raw C
//! loaders (ADR 054).

use std::cell::RefCell;
use std::ffi::{c_int, c_void, CStr};
use std::rc::Rc;
use std::sync::Arc;

use mlua::ffi::{self, lua_State};
use mlua::{Function, LightUserData, Lua, Table, Value as LuaValue};
use serde_json::Value;

use super::fields::{self, Field, Fields, PushTo};
use super::scalars::ScalarFields;
use super::{Global, NumberTexts};
use crate::hooks::ResultForm;

mod fast_field;

const LAZY_LUA: &str = include_str!("lazy.lua");

/// The hidden key under which a cache's metatable keeps the index of its
/// source.
const SOURCE_KEY: LightUserData = LightUserData(2 as *mut c_void);
/// The hidden key under which a cache's metatable keeps the generation of
/// its call.
const GENERATION_KEY: LightUserData = LightUserData(3 as *mut c_void);
/// Most lazy globals one call sets (`rate_limit`'s `request`, `key_info`,
/// `rate_limit_status` and `current_time`).
const MAX_DEFERRED: usize = 4;
/// `run`'s arguments after `chunk` and `env` ([`CallData::run_args`]).
pub(crate) const RUN_ARGS: usize = 2 + 2 * MAX_DEFERRED;
/// The globals that can be lazy. `run` gets a global's index in this list,
/// not its name: pushing a string while the call's memory limit is armed
/// costs mlua a protected call.
const LAZY_GLOBALS: [&str; 9] = [
    "request",
    "response",
    "backends",
    "key_info",
    "standard_checks",
    "rate_limit_status",
    "current_time",
    "metadata",
    "error",
];

/// Where a lazy table's fields come from.
#[derive(Clone)]
pub(super) enum Source {
    /// An object in a parsed body shared by every hook of the request: the
    /// body itself or an object inside it (`node` points into `root`).
    Json { root: Arc<Value>, node: *const Value },
    /// Host data borrowed for the current call only (see [`defer`]).
    Borrowed(*const (dyn Fields + 'static)),
    /// A flat global of scalars the host staged ([`CallData::stage`]).
    Scalars(Rc<ScalarFields>),
}

impl Source {
    /// A whole parsed body.
    fn body(root: &Arc<Value>) -> Source {
        Source::Json {
            root: Arc::clone(root),
            node: Arc::as_ptr(root),
        }
    }

    /// `node`, an object inside this source's body, as a source of its
    /// own; `None` for host data (its JSON fields are converted whole).
    fn nested(&self, node: &Value) -> Option<Source> {
        match self {
            Source::Json { root, .. } => Some(Source::Json {
                root: Arc::clone(root),
                node,
            }),
            Source::Borrowed(_) | Source::Scalars(_) => None,
        }
    }

    /// The source of a view over `field` of this source, when the field is
    /// an object that is read lazily: a body, or an object inside this
    /// source's body (host data converts its JSON objects whole).
    fn child(&self, field: &Field<'_>) -> Option<Source> {
        match field {
            Field::Object(object) => Some(Source::body(object)),
            Field::Json(object @ Value::Object(_)) => self.nested(object),
            _ => None,
        }
    }

    /// The JSON object behind the lazy table, when it is one of a parsed
    /// body.
    pub(super) fn json_object(&self) -> Option<&serde_json::Map<String, Value>> {
        match self {
            // SAFETY: as in `fields`.
            Source::Json { node, .. } => unsafe { &**node }.as_object(),
            Source::Borrowed(_) | Source::Scalars(_) => None,
        }
    }

    /// The fields behind the lazy table.
    pub(super) fn fields(&self) -> &dyn Fields {
        match self {
            // SAFETY: `node` points into `root`, which this source keeps
            // alive; a parsed body is never changed behind its `Arc`.
            Source::Json { node, .. } => unsafe { &**node },
            // SAFETY: `defer`'s contract: the data outlives the call, and
            // `CallData::source` hands out sources of the current call only.
            Source::Borrowed(p) => unsafe { &**p },
            Source::Scalars(fields) => &**fields,
        }
    }
}

/// What the conversions of the current call share (VM app data): the
/// sources of its lazy tables and the texts of the numbers it converted.
/// It stays at one address for the VM's life, and the raw loaders get a
/// pointer to it as an argument: looking it up in the app data on every
/// field read cost more than the read.
#[derive(Default)]
pub(crate) struct CallData {
    sources: RefCell<CallSources>,
    /// The texts of the numbers this call converted (see `numbers.rs`).
    pub(super) texts: RefCell<NumberTexts>,
    /// How the call's result is encoded inside the call, and what that
    /// gave (see [`encode_result`]).
    result: RefCell<ResultSlot>,
}

/// How the current call's result is encoded where the script returned it
/// ([`run_args`]), and the outcome ([`take_result`]).
#[derive(Default)]
struct ResultSlot {
    /// The output limits, and the form wanted.
    spec: Option<(super::Limits, ResultForm)>,
    /// The encoded result: the value (without `body` when that is text)
    /// and the body's text.
    out: Option<super::EncodedResult>,
}

/// The sources of the lazy tables of the current call.
#[derive(Default)]
struct CallSources {
    generation: u64,
    sources: Vec<Source>,
    /// Lazy globals registered for the call (index in [`LAZY_GLOBALS`]),
    /// with their source.
    deferred: [Option<(usize, usize)>; MAX_DEFERRED],
    /// Eager globals staged for the call ([`super::stage_globals`]), set
    /// by `push_staged` inside it: each name (which the staging caller
    /// promised outlives the call) with its value.
    staged: Vec<(*const str, Staged)>,
}

/// The value of a staged global.
#[derive(Clone, Copy)]
enum Staged {
    /// A JSON value the staging caller promised outlives the call.
    Json(*const Value),
    /// A string the staging caller promised outlives the call.
    Text(*const str),
    /// A number.
    Number(f64),
}

impl CallSources {
    fn push(&mut self, source: Source) -> usize {
        self.sources.push(source);
        self.sources.len() - 1
    }

    /// Whether `name` may be a lazy global of this call: it is one of
    /// [`LAZY_GLOBALS`] and the call has a free slot.
    fn can_defer(&self, name: &str) -> bool {
        LAZY_GLOBALS.contains(&name) && self.deferred.iter().any(Option::is_none)
    }

    /// Make `source` the lazy global `name` of the call.
    fn defer(&mut self, name: &str, source: Source) -> mlua::Result<()> {
        let name = LAZY_GLOBALS
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| mlua::Error::runtime(format!("llmproxy: '{name}' cannot be a lazy global")))?;
        let slot = self.push(source);
        let free = self
            .deferred
            .iter_mut()
            .find(|d| d.is_none())
            .ok_or_else(|| mlua::Error::runtime("llmproxy: too many lazy globals for one call"))?;
        *free = Some((name, slot));
        Ok(())
    }
}

/// The Lua half of lazy tables, for the VM and the sandbox.
pub(crate) struct LazyLua {
    /// `run(chunk, env, generation, name1, slot1, ..., staged)` (`lazy.lua`).
    pub run: Function,
    /// `materialize(t)`, for the sandbox's `pairs`, `next`, `rawget`, ... .
    pub materialize: Function,
    /// The VM's call data (also its app data, for the hooks' inputs and
    /// the encoders): the VM's own handle, with no app data lookup per call.
    pub data: Rc<CallData>,
}

/// Install lazy tables in a VM: the per-call source list, the Rust
/// callbacks and the Lua half. Takes raw base functions from the globals,
/// so it runs before the sandbox empties them.
pub(crate) fn install(lua: &Lua) -> mlua::Result<LazyLua> {
    let shared = Rc::new(CallData::default());
    lua.set_app_data(Rc::clone(&shared));
    let data = LightUserData(Rc::as_ptr(&shared).cast_mut().cast());
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
        rust.raw_set("encode_result", lua.create_c_function(encode_result)?)?;
        rust.raw_set("push_staged", lua.create_c_function(push_staged)?)?;
    }
    if let Some(clear) = table_clear(lua) {
        rust.raw_set("clear", clear)?;
    }
    rust.raw_set("array_mt", super::markers(lua)?.array_mt.clone())?;
    rust.raw_set("max_globals", crate::vm::MAX_REUSED_GLOBALS)?;
    rust.raw_set("call_data", data)?;
    if crate::sandbox::jit::mode() != crate::sandbox::jit::Mode::Off {
        install_fast_field(lua, &rust)?;
    }
    let module: Table = lua.load(LAZY_LUA).set_name("=llmproxy.lazy").call(rust)?;
    lua.set_app_data(HeadersMt(module.raw_get("headers_mt")?));
    Ok(LazyLua {
        run: module.raw_get("run")?,
        materialize: module.raw_get("materialize")?,
        data: shared,
    })
}

/// LuaJIT's `table.clear`, which `require "table.clear"` would load: its
/// loader is registered in `_PRELOAD` when the table library opens.
/// `None` where the host's LuaJIT lacks it (`lazy.lua` then empties tables
/// with a loop).
fn table_clear(lua: &Lua) -> Option<Function> {
    let preload: Table = lua.named_registry_value("_PRELOAD").ok()?;
    let loader: Function = preload.raw_get("table.clear").ok()?;
    loader.call(()).ok()
}

/// Give `lazy.lua` what it needs to read fields through the FFI
/// ([`fast_field`]): LuaJIT's `ffi` module, opened for it alone (no global,
/// no `require` entry: scripts cannot reach it, nor anything `lazy.lua`
/// keeps in its upvalues), the function's address, its C type and the
/// codes of its `kind`.
fn install_fast_field(lua: &Lua, rust: &Table) -> mlua::Result<()> {
    // SAFETY: `luaopen_ffi` follows the Lua C API (it returns the module).
    let open = unsafe { lua.create_c_function(ffi::luaopen_ffi)? };
    let module: Table = open.call(())?;
    // `luaopen_ffi` also registers itself as a loaded module. The module
    // must stay alive, though: it holds LuaJIT's only reference to the
    // table of C types' metatables, which the JIT compiler reads when it
    // records an FFI call. A registry key of our own keeps it (scripts
    // cannot read the registry).
    let loaded: Table = lua.named_registry_value("_LOADED")?;
    loaded.raw_set("ffi", LuaValue::Nil)?;
    lua.set_named_registry_value("llmproxy.ffi", &module)?;
    rust.raw_set("ffi", module)?;
    let address = fast_field::fast_field as *const () as *mut c_void;
    rust.raw_set("fast_field", LightUserData(address))?;
    rust.raw_set("fast_field_declarations", fast_field::DECLARATIONS)?;
    rust.raw_set("fast_field_type", fast_field::SIGNATURE)?;
    let kinds = lua.create_table()?;
    for (name, code) in [
        ("nil", fast_field::NIL),
        ("number", fast_field::NUMBER),
        ("true", fast_field::TRUE),
        ("false", fast_field::FALSE),
        ("object", fast_field::OBJECT),
        ("other", fast_field::OTHER),
        ("string", fast_field::STRING),
    ] {
        kinds.raw_set(name, code)?;
    }
    rust.raw_set("fast_kinds", kinds)
}

/// The metatable of headers tables (VM app data).
struct HeadersMt(Table);

/// The metatable that makes a headers table's lookups case-insensitive
/// (`None` in a state without lazy tables).
pub(crate) fn headers_metatable(lua: &Lua) -> Option<Table> {
    lua.app_data_ref::<HeadersMt>().map(|m| m.0.clone())
}

/// The current call's shared conversion data (`None` in a state without
/// lazy tables). The VM holds it too ([`LazyLua::data`]) and uses that.
pub(super) fn call_data(lua: &Lua) -> Option<mlua::AppDataRef<'_, Rc<CallData>>> {
    lua.app_data_ref::<Rc<CallData>>()
}

impl CallData {
    /// Start a call: lazy tables built from here on belong to it, and the
    /// number texts of the last call are forgotten.
    pub(crate) fn begin_call(&self) {
        self.end_call();
        self.texts.borrow_mut().clear();
    }

    /// End a call: its sources are dropped, and any lazy table of it that
    /// survived (nothing should) fails loudly instead of reading freed
    /// data.
    pub(crate) fn end_call(&self) {
        let mut s = self.sources.borrow_mut();
        s.sources.clear();
        s.deferred = [None; MAX_DEFERRED];
        s.staged.clear();
        s.generation = s.generation.wrapping_add(1);
    }

    /// `run`'s arguments after `chunk` and `env`: the call's generation
    /// and its lazy globals (1-based index in `LAZY_GLOBALS`, 0 for none)
    /// with their sources. The call will encode a table it returns where
    /// the script returned it, within `limits`, in `form` (see
    /// [`encode_result`]), instead of handing it back to be read in a
    /// protected call of its own; [`CallData::take_result`] has it.
    /// The last argument is 1 when globals were staged for the call
    /// (`run` then calls `push_staged`), else 0.
    pub(crate) fn run_args(&self, limits: super::Limits, form: ResultForm) -> [f64; RUN_ARGS] {
        *self.result.borrow_mut() = ResultSlot {
            spec: Some((limits, form)),
            out: None,
        };
        let s = self.sources.borrow();
        let mut args = [0.0; RUN_ARGS];
        args[0] = s.generation as f64;
        for (i, (name, slot)) in s.deferred.iter().flatten().enumerate() {
            args[1 + 2 * i] = (name + 1) as f64;
            args[2 + 2 * i] = *slot as f64;
        }
        args[RUN_ARGS - 1] = f64::from(u8::from(!s.staged.is_empty()));
        args
    }

    /// Stage `globals` for the current call (see [`super::stage_globals`]):
    /// a JSON value is set as the call starts, a flat table of scalars
    /// becomes a lazy global (a copy of its fields is its source).
    ///
    /// # Safety
    /// As [`super::stage_globals`].
    pub(super) unsafe fn stage(&self, globals: &[(&str, Global<'_>)]) -> mlua::Result<()> {
        let mut s = self.sources.borrow_mut();
        for &(name, value) in globals {
            let staged = match value {
                Global::Json(Value::Null) => None,
                Global::Json(v) => Some(Staged::Json(v)),
                Global::Shared(v) if v.is_null() => None,
                Global::Shared(v) if v.is_object() && s.can_defer(name) => {
                    s.defer(name, Source::body(v))?;
                    None
                }
                Global::Shared(v) => Some(Staged::Json(&**v)),
                Global::Text(t) => Some(Staged::Text(t)),
                Global::Number(n) => Some(Staged::Number(n)),
                Global::Fields(fields) => {
                    // SAFETY: the caller's promise (the strings outlive the
                    // call).
                    let fields = unsafe { ScalarFields::new(fields) };
                    s.defer(name, Source::Scalars(Rc::new(fields)))?;
                    None
                }
            };
            if let Some(staged) = staged {
                s.staged.push((name, staged));
            }
        }
        Ok(())
    }

    /// The result the last call encoded inside it, if it did.
    pub(crate) fn take_result(&self) -> Option<super::EncodedResult> {
        let mut slot = self.result.borrow_mut();
        slot.spec = None;
        slot.out.take()
    }

    /// Source `slot` of the call `generation`; an error for another call's.
    fn source(&self, slot: f64, generation: f64) -> Result<Source, &'static CStr> {
        let s = self.sources.borrow();
        if generation != s.generation as f64 {
            return Err(c"llmproxy: a lazy table outlived its call");
        }
        s.sources
            .get(slot as usize)
            .cloned()
            .ok_or(c"llmproxy: a lazy table lost its source")
    }

    /// Add a source to the current call; its slot.
    fn push(&self, source: Source) -> usize {
        self.sources.borrow_mut().push(source)
    }

    /// Record the numbers a conversion met (see `numbers.rs`).
    pub(super) fn record(&self, found: Vec<(f64, serde_json::Number)>, plain: &[u64]) {
        if found.is_empty() && plain.is_empty() {
            return;
        }
        let mut texts = self.texts.borrow_mut();
        for (f, n) in found {
            texts.record(f, n);
        }
        texts.record_plain(plain);
    }
}

/// Register `fields` as the lazy global `name` of the current call: `run`
/// sets it in the environment as the script starts.
///
/// # Safety
/// `fields` must stay alive and unchanged until the VM's current call ends
/// ([`end_call`]): the view keeps a pointer to it, not a copy.
pub(crate) unsafe fn defer<'a>(lua: &Lua, name: &str, fields: &'a (dyn Fields + 'a)) -> mlua::Result<()> {
    let p: *const (dyn Fields + 'a) = fields;
    // SAFETY: only the lifetime bound of the trait object changes; the
    // caller keeps the data alive for as long as the pointer is reachable.
    let p: *const (dyn Fields + 'static) = unsafe { std::mem::transmute(p) };
    let d = call_data(lua).ok_or_else(|| mlua::Error::runtime("llmproxy: lazy sources missing"))?;
    let mut s = d.sources.borrow_mut();
    s.defer(name, Source::Borrowed(p))
}

/// The cache table of a lazy table, or `None` for any other table.
pub(super) fn cache_of(t: &Table) -> Option<Table> {
    let mt = t.metatable()?;
    let cache: Table = mt.raw_get("__index").ok()?;
    matches!(
        cache.metatable()?.raw_get::<LuaValue>(SOURCE_KEY),
        Ok(LuaValue::Number(_) | LuaValue::Integer(_))
    )
    .then_some(cache)
}

/// With a table's metatable on top of the stack: when it is a lazy
/// table's of the current call, push its cache and return its source;
/// else leave the stack as it was.
///
/// # Safety
/// `state` is live with a table on top and room for three more values.
/// Only raw reads (of a key string Lua already holds, `__index`), so
/// nothing allocates and no metamethod runs.
pub(super) unsafe fn view_source(state: *mut lua_State, data: &CallData) -> Option<Source> {
    // SAFETY: the function's contract.
    unsafe {
        let mt = ffi::lua_gettop(state);
        ffi::lua_pushlstring(state, c"__index".as_ptr(), 7);
        if ffi::lua_rawget(state, mt) != ffi::LUA_TTABLE {
            ffi::lua_settop(state, mt);
            return None;
        }
        // The hidden keys are in the cache's own metatable.
        if ffi::lua_getmetatable(state, mt + 1) == 0 {
            ffi::lua_settop(state, mt);
            return None;
        }
        let number_at = |key: LightUserData| {
            ffi::lua_pushlightuserdata(state, key.0);
            let n = (ffi::lua_rawget(state, mt + 2) == ffi::LUA_TNUMBER).then(|| ffi::lua_tonumber(state, -1));
            ffi::lua_pop(state, 1);
            n
        };
        let source = match (number_at(SOURCE_KEY), number_at(GENERATION_KEY)) {
            (Some(slot), Some(generation)) => data.source(slot, generation).ok(),
            _ => None,
        };
        ffi::lua_pop(state, 1);
        if source.is_none() {
            ffi::lua_settop(state, mt);
        }
        source
    }
}

/// Whether the cache at `cache` holds a field a script read (the cache
/// holds nothing else).
///
/// # Safety
/// `state` is live with a table at `cache`.
pub(super) unsafe fn holds_a_field(state: *mut lua_State, cache: c_int) -> bool {
    // SAFETY: the function's contract; `lua_next` leaves the stack as it
    // was once it returns 0, and the pair it found is popped here.
    unsafe {
        if ffi::lua_checkstack(state, 2) == 0 {
            // Not known: the caller's general path decides field by field.
            return true;
        }
        ffi::lua_pushnil(state);
        if ffi::lua_next(state, cache) != 0 {
            ffi::lua_pop(state, 2);
            return true;
        }
        false
    }
}

/// The source behind `cache`; an error when it is another call's.
fn source_of(lua: &Lua, cache: &Table) -> mlua::Result<Source> {
    let hidden = cache
        .metatable()
        .ok_or_else(|| mlua::Error::runtime("llmproxy: a lazy table without its source"))?;
    let (slot, generation) = (hidden.raw_get(SOURCE_KEY)?, hidden.raw_get(GENERATION_KEY)?);
    call_data(lua)
        .ok_or(c"llmproxy: lazy sources missing")
        .and_then(|d| d.source(slot, generation))
        .map_err(|e| mlua::Error::runtime(e.to_string_lossy()))
}

/// Stack positions of the raw loaders' arguments after their own three.
const ARRAY_MT_ARG: c_int = 4;
const HEADERS_MT_ARG: c_int = 5;
const CALL_DATA_ARG: c_int = 6;
/// Stack position of `encode_result`'s [`CallData`] argument.
const ENCODE_CALL_DATA_ARG: c_int = 4;

/// `load_field(slot, generation, key, array_mt, headers_mt, call_data)`,
/// the loader behind every cache's `__index`: field `key` of source
/// `slot`, converted; or `nil` and the slot of a new source when the field
/// is a JSON object, which `lazy.lua` turns into a lazy table; or an array
/// without its object items, `nil` and `{index, slot, ...}` of those items
/// for `lazy.lua` to put views at.
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
        let Some(data) = call_data_at(state, CALL_DATA_ARG) else {
            return ffi::luaL_error(state, c"llmproxy: lazy sources missing".as_ptr());
        };
        let source = match data.source(ffi::lua_tonumber(state, 1), ffi::lua_tonumber(state, 2)) {
            Ok(source) => source,
            Err(message) => return ffi::luaL_error(state, message.as_ptr()),
        };
        let field = source.fields().field(name);
        if let Some(child) = source.child(&field) {
            ffi::lua_pushnil(state);
            ffi::lua_pushnumber(state, data.push(child) as f64);
            return 2;
        }
        if let Field::Json(Value::Array(items)) = field {
            if let Some(views) = element_views(&source, items, data) {
                push_outside_limit(state, data, |to| push_array(state, items, &views, to));
                ffi::lua_pushnil(state);
                push_pairs(state, &views);
                return 3;
            }
        }
        if field.allocates() {
            push_outside_limit(state, data, |to| fields::push(state, &field, to));
        } else {
            push_numbers(data, |to| fields::push(state, &field, to));
        }
        1
    }
}

/// `load_missing(into, slot, generation, array_mt, headers_mt,
/// call_data)`: load every field of source `slot` that table `into` lacks
/// into it (`materialize` passes the view itself, holding the fields read
/// so far), in one call (a script iterating a body would otherwise cross into
/// Rust once per field). JSON objects come back as `{name, slot, ...}` for
/// `lazy.lua` to wrap (`nil` when there are none), then, when arrays held
/// objects, `{name, index, slot, ...}` for the views to put in them.
///
/// # Safety
/// As [`load_field`].
unsafe extern "C-unwind" fn load_missing(state: *mut lua_State) -> c_int {
    // SAFETY: the function's contract; the table to fill is argument 1.
    unsafe {
        let Some(data) = call_data_at(state, CALL_DATA_ARG) else {
            return ffi::luaL_error(state, c"llmproxy: lazy sources missing".as_ptr());
        };
        let source = match data.source(ffi::lua_tonumber(state, 2), ffi::lua_tonumber(state, 3)) {
            Ok(source) => source,
            Err(message) => return ffi::luaL_error(state, message.as_ptr()),
        };
        let fields = source.fields();
        let mut children = Vec::new();
        // (field name, index in that array, slot) of each array item that
        // becomes a view.
        let mut items_views = Vec::new();
        // A field already in `into` (read before) is kept; when it holds
        // none, nothing needs looking up.
        ffi::luaL_checkstack(state, 2, std::ptr::null());
        ffi::lua_pushnil(state);
        let empty = ffi::lua_next(state, 1) == 0;
        if !empty {
            ffi::lua_pop(state, 2);
        }
        push_outside_limit(state, data, |to| {
            fields.each(&mut |name, field| {
                ffi::luaL_checkstack(state, 3, std::ptr::null());
                // The name is interned once, then copied on the stack.
                fields::push_str(state, name);
                if !empty {
                    ffi::lua_pushvalue(state, -1);
                    if ffi::lua_rawget(state, 1) != ffi::LUA_TNIL {
                        ffi::lua_pop(state, 2);
                        return;
                    }
                    ffi::lua_pop(state, 1);
                }
                if let Some(child) = source.child(&field) {
                    ffi::lua_pop(state, 1);
                    children.push((name, data.push(child)));
                    return;
                }
                match field {
                    Field::Json(Value::Array(items)) => match element_views(&source, items, data) {
                        Some(views) => {
                            push_array(state, items, &views, to);
                            items_views.extend(views.into_iter().map(|(i, slot)| (name, i, slot)));
                        }
                        None => fields::push(state, &field, to),
                    },
                    _ => fields::push(state, &field, to),
                }
                ffi::lua_rawset(state, 1);
            });
        });
        ffi::luaL_checkstack(state, 4, std::ptr::null());
        if children.is_empty() {
            ffi::lua_pushnil(state);
        } else {
            ffi::lua_createtable(state, c_int::try_from(children.len() * 2).unwrap_or(0), 0);
            for (i, (name, slot)) in children.iter().enumerate() {
                fields::push_str(state, name);
                ffi::lua_rawseti(state, -2, (2 * i + 1) as ffi::lua_Integer);
                ffi::lua_pushnumber(state, *slot as f64);
                ffi::lua_rawseti(state, -2, (2 * i + 2) as ffi::lua_Integer);
            }
        }
        if items_views.is_empty() {
            return 1;
        }
        ffi::lua_createtable(state, c_int::try_from(items_views.len() * 3).unwrap_or(0), 0);
        for (i, (name, index, slot)) in items_views.iter().enumerate() {
            let at = (3 * i) as ffi::lua_Integer;
            fields::push_str(state, name);
            ffi::lua_rawseti(state, -2, at + 1);
            ffi::lua_pushnumber(state, *index as f64);
            ffi::lua_rawseti(state, -2, at + 2);
            ffi::lua_pushnumber(state, *slot as f64);
            ffi::lua_rawseti(state, -2, at + 3);
        }
        2
    }
}

/// The objects among `items` (an array field of `source`) as sources of
/// their own, by 1-based index; `None` when there are none, or `source`
/// is host data (the array is then converted whole).
fn element_views(source: &Source, items: &[Value], data: &CallData) -> Option<Vec<(usize, usize)>> {
    if !matches!(source, Source::Json { .. }) || !items.iter().any(Value::is_object) {
        return None;
    }
    let views = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let child = item.is_object().then(|| source.nested(item)).flatten()?;
            Some((i + 1, data.push(child)))
        })
        .collect();
    Some(views)
}

/// Push `items` as a JSON array table, leaving out the items `views` lists
/// (`lazy.lua` puts a view at each).
///
/// # Safety
/// As [`fields::push`].
unsafe fn push_array(state: *mut lua_State, items: &[Value], views: &[(usize, usize)], to: &mut PushTo<'_>) {
    // SAFETY: the caller's contract.
    unsafe {
        ffi::luaL_checkstack(state, 3, std::ptr::null());
        ffi::lua_createtable(state, c_int::try_from(items.len()).unwrap_or(0), 0);
        let mut views = views.iter().map(|v| v.0).peekable();
        for (i, item) in items.iter().enumerate() {
            if views.next_if_eq(&(i + 1)).is_some() {
                continue;
            }
            fields::push(state, &Field::Json(item), to);
            ffi::lua_rawseti(state, -2, (i + 1) as ffi::lua_Integer);
        }
        ffi::lua_pushvalue(state, to.array_mt);
        ffi::lua_setmetatable(state, -2);
    }
}

/// Push `{index1, slot1, index2, slot2, ...}`.
///
/// # Safety
/// `state` is live; an allocation failure raises (nothing owned here).
unsafe fn push_pairs(state: *mut lua_State, pairs: &[(usize, usize)]) {
    // SAFETY: the caller's contract.
    unsafe {
        ffi::luaL_checkstack(state, 2, std::ptr::null());
        ffi::lua_createtable(state, c_int::try_from(pairs.len() * 2).unwrap_or(0), 0);
        for (i, (index, slot)) in pairs.iter().enumerate() {
            ffi::lua_pushnumber(state, *index as f64);
            ffi::lua_rawseti(state, -2, (2 * i + 1) as ffi::lua_Integer);
            ffi::lua_pushnumber(state, *slot as f64);
            ffi::lua_rawseti(state, -2, (2 * i + 2) as ffi::lua_Integer);
        }
    }
}

/// `encode_result(result, array_mt, headers_mt, call_data)`: encode the
/// value a script returned (a table, or a string, number or boolean: a
/// routing decision), as [`CallData::run_args`] asked, into the call's
/// [`CallData`]; `true` when it did (the caller then drops the result),
/// `false` when the result is to be handed back (no encoding asked for, or
/// a part the raw walk leaves to the general encoder).
///
/// # Safety
/// Called by Lua only, as `lazy.lua` does, with a value other than nil as
/// argument 1.
/// Conversion errors are kept, not raised; an allocation failure (the
/// memory limit is armed: the script's own allowance) raises through
/// frames that own at most the values being built, which unwinding drops.
unsafe extern "C-unwind" fn encode_result(state: *mut lua_State) -> c_int {
    // SAFETY: the function's contract; `encode_result_at` wants the result,
    // the array marker and the headers metatable at 1, 2, 3, as here.
    unsafe {
        let Some(data) = call_data_at(state, ENCODE_CALL_DATA_ARG) else {
            return ffi::luaL_error(state, c"llmproxy: lazy sources missing".as_ptr());
        };
        let spec = data.result.borrow().spec;
        let Some((limits, form)) = spec else {
            ffi::lua_pushboolean(state, 0);
            return 1;
        };
        // Only a table has a `body` to take apart, or is written as text.
        let table = ffi::lua_type(state, 1) == ffi::LUA_TTABLE;
        let form = if table { form } else { ResultForm::Value };
        let texts = || {
            let t = data.texts.borrow();
            (!t.is_empty()).then(|| t.settled())
        };
        let out = super::encode_result_at(state, limits, form, texts, data);
        let encoded = out.is_some();
        data.result.borrow_mut().out = out;
        ffi::lua_pushboolean(state, c_int::from(encoded));
        1
    }
}

/// `push_staged(env, array_mt, call_data)`: set the globals staged for
/// the current call ([`super::stage_globals`]) in `env`, with the memory
/// limit lifted as the loaders lift it (the staged values are the hook's
/// input, bounded by its limits, not the script's allocations). Returns
/// the names of the first [`MAX_NAMED_STAGED`] it set, for `lazy.lua` to
/// remove them by name after the call.
///
/// # Safety
/// Called by Lua only, as `lazy.lua`'s `run` does. An allocation failure
/// (a real out-of-memory: the limit is lifted) raises through frames that
/// own at most the number lists, which unwinding drops; the staged lists
/// are only borrowed.
unsafe extern "C-unwind" fn push_staged(state: *mut lua_State) -> c_int {
    // SAFETY: the function's contract: `env` is argument 1 and the array
    // marker argument 2, as `push_global` wants them; staged pointers are
    // alive for the call (`stage`'s contract) and `end_call` clears them.
    unsafe {
        let Some(data) = call_data_at(state, 3) else {
            return ffi::luaL_error(state, c"llmproxy: lazy sources missing".as_ptr());
        };
        let mut named = 0;
        push_outside_limit(state, data, |to| {
            let s = data.sources.borrow();
            for &(name, value) in &s.staged {
                let name = &*name;
                match value {
                    Staged::Json(v) => super::push_global(state, name, &*v, 2, to.texts, to.plain),
                    Staged::Text(t) => set_global(state, name, |state| {
                        let t = &*t;
                        ffi::lua_pushlstring(state, t.as_ptr().cast(), t.len());
                    }),
                    Staged::Number(n) => set_global(state, name, |state| ffi::lua_pushnumber(state, n)),
                }
            }
            if ffi::lua_checkstack(state, MAX_NAMED_STAGED as c_int) == 0 {
                return;
            }
            for &(name, _) in s.staged.iter().take(MAX_NAMED_STAGED) {
                let name = &*name;
                ffi::lua_pushlstring(state, name.as_ptr().cast(), name.len());
                named += 1;
            }
        });
        named
    }
}

/// Most staged globals `push_staged` names (`run` removes any others with
/// the walk it makes for globals a script defined).
const MAX_NAMED_STAGED: usize = 4;

/// Store the value `push` pushes as `name` in the table at stack index 1.
///
/// # Safety
/// As [`super::push_global`].
unsafe fn set_global(state: *mut lua_State, name: &str, push: impl FnOnce(*mut lua_State)) {
    // SAFETY: the function's contract.
    unsafe {
        if ffi::lua_checkstack(state, 2) == 0 {
            ffi::luaL_error(state, c"llmproxy: the Lua stack cannot grow".as_ptr());
        }
        ffi::lua_pushlstring(state, name.as_ptr().cast(), name.len());
        push(state);
        ffi::lua_rawset(state, 1);
    }
}

/// The loaders' [`CallData`] argument.
///
/// # Safety
/// `state` is live; argument `arg` is the light userdata `install` made,
/// which points into the VM's app data for the VM's life.
unsafe fn call_data_at<'a>(state: *mut lua_State, arg: c_int) -> Option<&'a CallData> {
    // SAFETY: the caller's contract; `CallData` is only ever borrowed
    // shared (its parts are `RefCell`s), so a shared reference here aliases
    // nothing mutable.
    unsafe { ffi::lua_touserdata(state, arg).cast::<CallData>().cast_const().as_ref() }
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
        crate::stack::utf8(crate::stack::str_at(state, index)).ok()
    }
}

/// Run `push` with the loaders' metatable arguments, then record the
/// numbers it converted.
fn push_numbers(data: &CallData, push: impl FnOnce(&mut PushTo<'_>)) {
    let mut texts = Vec::new();
    let mut plain = Vec::new();
    push(&mut PushTo {
        array_mt: ARRAY_MT_ARG,
        headers_mt: HEADERS_MT_ARG,
        texts: &mut texts,
        plain: &mut plain,
    });
    data.record(texts, &plain);
}

/// [`push_numbers`] for fields that allocate: with the memory limit
/// lifted, then put back raised by what the push allocated. Lifting it is
/// safe here because what is converted is bounded by the hook's input
/// limits (each field converts once), not by the script; the script's own
/// allowance is unchanged.
///
/// # Safety
/// `state` is the loader's (a state mlua made, so `Lua` is found from it).
unsafe fn push_outside_limit(state: *mut lua_State, data: &CallData, push: impl FnOnce(&mut PushTo<'_>)) {
    // SAFETY: the caller's contract.
    let lua = unsafe { Lua::get_or_init_from_ptr(state) };
    let before = lua.used_memory();
    let limit = lua.set_memory_limit(0).unwrap_or(0);
    push_numbers(data, push);
    if limit != 0 {
        let grown = lua.used_memory().saturating_sub(before);
        let _ = lua.set_memory_limit(limit.saturating_add(grown));
    }
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
            out.push((name.to_owned(), Err(original.into_owned())));
        }
    }
    Ok(out)
}
