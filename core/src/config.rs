//! The YAML configuration (seed design, "统一配置格式").
//!
//! Canonical form: `listen`, `backends`, and `scripts.<hook>` for each of
//! the seven hooks (`enabled`, `script` | `script_file`, `timeout_ms`,
//! `memory_mb`, `on_error`), with `scripts.defaults` for the global limits and
//! `scripts.pool` for the VM pool. The seed's per-section snippets load too:
//! `routing.script`, `routing.request_transform`, `routing.response_transform`,
//! `auth`, `rate_limit`, `usage_hook` and `error_handler`.
//!
//! Standalone gateways also read `gateway:` ([`GatewayConfig`]: balancer,
//! body limit, models, retry, timeouts, health) and per-backend
//! `timeouts`; other hosts ignore them. The account sections are also read
//! by gateways only: `keys:` / `keys_file:` (API keys, [`KeyRecord`]),
//! `limits:` ([`LimitsConfig`]), `state:` ([`StateConfig`]), `ledger:`
//! ([`LedgerConfig`]), `admin:` ([`AdminConfig`]) and `reload:`
//! ([`ReloadConfig`]).
//!
//! Every problem names its key path (`scripts.routing.timeout_ms: ...`);
//! `script_file` paths are relative to the config file. Every problem is
//! reported at once: structural ones (unknown keys, wrong types: each is
//! cut out and the rest parsed again) and semantic ones (missing files, `script` and
//! `script_file` both set, a hook defined twice, duplicate backends).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

mod accounts_only;
pub use accounts_only::AccountsConfig;

use crate::admission::Check;
use crate::error::ConfigError;
use crate::hooks::HookName;
use crate::keys::KeyRecord;

mod structural;
mod yaml_error;

/// Default per-call time limit.
pub const DEFAULT_TIMEOUT_MS: u64 = 100;
/// Default per-call memory allowance.
pub const DEFAULT_MEMORY_MB: u64 = 10;
/// Largest `max_depth` a config may set (hosts that parse input before they
/// know which hook it is for parse within this).
pub const MAX_DEPTH_LIMIT: usize = 1000;
/// Largest `max_input_bytes` / `max_output_bytes` a config may set.
pub const MAX_BYTES_LIMIT: usize = 1 << 32;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (`":8000"`, `"127.0.0.1:8000"`), for gateways.
    pub listen: Option<String>,
    /// The configured backends.
    pub backends: Vec<BackendConfig>,
    /// Enabled hooks, indexed by [`HookName::index`].
    pub hooks: [Option<HookConfig>; 7],
    /// Global script limits (after defaults).
    pub defaults: ScriptLimits,
    /// VM pool settings.
    pub pool: PoolConfig,
    /// Standalone gateway settings (`gateway:`).
    pub gateway: GatewayConfig,
    /// API keys from `keys:` and `keys_file:`, in that order.
    pub keys: Vec<KeyRecord>,
    /// Whether the config declares keys at all (`keys:` or `keys_file:`
    /// present, even when empty): gateways then check every request's key.
    pub keys_configured: bool,
    /// The `keys_file`, resolved against the config's directory.
    pub keys_file: Option<PathBuf>,
    /// The standard checks whose failure an `auth` script's `allow = true`
    /// may overrule (`scripts.auth.may_override`, default none:
    /// docs/adr/040).
    pub auth_may_override: Vec<Check>,
    /// The standard rate limiter (`limits:`).
    pub limits: LimitsConfig,
    /// Where limiter and quota counters live (`state:`).
    pub state: StateConfig,
    /// The usage ledger (`ledger:`); `None` when absent or disabled.
    pub ledger: Option<LedgerConfig>,
    /// The admin endpoint (`admin:`).
    pub admin: AdminConfig,
    /// Hot reload settings (`reload:`).
    pub reload: ReloadConfig,
    /// The files this config was built from besides the config file itself
    /// (`keys_file`, `script_file`s), resolved; watched for hot reload.
    pub sources: Vec<PathBuf>,
    /// The file this config was read from, if any.
    pub path: Option<PathBuf>,
}

/// The standard rate limiter (`limits:`). Every limit is a token bucket
/// refilled continuously (a limit of N per minute holds at most N tokens and
/// gains N/60 per second); 0 means unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests per minute over all keys.
    pub global_rpm: u64,
    /// Requests per minute per key.
    pub key_rpm: u64,
    /// Tokens per minute per key (charged after each response).
    pub key_tpm: u64,
    /// Requests in flight per key.
    pub key_concurrency: u64,
    /// The zone of `current_time` for `rate_limit` scripts: `local` (the
    /// default: the machine's zone, `TZ` or the system's), `UTC`, or a
    /// fixed offset such as `+08:00` (docs/adr/041).
    pub time_zone: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            global_rpm: 0,
            key_rpm: 0,
            key_tpm: 0,
            key_concurrency: 0,
            time_zone: String::from("local"),
        }
    }
}

impl LimitsConfig {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.global_rpm > 0 || self.key_rpm > 0 || self.key_tpm > 0 || self.key_concurrency > 0
    }

    /// `time_zone` as seconds east of UTC (an error for `local`, whose
    /// offset changes with the date: use [`LimitsConfig::zone`]).
    pub fn utc_offset_seconds(&self) -> Result<i32, String> {
        parse_utc_offset(&self.time_zone)
    }

    /// `time_zone`, parsed.
    pub fn zone(&self) -> Result<crate::clock::Zone, String> {
        crate::clock::Zone::parse(&self.time_zone)
    }
}

/// Parse `UTC`, `Z` or a fixed offset `+HH:MM` / `-HH:MM` / `+HH` into
/// seconds east of UTC.
pub fn parse_utc_offset(text: &str) -> Result<i32, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" || t.is_empty() {
        return Ok(0);
    }
    let bad = || format!("'{text}' is not UTC or a fixed offset such as +08:00");
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "0"),
    };
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    Ok(sign * (h * 3600 + m * 60))
}

