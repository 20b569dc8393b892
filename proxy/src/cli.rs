//! Command-line parsing and the offline subcommands (`check`, `hook`).
//!
//! Exit codes: 0 success, 1 the script failed (`hook`), 2 usage, input or
//! config errors.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use llmproxy_core::config::ScriptLimits;
use llmproxy_core::{Config, Engine, HookName};
use serde_json::{json, Value};

/// LLMProxy: an LLM API gateway whose decisions are small Lua scripts.
#[derive(Debug, Parser)]
#[command(name = "llmproxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load a config and compile every script; exit 2 with every error found.
    Check {
        /// The YAML config file.
        config: PathBuf,
    },
    /// Run one hook once on a JSON object holding the hook's globals.
    Hook {
        /// routing, auth, request_transform, response_transform, rate_limit, usage or error_handler.
        hook: String,
        /// The Lua script.
        #[arg(long)]
        script: PathBuf,
        /// The input JSON file, or `-` for standard input (default: `{}`).
        #[arg(long)]
        input: Option<String>,
        /// Time limit in milliseconds.
        #[arg(long, default_value_t = llmproxy_core::config::DEFAULT_TIMEOUT_MS)]
        timeout_ms: u64,
        /// Memory limit in megabytes.
        #[arg(long, default_value_t = llmproxy_core::config::DEFAULT_MEMORY_MB)]
        memory_mb: u64,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Hook {
            hook,
            script,
            input,
            timeout_ms,
            memory_mb,
        } => run_hook(&hook, &script, input.as_deref(), timeout_ms, memory_mb),
    }
}

/// JSON logs on stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn check(path: &std::path::Path) -> ExitCode {
    let result = Config::from_file(path).and_then(Engine::new);
    match result {
        Ok(engine) => {
            let hooks: Vec<&str> = HookName::ALL
                .iter()
                .filter(|h| engine.is_enabled(**h))
                .map(|h| h.as_str())
                .collect();
            println!(
                "{}: ok ({} backends; hooks: {})",
                path.display(),
                engine.config().backends.len(),
                if hooks.is_empty() {
                    String::from("none")
                } else {
                    hooks.join(", ")
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {} problem(s)", path.display(), e.problems.len());
            for p in &e.problems {
                eprintln!("  {p}");
            }
            ExitCode::from(2)
        }
    }
}

fn usage_error(message: String) -> ExitCode {
    eprintln!("llmproxy hook: {message}");
    ExitCode::from(2)
}

fn run_hook(
    hook: &str,
    script: &std::path::Path,
    input: Option<&str>,
    timeout_ms: u64,
    memory_mb: u64,
) -> ExitCode {
    let hook: HookName = match hook.parse() {
        Ok(h) => h,
        Err(e) => return usage_error(e),
    };
    if !(1..=60_000).contains(&timeout_ms) || !(1..=4096).contains(&memory_mb) {
        return usage_error(String::from(
            "--timeout-ms must be 1..=60000 and --memory-mb 1..=4096",
        ));
    }
    let source = match std::fs::read_to_string(script) {
        Ok(s) => s,
        Err(e) => return usage_error(format!("cannot read {}: {e}", script.display())),
    };
    let text = match input {
        None => String::from("{}"),
        Some("-") => {
            let mut s = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                return usage_error(format!("cannot read standard input: {e}"));
            }
            s
        }
        Some(path) => match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => return usage_error(format!("cannot read {path}: {e}")),
        },
    };
    let limits = ScriptLimits {
        timeout_ms,
        memory_mb,
        ..ScriptLimits::default()
    };
    let input: Value = match llmproxy_core::convert::parse_json(
        text.as_bytes(),
        llmproxy_core::convert::Limits {
            max_depth: limits.max_depth + 1,
            max_bytes: limits.max_input_bytes,
        },
    ) {
        Ok(v) if v.is_object() => v,
        Ok(_) => {
            return usage_error(String::from(
                "the input must be a JSON object of the hook's globals",
            ))
        }
        Err(e) => return usage_error(format!("input: {e}")),
    };
    let name = script.display().to_string();
    let engine = match Engine::new(Config::single_hook(hook, &name, &source, limits)) {
        Ok(e) => e,
        Err(e) => {
            println!(
                "{}",
                json!({"ok": false, "error": {"kind": "script_error", "message": e.to_string()}})
            );
            return ExitCode::from(1);
        }
    };
    let started = Instant::now();
    let result = engine.run_json(hook, &input);
    let elapsed_us = started.elapsed().as_micros() as u64;
    match result {
        Ok(value) => {
            println!(
                "{}",
                json!({"ok": true, "result": value, "elapsed_us": elapsed_us})
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.kind == llmproxy_core::ErrorKind::BadInput => {
            println!(
                "{}",
                json!({"ok": false, "error": {"kind": e.kind.as_str(), "message": e.message}})
            );
            ExitCode::from(2)
        }
        Err(e) => {
            let mut err = json!({"kind": e.kind.as_str(), "message": e.message});
            if let Some(line) = e.line {
                err["line"] = json!(line);
            }
            println!(
                "{}",
                json!({"ok": false, "error": err, "elapsed_us": elapsed_us})
            );
            ExitCode::from(1)
        }
    }
}
