//! JSON text to a [`Value`], strictly and within bounds.
//!
//! One pass over the text builds the tree and enforces what every host needs:
//!
//! - **Duplicate keys are refused.** With `{"a":1,"a":2}` a script would see
//!   one value while the upstream, which gets the original bytes, may see the
//!   other; refusing the body is the only answer that is the same for both.
//! - **Depth** is checked on the way down, before a deeper level is built.
//! - **Memory**: every node is charged an estimate of what it costs in Rust
//!   and, converted, in Lua; past the budget the parse stops. `json.decode`
//!   sets the budget to the script's memory allowance, so `[[],[],…]` cannot
//!   build hundreds of megabytes outside the Lua heap.
//! - **Time**: an optional interrupt (the call's deadline) is polled every
//!   [`INTERRUPT_EVERY`] nodes, so a big decode stops at the time limit.
//! - **Numbers keep their text** (serde_json's `arbitrary_precision`): an
//!   integer above 2^64 or `-0` round-trips byte for byte when no script
//!   changes it.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};
use smallvec::SmallVec;

/// Nodes between two polls of the interrupt.
pub const INTERRUPT_EVERY: u32 = 4096;

/// Estimated bytes one node costs (a `Value`, its slot in the parent, and
/// the Lua value it becomes).
const NODE_COST: usize = 64;

/// The key serde_json uses to hand a number's text to a visitor
/// (`arbitrary_precision`): a one-entry map `{TOKEN: "text"}`.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Why a parse stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The text is not JSON, has a duplicate key, or nests too deep.
    Invalid(String),
    /// The tree would cost more than the memory budget.
    Memory(String),
    /// The interrupt asked to stop (its message).
    Interrupted(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Invalid(m) | ParseError::Memory(m) | ParseError::Interrupted(m) => f.write_str(m),
        }
    }
}

/// Bounds of one parse.
pub struct Bounds<'a> {
    /// Maximum nesting of arrays/objects (the top level is depth 1).
    pub max_depth: usize,
    /// Estimated bytes the tree may cost.
    pub max_memory: usize,
    /// Polled every [`INTERRUPT_EVERY`] nodes; an `Err` stops the parse.
    pub interrupt: Option<&'a dyn Fn() -> Result<(), String>>,
}

struct State<'a> {
    max_depth: usize,
    remaining: Cell<usize>,
    max_memory: usize,
    nodes: Cell<u32>,
    interrupt: Option<&'a dyn Fn() -> Result<(), String>>,
    /// The first bound that stopped the parse (serde's error type cannot
    /// carry it).
    stop: Cell<Option<Stop>>,
    /// The interrupt's own message.
    interrupted: Cell<Option<String>>,
}

#[derive(Clone, Copy)]
enum Stop {
    Memory,
    Interrupted,
    Duplicate,
    Depth,
}

impl State<'_> {
    fn charge<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        let Some(left) = self.remaining.get().checked_sub(bytes) else {
            self.stop.set(Some(Stop::Memory));
            return Err(E::custom("memory budget exceeded"));
        };
        self.remaining.set(left);
        let n = self.nodes.get().wrapping_add(1);
        self.nodes.set(n);
        if n.is_multiple_of(INTERRUPT_EVERY) {
            if let Some(check) = self.interrupt {
                if let Err(m) = check() {
                    self.stop.set(Some(Stop::Interrupted));
                    self.interrupted.set(Some(m));
                    return Err(E::custom("interrupted"));
                }
            }
        }
        Ok(())
    }
}