/// Where the limiter's and the quotas' counters live (`state:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `local` (this process; quotas persisted in the ledger) or `redis`
    /// (shared by every gateway using the same Redis and prefix).
    pub backend: StateBackend,
    /// `redis://host:port[/db]` for the `redis` backend.
    pub url: Option<String>,
    /// Prefix of every Redis key.
    pub prefix: String,
    /// Time limit of one Redis call.
    pub timeout_ms: u64,
    /// What a request gets when Redis cannot be reached.
    pub on_error: StateOnError,
    /// Connections to Redis.
    pub connections: usize,
    /// `batched` (the default: admit from this node's view, settle with
    /// Redis every `settle_ms`; docs/adr/051) or `exact` (Redis on every
    /// request).
    pub mode: StateMode,
    /// How often a batched node settles with Redis (ms).
    pub settle_ms: u64,
    /// Most requests a batched node admits under one limit unseen by the
    /// fleet (and at most 1% of the limit). The default (500) only caps
    /// limits above 50,000 a minute, and lets the timer, not the count,
    /// pace settlements up to ~25,000 requests a second per node.
    pub batch: u64,
    /// PEM roots to verify a `rediss://` server with (a private CA),
    /// resolved against the config's directory; default: the system's.
    pub tls_ca_file: Option<PathBuf>,
}

/// How a Redis-backed node counts (`state.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateMode {
    /// From a local view, settled in batches (`policy::fleet`).
    #[default]
    Batched,
    /// One Redis call per request.
    Exact,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Local,
            url: None,
            prefix: String::from("llmproxy:"),
            timeout_ms: 250,
            on_error: StateOnError::Deny,
            connections: 2,
            mode: StateMode::Batched,
            settle_ms: 10,
            batch: 500,
            tls_ca_file: None,
        }
    }
}

/// The state backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateBackend {
    /// In this process.
    #[default]
    Local,
    /// In Redis, shared by several gateways.
    Redis,
}

impl StateBackend {
    /// Whether the ledger's `key_usage` table holds the keys' quota usage
    /// (each ledger row's billable tokens are charged there): with the
    /// local backend it does; with Redis, Redis holds the quota and the
    /// ledger keeps the rows only. The rule both hosts fill a ledger row's
    /// `charge_quota` with.
    pub fn ledger_holds_quota(self) -> bool {
        self == StateBackend::Local
    }
}

/// What a request gets when the state backend fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateOnError {
    /// 503 `state_unavailable` (fail closed).
    #[default]
    #[serde(alias = "fail_closed")]
    Deny,
    /// Admit (fail open): in `batched` mode on this node's limits, with the
    /// counts settled after recovery; in `exact` mode uncounted.
    #[serde(alias = "fail_open")]
    Allow,
}

/// The usage ledger (`ledger:`), a SQLite database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// The database file, resolved against the config's directory (unused
    /// with `url`).
    pub path: PathBuf,
    /// A PostgreSQL database a fleet shares (`postgres://...`) instead of
    /// the SQLite file (docs/adr/052).
    pub url: Option<String>,
    /// Longest time a record waits before it is written (1..=100 ms).
    pub flush_ms: u64,
    /// Most records written in one transaction.
    pub batch_max: usize,
    /// Records queued for the writer before producers wait.
    pub queue: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    enabled: Option<bool>,
    path: Option<String>,
    url: Option<String>,
    flush_ms: Option<u64>,
    batch_max: Option<usize>,
    queue: Option<usize>,
}

/// The admin listener and endpoint (`admin:`, docs/adr/038).
///
/// `POST /admin/reload` and `GET /metrics` are served on their own listener
/// (`listen`), never on the public one unless `on_public_listener` says so.
/// Without `listen` (and without `on_public_listener`) neither is served.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token of `POST /admin/reload`; without it the endpoint is off.
    /// On a listener that is not loopback it must not be a shipped example
    /// token and must be at least [`crate::admin::MIN_EXPOSED_TOKEN_BYTES`]
    /// long (see [`crate::admin::exposed_token_problem`]).
    pub token: Option<String>,
    /// Address of the admin listener (`/admin/*`, `/metrics`, `/healthz`),
    /// e.g. `127.0.0.1:8001`; absent: no admin listener.
    pub listen: Option<String>,
    /// Also serve `/admin/*` and `/metrics` on the public listener (the
    /// behaviour before the admin listener existed). Off by default.
    pub on_public_listener: bool,
}

/// Hot reload (`reload:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Reload when the config file, the keys file or a script file changes.
    pub watch: bool,
    /// How often their modification times are polled.
    pub poll_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            poll_ms: 1000,
        }
    }
}

/// The forms a `keys_file` may take: a list of keys, or `{keys: [...]}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawKeysFile {
    List(Vec<KeyRecord>),
    Map {
        #[serde(default)]
        keys: Vec<KeyRecord>,
    },
}

/// Read a keys file (YAML or JSON: a list of keys, or `{keys: [...]}`).
pub fn read_keys_file(path: &Path) -> Result<Vec<KeyRecord>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read '{}': {e}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let de = serde_norway::Deserializer::from_str(&text);
    let raw: Option<RawKeysFile> = serde_path_to_error::deserialize(de)
        .map_err(|e| format!("'{}': {}", path.display(), yaml_error::describe(&e)))?;
    Ok(match raw {
        None => Vec::new(),
        Some(RawKeysFile::List(k)) | Some(RawKeysFile::Map { keys: k }) => k,
    })
}

/// A backend from the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique name, used by routing scripts.
    pub name: String,
    /// Base URL, e.g. `http://127.0.0.1:9000`.
    pub url: String,
    /// Balancer weight (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Extra headers sent upstream (e.g. an upstream API key).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per-backend upstream timeouts; unset fields use `gateway.timeouts`.
    #[serde(default)]
    pub timeouts: TimeoutsOverride,
}

/// Per-backend overrides of [`TimeoutsConfig`] (gateways only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsOverride {
    /// Connect timeout.
    pub connect_ms: Option<u64>,
    /// Time from sending the request to the response head.
    pub first_byte_ms: Option<u64>,
    /// Longest silence between two body chunks.
    pub idle_ms: Option<u64>,
}

