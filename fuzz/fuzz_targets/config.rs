//! The config loader: `Config::from_yaml` on any text.
//!
//! It must not panic, and a config it refuses must say where: every
//! problem starts with a key path as the loader writes them
//! (`backends[0].url: ...`, `["a.b"]: ...` for a key that is not a word)
//! or names a line and column (YAML that does not parse, a document that is
//! not a mapping). A config it accepts must
//! build an engine or refuse with the same kind of problems (the scripts
//! are compiled there, so the LuaJIT parser sees fuzzed source too).
//!
//! Inputs with a `*_file` key (`script_file`, `keys_file`) are skipped:
//! the loader reads those files, and a fuzzed path such as `/dev/zero`
//! would test the machine, not the loader.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use llmproxy_core::{Config, Engine};

/// The length of the key path `text` starts with, as the loader writes
/// them: words (`[A-Za-z0-9_-]+`) joined by `.`, list indexes `[N]`, and
/// keys that are not words quoted as a JSON string, `["a.b"]`.
fn key_path_len(text: &str) -> Option<usize> {
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-';
    let mut at = 0;
    loop {
        let rest = &text[at..];
        if rest.starts_with("[\"") {
            // A JSON string up to its closing quote, then `]`.
            let mut strings = serde_json::Deserializer::from_str(&rest[1..]).into_iter::<String>();
            let Some(Ok(_)) = strings.next() else { return None };
            let end = 1 + strings.byte_offset();
            rest[end..].starts_with(']').then_some(())?;
            at += end + 1;
        } else if let Some(r) = rest.strip_prefix('[') {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            (n > 0 && r[n..].starts_with(']')).then_some(())?;
            at += n + 2;
        } else {
            let dot = usize::from(at > 0 && rest.starts_with('.'));
            if at > 0 && dot == 0 {
                return Some(at);
            }
            let n = rest[dot..].bytes().take_while(word).count();
            if n == 0 {
                return (at > 0 && dot == 0).then_some(at);
            }
            at += dot + n;
        }
    }
}

/// Whether `problem` says where it is: a key path, or a line and column.
fn located(problem: &str) -> bool {
    if problem.contains(" at line ") && problem.contains(" column ") {
        return true;
    }
    if let Some(m) = problem.strip_prefix("the config document: ") {
        return !m.is_empty();
    }
    key_path_len(problem)
        .and_then(|n| problem[n..].strip_prefix(": "))
        .is_some_and(|message| !message.is_empty())
}

/// Whether the YAML has a mapping key ending in `_file`, at any depth.
fn names_a_file(v: &serde_norway::Value) -> bool {
    match v {
        serde_norway::Value::Mapping(m) => m
            .iter()
            .any(|(k, v)| k.as_str().is_some_and(|k| k.ends_with("_file")) || names_a_file(v)),
        serde_norway::Value::Sequence(s) => s.iter().any(names_a_file),
        serde_norway::Value::Tagged(t) => names_a_file(&t.value),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // YAML that does not parse as a value is refused before any file is read.
    if let Ok(v) = serde_norway::from_str::<serde_norway::Value>(text) {
        if names_a_file(&v) {
            return;
        }
    }
    // An empty directory: a relative `script_file` that slips through finds nothing.
    let base = Path::new("/nonexistent-llmproxy-fuzz");
    match Config::from_yaml(text, base) {
        Err(e) => {
            assert!(!e.problems.is_empty(), "a refused config with no problem");
            for p in &e.problems {
                assert!(located(p), "a config problem without a key path or line: {p:?}");
            }
        }
        Ok(config) if config.hooks.iter().any(Option::is_some) => {
            if let Err(e) = Engine::new(config) {
                for p in &e.problems {
                    assert!(!p.is_empty(), "an empty engine problem");
                }
            }
        }
        Ok(_) => {}
    }
});
