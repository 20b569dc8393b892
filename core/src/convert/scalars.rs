//! A flat global of scalars (`standard_checks`, `rate_limit_status`,
//! `current_time`, `metadata`, `error`) as a lazy table's source: its fields are
//! converted when a script reads them, as the request's are.
//!
//! Most scripts read none or one of these fields; building each as a
//! table on every call was a third of an `auth` call that read nothing.

use std::borrow::Cow;

use serde_json::Value;
use smallvec::SmallVec;

use super::fields::{Field, Fields};
use super::{Scalar, MAX_SAFE_INTEGER};

/// One field's value, as a script sees it.
enum Converted {
    Bool(bool),
    /// A number whose double a script gets encodes back as the same JSON
    /// (every integer within 2^53, every finite double): pushed as a plain
    /// number, with no JSON value built and dropped on each call.
    Number(f64),
    /// An integer past 2^53, kept as JSON so that its text survives.
    Exact(Box<Value>),
    /// A string the staging caller keeps alive for the call.
    Text(*const str),
}

/// The fields of a staged [`super::Global::Fields`], copied for the call.
pub(super) struct ScalarFields {
    /// Inline: the hooks' globals have at most five fields.
    fields: SmallVec<[(&'static str, Converted); 5]>,
}

impl ScalarFields {
    /// `fields` as a source, in the order of their names (as a plain
    /// table of them encodes). A number that is not finite is left out, as
    /// JSON makes it null.
    ///
    /// # Safety
    /// The strings of [`Scalar::Str`] outlive the call (the staging
    /// caller's promise): only pointers to them are kept.
    pub(super) unsafe fn new(fields: &[(&'static str, Scalar<'_>)]) -> ScalarFields {
        let mut fields: SmallVec<[(&'static str, Converted); 5]> = fields
            .iter()
            .filter_map(|(name, scalar)| {
                let value = match *scalar {
                    Scalar::Bool(b) => Converted::Bool(b),
                    Scalar::Int(i) if i.unsigned_abs() <= MAX_SAFE_INTEGER as u64 => Converted::Number(i as f64),
                    Scalar::Int(i) => Converted::Exact(Box::new(Value::from(i))),
                    Scalar::Num(f) if f.is_finite() => Converted::Number(f),
                    Scalar::Num(_) => return None,
                    Scalar::Str(s) => Converted::Text(s),
                };
                Some((*name, value))
            })
            .collect();
        // The hooks list them sorted already.
        if !fields.is_sorted_by_key(|(name, _)| *name) {
            fields.sort_unstable_by_key(|(name, _)| *name);
        }
        ScalarFields { fields }
    }

    fn get(&self, name: &str) -> Option<&Converted> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

impl Converted {
    fn field(&self) -> Field<'_> {
        match self {
            Converted::Bool(b) => Field::Bool(*b),
            Converted::Number(n) => Field::Number(*n),
            Converted::Exact(v) => Field::Json(v),
            // SAFETY: `ScalarFields::new`'s contract.
            Converted::Text(s) => Field::Text(unsafe { &**s }),
        }
    }

    fn json(&self) -> Cow<'_, Value> {
        match self {
            Converted::Bool(b) => Cow::Owned(Value::Bool(*b)),
            // As a Lua number encodes: 3.0 is 3 (finite: see `new`).
            Converted::Number(n) => Cow::Owned(super::number(*n).map_or(Value::Null, Value::Number)),
            Converted::Exact(v) => Cow::Borrowed(v),
            // SAFETY: as in `field`.
            Converted::Text(s) => Cow::Owned(Value::String(unsafe { &**s }.to_owned())),
        }
    }
}

impl Fields for ScalarFields {
    fn names(&self) -> Vec<&str> {
        self.fields.iter().map(|(n, _)| *n).collect()
    }

    fn field(&self, name: &str) -> Field<'_> {
        self.get(name).map_or(Field::Nil, Converted::field)
    }

    fn json(&self, name: &str) -> Option<Cow<'_, Value>> {
        self.get(name).map(Converted::json)
    }

    fn each<'a>(&'a self, f: &mut dyn FnMut(&'a str, Field<'a>)) {
        for (name, value) in &self.fields {
            f(name, value.field());
        }
    }
}
