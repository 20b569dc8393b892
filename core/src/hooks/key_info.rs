//! `key_info`: the key record the admission hooks (`auth`, `rate_limit`)
//! see, with the key's live usage.

use std::borrow::Cow;

use mlua::Lua;
use serde_json::Value;

use crate::convert::{self, Field, Fields};

/// The name of the field a live count replaces.
const USED_QUOTA: &str = "used_quota";

/// The `key_info` global of `auth` and `rate_limit`: a key's record as JSON
/// (built once per key: [`crate::keys::KeyRecord::key_info`]) and, when the
/// host counts the key's usage, that live count as `used_quota`.
///
/// The record is borrowed, and the count read in its place when a script
/// asks for it: a host passes the same record on every request, without
/// copying it to set one number. `null` is no key (`key_info == nil`).
#[derive(Debug, Clone)]
pub struct KeyInfo<'a> {
    record: &'a Value,
    /// `used_quota` as the host counts it (a number), when it does.
    used_quota: Option<Value>,
}

/// No key.
static NONE: Value = Value::Null;

impl<'a> KeyInfo<'a> {
    /// No key (an unknown one): scripts see `key_info == nil`.
    pub fn none() -> KeyInfo<'static> {
        KeyInfo {
            record: &NONE,
            used_quota: None,
        }
    }

    /// `record` as it is (`null`: no key).
    pub fn json(record: &'a Value) -> KeyInfo<'a> {
        KeyInfo {
            record,
            used_quota: None,
        }
    }

    /// `record` (a JSON object) with `used_quota` = `used`, the key's live
    /// count, whatever the record says.
    pub fn live(record: &'a Value, used: u64) -> KeyInfo<'a> {
        KeyInfo {
            record,
            used_quota: Some(Value::from(used)),
        }
    }

    /// The value scripts see, as JSON (for hosts that hand it on).
    pub fn to_json(&self) -> Value {
        let mut v = self.record.clone();
        if let (Value::Object(m), Some(used)) = (&mut v, &self.used_quota) {
            m.insert(USED_QUOTA.into(), used.clone());
        }
        v
    }

    /// Register the record as the lazy global `key_info` when it is an
    /// object; returns what is left to set eagerly: `null` (nothing) then,
    /// else the record itself.
    ///
    /// # Safety
    /// `self` stays alive and unchanged until the VM's current call ends
    /// (as for [`convert::defer`]).
    pub(crate) unsafe fn defer(&self, lua: &Lua) -> mlua::Result<&'a Value> {
        if !self.record.is_object() {
            return Ok(self.record);
        }
        // SAFETY: the caller's promise.
        unsafe { convert::defer(lua, "key_info", self)? };
        Ok(&NONE)
    }

    /// The live count, when field `name` is the one it sets (a record is
    /// an object; `null` is no key and has no fields).
    fn live_field(&self, name: &str) -> Option<&Value> {
        self.used_quota
            .as_ref()
            .filter(|_| name == USED_QUOTA && self.record.is_object())
    }

    /// Whether the live count is a field the record lacks.
    fn adds_used_quota(&self) -> bool {
        self.live_field(USED_QUOTA).is_some() && self.record.get(USED_QUOTA).is_none()
    }
}

/// The record's fields, `used_quota` read from the live count.
impl Fields for KeyInfo<'_> {
    fn names(&self) -> Vec<&str> {
        let mut names = self.record.names();
        if self.adds_used_quota() {
            names.push(USED_QUOTA);
        }
        names
    }

    fn field(&self, name: &str) -> Field<'_> {
        match self.live_field(name) {
            Some(v) => Field::Json(v),
            None => self.record.field(name),
        }
    }

    fn json(&self, name: &str) -> Option<Cow<'_, Value>> {
        match self.live_field(name) {
            Some(v) => Some(Cow::Borrowed(v)),
            None => Fields::json(self.record, name),
        }
    }

    fn each<'b>(&'b self, f: &mut dyn FnMut(&'b str, Field<'b>)) {
        self.record.each(&mut |name, field| match self.live_field(name) {
            Some(v) => f(name, Field::Json(v)),
            None => f(name, field),
        });
        if let (true, Some(v)) = (self.adds_used_quota(), &self.used_quota) {
            f(USED_QUOTA, Field::Json(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_live_count_replaces_the_records_or_adds_one() {
        let with = json!({"key": "sk-1", "used_quota": 5, "total_quota": 100});
        let without = json!({"key": "sk-1", "total_quota": 100});
        for (record, used, want) in [
            (
                &with,
                Some(7),
                json!({"key": "sk-1", "used_quota": 7, "total_quota": 100}),
            ),
            (&with, None, with.clone()),
            (
                &without,
                Some(7),
                json!({"key": "sk-1", "total_quota": 100, "used_quota": 7}),
            ),
            (&Value::Null, Some(7), Value::Null),
        ] {
            let info = match used {
                Some(u) => KeyInfo::live(record, u),
                None => KeyInfo::json(record),
            };
            assert_eq!(info.to_json(), want);
            let names: Vec<&str> = want
                .as_object()
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            assert_eq!(info.names(), names, "{record}");
            let mut seen = Vec::new();
            info.each(&mut |name, field| {
                let Field::Json(v) = field else {
                    panic!("{name}: not JSON")
                };
                seen.push((name.to_owned(), v.clone()));
            });
            let want_each: Vec<(String, Value)> = want
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            assert_eq!(seen, want_each);
            for (name, v) in &want_each {
                assert_eq!(Fields::json(&info, name).as_deref(), Some(v), "{name}");
            }
        }
    }
}