/// Settings of a standalone gateway (`gateway:`). Every field is optional;
/// hosts that are not gateways (the C ABI, OpenResty) ignore the section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Default balancer when routing returns nil.
    pub balancer: BalancerKind,
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Largest non-streamed upstream response body the gateway buffers.
    pub max_response_bytes: usize,
    /// Model ids served by `GET /v1/models` (empty: the backend names).
    pub models: Vec<String>,
    /// Retries on another backend.
    pub retry: RetryConfig,
    /// Upstream timeouts.
    pub timeouts: TimeoutsConfig,
    /// Passive and active health checking.
    pub health: HealthConfig,
    /// Most client connections open at once; connections over the cap get
    /// a 503 (`too_many_connections`) with `Connection: close`.
    pub max_connections: usize,
    /// Longest time to receive a request body once its head arrived (408
    /// and the connection closes after it).
    pub body_read_timeout_ms: u64,
    /// Longest time a write to a client may stay blocked (a client that
    /// stops reading): the connection, and the upstream stream it was
    /// relaying, are then dropped.
    pub write_timeout_ms: u64,
    /// Largest SSE event the relay buffers while waiting for its end; an
    /// upstream event over it ends the stream (502 before the first event,
    /// an error event after).
    pub max_event_bytes: usize,
    /// Most hook jobs queued for the hook threads; a request whose job
    /// does not fit, or does not start within `scripts.pool.checkout_timeout_ms`,
    /// gets a 503 (`hooks_overloaded`).
    pub hook_queue: usize,
    /// Budget of a hook job run inline on the gateway's async worker, in
    /// milliseconds; a job that passes it is stopped and runs again on a
    /// hook thread (docs/adr/049). 0: every job goes to the hook threads.
    pub inline_budget_ms: u64,
    /// Threads serving client connections, each with its own
    /// single-threaded runtime and upstream pools; 0: one per CPU.
    pub workers: usize,
    /// Throttling of clients that keep failing API key or admin token
    /// checks (docs/adr/039).
    pub auth_throttle: AuthThrottleConfig,
}

/// Throttling of failed credential attempts per client address
/// (`gateway.auth_throttle`): each address may fail `max_failures` times in
/// a burst, and earns one more attempt every `window_s / max_failures`
/// seconds; past that, its requests are answered 429 with `Retry-After`
/// before any key or token is checked. IPv6 clients are grouped by /64.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthThrottleConfig {
    /// Failures allowed in a burst (0: no throttling).
    pub max_failures: u32,
    /// Time over which `max_failures` attempts come back, in seconds.
    pub window_s: u64,
    /// Most client addresses tracked at once (memory bound); addresses
    /// beyond it are not throttled until tracked ones recover.
    pub max_clients: usize,
}

impl Default for AuthThrottleConfig {
    fn default() -> Self {
        AuthThrottleConfig {
            max_failures: 10,
            window_s: 60,
            max_clients: 100_000,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            balancer: BalancerKind::default(),
            max_body_bytes: 10 << 20,
            max_response_bytes: 64 << 20,
            models: Vec::new(),
            retry: RetryConfig::default(),
            timeouts: TimeoutsConfig::default(),
            health: HealthConfig::default(),
            auth_throttle: AuthThrottleConfig::default(),
            max_connections: 1024,
            body_read_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            max_event_bytes: 1 << 20,
            hook_queue: 1024,
            inline_budget_ms: 1,
            workers: 0,
        }
    }
}

/// Most connection workers a gateway may start (`gateway.workers`).
pub const MAX_WORKERS: usize = 1024;

/// The default balancer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Smooth weighted round robin over healthy backends.
    #[default]
    WeightedRoundRobin,
    /// Fewest requests in flight per unit of weight.
    LeastConnections,
    /// Lowest latency EWMA.
    LowestLatency,
}

impl BalancerKind {
    /// Every kind.
    pub const ALL: [BalancerKind; 3] = [
        BalancerKind::WeightedRoundRobin,
        BalancerKind::LeastConnections,
        BalancerKind::LowestLatency,
    ];

    /// The config's name (`gateway.balancer`).
    pub fn as_str(self) -> &'static str {
        match self {
            BalancerKind::WeightedRoundRobin => "weighted_round_robin",
            BalancerKind::LeastConnections => "least_connections",
            BalancerKind::LowestLatency => "lowest_latency",
        }
    }

    /// The kind [`BalancerKind::as_str`] names.
    pub fn parse(name: &str) -> Option<BalancerKind> {
        BalancerKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// When a failed attempt is retried on another backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries after the first attempt (0 disables retries).
    pub max_retries: u32,
    /// Upstream statuses that are retried.
    pub on_status: Vec<u16>,
    /// Retry when the connection cannot be made.
    pub on_connect_error: bool,
    /// Retry when the backend does not answer in time.
    pub on_timeout: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 2,
            on_status: vec![500, 502, 503, 504],
            on_connect_error: true,
            on_timeout: true,
        }
    }
}

/// Upstream timeouts, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Connect timeout.
    pub connect_ms: u64,
    /// Time from sending the request to the response head (and, for
    /// streams, to the first event).
    pub first_byte_ms: u64,
    /// Longest silence between two body chunks.
    pub idle_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect_ms: 2_000,
            first_byte_ms: 60_000,
            idle_ms: 60_000,
        }
    }
}

/// Health checking of backends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive failures that mark a backend unhealthy.
    pub failures_to_unhealthy: u32,
    /// Consecutive successes that mark an unhealthy backend healthy again.
    pub successes_to_healthy: u32,
    /// An unhealthy backend gets trial requests again after this long.
    pub cooldown_ms: u64,
    /// Active probe period (0: passive checks only).
    pub probe_interval_ms: u64,
    /// Path probed with `GET`.
    pub probe_path: String,
    /// Probe timeout.
    pub probe_timeout_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            failures_to_unhealthy: 3,
            successes_to_healthy: 1,
            cooldown_ms: 5_000,
            probe_interval_ms: 0,
            probe_path: String::from("/healthz"),
            probe_timeout_ms: 1_000,
        }
    }
}

fn default_weight() -> u32 {
    1
}

