//! Command-line parsing: `serve` (the gateway), `mock-backend`, the
//! offline subcommands `check` and `hook`, and the operator's `keys` and
//! `usage` (see [`crate::admin_cli`]).
//!
//! Exit codes: 0 success, 1 the script failed (`hook`) or the server could
//! not start, 2 usage, input or config errors.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use llmproxy_core::config::ScriptLimits;
use llmproxy_core::{Config, Engine, HookName};
use serde_json::{json, Value};

use crate::admin_cli::{self, KeysCommand};
use crate::demo;
use crate::gateway::{Gateway, GatewayOptions};
use crate::listen::parse_listen;
use crate::mock::{MockOptions, MockServer};

/// LLMProxy: an LLM API gateway whose decisions are small Lua scripts.
#[derive(Debug, Parser)]
#[command(name = "llmproxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. Without --config: the built-in demo (three mock
    /// backends, the seed's viplevel routing script) on :8000.
    Serve {
        /// The YAML config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address (`:8000`, `127.0.0.1:8000`); overrides `listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Admin listener (`/admin/*`, `/metrics`), e.g. `127.0.0.1:8001`;
        /// overrides `admin.listen`.
        #[arg(long)]
        admin_listen: Option<String>,
    },
    /// Run an OpenAI-compatible fake backend (tests, demo, benchmarks).
    MockBackend {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        /// Name reported in `x-mock-backend`.
        #[arg(long, default_value = "mock")]
        name: String,
        /// Delay before the response (and before a stream's first event).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Content chunks per completion (stream events).
        #[arg(long, default_value_t = 8)]
        chunks: usize,
        /// Delay between stream events.
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
        /// Fraction of requests answered with a 500 (0..=1).
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
    },
    /// Load a config and compile every script; exit 2 with every error found.
    Check {
        /// The YAML config file.
        config: PathBuf,
    },
    /// Manage API keys (edits the config's keys_file; a running gateway
    /// reloads it).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Report usage from the ledger (per key; `--records` for each request).
    Usage {
        /// The gateway's config file (its `ledger.path` or `ledger.url` is read).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Ledgers to read instead: SQLite files (repeat to merge several
        /// nodes) or a fleet's PostgreSQL URL (`postgres://...`).
        #[arg(long = "db")]
        dbs: Vec<PathBuf>,
        /// Only requests completed since (RFC 3339, or an age: 30s, 15m, 2h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Only this key (the key or its `sha256:` fingerprint).
        #[arg(long)]
        key: Option<String>,
        /// `json` or `csv`.
        #[arg(long, default_value = "json")]
        format: String,
        /// One row per request instead of per key.
        #[arg(long)]
        records: bool,
    },
    /// Run one hook once on a JSON object holding the hook's globals.
    #[command(after_help = HOOK_INPUT_HELP)]
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

/// The shape of `llmproxy hook --input`, shown by `llmproxy hook --help`.
/// `examples/inputs/<hook>.json` holds a complete input per hook.
const HOOK_INPUT_HELP: &str = r#"Input (--input): a JSON object whose keys are the hook's globals; a global
left out is nil. A complete input per hook: examples/inputs/<hook>.json.

  routing             {"request": R, "backends": {"<name>": {"url": "http://...", "healthy": true,
                       "weight": 10, "latency_ms": 80, "active_connections": 3}, ...}}
                      (a name the script returns must be a key of backends)
  auth                {"request": R, "key_info": {"key", "user_id", "name", "status", "total_quota",
                       "used_quota", "allowed_ips", "expires_at"} (left out: unknown key),
                       "standard_checks": {"key_valid", "status_active", "not_expired",
                       "ip_allowed", "quota_available"}}
  request_transform   {"request": R with "backend_url"}
  response_transform  {"request": R, "response": {"status_code", "body", "headers", "is_stream"},
                       "backend_url", "latency_ms"}
  rate_limit          {"request": R, "key_info": {...}, "rate_limit_status": {"global_remaining",
                       "key_remaining", "concurrent_count"}, "current_time": {"hour",
                       "weekday", "timestamp"}}
  usage               {"request": R, "usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
                       "response": {"status_code", "body"}, "metadata": {"backend_url",
                       "latency_ms", "is_stream"}}
  error_handler       {"request": R, "error": {"type", "message", "status_code", "backend_url",
                       "retry_count"}}

  R = {"id": "req-1", "body": {"model": "gpt-4", ...}, "headers": {...}, "user_id",
       "api_key", "client_ip", "path"}

Example:
  llmproxy hook routing --script examples/scripts/routing.lua --input examples/inputs/routing.json
  {"ok":true,"result":"ultra","elapsed_us":113}"#;

/// Entry point of the `llmproxy` binary.
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
        Command::Serve {
            config,
            listen,
            admin_listen,
        } => serve(config, listen, admin_listen),
        Command::MockBackend {
            listen,
            name,
            latency_ms,
            chunks,
            chunk_delay_ms,
            fail_rate,
        } => mock_backend(
            &listen,
            llmproxy_mock_options(name, latency_ms, chunks, chunk_delay_ms, fail_rate),
        ),
        Command::Check { config } => check(&config),
        Command::Keys { command } => admin_cli::keys(command),
        Command::Usage {
            config,
            dbs,
            since,
            key,
            format,
            records,
        } => admin_cli::usage(
            config.as_deref(),
            &dbs,
            since.as_deref(),
            key.as_deref(),
            &format,
            records,
        ),
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

