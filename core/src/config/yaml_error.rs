//! A YAML deserialization error as one config problem that says where it
//! is: `key.path: message` for a problem inside the document, the message
//! with its line and column for one about the document as a whole.

use serde_path_to_error::{Path, Segment};

/// `error` as a config problem (see the module docs).
pub(crate) fn describe(error: &serde_path_to_error::Error<serde_norway::Error>) -> String {
    // A path of unknown segments (`?`, YAML the parser could not follow)
    // names nothing either.
    let unknown = error.path().iter().filter(|s| matches!(s, Segment::Unknown)).count();
    let at_root = error.path().iter().count() == unknown;
    let path = key_path(error.path());
    let plain = error.path().to_string();
    let inner = error.inner();
    let text = inner.to_string();
    if at_root {
        // Nothing names a key: the line and column must. The YAML library
        // leaves them out at line 1, column 1.
        let text = text
            .replace("expected struct RawConfig", "expected a mapping of config sections")
            .replace("expected struct RawAccounts", "expected a mapping of config sections");
        return match inner.location() {
            Some(l) => with_location(text, l),
            None => format!("the config document: {text}"),
        };
    }
    // The YAML library names a (sometimes shorter) path itself.
    let message = match text.split_once(": ") {
        Some((head, rest)) if plain.starts_with(head) => rest,
        _ => text.as_str(),
    };
    match inner.location() {
        Some(l) if unknown > 0 => with_location(format!("{path}: {message}"), l),
        _ => format!("{path}: {message}"),
    }
}

/// `text` ending with its location: kept when the YAML library put it
/// there, appended otherwise. Only the end counts: the message may quote
/// the document's own text, " at line " included.
fn with_location(text: String, l: serde_norway::Location) -> String {
    let suffix = format!(" at line {} column {}", l.line(), l.column());
    if text.ends_with(&suffix) {
        text
    } else {
        text + &suffix
    }
}

/// The key path of `path`: `backends[0].url`. A key that is not a plain
/// word (empty, or holding `.`, `[`, `:`, spaces, ...) is quoted, `["a.b"]`,
/// so that a key such as `.` is never read as the document itself.
pub(crate) fn key_path(path: &Path) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => push_key(&mut out, key),
            Segment::Unknown => out.push_str(if out.is_empty() { "?" } else { ".?" }),
        }
    }
    out
}

/// Append `key` to the key path `out`: `.key`, or `["a.b"]` for a key that
/// is not a plain word.
pub(crate) fn push_key(out: &mut String, key: &str) {
    if is_plain(key) {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(key);
    } else {
        let quoted = serde_json::to_string(key).unwrap_or_else(|_| String::from("\"?\""));
        out.push_str(&format!("[{quoted}]"));
    }
}

fn is_plain(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn problems(yaml: &str) -> Vec<String> {
        match Config::from_yaml(yaml, std::path::Path::new(".")) {
            Ok(_) => panic!("accepted: {yaml:?}"),
            Err(e) => e.problems,
        }
    }

    #[test]
    fn every_problem_names_a_key_path_or_a_line() {
        // (config, start of its one problem). Found by the config fuzz
        // target: a syntax error at the first character had no location,
        // and a top-level key `.` was reported as if it were the document.
        let cases = [
            (
                "]+",
                "did not find expected node content, while parsing a block node at line 1 column 1",
            ),
            ("\u{1}", "control characters are not allowed at line 1 column 1"),
            (
                ":",
                "did not find expected key, while parsing a block mapping at line 1 column 1",
            ),
            (".: 1\n", "[\".\"]: unknown field `.`, expected one of `listen`"),
            ("'': 1\n", "[\"\"]: unknown field ``"),
            ("a.b: 1\n", "[\"a.b\"]: unknown field `a.b`"),
            ("foo: 1\n", "foo: unknown field `foo`"),
            (
                "backends: [{name: a, url: 'http://b', .: 1}]\n",
                "backends[0][\".\"]: unknown field `.`, expected one of `name`",
            ),
            (
                "5\n",
                "invalid type: integer `5`, expected a mapping of config sections at line 1 column 1",
            ),
            (
                // The document's own text may say " at line ": the location
                // still ends the message.
                "00 at line 1 cumno l1.:X1\n",
                "invalid type: string \"00 at line 1 cumno l1.:X1\", expected a mapping of config sections at line 1 column 1",
            ),
            (
                "- a\n",
                "invalid type: sequence, expected a mapping of config sections at line 1 column 1",
            ),
        ];
        for (yaml, want) in cases {
            let p = problems(yaml);
            assert_eq!(p.len(), 1, "{yaml:?}: {p:?}");
            assert!(p[0].starts_with(want), "{yaml:?}: {p:?}");
        }
    }
}