/// What a host does when a hook's script fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Act as if the script returned `nil` (the standard behaviour).
    Standard,
    /// Fail the request (503). The default for `auth`: fail closed.
    Deny,
}

impl OnError {
    /// The default policy of a hook (`docs/architecture.md`, "Failure policy").
    pub fn default_for(hook: HookName) -> OnError {
        match hook {
            HookName::Auth => OnError::Deny,
            _ => OnError::Standard,
        }
    }
}

/// Limits applied to one script call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptLimits {
    /// Wall-clock time limit per call.
    pub timeout_ms: u64,
    /// Memory the script may allocate per call.
    pub memory_mb: u64,
    /// Maximum nesting of input and output tables.
    pub max_depth: usize,
    /// Maximum size of the hook's JSON input.
    pub max_input_bytes: usize,
    /// Maximum size of the script's result as JSON.
    pub max_output_bytes: usize,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        ScriptLimits {
            timeout_ms: DEFAULT_TIMEOUT_MS,
            memory_mb: DEFAULT_MEMORY_MB,
            max_depth: 64,
            max_input_bytes: 16 << 20,
            max_output_bytes: 16 << 20,
        }
    }
}

/// VM pool settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most VMs alive at once (0 = two per CPU).
    pub size: usize,
    /// A VM is replaced after this many calls. A new VM compiles its
    /// traces again; at 100,000 that warm-up cost ~2.5% of the four-hook
    /// gateway's CPU, so the default is 1,000,000 (the heap check below
    /// catches a VM that grows).
    pub recycle_after_calls: u64,
    /// A VM holding more than this after a call (and a full GC) is replaced.
    pub recycle_memory_mb: u64,
    /// How long a call waits for a free VM before failing.
    pub checkout_timeout_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 0,
            recycle_after_calls: 1_000_000,
            recycle_memory_mb: 32,
            checkout_timeout_ms: 1000,
        }
    }
}

/// An enabled hook: its script, limits and failure policy.
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// Which hook.
    pub hook: HookName,
    /// The script.
    pub script: Script,
    /// Limits, after defaults.
    pub limits: ScriptLimits,
    /// Failure policy.
    pub on_error: OnError,
    /// The `script_file`, resolved, when the script came from a file.
    pub file: Option<PathBuf>,
}

/// A script's source and the name errors refer to it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// `scripts.routing` for inline scripts, the file path for files.
    pub name: Arc<str>,
    /// The Lua source text.
    pub source: Arc<str>,
}