fn llmproxy_mock_options(
    name: String,
    latency_ms: u64,
    chunks: usize,
    chunk_delay_ms: u64,
    fail_rate: f64,
) -> MockOptions {
    MockOptions {
        name,
        latency_ms,
        chunks,
        chunk_delay_ms,
        fail_rate,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("llmproxy: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

fn serve(config: Option<PathBuf>, listen: Option<String>, admin_listen: Option<String>) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let (mut config, _mocks) = match &config {
            Some(path) => match Config::from_file(path) {
                Ok(c) => (c, Vec::new()),
                Err(e) => {
                    eprintln!("{}: {} problem(s)", path.display(), e.problems.len());
                    for p in &e.problems {
                        eprintln!("  {p}");
                    }
                    return ExitCode::from(2);
                }
            },
            None => match demo::start().await {
                Ok((c, mocks)) => {
                    tracing::info!(
                        target: "llmproxy::gateway",
                        backends = ?mocks.iter().map(MockServer::url).collect::<Vec<_>>(),
                        "no --config: serving the built-in demo (standard, high-performance, ultra)"
                    );
                    (c, mocks)
                }
                Err(e) => {
                    eprintln!("llmproxy serve: {e}");
                    return ExitCode::from(1);
                }
            },
        };
        let text = listen
            .or_else(|| config.listen.clone())
            .unwrap_or_else(|| String::from(":8000"));
        let addr = match parse_listen(&text) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("llmproxy serve: {e}");
                return ExitCode::from(2);
            }
        };
        if admin_listen.is_some() {
            config.admin.listen = admin_listen;
        }
        let gateway = match Gateway::start(config, addr, GatewayOptions::default()).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("llmproxy serve: {e}");
                return ExitCode::from(1);
            }
        };
        tracing::info!(
            target: "llmproxy::gateway",
            addr = %gateway.local_addr(),
            admin_addr = %gateway.admin_addr().map_or_else(|| String::from("off"), |a| a.to_string()),
            hook_threads = gateway.shared().hooks.threads(),
            "listening"
        );
        let shared = std::sync::Arc::clone(gateway.shared());
        let hup = tokio::spawn(async move {
            #[cfg(unix)]
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                while s.recv().await.is_some() {
                    shared.reload(crate::gateway::reload::Trigger::Signal).await;
                }
            }
            #[cfg(not(unix))]
            let _ = shared;
        });
        shutdown_signal().await;
        hup.abort();
        tracing::info!(target: "llmproxy::gateway", "shutting down");
        gateway.shutdown(Duration::from_secs(10)).await;
        tracing::info!(target: "llmproxy::gateway", "stopped");
        ExitCode::SUCCESS
    })
}

fn mock_backend(listen: &str, options: MockOptions) -> ExitCode {
    if !(0.0..=1.0).contains(&options.fail_rate) {
        eprintln!("llmproxy mock-backend: --fail-rate must be within 0..=1");
        return ExitCode::from(2);
    }
    let addr = match parse_listen(listen) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("llmproxy mock-backend: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let mock = match MockServer::start(addr, options).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("llmproxy mock-backend: cannot listen on {addr}: {e}");
                return ExitCode::from(1);
            }
        };
        tracing::info!(target: "llmproxy::mock", addr = %mock.local_addr(), "listening");
        shutdown_signal().await;
        ExitCode::SUCCESS
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
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
            let config = engine.config();
            let zone = config
                .limits
                .zone()
                .map_or_else(|e| e, |z| z.describe(chrono::Utc::now()));
            println!(
                "{}: ok ({} backends; hooks: {}; current_time zone: {zone})",
                path.display(),
                config.backends.len(),
                if hooks.is_empty() {
                    String::from("none")
                } else {
                    hooks.join(", ")
                }
            );
            for w in config.warnings() {
                eprintln!("  warning: {w}");
            }
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

fn run_hook(hook: &str, script: &std::path::Path, input: Option<&str>, timeout_ms: u64, memory_mb: u64) -> ExitCode {
    let hook: HookName = match hook.parse() {
        Ok(h) => h,
        Err(e) => return usage_error(e),
    };
    if !(1..=60_000).contains(&timeout_ms) || !(1..=4096).contains(&memory_mb) {
        return usage_error(String::from("--timeout-ms must be 1..=60000 and --memory-mb 1..=4096"));
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
        Ok(_) => return usage_error(String::from("the input must be a JSON object of the hook's globals")),
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
            println!("{}", json!({"ok": true, "result": value, "elapsed_us": elapsed_us}));
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
            println!("{}", json!({"ok": false, "error": err, "elapsed_us": elapsed_us}));
            ExitCode::from(1)
        }
    }
}
