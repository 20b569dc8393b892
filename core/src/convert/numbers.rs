//! The exact text of numbers a double cannot carry.
//!
//! Scripts see JSON numbers as LuaJIT doubles. A number whose text a double
//! does not reproduce (an integer beyond ±2^53 such as a 64-bit `seed` or a
//! user id, or a decimal with more digits than a double holds) used to come
//! back rounded as soon as a script copied it, as every seed transform does
//! (`for k, v in pairs(request.body) do out[k] = v end`).
//!
//! While a call runs, each such number that enters Lua is recorded here
//! under the bits of the double the script got. When a result is encoded, a
//! double with recorded bits is written with its original text: the script
//! either passed the value through or computed exactly the same double, and
//! the text is the more precise spelling of that double. Two texts that map
//! to the same double are ambiguous and fall back to the double's own text,
//! and so does a recorded double that a number of the input also has with a
//! text the double reproduces (`9007199254740992` next to
//! `9007199254740993`): either may be the one the script passed through.
//! The record is per call (cleared before each call) and costs nothing when
//! a body has no such number.

use std::collections::HashMap;

use serde_json::Number;

/// Numbers seen in this call whose text a double does not reproduce, by the
/// bits of that double; `None` when two texts share one double.
#[derive(Debug, Default, Clone)]
pub(crate) struct NumberTexts {
    by_bits: HashMap<u64, Option<Number>>,
    /// Bits of the doubles of the other numbers seen in this call (their
    /// own text is the double's); [`NumberTexts::settled`] applies them.
    plain: Vec<u64>,
    /// `plain` is sorted and deduplicated when it reaches this length.
    compact_at: usize,
}

/// `plain` is first compacted at this length.
const COMPACT_FIRST: usize = 4096;

impl NumberTexts {
    /// Forget everything (a new call starts).
    pub fn clear(&mut self) {
        if !self.by_bits.is_empty() {
            self.by_bits.clear();
        }
        self.plain.clear();
        self.compact_at = COMPACT_FIRST;
    }

    /// Whether no text was recorded.
    pub fn is_empty(&self) -> bool {
        self.by_bits.is_empty()
    }

    /// Record `text` as the spelling of the double `f`.
    pub fn record(&mut self, f: f64, text: Number) {
        self.by_bits
            .entry(f.to_bits())
            .and_modify(|seen| {
                if seen.as_ref() != Some(&text) {
                    *seen = None;
                }
            })
            .or_insert(Some(text));
    }

    /// Record the bits of doubles whose own text is their number's text.
    pub fn record_plain(&mut self, bits: &[u64]) {
        self.plain.extend_from_slice(bits);
        if self.plain.len() >= self.compact_at.max(COMPACT_FIRST) {
            // Repeated numbers (a script decoding the same text in a loop)
            // do not grow the list.
            self.plain.sort_unstable();
            self.plain.dedup();
            self.compact_at = self.plain.len().saturating_mul(2);
        }
    }

    /// The texts an encoder may write: those of doubles no plain number has.
    pub fn settled(&self) -> NumberTexts {
        let mut by_bits = self.by_bits.clone();
        for bits in &self.plain {
            if let Some(seen) = by_bits.get_mut(bits) {
                *seen = None;
            }
        }
        NumberTexts {
            by_bits,
            plain: Vec::new(),
            compact_at: COMPACT_FIRST,
        }
    }

    /// The original text of the double `f`, if one was recorded.
    pub fn text_of(&self, f: f64) -> Option<&Number> {
        self.by_bits.get(&f.to_bits()).and_then(Option::as_ref)
    }
}

/// The original text an encoder writes for the double `f`, when this call
/// recorded one (both encoders of `convert` ask here).
pub(crate) fn recorded(texts: &Option<NumberTexts>, f: f64) -> Option<Number> {
    texts.as_ref().and_then(|t| t.text_of(f)).cloned()
}