// ---- the YAML shape ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    #[serde(default)]
    backends: Vec<BackendConfig>,
    #[serde(default)]
    scripts: RawScripts,
    #[serde(default)]
    gateway: GatewayConfig,
    keys: Option<Vec<KeyRecord>>,
    keys_file: Option<String>,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    state: StateConfig,
    ledger: Option<RawLedger>,
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default)]
    reload: ReloadConfig,
    // The seed's per-section forms.
    routing: Option<RawSeedRouting>,
    auth: Option<RawHook>,
    rate_limit: Option<RawHook>,
    usage_hook: Option<RawHook>,
    error_handler: Option<RawHook>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScripts {
    defaults: Option<RawLimits>,
    pool: Option<PoolConfig>,
    routing: Option<RawHook>,
    auth: Option<RawHook>,
    request_transform: Option<RawHook>,
    response_transform: Option<RawHook>,
    rate_limit: Option<RawHook>,
    usage: Option<RawHook>,
    error_handler: Option<RawHook>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    timeout_ms: Option<u64>,
    memory_mb: Option<u64>,
    max_depth: Option<usize>,
    max_input_bytes: Option<usize>,
    max_output_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    enabled: Option<bool>,
    script: Option<String>,
    script_file: Option<String>,
    timeout_ms: Option<u64>,
    memory_mb: Option<u64>,
    max_depth: Option<usize>,
    max_input_bytes: Option<usize>,
    max_output_bytes: Option<usize>,
    on_error: Option<OnError>,
    /// `auth` only: the checks a script's `allow = true` may overrule.
    may_override: Option<Vec<Check>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeedRouting {
    enabled: Option<bool>,
    script: Option<String>,
    script_file: Option<String>,
    timeout_ms: Option<u64>,
    memory_mb: Option<u64>,
    on_error: Option<OnError>,
    request_transform: Option<RawHook>,
    response_transform: Option<RawHook>,
}

impl Config {
    /// Read and validate a config file; `script_file`s are relative to it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: cannot read config: {e}", path.display())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = Config::from_yaml(&text, &base)?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parse and validate YAML text; `script_file`s are relative to `base_dir`.
    pub fn from_yaml(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        match structural::deserialize_all::<RawConfig>(text) {
            Ok(raw) => raw.resolve(base_dir),
            // Every unknown key and wrong type, then what the rest of the
            // document gets wrong (missing files, duplicate backends, ...).
            Err((mut problems, rest)) => {
                if let Some(Err(e)) = rest.map(|raw| raw.resolve(base_dir)) {
                    problems.extend(e.problems);
                }
                Err(ConfigError { problems })
            }
        }
    }

    /// A config with one inline script (used by `llmproxy hook`).
    pub fn single_hook(hook: HookName, name: &str, source: &str, limits: ScriptLimits) -> Config {
        let mut hooks: [Option<HookConfig>; 7] = Default::default();
        hooks[hook.index()] = Some(HookConfig {
            hook,
            script: Script {
                name: Arc::from(name),
                source: Arc::from(source),
            },
            limits,
            on_error: OnError::default_for(hook),
            file: None,
        });
        Config {
            listen: None,
            backends: Vec::new(),
            hooks,
            defaults: limits,
            pool: PoolConfig::default(),
            gateway: GatewayConfig::default(),
            keys: Vec::new(),
            keys_configured: false,
            keys_file: None,
            auth_may_override: Vec::new(),
            limits: LimitsConfig::default(),
            state: StateConfig::default(),
            ledger: None,
            admin: AdminConfig::default(),
            reload: ReloadConfig::default(),
            sources: Vec::new(),
            path: None,
        }
    }

    /// What loads but deserves a warning (hosts log these; `llmproxy
    /// check` prints them), such as a key's `total_quota: 0`.
    pub fn warnings(&self) -> Vec<String> {
        self.keys
            .iter()
            .flat_map(|k| k.warnings(&format!("keys[{}]", k.fingerprint())))
            .collect()
    }

    /// The enabled hook's settings, if it is enabled.
    pub fn hook(&self, hook: HookName) -> Option<&HookConfig> {
        self.hooks[hook.index()].as_ref()
    }
}

impl RawConfig {
    fn resolve(self, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let defaults = apply_limits(
            ScriptLimits::default(),
            self.scripts.defaults.as_ref(),
            "scripts.defaults",
            &mut problems,
        );

        // (config key path, hook, section) in a fixed order.
        let mut sections: Vec<(String, HookName, RawHook)> = Vec::new();
        let s = self.scripts;
        for (hook, raw) in [
            (HookName::Routing, s.routing),
            (HookName::Auth, s.auth),
            (HookName::RequestTransform, s.request_transform),
            (HookName::ResponseTransform, s.response_transform),
            (HookName::RateLimit, s.rate_limit),
            (HookName::Usage, s.usage),
            (HookName::ErrorHandler, s.error_handler),
        ] {
            if let Some(raw) = raw {
                sections.push((format!("scripts.{hook}"), hook, raw));
            }
        }
        if let Some(r) = self.routing {
            if r.script.is_some() || r.script_file.is_some() || r.enabled.is_some() {
                let raw = RawHook {
                    enabled: r.enabled,
                    script: r.script,
                    script_file: r.script_file,
                    timeout_ms: r.timeout_ms,
                    memory_mb: r.memory_mb,
                    on_error: r.on_error,
                    ..RawHook::default()
                };
                sections.push(("routing".into(), HookName::Routing, raw));
            }
            if let Some(raw) = r.request_transform {
                sections.push(("routing.request_transform".into(), HookName::RequestTransform, raw));
            }
            if let Some(raw) = r.response_transform {
                sections.push(("routing.response_transform".into(), HookName::ResponseTransform, raw));
            }
        }
        for (key, hook, raw) in [
            ("auth", HookName::Auth, self.auth),
            ("rate_limit", HookName::RateLimit, self.rate_limit),
            ("usage_hook", HookName::Usage, self.usage_hook),
            ("error_handler", HookName::ErrorHandler, self.error_handler),
        ] {
            if let Some(raw) = raw {
                sections.push((key.into(), hook, raw));
            }
        }

        let mut hooks: [Option<HookConfig>; 7] = Default::default();
        let mut defined_at: [Option<String>; 7] = Default::default();
        let mut auth_may_override = Vec::new();
        for (key, hook, mut raw) in sections {
            if let Some(first) = &defined_at[hook.index()] {
                problems.push(format!("{key}: the {hook} hook is already defined at {first}"));
                continue;
            }
            defined_at[hook.index()] = Some(key.clone());
            match raw.may_override.take() {
                Some(list) if hook == HookName::Auth => auth_may_override = list,
                Some(_) => problems.push(format!("{key}.may_override: only the auth hook has may_override")),
                None => {}
            }
            if let Some(cfg) = resolve_hook(&key, hook, raw, defaults, base_dir, &mut problems) {
                hooks[hook.index()] = Some(cfg);
            }
        }

        let mut seen = BTreeMap::new();
        for (i, b) in self.backends.iter().enumerate() {
            if b.name.trim().is_empty() {
                problems.push(format!("backends[{i}].name: must not be empty"));
            }
            if let Some(first) = seen.insert(b.name.clone(), i) {
                problems.push(format!(
                    "backends[{i}].name: '{}' is already used by backends[{first}]",
                    b.name
                ));
            }
            if !(b.url.starts_with("http://") || b.url.starts_with("https://")) {
                problems.push(format!(
                    "backends[{i}].url: '{}' must start with http:// or https://",
                    b.url
                ));
            }
            // `Host` may be named (a backend behind a name-based virtual
            // host); the rest of what hosts write themselves may not.
            for name in b.headers.keys() {
                if !name.eq_ignore_ascii_case("host") && !crate::http::hop_by_hop::script_may_set(name) {
                    problems.push(format!(
                        "backends[{i}].headers: '{name}' is written by the host (hop-by-hop or Content-Length)"
                    ));
                }
            }
        }

        let g = &self.gateway;
        if g.max_body_bytes == 0 {
            problems.push(String::from("gateway.max_body_bytes: must be > 0"));
        }
        for (name, v) in [
            ("max_connections", g.max_connections as u64),
            ("body_read_timeout_ms", g.body_read_timeout_ms),
            ("write_timeout_ms", g.write_timeout_ms),
            ("max_event_bytes", g.max_event_bytes as u64),
            ("hook_queue", g.hook_queue as u64),
        ] {
            if v == 0 {
                problems.push(format!("gateway.{name}: must be > 0"));
            }
        }
        if g.workers > MAX_WORKERS {
            problems.push(format!(
                "gateway.workers: {} is more than {MAX_WORKERS} (0 means one per CPU)",
                g.workers
            ));
        }
        if g.max_retries_out_of_range() {
            problems.push(format!(
                "gateway.retry.max_retries: {} is out of range (0..=10)",
                g.retry.max_retries
            ));
        }
        for (i, code) in g.retry.on_status.iter().enumerate() {
            if !(100..=599).contains(code) {
                problems.push(format!("gateway.retry.on_status[{i}]: {code} is not an HTTP status"));
            }
        }
        let t = &g.timeouts;
        for (name, v) in [
            ("connect_ms", t.connect_ms),
            ("first_byte_ms", t.first_byte_ms),
            ("idle_ms", t.idle_ms),
        ] {
            if v == 0 {
                problems.push(format!("gateway.timeouts.{name}: must be > 0"));
            }
        }
        if g.health.failures_to_unhealthy == 0 || g.health.successes_to_healthy == 0 {
            problems.push(String::from(
                "gateway.health: failures_to_unhealthy and successes_to_healthy must be > 0",
            ));
        }
        let th = &g.auth_throttle;
        if th.max_failures > 0 && !(1..=86_400).contains(&th.window_s) {
            problems.push(format!(
                "gateway.auth_throttle.window_s: {} is out of range (1..=86400)",
                th.window_s
            ));
        }
        if th.max_failures > 0 && th.max_clients == 0 {
            problems.push(String::from("gateway.auth_throttle.max_clients: must be > 0"));
        }
        if !g.health.probe_path.starts_with('/') {
            problems.push(format!(
                "gateway.health.probe_path: '{}' must start with /",
                g.health.probe_path
            ));
        }

        let mut sources: Vec<PathBuf> = hooks.iter().flatten().filter_map(|h| h.file.clone()).collect();
        let accounts = resolve_accounts(
            AccountSections {
                keys: self.keys,
                keys_file: self.keys_file,
                limits: &self.limits,
                state: &self.state,
                ledger: self.ledger,
                admin: &self.admin,
                reload: &self.reload,
            },
            base_dir,
            &mut problems,
        );
        if let Some(f) = &accounts.keys_file {
            sources.push(f.clone());
        }

        let pool = s.pool.unwrap_or_default();
        if problems.is_empty() {
            Ok(Config {
                listen: self.listen,
                backends: self.backends,
                hooks,
                defaults,
                pool,
                gateway: self.gateway,
                keys: accounts.keys,
                keys_configured: accounts.keys_configured,
                keys_file: accounts.keys_file,
                auth_may_override,
                limits: self.limits,
                state: StateConfig {
                    tls_ca_file: accounts.state_tls_ca,
                    ..self.state
                },
                ledger: accounts.ledger,
                admin: self.admin,
                reload: self.reload,
                sources,
                path: None,
            })
        } else {
            Err(ConfigError { problems })
        }
    }
}

impl GatewayConfig {
    fn max_retries_out_of_range(&self) -> bool {
        self.retry.max_retries > 10
    }
}

fn apply_limits(
    mut base: ScriptLimits,
    raw: Option<&RawLimits>,
    key: &str,
    problems: &mut Vec<String>,
) -> ScriptLimits {
    let Some(raw) = raw else { return base };
    set_limits(
        &mut base,
        [raw.timeout_ms, raw.memory_mb],
        [raw.max_depth, raw.max_input_bytes, raw.max_output_bytes],
        key,
        problems,
    );
    base
}

fn set_limits(
    l: &mut ScriptLimits,
    [timeout_ms, memory_mb]: [Option<u64>; 2],
    [max_depth, max_input, max_output]: [Option<usize>; 3],
    key: &str,
    problems: &mut Vec<String>,
) {
    let mut check = |name: &str, v: u64, min: u64, max: u64| {
        if v < min || v > max {
            problems.push(format!("{key}.{name}: {v} is out of range ({min}..={max})"));
        }
    };
    if let Some(v) = timeout_ms {
        check("timeout_ms", v, 1, 60_000);
        l.timeout_ms = v;
    }
    if let Some(v) = memory_mb {
        check("memory_mb", v, 1, 4096);
        l.memory_mb = v;
    }
    if let Some(v) = max_depth {
        check("max_depth", v as u64, 2, MAX_DEPTH_LIMIT as u64);
        l.max_depth = v;
    }
    if let Some(v) = max_input {
        check("max_input_bytes", v as u64, 1024, MAX_BYTES_LIMIT as u64);
        l.max_input_bytes = v;
    }
    if let Some(v) = max_output {
        check("max_output_bytes", v as u64, 1024, MAX_BYTES_LIMIT as u64);
        l.max_output_bytes = v;
    }
}

fn resolve_hook(
    key: &str,
    hook: HookName,
    raw: RawHook,
    defaults: ScriptLimits,
    base_dir: &Path,
    problems: &mut Vec<String>,
) -> Option<HookConfig> {
    let has_source = raw.script.is_some() || raw.script_file.is_some();
    let enabled = raw.enabled.unwrap_or(has_source);
    if !enabled {
        return None;
    }
    let mut limits = defaults;
    set_limits(
        &mut limits,
        [raw.timeout_ms, raw.memory_mb],
        [raw.max_depth, raw.max_input_bytes, raw.max_output_bytes],
        key,
        problems,
    );
    let raw_is_file = raw.script_file.is_some();
    let mut file_path = None;
    let script = match (raw.script, raw.script_file) {
        (Some(_), Some(_)) => {
            problems.push(format!("{key}: set either 'script' or 'script_file', not both"));
            return None;
        }
        (None, None) => {
            problems.push(format!("{key}: enabled, but neither 'script' nor 'script_file' is set"));
            return None;
        }
        (Some(source), None) => Script {
            name: Arc::from(key),
            source: Arc::from(source),
        },
        (None, Some(file)) => {
            let path = base_dir.join(&file);
            file_path = Some(path.clone());
            match std::fs::read_to_string(&path) {
                Ok(source) => Script {
                    name: Arc::from(file.as_str()),
                    source: Arc::from(source),
                },
                Err(e) => {
                    problems.push(format!("{key}.script_file: cannot read '{}': {e}", path.display()));
                    return None;
                }
            }
        }
    };
    if let Err(e) = crate::vm::syntax_check(&script) {
        let at = if raw_is_file {
            format!("{key}.script_file")
        } else {
            format!("{key}.script")
        };
        problems.push(format!("{at}: {e}"));
        return None;
    }
    Some(HookConfig {
        hook,
        script,
        limits,
        on_error: raw.on_error.unwrap_or(OnError::default_for(hook)),
        file: file_path,
    })
}

/// The account sections as read, before validation.
struct AccountSections<'a> {
    keys: Option<Vec<KeyRecord>>,
    keys_file: Option<String>,
    limits: &'a LimitsConfig,
    state: &'a StateConfig,
    ledger: Option<RawLedger>,
    admin: &'a AdminConfig,
    reload: &'a ReloadConfig,
}

