//! JSON text out of a walk ([`ToText`]), byte for byte what
//! `serde_json::to_writer` writes for the same value (compact).
//!
//! Bodies are mostly long strings with nothing to escape: message
//! contents, parts of a body no script read. serde_json's writer looks at
//! each byte of a string in turn; here a string is checked eight bytes at a
//! time and copied whole when it needs no escape, and only a string that
//! needs one goes through serde_json's escaping.

use serde_json::{Number, Value};

use super::Emit;
use crate::http::fields::TopFields;

/// [`Emit`] as JSON text (compact, as `serde_json::to_writer` writes a
/// value).
pub(super) struct ToText {
    pub(super) out: Vec<u8>,
    /// Where the top-level object's fields a host reads are, once that
    /// object is written (see [`TopFields`]).
    pub(super) top: Option<TopFields>,
    /// How many arrays and objects are open.
    depth: usize,
    /// The top-level fields noted so far.
    noting: TopFields,
    /// The field being written at the top level, when it is one of those
    /// noted: which one, and where its value starts.
    field: Option<(usize, usize)>,
    /// Write the objects of sources (views no script read) with their keys
    /// sorted, as the walk writes a table's ([`ToText::sorted`]).
    sort_sources: bool,
}

impl ToText {
    /// A text encoder with room for a typical body, so that the output is
    /// not regrown several times while small values are appended.
    pub(super) fn new() -> ToText {
        ToText {
            out: Vec::with_capacity(TEXT_CAPACITY),
            top: None,
            depth: 0,
            noting: TopFields::of(&TopFields::BODY),
            field: None,
            sort_sources: false,
        }
    }

    /// A text encoder whose every object has its keys sorted (byte order),
    /// those of sources too: what `policy::usage::record_json` writes for
    /// the same value. It notes the top-level fields `noted`.
    pub(super) fn sorted(noted: &'static [&'static str]) -> ToText {
        ToText {
            sort_sources: true,
            noting: TopFields::of(noted),
            ..ToText::new()
        }
    }

    /// The value of the top-level field being noted ends here.
    fn end_field(&mut self) {
        if let Some((index, start)) = self.field.take() {
            self.noting.set(index, start..self.out.len());
        }
    }

    /// `s` as a JSON string, as serde_json writes it: a string with nothing
    /// to escape (nearly every key and most values) is copied whole.
    fn quoted(&mut self, s: &str) {
        if needs_escape(s.as_bytes()) {
            // Writing a str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut self.out, s);
            return;
        }
        self.out.reserve(s.len() + 2);
        self.out.push(b'"');
        self.out.extend_from_slice(s.as_bytes());
        self.out.push(b'"');
    }

    /// `v` as serde_json writes it, its strings through [`ToText::quoted`].
    /// Values here come from a parse, which bounds their depth.
    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.out.extend_from_slice(b"null"),
            Value::Bool(b) => self.boolean(*b),
            Value::Number(n) => self.number_text(n),
            Value::String(s) => self.quoted(s),
            Value::Array(items) => {
                self.out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(b',');
                    }
                    self.value(item);
                }
                self.out.push(b']');
            }
            Value::Object(map) if self.sort_sources => {
                let mut fields: Vec<(&String, &Value)> = map.iter().collect();
                fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
                self.object(fields.into_iter());
            }
            Value::Object(map) => self.object(map.iter()),
        }
    }

    /// An object of `fields`, in their order.
    fn object<'v>(&mut self, fields: impl Iterator<Item = (&'v String, &'v Value)>) {
        self.out.push(b'{');
        for (i, (key, item)) in fields.enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.quoted(key);
            self.out.push(b':');
            self.value(item);
        }
        self.out.push(b'}');
    }

    /// A number as its text (the crate keeps every number's text:
    /// `arbitrary_precision`).
    fn number_text(&mut self, n: &Number) {
        self.out.extend_from_slice(n.as_str().as_bytes());
    }
}

/// `v` as JSON text with every object's keys sorted (byte order): what
/// `Value::sort_all_objects` then `to_string` writes, without the deep copy
/// sorting in place would need (the usage record's text,
/// `policy::usage::record_json`).
pub(crate) fn sorted_json(v: &Value) -> Vec<u8> {
    let mut t = ToText::sorted(&[]);
    t.value(v);
    t.out
}

/// Bytes [`ToText`] starts with room for.
const TEXT_CAPACITY: usize = 1024;

/// Whether serde_json escapes any byte of `bytes` inside a string: control
/// characters, the quote and the backslash (nothing else, not `/` nor
/// non-ASCII). A block at a time, each block checked whole without a
/// branch per byte, which the compiler turns into vector compares.
fn needs_escape(bytes: &[u8]) -> bool {
    const BLOCK: usize = 64;
    bytes.chunks(BLOCK).any(|block| {
        block
            .iter()
            .fold(false, |found, &b| found | (b < 0x20) | (b == b'"') | (b == b'\\'))
    })
}

impl Emit for ToText {
    type Item = ();
    type Array = ();
    type Object = ();

