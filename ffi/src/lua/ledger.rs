//! The usage ledger from nginx (docs/adr/028): one SQLite row per admitted
//! request, in the standalone gateway's schema (proxy/src/gateway/ledger.rs;
//! `llmproxy usage --config FILE` reads it), written off the request path.
//!
//! `log()` hands a record to `engine:ledger_record(tbl)`, which never
//! blocks: the record goes into a bounded channel (`ledger.queue`) or, when
//! the channel is full, is dropped and counted (`ledger_stats().dropped`,
//! shown in the metrics). One writer thread per worker process takes
//! records in batches (everything within `ledger.flush_ms` of the first, at
//! most `ledger.batch_max`) and commits each batch in one transaction (WAL,
//! `synchronous = NORMAL`, a busy timeout for the other workers' writers),
//! charging `billable_tokens` to `key_usage` in the same transaction.
//!
//! The writer is per process and per database file: engines rebuilt by a
//! reload share it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llmproxy_core::config::LedgerConfig;
use rusqlite::{params, Connection};

/// One ledger row (the gateway's `LedgerRecord`).
pub(crate) struct Record {
    pub request_id: String,
    pub node: String,
    pub key_fp: Option<String>,
    pub user_id: Option<String>,
    pub backend: Option<String>,
    pub model: Option<String>,
    pub path: String,
    pub is_stream: bool,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub billable_tokens: u64,
    pub cost: Option<f64>,
    pub latency_ms: f64,
    pub record: String,
}

enum Msg {
    Record(Box<Record>, i64),
    SetUsed {
        key_fp: String,
        used: u64,
        config_used: u64,
    },
}

/// Counters.
#[derive(Default)]
pub(crate) struct Stats {
    pub written: AtomicU64,
    pub batches: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub pending: AtomicU64,
}

/// The writer of one database file in this process.
pub(crate) struct Writer {
    tx: SyncSender<Msg>,
    pub path: PathBuf,
    pub stats: Arc<Stats>,
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<Writer>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Arc<Writer>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The gateway's schema (proxy/src/gateway/ledger.rs `migrate`), verbatim.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS usage (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL,
            ts_ms INTEGER NOT NULL,
            node TEXT NOT NULL,
            key_fp TEXT,
            user_id TEXT,
            backend TEXT,
            model TEXT,
            path TEXT NOT NULL,
            is_stream INTEGER NOT NULL,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            total_tokens INTEGER NOT NULL,
            billable_tokens INTEGER NOT NULL,
            cost REAL,
            latency_ms REAL NOT NULL,
            record TEXT NOT NULL
         );
         CREATE INDEX IF NOT EXISTS usage_ts ON usage(ts_ms);
         CREATE INDEX IF NOT EXISTS usage_key ON usage(key_fp, ts_ms);
         CREATE TABLE IF NOT EXISTS key_usage (
            key_fp TEXT PRIMARY KEY,
            used INTEGER NOT NULL,
            config_used INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL,
            reset_ms INTEGER NOT NULL DEFAULT 0
         );";

