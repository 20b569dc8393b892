//! Every structural problem of a YAML document at once.
//!
//! serde stops at the first unknown key or wrong type. To report them all,
//! [`deserialize_all`] records the problem, removes the offending node from
//! the document and tries again, until the rest deserializes (or nothing
//! more can be removed). Later attempts run on the re-serialized document,
//! so YAML's scalar rules stay those of the text parser; their locations
//! would point into that text and are left out, and sequence indices are
//! translated back to the file's own.

use serde::de::DeserializeOwned;
use serde_norway::Value;
use serde_path_to_error::Segment;

/// At most this many structural problems are reported.
const MAX_PROBLEMS: usize = 100;

/// One step of a key path, with sequence indices as they are in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Deserialize `text`; on failure, every structural problem found, each
/// `key.path: message`, and the value the rest of the document gives (when
/// the document without its bad nodes deserializes).
pub(super) fn deserialize_all<T: DeserializeOwned>(text: &str) -> Result<T, (Vec<String>, Option<T>)> {
    let first = match attempt::<T>(text) {
        Ok(value) => return Ok(value),
        Err(failure) => failure,
    };
    // The first problem is in the file's own text: its own description,
    // with the line and column where it names no key.
    let mut problems = vec![first.described.clone()];
    // The document as a tree, to cut bad nodes out of. Text that is not
    // YAML at all has nothing more to report.
    let Ok(mut doc) = serde_norway::from_str::<Value>(text) else {
        return Err((problems, None));
    };
    // Original indices removed from each sequence (by its path in the file).
    let mut removed: Vec<(Vec<Step>, usize)> = Vec::new();
    let mut failure = first;
    loop {
        let steps = to_file_steps(&failure.path, &removed);
        let Some(cut) = remove(&mut doc, &failure.path) else {
            return Err((problems, None));
        };
        if let Some(index) = cut {
            let seq: Vec<Step> = steps[..steps.len().saturating_sub(1)].to_vec();
            let original = match steps.last() {
                Some(Step::Index(i)) => *i,
                _ => index,
            };
            removed.push((seq, original));
        }
        let Ok(next_text) = serde_norway::to_string(&doc) else {
            return Err((problems, None));
        };
        match attempt::<T>(&next_text) {
            Ok(value) => return Err((problems, Some(value))),
            Err(next) => {
                let steps = to_file_steps(&next.path, &removed);
                let problem = describe(&render(&steps), &next.path, &next.message, &next.error);
                // The same problem again: the cut did not reach it; stop.
                if problems.last() == Some(&problem) || problems.len() >= MAX_PROBLEMS {
                    return Err((problems, None));
                }
                problems.push(problem);
                failure = next;
            }
        }
    }
}

/// A failed attempt: where (as serde saw it) and what.
struct Failure {
    path: Vec<Segment>,
    message: String,
    error: serde_norway::Error,
    /// The problem as one line for the text it was found in (see
    /// [`super::yaml_error::describe`]).
    described: String,
}

fn attempt<T: DeserializeOwned>(text: &str) -> Result<T, Failure> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path: Vec<Segment> = e.path().iter().cloned().collect();
        let described = super::yaml_error::describe(&e);
        let error = e.into_inner();
        let message = error.to_string();
        Failure {
            path,
            message,
            error,
            described,
        }
    })
}
/// `path: message` for a problem found in a re-serialized document: the
/// parser sometimes names a (shorter) path itself, which is dropped, and its
/// location points into that text, not the file's, so it is dropped too.
fn describe(path: &str, seen: &[Segment], message: &str, error: &serde_norway::Error) -> String {
    let mut message = message.to_string();
    if let Some(loc) = error.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    if path.is_empty() {
        // No key names it, and the location would point into the
        // re-serialized text (a mapping used as a key, say).
        return format!("the config document: {message}");
    }
    let seen_path = render(&seen.iter().filter_map(step_of).collect::<Vec<_>>());
    let message = match message.split_once(": ") {
        Some((head, rest)) if path.starts_with(head) || seen_path.starts_with(head) => rest.to_string(),
        _ => message,
    };
    format!("{path}: {message}")
}

fn step_of(segment: &Segment) -> Option<Step> {
    match segment {
        Segment::Seq { index } => Some(Step::Index(*index)),
        Segment::Map { key } => Some(Step::Key(key.clone())),
        Segment::Enum { .. } | Segment::Unknown => None,
    }
}

/// A key path as text: `scripts.routing.timeout_ms`, `backends[1].url`,
/// `["."]` for a key that is not a plain word; empty for the document.
fn render(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(k) => super::yaml_error::push_key(&mut out, k),
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The path as it is in the file: each sequence index shifted past the
/// elements removed before it from the same sequence.
fn to_file_steps(path: &[Segment], removed: &[(Vec<Step>, usize)]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for step in path.iter().filter_map(step_of) {
        match step {
            Step::Index(current) => {
                let mut gone: Vec<usize> = removed
                    .iter()
                    .filter(|(seq, _)| *seq == steps)
                    .map(|(_, i)| *i)
                    .collect();
                gone.sort_unstable();
                let mut original = current;
                for g in gone {
                    if g <= original {
                        original += 1;
                    }
                }
                steps.push(Step::Index(original));
            }
            key => steps.push(key),
        }
    }
    steps
}

/// Remove the node at `path` (as serde saw it). `None` when there is no such
/// node (or it is the root); `Some(Some(i))` when it was element `i` of a
/// sequence, `Some(None)` when it was a mapping entry.
fn remove(doc: &mut Value, path: &[Segment]) -> Option<Option<usize>> {
    let steps: Vec<Step> = path.iter().filter_map(step_of).collect();
    let (last, parents) = steps.split_last()?;
    let mut node = doc;
    for step in parents {
        node = child(node, step)?;
    }
    match (node, last) {
        (Value::Mapping(map), Step::Key(key)) => {
            let found = map.keys().find(|k| key_matches(k, key)).cloned()?;
            map.remove(&found);
            Some(None)
        }
        (Value::Sequence(seq), Step::Index(i)) if *i < seq.len() => {
            seq.remove(*i);
            Some(Some(*i))
        }
        (Value::Tagged(tagged), step) => {
            let inner = &mut tagged.value;
            match (inner, step) {
                (Value::Mapping(map), Step::Key(key)) => {
                    let found = map.keys().find(|k| key_matches(k, key)).cloned()?;
                    map.remove(&found);
                    Some(None)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn child<'a>(node: &'a mut Value, step: &Step) -> Option<&'a mut Value> {
    match (node, step) {
        (Value::Mapping(map), Step::Key(key)) => map.iter_mut().find(|(k, _)| key_matches(k, key)).map(|(_, v)| v),
        (Value::Sequence(seq), Step::Index(i)) => seq.get_mut(*i),
        (Value::Tagged(tagged), step) => child(&mut tagged.value, step),
        _ => None,
    }
}

/// Whether a YAML mapping key is the key serde named.
fn key_matches(key: &Value, name: &str) -> bool {
    match key {
        Value::String(s) => s == name,
        Value::Number(n) => n.to_string() == name,
        Value::Bool(b) => b.to_string() == name,
        _ => false,
    }
}