    fn null(&mut self) {
        self.out.extend_from_slice(b"null");
    }
    fn boolean(&mut self, b: bool) {
        self.out.extend_from_slice(if b { b"true" } else { b"false" });
    }
    fn number(&mut self, n: Number) {
        self.number_text(&n);
    }
    fn integer(&mut self, i: i64) {
        // Writing into a Vec cannot fail; serde_json writes integers
        // without the formatting machinery of `write!`.
        let _ = serde_json::to_writer(&mut self.out, &i);
    }
    fn string(&mut self, s: &str) {
        self.quoted(s);
    }
    fn array_open(&mut self, _: usize) {
        self.depth += 1;
        self.out.push(b'[');
    }
    fn array_next(&mut self, _: &mut (), index: usize) {
        if index > 0 {
            self.out.push(b',');
        }
    }
    fn array_push(&mut self, _: &mut (), (): ()) {}
    fn array_close(&mut self, (): ()) {
        self.depth -= 1;
        self.out.push(b']');
    }
    fn object_open(&mut self, _: usize) {
        self.depth += 1;
        self.out.push(b'{');
    }
    fn object_next(&mut self, _: &mut (), index: usize, key: &str) {
        let top = self.depth == 1;
        if top {
            self.end_field();
        }
        if index > 0 {
            self.out.push(b',');
        }
        self.quoted(key);
        self.out.push(b':');
        if top {
            self.field = self.noting.index(key).map(|i| (i, self.out.len()));
        }
    }
    fn object_push(&mut self, _: &mut (), (): ()) {}
    fn json(&mut self, v: &Value) {
        self.value(v);
    }
    fn sorts_views(&self) -> bool {
        self.sort_sources
    }
    fn object_close(&mut self, (): ()) {
        if self.depth == 1 {
            self.end_field();
            let fresh = self.noting.cleared();
            self.top = Some(std::mem::replace(&mut self.noting, fresh));
        }
        self.depth -= 1;
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte that matters, alone and at each offset of a word, in
    /// strings long enough to take the word loop and its remainder.
    #[test]
    fn escape_check_finds_every_byte_that_needs_one() {
        for b in 0u8..=0x7f {
            let expected = b < 0x20 || b == b'"' || b == b'\\';
            for len in [1usize, 7, 8, 9, 16, 23] {
                for at in 0..len {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    assert_eq!(needs_escape(&s), expected, "byte {b:#x} at {at} of {len}");
                }
            }
        }
        // Non-ASCII (UTF-8 lead and continuation bytes) needs none.
        assert!(!needs_escape("héllo wörld, 你好，世界 ✓✓✓".as_bytes()));
        assert!(!needs_escape(b""));
    }

    /// The text is serde_json's, byte for byte, for values with every
    /// kind of string, number and nesting.
    #[test]
    fn values_are_written_as_serde_json_writes_them() {
        let cases = [
            r#"null"#,
            r#"[true,false,null,[],{}]"#,
            r#"{"model":"gpt-4","temperature":0.7,"n":1,"big":123456789012345678901234567890,"e":1e400,"neg":-0.0}"#,
            r#"{"s":"tab\tquote\"backslash\\newline\nnul\u0000 bell\u0007 del\u007f slash/ é 你好 ✓"}"#,
            r#"{"messages":[{"role":"user","content":"lorem ipsum dolor sit amet lorem ipsum"},{"role":"assistant","content":"\u001f\u0020\u2028"}]}"#,
            r#"{"":"","a":{"b":{"c":[1,[2,[3,{"d":"e"}]]]}}}"#,
        ];
        for case in cases {
            let v: Value = serde_json::from_str(case).expect("case parses");
            let mut t = ToText::new();
            t.value(&v);
            assert_eq!(
                String::from_utf8(t.out).expect("UTF-8"),
                serde_json::to_string(&v).expect("serde writes"),
                "{case}"
            );
        }
    }

    /// The spans noted are those of the top-level fields, not of fields of
    /// the same name further down, and each covers exactly its value.
    #[test]
    fn the_top_level_fields_spans_are_noted() {
        let mut t = ToText::new();
        t.object_open(4);
        t.object_next(&mut (), 0, "messages");
        t.array_open(1);
        t.array_next(&mut (), 0);
        t.object_open(1);
        t.object_next(&mut (), 0, "stream");
        t.boolean(false);
        t.object_close(());
        t.array_close(());
        t.object_next(&mut (), 1, "model");
        t.string("gpt-4");
        t.object_next(&mut (), 2, "stream");
        t.boolean(true);
        t.object_next(&mut (), 3, "stream_options");
        t.json(&serde_json::json!({"include_usage": true}));
        t.object_close(());
        let text = String::from_utf8(t.out).expect("UTF-8");
        assert_eq!(
            text,
            r#"{"messages":[{"stream":false}],"model":"gpt-4","stream":true,"stream_options":{"include_usage":true}}"#
        );
        let top = t.top.expect("the top-level object was closed");
        let mut expected = TopFields::default();
        for (name, value) in [
            ("model", r#""gpt-4""#),
            ("stream", "true"),
            ("stream_options", r#"{"include_usage":true}"#),
        ] {
            let start = text.find(&format!("\"{name}\":{value}")).expect("in the text") + name.len() + 3;
            expected.set(expected.index(name).expect("noted"), start..start + value.len());
        }
        assert_eq!(top, expected);
        // Text that is not an object notes nothing.
        let mut t = ToText::new();
        t.array_open(0);
        t.array_close(());
        assert_eq!(t.top, None);
    }
}
