//! The shared conformance case format (`conformance/cases/*.json`).
//!
//! One JSON file per case, so every host (Rust, C, Go, LuaJIT, nginx) can read
//! it with the JSON parser it already has:
//!
//! ```json
//! {
//!   "name": "seed: routing by viplevel, vip 3 goes to ultra",
//!   "hook": "routing",
//!   "script": ["local viplevel = request.body.viplevel or 0", "..."],
//!   "input": {"request": {...}, "backends": {...}},
//!   "limits": {"timeout_ms": 50},
//!   "expect": {"result": "ultra"}
//! }
//! ```
//!
//! `script` is an array of lines (joined with `\n`). `expect` holds either
//! `result` (the script's return value as JSON, `null` for nil) or `error`
//! (an error kind: `timeout`, `memory`, `script_error`, `bad_output`,
//! `bad_input`). `limits` is optional (`timeout_ms`, `memory_mb`).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::config::{Config, ScriptLimits};
use crate::engine::Engine;
use crate::hooks::HookName;

/// One conformance case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case shows.
    pub name: String,
    /// The hook's config name.
    pub hook: String,
    /// The script, one array element per line.
    pub script: Vec<String>,
    /// The hook's globals.
    pub input: Value,
    /// Optional limits for this case.
    #[serde(default)]
    pub limits: CaseLimits,
    /// The expected outcome.
    pub expect: Expect,
    /// The file the case came from (set by [`load_dir`]).
    #[serde(skip)]
    pub file: PathBuf,
}

/// Limits a case may set.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseLimits {
    /// Per-call time limit.
    pub timeout_ms: Option<u64>,
    /// Per-call memory allowance.
    pub memory_mb: Option<u64>,
}

/// The expected outcome of a case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The script's result as JSON (`null` is a result: nil).
    #[serde(default, deserialize_with = "present")]
    pub result: Option<Value>,
    /// The error kind.
    #[serde(default)]
    pub error: Option<String>,
}

impl Case {
    /// The script source.
    pub fn source(&self) -> String {
        self.script.join("\n")
    }

    /// The case's limits over the defaults.
    pub fn script_limits(&self) -> ScriptLimits {
        let mut l = ScriptLimits::default();
        if let Some(t) = self.limits.timeout_ms {
            l.timeout_ms = t;
        }
        if let Some(m) = self.limits.memory_mb {
            l.memory_mb = m;
        }
        l
    }

    /// Run the case in-process; `Err` says how the outcome differed.
    pub fn run(&self) -> Result<(), String> {
        let hook: HookName = self.hook.parse()?;
        let config = Config::single_hook(hook, &format!("scripts.{hook}"), &self.source(), self.script_limits());
        let engine = Engine::new(config).map_err(|e| format!("engine: {e}"))?;
        let outcome = engine.run_json(hook, &self.input);
        self.check(outcome.as_ref().map_err(|e| e.kind.as_str()))
    }

    /// Compare an outcome (`Ok(result)` or `Err(kind)`) with the expectation.
    pub fn check(&self, outcome: Result<&Value, &str>) -> Result<(), String> {
        match (&self.expect.result, &self.expect.error, outcome) {
            (Some(want), None, Ok(got)) if want == got => Ok(()),
            (None, Some(kind), Err(got)) if kind == got => Ok(()),
            (Some(want), None, got) => Err(format!("expected result {want}, got {got:?}")),
            (None, Some(kind), got) => Err(format!("expected error {kind}, got {got:?}")),
            _ => Err(String::from(
                "case must set exactly one of expect.result and expect.error",
            )),
        }
    }
}

/// A field that is present is `Some`, even when it is `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Load every `*.json` case under `dir`, sorted by file name.
pub fn load_dir(dir: impl AsRef<Path>) -> Result<Vec<Case>, String> {
    let dir = dir.as_ref();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut case: Case = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            case.file = path;
            Ok(case)
        })
        .collect()
}