/// `n` as the double a script sees, and whether its text must be recorded
/// ([`needs_text`]). Integers of up to 15 digits, most numbers of a body,
/// take a short path: no float parsing, nothing to record.
pub(crate) fn read(n: &Number) -> (f64, bool) {
    let text = n.as_str();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit()) {
        // `-0` is the double -0.0, which the integer 0 is not.
        if let Ok(i @ (..=-1 | 1..)) = text.parse::<i64>() {
            return (i as f64, false);
        }
        if text == "0" {
            return (0.0, false);
        }
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    (f, needs_text(n, f))
}

/// Whether `n`, read as the double `f`, comes back with another value: it
/// has more significant digits than a double keeps (16 or more) and the
/// double's own text differs. Spelling alone (`1.0`, `1e2`) is not recorded:
/// a double holds any 15 significant digits, and recording it would make a
/// script's own `1` come out as `1.0`.
pub(crate) fn needs_text(n: &Number, f: f64) -> bool {
    if !f.is_finite() || significant_digits(n.as_str()) <= 15 {
        return false;
    }
    match super::number(f) {
        Ok(canonical) => canonical.as_str() != n.as_str(),
        Err(_) => false,
    }
}

/// Significant digits of a JSON number's text (leading and trailing zeros
/// of its mantissa do not count).
fn significant_digits(text: &str) -> usize {
    let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
    let digits = || mantissa.bytes().filter(u8::is_ascii_digit);
    let first = digits().position(|b| b != b'0');
    let last = digits().rev().position(|b| b != b'0');
    match (first, last) {
        (Some(a), Some(b)) => digits().count() - a - b,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_short_path_reads_as_the_long_one() {
        for text in [
            "0",
            "-0",
            "7",
            "-42",
            "123456789012345",
            "-123456789012345",
            "1234567890123456",
            "1.5",
            "1e3",
        ] {
            let n: super::Number = text.parse().expect("number");
            let f = n.as_f64().unwrap_or(f64::NAN);
            let (g, t) = super::read(&n);
            assert_eq!((g.to_bits(), t), (f.to_bits(), super::needs_text(&n, f)), "{text}");
        }
    }

    use super::*;

    fn num(s: &str) -> Number {
        s.parse().expect("number")
    }

    #[test]
    fn only_numbers_a_double_changes_need_their_text() {
        let cases = [
            ("12", false),
            ("-7", false),
            ("0.5", false),
            ("9007199254740993", true),
            ("12345678901234567890", true),
            ("0.30000000000000000001", true),
            ("1.0", false),
            ("1e2", false),
            ("1000000000000000000000", false),
            ("1152921504606846976", true),
            ("1e400", false),
        ];
        for (text, want) in cases {
            let n = num(text);
            let f = n.as_f64().unwrap_or(f64::NAN);
            assert_eq!(needs_text(&n, f), want, "{text}");
        }
    }

    #[test]
    fn two_texts_for_one_double_are_ambiguous() {
        let mut t = NumberTexts::default();
        let a = num("9007199254740993");
        let f = a.as_f64().unwrap_or_default();
        t.record(f, a.clone());
        assert_eq!(t.text_of(f), Some(&a));
        t.record(f, num("9007199254740992.0000001"));
        assert_eq!(t.text_of(f), None);
        t.clear();
        assert!(t.is_empty());
    }

    #[test]
    fn a_plain_number_with_the_same_double_makes_a_text_ambiguous() {
        let mut t = NumberTexts::default();
        let a = num("9007199254740993");
        let f = a.as_f64().unwrap_or_default();
        t.record(f, a.clone());
        t.record_plain(&[1.5f64.to_bits()]);
        assert_eq!(t.settled().text_of(f), Some(&a));
        t.record_plain(&[f.to_bits()]);
        assert_eq!(t.settled().text_of(f), None);
        for i in 0..3 * COMPACT_FIRST {
            t.record_plain(&[(i % 10) as u64]);
        }
        assert!(t.plain.len() < COMPACT_FIRST + 12, "repeats are compacted");
        assert_eq!(t.settled().text_of(f), None);
    }
}
