//! Reading Lua values on the raw stack, for conversions that walk tables
//! without mlua references (one protected call per walk instead of a
//! registry reference per value). Shared by the core's conversions and the
//! ffi crate's host-side ones, so both read tables by the same rules.

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

/// What one `lua_next` pass found in a table.
#[derive(Debug, Clone, Copy)]
pub struct TableShape {
    /// The table's border (`#t`, `lua_objlen`).
    pub len: usize,
    /// How many entries it holds.
    pub count: usize,
    /// Whether every key is an integer in `1..=len`.
    pub sequence: bool,
}

impl TableShape {
    /// Whether the table is a JSON array: exactly the keys `1..len`, and
    /// not empty unless `marked` (it carries the array marker).
    pub fn is_array(&self, marked: bool) -> bool {
        self.sequence && self.count == self.len && (self.len > 0 || marked)
    }
}

/// The shape of the table at absolute index `idx`.
///
/// # Safety
/// `state` is live, with a table at the absolute index `idx` and room for
/// two more values on the stack; the stack is left as it was.
pub unsafe fn table_shape(state: *mut lua_State, idx: c_int) -> TableShape {
    let len = ffi::lua_objlen(state, idx);
    let mut count = 0usize;
    let mut sequence = true;
    ffi::lua_pushnil(state);
    while ffi::lua_next(state, idx) != 0 {
        count += 1;
        sequence = sequence && ffi::lua_type(state, -2) == ffi::LUA_TNUMBER && {
            let k = ffi::lua_tonumber(state, -2);
            k.fract() == 0.0 && k >= 1.0 && k <= len as f64
        };
        ffi::lua_pop(state, 1);
    }
    TableShape { len, count, sequence }
}

/// The bytes of the string at `idx`, valid while it stays on the stack.
///
/// # Safety
/// `state` is live with a string (not a number: it would be converted in
/// place) at `idx`.
pub unsafe fn str_at<'s>(state: *mut lua_State, idx: c_int) -> &'s [u8] {
    let mut len = 0usize;
    let p = ffi::lua_tolstring(state, idx, &mut len);
    if p.is_null() {
        return &[];
    }
    std::slice::from_raw_parts(p.cast::<u8>(), len)
}

/// `bytes` as text: what `std::str::from_utf8` gives. The keys and values
/// a script returns are nearly all ASCII, which is checked a word at a
/// time; `from_utf8` walks short strings byte by byte (its cost was 4% of
/// a request through the C ABI, ~40 strings a request).
pub fn utf8(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes)
}

/// The integer a Lua number is, by mlua's rule (`Value::Integer`): integral,
/// within i64, and not -0.0.
pub fn as_integer(n: f64) -> Option<i64> {
    (n.fract() == 0.0 && n >= i64::MIN as f64 && n < i64::MAX as f64 && n.to_bits() != (-0.0f64).to_bits())
        .then_some(n as i64)
}

/// The name of a Lua type, as `type()` gives it.
///
/// # Safety
/// `state` is live; `t` is a type tag `lua_type` returned.
pub unsafe fn type_name(state: *mut lua_State, t: c_int) -> String {
    std::ffi::CStr::from_ptr(ffi::lua_typename(state, t))
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::as_integer;

    #[test]
    fn integers_follow_mlua() {
        let cases: &[(f64, Option<i64>)] = &[
            (0.0, Some(0)),
            (-0.0, None),
            (3.0, Some(3)),
            (-7.0, Some(-7)),
            (1.5, None),
            (9_007_199_254_740_992.0, Some(9_007_199_254_740_992)),
            (9_223_372_036_854_775_808.0, None), // 2^63
            (-9_223_372_036_854_775_808.0, Some(i64::MIN)),
            (f64::NAN, None),
            (f64::INFINITY, None),
        ];
        for (n, want) in cases {
            assert_eq!(as_integer(*n), *want, "{n}");
        }
    }
}
