//! The config loader: `Config::from_yaml` on any text.
//!
//! It must not panic, and a config it refuses must say where: every
//! problem starts with a key path (`backends[0].url: ...`) or, for YAML
//! that does not parse, names a line and column. A config it accepts must
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

/// What the text is as plain YAML, before the config schema applies.
enum Shape {
    /// Not YAML: problems must name a line/column or position, except at
    /// the first character, where the YAML library names none (a known
    /// finding, docs/fuzzing.md).
    Unparsable { at_start: bool },
    /// YAML, but no mapping at the top (a scalar, a list, nothing): a
    /// problem is about the whole document and needs no key path.
    NotAMapping,
    /// A mapping: problems must start with a key path.
    Mapping,
}

/// Whether `problem` says where it is.
fn located(problem: &str, shape: &Shape) -> bool {
    if (problem.contains(" line ") && problem.contains(" column ")) || problem.contains(" at position ") {
        return true;
    }
    if matches!(shape, Shape::NotAMapping | Shape::Unparsable { at_start: true }) {
        return true;
    }
    // A top-level key named "." is reported as if it were the root (known
    // finding, docs/fuzzing.md); the message still names the key.
    if problem.starts_with("unknown field `.`") {
        return true;
    }
    // The top of the document is not a mapping (found before a later
    // syntax error): the problem is about the whole document.
    if problem.starts_with("invalid type: ") && problem.ends_with("expected struct RawConfig") {
        return true;
    }
    let Some((path, message)) = problem.split_once(": ") else {
        return false;
    };
    // Keys are the config's own text: a path may hold any character, or
    // none (a key that is the empty string); it is not serde's own words.
    const SERDE_HEADS: &[&str] = &[
        "invalid type",
        "invalid value",
        "invalid length",
        "missing field",
        "unknown field",
        "unknown variant",
        "duplicate field",
    ];
    if SERDE_HEADS.iter().any(|h| path.starts_with(h)) {
        // Only a key spelled like serde's words (it may hold ": " too),
        // which the message then names.
        return problem
            .match_indices(": ")
            .any(|(i, _)| problem[i + 2..].contains(&format!("`{}`", &problem[..i])));
    }
    !message.is_empty()
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
    let shape = match serde_norway::from_str::<serde_norway::Value>(text) {
        Ok(v) if names_a_file(&v) => return,
        Ok(serde_norway::Value::Mapping(_)) => Shape::Mapping,
        Ok(_) => Shape::NotAMapping,
        Err(e) => Shape::Unparsable {
            at_start: e.location().is_none_or(|l| l.index() == 0),
        },
    };
    // An empty directory: a relative `script_file` that slips through finds nothing.
    let base = Path::new("/nonexistent-llmproxy-fuzz");
    match Config::from_yaml(text, base) {
        Err(e) => {
            assert!(!e.problems.is_empty(), "a refused config with no problem");
            for p in &e.problems {
                assert!(located(p, &shape), "a config problem without a key path or line: {p:?}");
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