/// Parse `text` within `bounds`.
pub fn parse(text: &[u8], bounds: &Bounds<'_>) -> Result<Value, ParseError> {
    let state = State {
        max_depth: bounds.max_depth,
        remaining: Cell::new(bounds.max_memory),
        max_memory: bounds.max_memory,
        nodes: Cell::new(0),
        interrupt: bounds.interrupt,
        stop: Cell::new(None),
        interrupted: Cell::new(None),
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    let result = Node {
        depth: 1,
        state: &state,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    result.map_err(|e| match state.stop.get() {
        Some(Stop::Memory) => ParseError::Memory(format!(
            "JSON value is larger than the memory limit of {} bytes",
            state.max_memory
        )),
        Some(Stop::Interrupted) => ParseError::Interrupted(state.interrupted.take().unwrap_or_else(|| e.to_string())),
        Some(Stop::Depth) => ParseError::Invalid(format!(
            "JSON nesting is deeper than the limit of {} levels",
            state.max_depth
        )),
        Some(Stop::Duplicate) | None => ParseError::Invalid(format!("invalid JSON: {e}")),
    })
}

#[derive(Clone, Copy)]
struct Node<'s, 'a> {
    depth: usize,
    state: &'s State<'a>,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Node<'_, '_> {
    fn deeper<E: de::Error>(self) -> Result<Self, E> {
        if self.depth > self.state.max_depth {
            self.state.stop.set(Some(Stop::Depth));
            return Err(E::custom("nesting too deep"));
        }
        Ok(Node {
            depth: self.depth + 1,
            state: self.state,
        })
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.state.charge(NODE_COST)?;
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.state.charge(NODE_COST)?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
        self.state.charge(NODE_COST)?;
        Ok(Value::from(n))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
        self.state.charge(NODE_COST)?;
        Ok(Value::from(n))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
        self.state.charge(NODE_COST)?;
        Number::from_f64(n)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.state.charge(NODE_COST + s.len())?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.state.charge(NODE_COST + s.len())?;
        Ok(Value::String(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let child = self.deeper()?;
        self.state.charge(NODE_COST)?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(child)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let first = match map.next_key_seed(FirstKeySeed)? {
            None => {
                self.deeper()?;
                self.state.charge(NODE_COST)?;
                return Ok(Value::Object(Map::new()));
            }
            Some(FirstKey::Number) => {
                let text: String = map.next_value()?;
                self.state.charge(NODE_COST + text.len())?;
                let n = text
                    .parse::<Number>()
                    .map_err(|e| de::Error::custom(format!("invalid number: {e}")))?;
                // A number past the largest double (`1e400`) would reach a
                // script as NaN: refused, as without `arbitrary_precision`.
                if n.as_f64().is_none() {
                    return Err(de::Error::custom("number out of range"));
                }
                return Ok(Value::Number(n));
            }
            Some(FirstKey::Name(k)) => k,
        };
        let child = self.deeper()?;
        self.state.charge(NODE_COST)?;
        // The pairs first, then a map of the right size: a map grown pair by
        // pair rehashed its keys at every doubling.
        let mut pairs: SmallVec<[(String, Value); PAIRS_INLINE]> = SmallVec::new();
        let mut key = Some(first);
        while let Some(k) = key {
            self.state.charge(NODE_COST + k.len())?;
            let v = map.next_value_seed(child)?;
            pairs.push((k, v));
            key = map.next_key::<String>()?;
        }
        let mut out = Map::with_capacity(pairs.len());
        for (k, v) in pairs {
            match out.entry(k) {
                Entry::Vacant(slot) => {
                    slot.insert(v);
                }
                Entry::Occupied(taken) => {
                    self.state.stop.set(Some(Stop::Duplicate));
                    return Err(de::Error::custom(format!("duplicate key \"{}\"", short(taken.key()))));
                }
            }
        }
        Ok(Value::Object(out))
    }
}

/// Pairs of an object kept on the stack while it is read (a message has
/// two; a bigger object spills them to the heap). Small: the parse recurses
/// once per level, up to serde_json's 128.
const PAIRS_INLINE: usize = 4;

/// An object's first key: a name, or the token under which serde_json
/// hands over a number's text (recognized without copying it).
enum FirstKey {
    Number,
    Name(String),
}

/// Reads a [`FirstKey`].
struct FirstKeySeed;

impl<'de> DeserializeSeed<'de> for FirstKeySeed {
    type Value = FirstKey;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<FirstKey, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for FirstKeySeed {
    type Value = FirstKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<FirstKey, E> {
        Ok(if s == NUMBER_TOKEN {
            FirstKey::Number
        } else {
            FirstKey::Name(s.to_owned())
        })
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<FirstKey, E> {
        Ok(if s == NUMBER_TOKEN {
            FirstKey::Number
        } else {
            FirstKey::Name(s)
        })
    }
}

/// A key cut for an error message.
fn short(k: &str) -> String {
    let mut s = k.to_owned();
    crate::error::truncate_utf8(&mut s, 64, "…");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds<'static> {
        Bounds {
            max_depth: 4,
            max_memory: usize::MAX,
            interrupt: None,
        }
    }

    #[test]
    fn numbers_keep_their_text() {
        // serde_json writes an exponent with its sign: the value is kept,
        // the text of `1e2` becomes `1e+2`.
        for (text, out) in [
            ("18446744073709551616123", "18446744073709551616123"),
            ("-0", "-0"),
            ("1.0", "1.0"),
            ("1e2", "1e+2"),
            ("9223372036854775807", "9223372036854775807"),
            ("-9223372036854775809", "-9223372036854775809"),
            ("0.30000000000000000001", "0.30000000000000000001"),
            ("1e-400", "1e-400"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
        ] {
            let v = parse(text.as_bytes(), &bounds()).expect(text);
            assert_eq!(serde_json::to_string(&v).expect("encode"), out);
        }
    }

    #[test]
    fn refuses_what_it_must() {
        let cases: &[(&str, &str)] = &[
            (r#"{"a":1,"a":2}"#, "duplicate key \"a\""),
            (r#"{"x":{"b":[],"b":{}}}"#, "duplicate key \"b\""),
            ("[[[[[1]]]]]", "deeper than the limit of 4"),
            (r#"{"a":{"b":{"c":{"d":{}}}}}"#, "deeper than the limit of 4"),
            ("[1,]", "invalid JSON"),
            ("{} x", "invalid JSON"),
            // Found by the convert fuzz target: it reached scripts as NaN.
            ("7e308", "number out of range"),
            (r#"{"t":-1e400}"#, "number out of range"),
        ];
        for (text, want) in cases {
            let err = parse(text.as_bytes(), &bounds()).expect_err(text);
            assert!(matches!(err, ParseError::Invalid(_)), "{text}: {err:?}");
            assert!(err.to_string().contains(want), "{text}: {err}");
        }
        assert!(parse(b"[[[[1]]]]", &bounds()).is_ok());
    }

    #[test]
    fn memory_budget_and_interrupt_stop_the_parse() {
        let text = format!("[{}[]]", "[],".repeat(100_000));
        let tight = Bounds {
            max_depth: 4,
            max_memory: 1 << 20,
            interrupt: None,
        };
        assert!(matches!(parse(text.as_bytes(), &tight), Err(ParseError::Memory(_))));
        let stop = || Err(String::from("time limit"));
        let interrupted = Bounds {
            max_depth: 4,
            max_memory: usize::MAX,
            interrupt: Some(&stop),
        };
        assert_eq!(
            parse(text.as_bytes(), &interrupted),
            Err(ParseError::Interrupted(String::from("time limit")))
        );
    }
}