fn open_rw(path: &Path) -> Result<Connection, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("ledger: cannot create {}: {e}", dir.display()))?;
    }
    let conn = Connection::open(path).map_err(|e| format!("ledger: cannot open {}: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .and_then(|_| conn.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
        .and_then(|_| conn.execute_batch(SCHEMA))
        .map_err(|e| format!("ledger: cannot prepare {}: {e}", path.display()))?;
    Ok(conn)
}

/// The writer of `cfg.path` in this process (started on first use).
pub(crate) fn writer(cfg: &LedgerConfig) -> Result<Arc<Writer>, String> {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = reg.get(&cfg.path) {
        return Ok(Arc::clone(w));
    }
    let conn = open_rw(&cfg.path)?;
    let (tx, rx) = mpsc::sync_channel(cfg.queue.max(1));
    let stats = Arc::new(Stats::default());
    let s = Arc::clone(&stats);
    let flush = Duration::from_millis(cfg.flush_ms);
    let batch_max = cfg.batch_max.max(1);
    std::thread::Builder::new()
        .name(String::from("llmproxy-ledger"))
        .spawn(move || run(conn, rx, flush, batch_max, &s))
        .map_err(|e| format!("ledger: cannot start the writer thread: {e}"))?;
    let w = Arc::new(Writer {
        tx,
        path: cfg.path.clone(),
        stats,
    });
    reg.insert(cfg.path.clone(), Arc::clone(&w));
    Ok(w)
}

impl Writer {
    /// Queue one record without waiting: false (and counted) when the queue
    /// is full.
    pub fn record(&self, r: Record) -> bool {
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Msg::Record(Box::new(r), now_ms())) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.pending.fetch_sub(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// The starting quota usage of each key (fingerprint, configured
    /// `used_quota`), as the gateway's local state computes it: the
    /// ledger's count while the configured value is unchanged, else the
    /// configured value (queued as the key's new count).
    pub fn sync_keys(&self, keys: &[(String, u64)]) -> Result<Vec<(String, u64)>, String> {
        let conn = Connection::open(&self.path).map_err(|e| format!("ledger: {e}"))?;
        let _ = conn.busy_timeout(Duration::from_secs(5));
        let mut stmt = conn
            .prepare("SELECT used, config_used, reset_ms FROM key_usage WHERE key_fp = ?1")
            .map_err(|e| format!("ledger: {e}"))?;
        let mut out = Vec::with_capacity(keys.len());
        for (fp, configured) in keys {
            let row: Option<(i64, i64, i64)> = stmt.query_row([fp], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).ok();
            let used = match row {
                Some((used, config_used, reset_ms))
                    if reset_ms > 0 || u64::try_from(config_used).unwrap_or(0) == *configured =>
                {
                    u64::try_from(used).unwrap_or(0)
                }
                _ => {
                    let _ = self.tx.try_send(Msg::SetUsed {
                        key_fp: fp.clone(),
                        used: *configured,
                        config_used: *configured,
                    });
                    *configured
                }
            };
            out.push((fp.clone(), used));
        }
        Ok(out)
    }
}

fn run(mut conn: Connection, rx: Receiver<Msg>, flush: Duration, batch_max: usize, stats: &Stats) {
    let mut batch: Vec<Msg> = Vec::with_capacity(batch_max.min(8192));
    loop {
        let first = match rx.recv() {
            Ok(m) => m,
            Err(_) => return,
        };
        batch.push(first);
        let deadline = Instant::now() + flush;
        while batch.len() < batch_max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
                continue;
            }
            match rx.recv_timeout(left) {
                Ok(m) => batch.push(m),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        commit(&mut conn, &mut batch, stats);
    }
}

fn commit(conn: &mut Connection, batch: &mut Vec<Msg>, stats: &Stats) {
    let records = batch.iter().filter(|m| matches!(m, Msg::Record(..))).count() as u64;
    let mut attempt = 0;
    loop {
        match write_batch(conn, batch) {
            Ok(()) => {
                stats.written.fetch_add(records, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(_) if attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(20 << attempt));
            }
            Err(_) => {
                stats.failed.fetch_add(records, Ordering::Relaxed);
                break;
            }
        }
    }
    stats.pending.fetch_sub(records, Ordering::Relaxed);
    batch.clear();
}

fn write_batch(conn: &mut Connection, batch: &[Msg]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO usage (request_id, ts_ms, node, key_fp, user_id, backend, model, path, is_stream,
             status, prompt_tokens, completion_tokens, total_tokens, billable_tokens, cost, latency_ms, record)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?;
        let mut charge = tx.prepare_cached(
            "INSERT INTO key_usage (key_fp, used, config_used, updated_ms) VALUES (?1, ?2, 0, ?3)
             ON CONFLICT(key_fp) DO UPDATE SET used = used + excluded.used, updated_ms = excluded.updated_ms",
        )?;
        let mut set = tx.prepare_cached(
            "INSERT INTO key_usage (key_fp, used, config_used, updated_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(key_fp) DO UPDATE SET used = excluded.used, config_used = excluded.config_used,
             updated_ms = excluded.updated_ms",
        )?;
        let now = now_ms();
        for m in batch {
            match m {
                Msg::Record(r, ts_ms) => {
                    insert.execute(params![
                        r.request_id,
                        ts_ms,
                        r.node,
                        r.key_fp,
                        r.user_id,
                        r.backend,
                        r.model,
                        r.path,
                        r.is_stream,
                        r.status,
                        clamp(r.prompt_tokens),
                        clamp(r.completion_tokens),
                        clamp(r.total_tokens),
                        clamp(r.billable_tokens),
                        r.cost,
                        r.latency_ms,
                        r.record,
                    ])?;
                    if let (true, Some(fp)) = (r.billable_tokens > 0, &r.key_fp) {
                        charge.execute(params![fp, clamp(r.billable_tokens), now])?;
                    }
                }
                Msg::SetUsed {
                    key_fp,
                    used,
                    config_used,
                } => {
                    set.execute(params![key_fp, clamp(*used), clamp(*config_used), now])?;
                }
            }
        }
    }
    tx.commit()
}
