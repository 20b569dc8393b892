//! A hook's input as named fields, and one field put on a Lua stack with
//! raw API calls.
//!
//! Lazy tables ([`super::lazy`]) read their fields through [`Fields`]. A
//! field is described as data ([`Field`]) and pushed by [`push`], straight
//! onto the stack of the Lua function that asked for it: no mlua handle, no
//! registry reference, no protected call of its own (converting through
//! mlua values cost more than the routing script that read the field).

use std::borrow::Cow;
use std::ffi::c_int;
use std::sync::Arc;

use mlua::ffi::{self, lua_State};
use serde_json::{Number, Value};

/// Data a lazy table reads field by field.
pub(crate) trait Fields {
    /// Every field that is present, in the order encoding writes them.
    fn names(&self) -> Vec<&str>;
    /// Field `name` ([`Field::Nil`] when absent).
    fn field(&self, name: &str) -> Field<'_>;
    /// The JSON of field `name`, for encoding a field no script read
    /// (borrowed where the data holds it as JSON).
    fn json(&self, name: &str) -> Option<Cow<'_, Value>>;
    /// Every field that is present with its value, in [`Fields::names`]'
    /// order (what a loader that wants them all walks).
    fn each<'a>(&'a self, f: &mut dyn FnMut(&'a str, Field<'a>)) {
        for name in self.names() {
            f(name, self.field(name));
        }
    }
}

/// A JSON object's top-level fields, in their original order.
impl Fields for Value {
    fn names(&self) -> Vec<&str> {
        self.as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    fn field(&self, name: &str) -> Field<'_> {
        crate::small_object::get(self, name).map_or(Field::Nil, Field::Json)
    }

    fn json(&self, name: &str) -> Option<Cow<'_, Value>> {
        crate::small_object::get(self, name).map(Cow::Borrowed)
    }

    fn each<'a>(&'a self, f: &mut dyn FnMut(&'a str, Field<'a>)) {
        // The object's own order, without a list of names nor a lookup of
        // each one.
        for (name, value) in self.as_object().into_iter().flatten() {
            f(name, Field::Json(value));
        }
    }
}

/// One field of a [`Fields`], as the script will see it.
pub(crate) enum Field<'a> {
    /// Absent.
    Nil,
    /// A boolean.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A string.
    Text(&'a str),
    /// JSON converted eagerly (an object becomes a plain table).
    Json(&'a Value),
    /// A JSON object, seen as a lazy table of its own.
    Object(&'a Arc<Value>),
    /// A headers table (its lookups ignore case).
    Headers(&'a [(String, String)]),
    /// A table the host builds itself.
    Table(&'a dyn PushTable),
}

impl<'a> Field<'a> {
    /// `value` as a lazy table when it is an object, converted otherwise.
    pub fn json(value: &'a Arc<Value>) -> Field<'a> {
        if value.is_object() {
            Field::Object(value)
        } else {
            Field::Json(value)
        }
    }
}

impl Field<'_> {
    /// Whether pushing the field allocates in the Lua heap (numbers,
    /// booleans and `nil` are stored in the stack slot itself).
    pub fn allocates(&self) -> bool {
        match self {
            Field::Nil | Field::Bool(_) | Field::Number(_) | Field::Object(_) => false,
            Field::Json(v) => matches!(v, Value::String(_) | Value::Array(_) | Value::Object(_)),
            Field::Text(_) | Field::Headers(_) | Field::Table(_) => true,
        }
    }
}

/// A value a host puts on the stack as a table of its own making.
pub(crate) trait PushTable {
    /// Push the table.
    ///
    /// # Safety
    /// `state` is live and has room for three values; an allocation failure
    /// raises a Lua error through the caller, so the implementation owns
    /// nothing that needs dropping while it pushes.
    unsafe fn push(&self, state: *mut lua_State);
}

/// Where [`push`] finds the metatables a field may need (absolute stack
/// indices) and records the numbers it converts (see `numbers.rs`).
pub(crate) struct PushTo<'a> {
    /// The array marker (`Markers::array_mt`).
    pub array_mt: c_int,
    /// The headers metatable (`lazy.lua`'s `headers_mt`).
    pub headers_mt: c_int,
    /// Numbers a double changes, with their original text.
    pub texts: &'a mut Vec<(f64, Number)>,
    /// The doubles of the other numbers.
    pub plain: &'a mut Vec<u64>,
}

/// Push `field` on the stack of `state`. [`Field::Object`] is the caller's
/// to wrap as a lazy table: it pushes `nil` here.
///
/// # Safety
/// `state` is live, with `to.array_mt` and `to.headers_mt` valid absolute
/// indices. An allocation failure raises a Lua error: nothing on this
/// frame, nor on the caller's above its last Lua call, may need dropping
/// beyond what unwinding drops.
pub(crate) unsafe fn push(state: *mut lua_State, field: &Field<'_>, to: &mut PushTo<'_>) {
    // SAFETY: the caller's contract; `luaL_checkstack` raises (nothing owned
    // here) when the stack cannot grow.
    unsafe {
        ffi::luaL_checkstack(state, 3, std::ptr::null());
        match field {
            Field::Nil | Field::Object(_) => ffi::lua_pushnil(state),
            Field::Bool(b) => ffi::lua_pushboolean(state, c_int::from(*b)),
            Field::Number(n) => ffi::lua_pushnumber(state, *n),
            Field::Text(s) => push_str(state, s),
            Field::Json(v) => super::push_json(state, v, to.array_mt, to.texts, to.plain),
            Field::Headers(headers) => {
                ffi::lua_createtable(state, 0, c_int::try_from(headers.len()).unwrap_or(0));
                for (k, v) in *headers {
                    push_str(state, k);
                    push_str(state, v);
                    ffi::lua_rawset(state, -3);
                }
                ffi::lua_pushvalue(state, to.headers_mt);
                ffi::lua_setmetatable(state, -2);
            }
            Field::Table(t) => t.push(state),
        }
    }
}

/// Push `s`.
///
/// # Safety
/// `state` is live, with room for one value.
pub(crate) unsafe fn push_str(state: *mut lua_State, s: &str) {
    // SAFETY: the caller's contract.
    unsafe {
        ffi::lua_pushlstring(state, s.as_ptr().cast(), s.len());
    }
}