/// The account sections, validated.
struct Accounts {
    keys: Vec<KeyRecord>,
    keys_configured: bool,
    keys_file: Option<PathBuf>,
    ledger: Option<LedgerConfig>,
    /// `state.tls_ca_file`, resolved.
    state_tls_ca: Option<PathBuf>,
}

fn resolve_accounts(a: AccountSections<'_>, base_dir: &Path, problems: &mut Vec<String>) -> Accounts {
    let keys_configured = a.keys.is_some() || a.keys_file.is_some();
    let mut keys: Vec<(String, KeyRecord)> = a
        .keys
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, k)| (format!("keys[{i}]"), k))
        .collect();
    let keys_file = a.keys_file.map(|f| base_dir.join(f));
    if let Some(path) = &keys_file {
        match read_keys_file(path) {
            Ok(list) => keys.extend(
                list.into_iter()
                    .enumerate()
                    .map(|(i, k)| (format!("keys_file[{i}]"), k)),
            ),
            Err(e) => problems.push(format!("keys_file: {e}")),
        }
    }
    let mut seen: BTreeMap<[u8; 32], String> = BTreeMap::new();
    for (at, k) in &keys {
        problems.extend(k.validate(at));
        if let Some(first) = seen.insert(k.key_digest(), at.clone()) {
            problems.push(format!("{at}.key: the same key is already defined at {first}"));
        }
    }

    let l = a.limits;
    if let Err(e) = l.zone() {
        problems.push(format!("limits.time_zone: {e}"));
    }
    let st = a.state;
    if st.backend == StateBackend::Redis {
        match st.url.as_deref().map(crate::redis_url::RedisUrl::parse) {
            Some(Ok(_)) => {}
            Some(Err(e)) => problems.push(format!("state.url: {e}")),
            None => problems.push(String::from("state.url: the redis backend needs a url")),
        }
    }
    let state_tls_ca = st.tls_ca_file.as_ref().map(|f| base_dir.join(f));
    if let Some(f) = state_tls_ca.as_ref().filter(|f| !f.is_file()) {
        problems.push(format!("state.tls_ca_file: {} is not a readable file", f.display()));
    }
    if st.timeout_ms == 0 || st.timeout_ms > 60_000 {
        problems.push(format!(
            "state.timeout_ms: {} is out of range (1..=60000)",
            st.timeout_ms
        ));
    }
    if st.settle_ms == 0 || st.settle_ms > 1_000 {
        problems.push(format!("state.settle_ms: {} is out of range (1..=1000)", st.settle_ms));
    }
    if st.batch == 0 || st.batch > 100_000 {
        problems.push(format!("state.batch: {} is out of range (1..=100000)", st.batch));
    }
    if st.connections == 0 || st.connections > 64 {
        problems.push(format!(
            "state.connections: {} is out of range (1..=64)",
            st.connections
        ));
    }
    let ledger = match a.ledger {
        None => None,
        Some(raw) if raw.enabled == Some(false) => None,
        Some(raw) => {
            let flush_ms = raw.flush_ms.unwrap_or(50);
            if !(1..=100).contains(&flush_ms) {
                problems.push(format!("ledger.flush_ms: {flush_ms} is out of range (1..=100)"));
            }
            let batch_max = raw.batch_max.unwrap_or(4096);
            if batch_max == 0 {
                problems.push(String::from("ledger.batch_max: must be > 0"));
            }
            let queue = raw.queue.unwrap_or(65_536);
            if queue == 0 {
                problems.push(String::from("ledger.queue: must be > 0"));
            }
            if let Some(url) = &raw.url {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    problems.push(String::from("ledger.url: must be a postgres:// or postgresql:// URL"));
                }
                if raw.path.is_some() {
                    problems.push(String::from(
                        "ledger.url: set either path (SQLite) or url (PostgreSQL), not both",
                    ));
                }
                if st.backend != StateBackend::Redis {
                    problems.push(String::from(
                        "ledger.url: a PostgreSQL ledger is for a fleet, whose quotas live in Redis: set state.backend: redis",
                    ));
                }
            }
            Some(LedgerConfig {
                path: base_dir.join(raw.path.unwrap_or_else(|| String::from("usage.db"))),
                url: raw.url,
                flush_ms,
                batch_max,
                queue,
            })
        }
    };
    if a.admin.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        problems.push(String::from("admin.token: must not be empty"));
    }
    if a.admin.listen.as_deref().is_some_and(|t| t.trim().is_empty()) {
        problems.push(String::from("admin.listen: must not be empty"));
    }
    if a.reload.poll_ms < 100 {
        problems.push(format!("reload.poll_ms: {} is below 100", a.reload.poll_ms));
    }
    Accounts {
        keys: keys.into_iter().map(|(_, k)| k).collect(),
        keys_configured,
        keys_file,
        ledger,
        state_tls_ca,
    }
}

