//! What "the same JSON value" means after a trip through Lua, as the
//! README documents it (numbers are doubles; see `core/src/convert/numbers.rs`):
//!
//! - a number comes back as the text of its double: `-0` for negative zero,
//!   an integer within ±2^53 without a fraction (`1.0` comes back as `1`),
//!   otherwise the shortest text that reads back as the same double;
//! - except that a number with more significant digits than a double keeps
//!   (16 or more) whose text the double does not reproduce comes back with
//!   its own text, byte for byte, unless the same call saw another number
//!   with the same double (then the double's own text);
//! - everything else comes back exactly; object key order is not compared.

use std::collections::{HashMap, HashSet};

use serde_json::{Number, Value};

/// Largest integer a double holds exactly.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_992.0;

/// The double's own text as core compares it with a number's text
/// (`convert::number`): `-0`, an integer within ±2^53, else the shortest
/// text that reads back as the double.
fn canonical(f: f64) -> String {
    if f == 0.0 && f.is_sign_negative() {
        return String::from("-0");
    }
    if f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER {
        return (f as i64).to_string();
    }
    Number::from_f64(f).map_or_else(|| String::from("NaN"), |n| n.to_string())
}

/// The text a double is written with when no recorded text applies: an
/// integral double within the 64-bit integer range as an integer
/// (`1e18` as `1000000000000000000`), otherwise [`canonical`].
pub fn double_text(f: f64) -> String {
    let integral = f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64;
    if integral && f.to_bits() != (-0.0f64).to_bits() {
        return (f as i64).to_string();
    }
    canonical(f)
}

/// Significant digits of a number's text.
fn significant_digits(text: &str) -> usize {
    let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    match (
        digits.iter().position(|&b| b != b'0'),
        digits.iter().rposition(|&b| b != b'0'),
    ) {
        (Some(a), Some(b)) => b - a + 1,
        _ => 0,
    }
}

/// Whether a double does not bring `n` back (more digits than it keeps).
fn needs_text(n: &Number, f: f64) -> bool {
    let text = n.to_string();
    significant_digits(&text) > 15 && canonical(f) != text
}

/// The numbers of one call: which texts come back as they were sent.
#[derive(Debug, Default)]
pub struct NumberRule {
    /// Texts by the bits of their double; `None` when ambiguous.
    texts: HashMap<u64, Option<String>>,
    /// Bits of the numbers whose own text is their double's.
    plain: HashSet<u64>,
}

impl NumberRule {
    /// The rule for a call whose input numbers are those of `sent`.
    pub fn of(sent: &Value) -> NumberRule {
        let mut rule = NumberRule::default();
        rule.add(sent);
        rule
    }

    fn add(&mut self, v: &Value) {
        match v {
            Value::Number(n) => {
                let Some(f) = n.as_f64() else { return };
                if needs_text(n, f) {
                    let text = n.to_string();
                    self.texts
                        .entry(f.to_bits())
                        .and_modify(|seen| {
                            if seen.as_deref() != Some(text.as_str()) {
                                *seen = None;
                            }
                        })
                        .or_insert(Some(text));
                } else {
                    self.plain.insert(f.to_bits());
                }
            }
            Value::Array(a) => a.iter().for_each(|x| self.add(x)),
            Value::Object(o) => o.values().for_each(|x| self.add(x)),
            _ => {}
        }
    }

    /// The text `n` must come back with.
    pub fn expected(&self, n: &Number) -> String {
        let Some(f) = n.as_f64() else {
            return String::from("(a number no double holds)");
        };
        let bits = f.to_bits();
        match self.texts.get(&bits) {
            Some(Some(text)) if needs_text(n, f) && !self.plain.contains(&bits) => text.clone(),
            _ => double_text(f),
        }
    }
}

/// The first place where `got` is not what `sent` comes back as under
/// `rule` (`None`: the same value).
pub fn first_difference(sent: &Value, got: &Value, rule: &NumberRule, at: &str) -> Option<String> {
    match (sent, got) {
        (Value::Number(a), Value::Number(b)) => {
            let want = rule.expected(a);
            (want != b.to_string()).then(|| format!("{at}: sent {a}, want {want}, got {b}"))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, rule, &format!("{at}[{i}]"))),
        (Value::Object(a), Value::Object(b)) if a.len() == b.len() => a.iter().find_map(|(k, x)| match b.get(k) {
            Some(y) => first_difference(x, y, rule, &format!("{at}.{k}")),
            None => Some(format!("{at}.{k}: missing in the result")),
        }),
        _ if sent == got => None,
        _ => Some(format!("{at}: sent {sent}, got {got}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn numbers_come_back_as_documented() {
        // (sent, got, the same)
        let cases = [
            ("1.0", "1", true),
            ("1.0", "1.0", false),
            ("-0", "-0", true),
            ("-0", "0", false),
            ("-0.0", "-0", true),
            ("1e2", "100", true),
            ("1E18", "1000000000000000000", true),
            ("1152921504606846977", "1152921504606846977", true),
            ("1e300", "1e300", true),
            ("0.1", "0.1", true),
            ("1e-400", "0", true),
            ("18446744073709551616123", "18446744073709551616123", true),
            ("18446744073709551616123", "1.8446744073709552e22", false),
            (
                "[9007199254740993, 9007199254740993]",
                "[9007199254740993, 9007199254740993]",
                true,
            ),
            (
                "[9007199254740993, 9007199254740992]",
                "[9007199254740992, 9007199254740992]",
                true,
            ),
            (
                "[9007199254740993, 9007199254740992]",
                "[9007199254740993, 9007199254740992]",
                false,
            ),
            (
                "[9007199254740993, 9007199254740992.0000001]",
                "[9007199254740992, 9007199254740992]",
                true,
            ),
            (r#"{"a": [1, {"b": null}]}"#, r#"{"a": [1, {"b": null}]}"#, true),
            (r#"{"a": 1}"#, r#"{"a": 1, "b": 2}"#, false),
            ("[]", "{}", false),
        ];
        for (sent, got, same) in cases {
            let (sent, got) = (v(sent), v(got));
            let rule = NumberRule::of(&sent);
            assert_eq!(
                first_difference(&sent, &got, &rule, "$").is_none(),
                same,
                "{sent} vs {got}"
            );
        }
    }
}