#[cfg(test)]
mod account_section_tests {
    use super::*;

    fn load(yaml: &str, base: &Path) -> Result<Config, Vec<String>> {
        Config::from_yaml(yaml, base).map_err(|e| e.problems)
    }

    #[test]
    fn utc_offsets_parse_and_bad_ones_are_named() {
        for (text, want) in [
            ("UTC", 0),
            ("Z", 0),
            ("+08:00", 8 * 3600),
            ("-05:30", -(5 * 3600 + 30 * 60)),
            ("+0530", 5 * 3600 + 30 * 60),
            ("+09", 9 * 3600),
        ] {
            assert_eq!(parse_utc_offset(text), Ok(want), "{text}");
        }
        for bad in ["08:00", "+25:00", "+08:61", "Asia/Shanghai", "+x"] {
            assert!(parse_utc_offset(bad).is_err(), "{bad}");
        }
    }

    /// `state:` and `ledger:` for a fleet: the batched mode's knobs and a
    /// PostgreSQL ledger, with every misuse named.
    #[test]
    fn fleet_state_and_ledger_settings_validate() {
        let redis = "state: {backend: redis, url: \"redis://127.0.0.1:6379\"";
        let ok = load(
            &format!("backends: []\n{redis}, on_error: fail_open}}\nledger: {{url: \"postgres://u@db/x\"}}\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(ok.state.mode, StateMode::Batched);
        assert_eq!((ok.state.settle_ms, ok.state.batch), (10, 500));
        assert_eq!(ok.state.on_error, StateOnError::Allow);
        assert_eq!(ok.ledger.and_then(|l| l.url).as_deref(), Some("postgres://u@db/x"));
        let exact = load(
            &format!("backends: []\n{redis}, mode: exact, on_error: fail_closed}}\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            (exact.state.mode, exact.state.on_error),
            (StateMode::Exact, StateOnError::Deny)
        );
        for (yaml, problem) in [
            (format!("{redis}, settle_ms: 0}}"), "state.settle_ms: 0 is out of range"),
            (format!("{redis}, batch: 0}}"), "state.batch: 0 is out of range"),
            (format!("{redis}, mode: sometimes}}"), "state.mode"),
            (
                String::from("ledger: {url: \"postgres://db/x\"}"),
                "ledger.url: a PostgreSQL ledger is for a fleet",
            ),
            (
                format!("{redis}}}\nledger: {{url: \"mysql://db/x\"}}"),
                "ledger.url: must be a postgres://",
            ),
            (
                format!("{redis}}}\nledger: {{url: \"postgres://db/x\", path: u.db}}"),
                "ledger.url: set either path",
            ),
        ] {
            let p = load(&format!("backends: []\n{yaml}\n"), Path::new(".")).unwrap_err();
            assert!(p.iter().any(|x| x.contains(problem)), "{yaml}: {p:?}");
        }
    }

    #[test]
    fn account_sections_default_off_and_validate() {
        let c = load("backends: []\n", Path::new(".")).unwrap();
        assert!(!c.keys_configured && c.keys.is_empty() && c.ledger.is_none());
        assert!(!c.limits.any());
        assert_eq!(c.state.backend, StateBackend::Local);

        let c = load(
            "keys: []\nlimits: {key_rpm: 5, time_zone: '+08:00'}\nledger: {path: u.db}\nadmin: {token: t0ken}\n",
            Path::new("/srv"),
        )
        .unwrap();
        assert!(c.keys_configured);
        assert_eq!(c.limits.utc_offset_seconds(), Ok(8 * 3600));
        assert_eq!(
            c.ledger.as_ref().map(|l| l.path.clone()),
            Some(PathBuf::from("/srv/u.db"))
        );
        assert_eq!(c.admin.token.as_deref(), Some("t0ken"));
        assert_eq!(c.admin.listen, None);
        assert!(!c.admin.on_public_listener);
        let c = load(
            "admin: {token: t, listen: '127.0.0.1:8001', on_public_listener: true}\n",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.admin.listen.as_deref(), Some("127.0.0.1:8001"));
        assert!(c.admin.on_public_listener);
        let p = load("admin: {listen: ''}\n", Path::new(".")).unwrap_err();
        assert_eq!(p, vec![String::from("admin.listen: must not be empty")]);

        let p = load(
            "keys:\n  - {key: a, user_id: u}\n  - {key: a, user_id: v, allowed_ips: [bad]}\n\
             limits: {time_zone: Mars}\nstate: {backend: redis}\nledger: {flush_ms: 500}\n",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p
            .iter()
            .any(|x| x.starts_with("keys[1].key: the same key is already defined at keys[0]")));
        assert!(p.iter().any(|x| x.starts_with("keys[1].allowed_ips[0]:")));
        assert!(p.iter().any(|x| x.starts_with("limits.time_zone:")));
        assert!(p.iter().any(|x| x.starts_with("state.url:")));
        assert!(p.iter().any(|x| x.starts_with("ledger.flush_ms:")));
        assert!(load("ledger: {enabled: false}\n", Path::new("."))
            .unwrap()
            .ledger
            .is_none());
        // A key given in clear and as its hash is the same key.
        let p = load(
            &format!(
                "keys:\n  - {{key: sk-a, user_id: u}}\n  - {{key_sha256: {}, user_id: v}}\n",
                crate::keys::key_sha256_hex("sk-a")
            ),
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(
            p,
            vec![String::from("keys[1].key: the same key is already defined at keys[0]")]
        );
        let p = load("limits: {key_rmp: 5}\n", Path::new(".")).unwrap_err();
        assert!(p[0].starts_with("limits.key_rmp: unknown field"), "{p:?}");
    }

    #[test]
    fn keys_files_are_read_in_both_forms_and_watched() {
        let dir = std::env::temp_dir().join(format!("llmproxy-keys-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("list.yaml"), "- {key: sk-1, user_id: u1, total_quota: 10}\n").unwrap();
        std::fs::write(dir.join("map.json"), r#"{"keys": [{"key": "sk-2", "user_id": "u2"}]}"#).unwrap();
        std::fs::write(dir.join("r.lua"), "return nil").unwrap();
        let c = load(
            "keys: [{key: sk-0, user_id: u0}]\nkeys_file: list.yaml\nscripts:\n  auth: {script_file: r.lua}\n",
            &dir,
        )
        .unwrap();
        let names: Vec<&str> = c.keys.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(names, ["sk-0", "sk-1"]);
        assert_eq!(c.keys[1].total_quota, Some(10));
        assert_eq!(c.sources, vec![dir.join("r.lua"), dir.join("list.yaml")]);
        let c = load("keys_file: map.json\n", &dir).unwrap();
        assert_eq!(c.keys[0].user_id, "u2");
        let p = load("keys_file: missing.yaml\n", &dir).unwrap_err();
        assert!(p[0].starts_with("keys_file: cannot read"), "{p:?}");
        std::fs::write(dir.join("bad.yaml"), "- {key: sk-3, usr: x}\n").unwrap();
        let p = load("keys_file: bad.yaml\n", &dir).unwrap_err();
        assert!(p[0].starts_with("keys_file: "), "{p:?}");
    }
}

#[cfg(test)]
mod balancer_kind_tests {
    use super::*;

    #[test]
    fn a_balancer_kind_is_named_as_the_config_names_it() {
        for kind in BalancerKind::ALL {
            let parsed: BalancerKind = serde_json::from_value(serde_json::json!(kind.as_str())).expect("a config name");
            assert_eq!(parsed, kind);
            assert_eq!(BalancerKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(BalancerKind::parse("round_robin"), None);
    }
}
