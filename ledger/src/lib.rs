//! The usage ledger: one row per admitted request, written off the request
//! path (docs/adr/032, docs/adr/028) to a SQLite file (one per node, the
//! default) or, with the `postgres` feature, to a PostgreSQL database a
//! fleet shares ([`postgres`], docs/adr/052). One crate for every host that
//! writes it — the standalone gateway and the nginx module — so the schema,
//! the batching writer and the quota charging cannot drift apart;
//! `llmproxy usage` reads what either wrote.
//!
//! Producers (usage jobs) send records into a bounded channel; one writer
//! thread takes them in batches — everything that arrived within
//! `ledger.flush_ms` (≤ 100 ms) of the first, at most `ledger.batch_max` —
//! and commits each batch in one transaction. The database is in WAL mode
//! with `synchronous = NORMAL`: a committed batch survives the process
//! being killed, so `kill -9` loses at most the records of the last
//! `flush_ms` plus the batch being committed. Closing the ledger (graceful
//! shutdown) drains the channel and commits everything before returning.
//!
//! With the local state backend, the per-key quota usage is kept in the same
//! database (`key_usage`) and updated in the same transaction as the records
//! that charge it, so the ledger and the quotas always agree.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

#[cfg(feature = "postgres")]
pub mod postgres;
mod row;

pub use row::{Charged, Served};

/// One ledger row.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRecord {
    /// The request id.
    pub request_id: String,
    /// When the request completed (Unix milliseconds).
    pub ts_ms: i64,
    /// The node that served it.
    pub node: String,
    /// The key's fingerprint (never the key).
    pub key_fp: Option<String>,
    /// The key's user.
    pub user_id: Option<String>,
    /// The backend that answered (none when no backend was reached).
    pub backend: Option<String>,
    /// The `model` the client asked for.
    pub model: Option<String>,
    /// The request path.
    pub path: String,
    /// Whether the response was streamed.
    pub is_stream: bool,
    /// The status the client got (499: the client went away first).
    pub status: u16,
    /// Prompt tokens (as recorded).
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
    /// Tokens charged to the key's quota.
    pub billable_tokens: u64,
    /// `cost`, when the usage script gave one.
    pub cost: Option<f64>,
    /// Time from request to completion, in milliseconds.
    pub latency_ms: f64,
    /// The usage record as JSON (the usage script's result, or raw usage).
    pub record: String,
    /// Whether `billable_tokens` is also added to `key_usage` (local state).
    pub charge_quota: bool,
}

enum Msg {
    /// A record and its number in this ledger's life: with the PostgreSQL
    /// store's boot id, the row's identity (a batch retried after a lost
    /// connection does not write it twice).
    Record(
        Box<LedgerRecord>,
        #[cfg_attr(not(feature = "postgres"), allow(dead_code))] u64,
    ),
    /// Set a key's usage (a configured `used_quota` changed).
    SetUsed {
        key_fp: String,
        used: u64,
        config_used: u64,
        /// When it was asked for (Unix ms): a reset after it wins.
        at_ms: i64,
    },
    /// Commit everything before this, then answer.
    Flush(mpsc::SyncSender<()>),
}

/// Ledger counters for metrics.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Records committed.
    pub written: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Records that could not be written (after retries).
    pub failed: AtomicU64,
    /// Times a producer waited because the queue was full.
    pub backpressure: AtomicU64,
    /// Records queued and not yet committed.
    pub pending: AtomicU64,
    /// Records [`Ledger::try_record`] dropped because the queue was full.
    pub dropped: AtomicU64,
}

/// The writer side of the ledger.
#[derive(Debug)]
pub struct Ledger {
    tx: Mutex<Option<SyncSender<Msg>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
    next: AtomicU64,
    /// Counters.
    pub stats: Arc<LedgerStats>,
}

/// Where a writer commits batches.
trait Store: Send + 'static {
    /// Commit one batch in one transaction (all or nothing).
    fn write(&mut self, batch: &[Msg]) -> Result<(), String>;
    /// How long a failing batch is retried before its records count as
    /// lost.
    fn retry_for(&self) -> Duration;
}

/// The SQLite file.
struct Sqlite(Connection);

impl Store for Sqlite {
    fn write(&mut self, batch: &[Msg]) -> Result<(), String> {
        write_batch(&mut self.0, batch).map_err(|e| e.to_string())
    }

    fn retry_for(&self) -> Duration {
        Duration::from_millis(1_500)
    }
}

/// Create the tables (idempotent).
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS usage (
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
         );",
    )
}

/// Open (creating) the database for writing: WAL, `synchronous = NORMAL`.
pub fn open_rw(path: &Path) -> Result<Connection, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("ledger: cannot create {}: {e}", dir.display()))?;
    }
    create_private(path)?;
    let conn = Connection::open(path).map_err(|e| format!("ledger: cannot open {}: {e}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
        .and_then(|_| conn.busy_timeout(Duration::from_secs(5)))
        .and_then(|_| migrate(&conn))
        .map_err(|e| format!("ledger: cannot prepare {}: {e}", path.display()))?;
    Ok(conn)
}

/// Create a missing database file with mode 0600: the ledger names users and
/// keys' fingerprints, and SQLite gives its `-wal` and `-shm` files the
/// database file's mode. An existing file keeps the mode it has.
fn create_private(path: &Path) -> Result<(), String> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("ledger: cannot create {}: {e}", path.display())),
    }
}

/// Open an existing database read-only (reports, `keys list`).
pub fn open_ro(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| format!("cannot open the ledger {}: {e}", path.display()))?;
    let _ = conn.busy_timeout(Duration::from_secs(5));
    Ok(conn)
}

/// A key's usage row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUsage {
    /// Tokens used.
    pub used: u64,
    /// The configured `used_quota` this count started from.
    pub config_used: u64,
    /// When an operator last reset the count (`llmproxy keys set-quota
    /// --used`), Unix ms; 0 if never.
    pub reset_ms: i64,
}

/// Every `key_usage` row.
pub fn read_key_usage(conn: &Connection) -> rusqlite::Result<HashMap<String, KeyUsage>> {
    let mut stmt = conn.prepare("SELECT key_fp, used, config_used, reset_ms FROM key_usage")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            KeyUsage {
                used: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                config_used: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                reset_ms: r.get(3)?,
            },
        ))
    })?;
    rows.collect()
}

/// One key's usage row, if any.
pub fn read_one_key_usage(conn: &Connection, key_fp: &str) -> rusqlite::Result<Option<KeyUsage>> {
    conn.query_row(
        "SELECT used, config_used, reset_ms FROM key_usage WHERE key_fp = ?1",
        [key_fp],
        |r| {
            Ok(KeyUsage {
                used: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                config_used: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                reset_ms: r.get(2)?,
            })
        },
    )
    .optional()
}

/// Now, in Unix milliseconds: what a record's `ts_ms` holds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reset one key's usage from outside the gateway (`llmproxy keys
/// set-quota --used`): the row gets a new `reset_ms`, which a running
/// gateway applies at its next reload. Records answered before `reset_ms`
/// that a writer commits after it are not charged to the new count (the
/// reset marker, docs/adr/043).
pub fn reset_key_usage(conn: &Connection, key_fp: &str, used: u64) -> rusqlite::Result<()> {
    let now = now_ms();
    conn.execute(
        "INSERT INTO key_usage (key_fp, used, config_used, updated_ms, reset_ms) VALUES (?1, ?2, ?2, ?3, ?3)
         ON CONFLICT(key_fp) DO UPDATE SET used = excluded.used, config_used = excluded.config_used,
         updated_ms = excluded.updated_ms, reset_ms = excluded.reset_ms",
        params![key_fp, clamp(used), now],
    )?;
    Ok(())
}

impl Ledger {
    /// Open the database at `path` and start the writer thread: batches of
    /// at most `batch_max` records, gathered for at most `flush` after the
    /// first, with up to `queue` records waiting.
    pub fn open(path: &Path, flush: Duration, batch_max: usize, queue: usize) -> Result<Ledger, String> {
        let conn = open_rw(path)?;
        Ledger::start(move || Ok(Sqlite(conn)), path.to_path_buf(), flush, batch_max, queue)
    }

    /// Start the writer thread on the store `make` opens there (a store
    /// that needs its own runtime, such as the PostgreSQL client, must not
    /// be opened on an async caller's thread); its error is returned.
    fn start<S: Store>(
        make: impl FnOnce() -> Result<S, String> + Send + 'static,
        path: PathBuf,
        flush: Duration,
        batch_max: usize,
        queue: usize,
    ) -> Result<Ledger, String> {
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let stats = Arc::new(LedgerStats::default());
        let batch_max = batch_max.max(1);
        let s = Arc::clone(&stats);
        let (opened_tx, opened) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(String::from("llmproxy-ledger"))
            .spawn(move || match make() {
                Ok(store) => {
                    let _ = opened_tx.send(Ok(()));
                    writer(store, rx, flush, batch_max, &s);
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                }
            })
            .map_err(|e| format!("ledger: cannot start the writer thread: {e}"))?;
        opened
            .recv()
            .map_err(|_| String::from("ledger: the writer thread ended"))??;
        Ok(Ledger {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            path,
            next: AtomicU64::new(0),
            stats,
        })
    }

    /// The database file (empty for a PostgreSQL ledger).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sender(&self) -> Option<SyncSender<Msg>> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn send(&self, msg: Msg) -> bool {
        let Some(tx) = self.sender() else {
            return false;
        };
        match tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(msg)) => {
                // Never drop a record: wait for the writer (back-pressure).
                self.stats.backpressure.fetch_add(1, Ordering::Relaxed);
                tx.send(msg).is_ok()
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Queue one record.
    pub fn record(&self, r: LedgerRecord) {
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if !self.send(Msg::Record(Box::new(r), n)) {
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(target: "llmproxy::ledger", "usage record lost: the ledger is closed");
        }
    }

    /// Queue one record without ever waiting (for hosts that must not
    /// block, such as an nginx phase): `false`, and counted in
    /// [`LedgerStats::dropped`], when the queue is full or closed.
    pub fn try_record(&self, r: LedgerRecord) -> bool {
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .sender()
            .is_some_and(|tx| tx.try_send(Msg::Record(Box::new(r), n)).is_ok());
        if !sent {
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// [`Ledger::set_used`] without ever waiting: `false` when the queue is
    /// full or closed.
    pub fn try_set_used(&self, key_fp: &str, used: u64, config_used: u64) -> bool {
        self.sender().is_some_and(|tx| {
            tx.try_send(Msg::SetUsed {
                key_fp: key_fp.to_owned(),
                used,
                config_used,
                at_ms: now_ms(),
            })
            .is_ok()
        })
    }

    /// Queue a change of a key's usage (ordered with the records).
    pub fn set_used(&self, key_fp: &str, used: u64, config_used: u64) {
        let _ = self.send(Msg::SetUsed {
            key_fp: key_fp.to_owned(),
            used,
            config_used,
            at_ms: now_ms(),
        });
    }

    /// Wait until everything queued so far is committed.
    pub fn flush(&self) {
        self.flush_within(Duration::from_secs(30));
    }

    /// Wait at most `limit` until everything queued so far is committed:
    /// whether it was.
    pub fn flush_within(&self, limit: Duration) -> bool {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Msg::Flush(tx)) && rx.recv_timeout(limit).is_ok()
    }

    /// Stop taking records, commit everything queued and stop the writer.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.close();
    }
}

/// How often the writer looks at the queue while it gathers a batch.
const GATHER_TICK: Duration = Duration::from_millis(5);

fn writer<S: Store>(mut store: S, rx: Receiver<Msg>, flush: Duration, batch_max: usize, stats: &LedgerStats) {
    let mut batch: Vec<Msg> = Vec::with_capacity(batch_max.min(8192));
    loop {
        // Wait for the first message, then gather for at most `flush`.
        let first = match rx.recv() {
            Ok(m) => m,
            Err(_) => return,
        };
        batch.push(first);
        let closed = gather(&rx, &mut batch, Instant::now() + flush, batch_max);
        commit(&mut store, &mut batch, stats);
        if closed {
            // Drain whatever is left (the channel is closed and empty now,
            // but be explicit).
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
            }
            commit(&mut store, &mut batch, stats);
            return;
        }
    }
}

/// Add to `batch` what arrives until `deadline`, `batch_max` messages or
/// a flush request; `true` when the channel closed. The writer sleeps
/// between looks at the queue instead of waiting on it: a producer then
/// never has to wake this thread (a futex call per record, a measurable
/// part of a request's cost at peak), only the first record of a batch
/// does.
fn gather(rx: &Receiver<Msg>, batch: &mut Vec<Msg>, deadline: Instant, batch_max: usize) -> bool {
    loop {
        while batch.len() < batch_max && !matches!(batch.last(), Some(Msg::Flush(_))) {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
        if batch.len() >= batch_max || matches!(batch.last(), Some(Msg::Flush(_))) {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(GATHER_TICK));
    }
}

fn commit<S: Store>(store: &mut S, batch: &mut Vec<Msg>, stats: &LedgerStats) {
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    let mut attempt = 0u32;
    let records = batch.iter().filter(|m| matches!(m, Msg::Record(..))).count() as u64;
    loop {
        match store.write(batch) {
            Ok(()) => {
                stats.written.fetch_add(records, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(e) if started.elapsed() < store.retry_for() => {
                attempt += 1;
                tracing::warn!(target: "llmproxy::ledger", attempt, "ledger write failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(20 << attempt.min(6)));
            }
            Err(e) => {
                stats.failed.fetch_add(records, Ordering::Relaxed);
                tracing::error!(target: "llmproxy::ledger", records, "ledger write failed, records lost: {e}");
                break;
            }
        }
    }
    stats.pending.fetch_sub(records, Ordering::Relaxed);
    for m in batch.drain(..) {
        if let Msg::Flush(done) = m {
            let _ = done.try_send(());
        }
    }
    tracing::trace!(target: "llmproxy::ledger", records, us = started.elapsed().as_micros() as u64, "batch committed");
}

/// The usage table's columns, in the order [`bind_row`] binds them.
const USAGE_COLUMNS: &str = "request_id, ts_ms, node, key_fp, user_id, backend, model, path, is_stream, status, \
     prompt_tokens, completion_tokens, total_tokens, billable_tokens, cost, latency_ms, record";
/// How many columns [`bind_row`] binds.
const USAGE_PARAMS: usize = 17;
/// Rows one insert statement writes: one statement per row was a third of
/// the writer's time in SQLite's per-statement work (step, reset, the
/// program's prologue), which a multi-row insert pays once.
const ROWS_PER_INSERT: usize = 16;

/// `INSERT INTO usage` of `rows` rows.
fn insert_sql(rows: usize) -> String {
    let one = format!("({})", vec!["?"; USAGE_PARAMS].join(", "));
    format!(
        "INSERT INTO usage ({USAGE_COLUMNS}) VALUES {}",
        vec![one; rows].join(", ")
    )
}

/// Bind `r`'s columns to the parameters of `stmt` from `first` (1-based).
fn bind_row(stmt: &mut rusqlite::Statement<'_>, first: usize, r: &LedgerRecord) -> rusqlite::Result<()> {
    stmt.raw_bind_parameter(first, &r.request_id)?;
    stmt.raw_bind_parameter(first + 1, r.ts_ms)?;
    stmt.raw_bind_parameter(first + 2, &r.node)?;
    stmt.raw_bind_parameter(first + 3, &r.key_fp)?;
    stmt.raw_bind_parameter(first + 4, &r.user_id)?;
    stmt.raw_bind_parameter(first + 5, &r.backend)?;
    stmt.raw_bind_parameter(first + 6, &r.model)?;
    stmt.raw_bind_parameter(first + 7, &r.path)?;
    stmt.raw_bind_parameter(first + 8, r.is_stream)?;
    stmt.raw_bind_parameter(first + 9, r.status)?;
    stmt.raw_bind_parameter(first + 10, clamp(r.prompt_tokens))?;
    stmt.raw_bind_parameter(first + 11, clamp(r.completion_tokens))?;
    stmt.raw_bind_parameter(first + 12, clamp(r.total_tokens))?;
    stmt.raw_bind_parameter(first + 13, clamp(r.billable_tokens))?;
    stmt.raw_bind_parameter(first + 14, r.cost)?;
    stmt.raw_bind_parameter(first + 15, r.latency_ms)?;
    stmt.raw_bind_parameter(first + 16, &r.record)
}

/// Insert `rows` ([`ROWS_PER_INSERT`] at a time, the rest one by one).
fn insert_rows(tx: &rusqlite::Transaction<'_>, rows: &[&LedgerRecord]) -> rusqlite::Result<()> {
    let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
    if chunks.len() > 0 {
        let mut many = tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?;
        for chunk in chunks.by_ref() {
            for (i, r) in chunk.iter().enumerate() {
                bind_row(&mut many, 1 + i * USAGE_PARAMS, r)?;
            }
            many.raw_execute()?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut one = tx.prepare_cached(&insert_sql(1))?;
        for r in rest {
            bind_row(&mut one, 1, r)?;
            one.raw_execute()?;
        }
    }
    Ok(())
}

fn write_batch(conn: &mut Connection, batch: &[Msg]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        // A count set before the key's last reset (`reset_ms`) is not
        // applied: the reset replaced it, even when the set reaches the
        // database after it.
        let mut set = tx.prepare_cached(
            "INSERT INTO key_usage (key_fp, used, config_used, updated_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(key_fp) DO UPDATE SET used = excluded.used, config_used = excluded.config_used,
             updated_ms = excluded.updated_ms WHERE key_usage.reset_ms <= ?5",
        )?;
        let now = now_ms();
        // Quota charges are summed per key and applied once per key and
        // batch (a row update per record was most of the writer's work
        // with one busy key), in order with the usage sets between them.
        // Usage rows go in after, in the batch's order: nothing else in the
        // batch reads them.
        let mut owed = Owed::default();
        let mut rows = Vec::with_capacity(batch.len());
        for m in batch {
            match m {
                Msg::Record(r, _) => {
                    rows.push(&**r);
                    if let (true, Some(fp)) = (r.charge_quota && r.billable_tokens > 0, &r.key_fp) {
                        owed.add(fp, r.ts_ms, r.billable_tokens);
                    }
                }
                Msg::SetUsed {
                    key_fp,
                    used,
                    config_used,
                    at_ms,
                } => {
                    owed.charge(&tx, now)?;
                    set.execute(params![key_fp, clamp(*used), clamp(*config_used), now, at_ms])?;
                }
                Msg::Flush(_) => {}
            }
        }
        owed.charge(&tx, now)?;
        insert_rows(&tx, &rows)?;
    }
    tx.commit()
}

/// The quota charges of a batch not applied yet: per key, each record's
/// answer time (Unix ms) and billable tokens.
#[derive(Default)]
struct Owed<'a>(HashMap<&'a str, Vec<(i64, u64)>>);

impl<'a> Owed<'a> {
    fn add(&mut self, key_fp: &'a str, ts_ms: i64, billable: u64) {
        self.0.entry(key_fp).or_default().push((ts_ms, billable));
    }

    /// Apply what is owed, one row update per key. A record answered
    /// before the key's last reset (`reset_ms`) is not charged: the reset
    /// replaced the count it belongs to, even when the record reaches the
    /// database after it. The transaction already wrote (the records), so
    /// it holds the write lock: `reset_ms` cannot change between the read
    /// and the update.
    fn charge(&mut self, tx: &rusqlite::Transaction<'_>, now: i64) -> rusqlite::Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut reset = tx.prepare_cached("SELECT reset_ms FROM key_usage WHERE key_fp = ?1")?;
        let mut add = tx.prepare_cached(
            "INSERT INTO key_usage (key_fp, used, config_used, updated_ms) VALUES (?1, ?2, 0, ?3)
             ON CONFLICT(key_fp) DO UPDATE SET used = used + excluded.used, updated_ms = excluded.updated_ms",
        )?;
        for (key_fp, charges) in self.0.drain() {
            let reset_ms: i64 = reset.query_row(params![key_fp], |r| r.get(0)).optional()?.unwrap_or(0);
            let sum = charges
                .iter()
                .filter(|(ts_ms, _)| *ts_ms >= reset_ms)
                .fold(0u64, |sum, (_, billable)| sum.saturating_add(*billable));
            if sum > 0 {
                add.execute(params![key_fp, clamp(sum), now])?;
            }
        }
        Ok(())
    }
}

/// What `llmproxy usage` reads: filters.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Records completed at or after this time (Unix ms).
    pub since_ms: Option<i64>,
    /// Records of this key fingerprint.
    pub key_fp: Option<String>,
}

/// One row per key (and user) over the selected records.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// The key's fingerprint (`-` for requests without a key).
    pub key: String,
    /// Its user.
    pub user_id: String,
    /// Records.
    pub requests: u64,
    /// Records whose status was >= 400.
    pub errors: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
    /// Tokens charged.
    pub billable_tokens: u64,
    /// Sum of `cost`.
    pub cost: f64,
}

fn where_clause(q: &Query) -> (String, Vec<rusqlite::types::Value>) {
    let mut clauses = Vec::new();
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(s) = q.since_ms {
        clauses.push("ts_ms >= ?");
        args.push(s.into());
    }
    if let Some(k) = &q.key_fp {
        clauses.push("key_fp = ?");
        args.push(k.clone().into());
    }
    let w = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    (w, args)
}

/// Per-key totals over `q`.
pub fn summarize(conn: &Connection, q: &Query) -> rusqlite::Result<Vec<Summary>> {
    let (w, args) = where_clause(q);
    let sql = format!(
        "SELECT COALESCE(key_fp, '-'), COALESCE(user_id, '-'), COUNT(*), SUM(status >= 400),
         SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens), SUM(billable_tokens),
         COALESCE(SUM(cost), 0) FROM usage{w} GROUP BY 1, 2 ORDER BY 1, 2"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| {
        let n = |i: usize| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
        Ok(Summary {
            key: r.get(0)?,
            user_id: r.get(1)?,
            requests: n(2)?,
            errors: n(3)?,
            prompt_tokens: n(4)?,
            completion_tokens: n(5)?,
            total_tokens: n(6)?,
            billable_tokens: n(7)?,
            cost: r.get(8)?,
        })
    })?;
    rows.collect()
}

/// The records selected by `q`, oldest first, as JSON objects.
pub fn records(conn: &Connection, q: &Query) -> rusqlite::Result<Vec<Value>> {
    let (w, args) = where_clause(q);
    let sql = format!(
        "SELECT request_id, ts_ms, node, key_fp, user_id, backend, model, path, is_stream, status,
         prompt_tokens, completion_tokens, total_tokens, billable_tokens, cost, latency_ms, record
         FROM usage{w} ORDER BY ts_ms, id"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| {
        Ok(StoredRecord {
            request_id: r.get(0)?,
            ts_ms: r.get(1)?,
            node: r.get(2)?,
            key: r.get(3)?,
            user_id: r.get(4)?,
            backend: r.get(5)?,
            model: r.get(6)?,
            path: r.get(7)?,
            is_stream: r.get(8)?,
            status: r.get(9)?,
            tokens: [r.get(10)?, r.get(11)?, r.get(12)?, r.get(13)?],
            cost: r.get(14)?,
            latency_ms: r.get(15)?,
            record: r.get(16)?,
        }
        .into_json())
    })?;
    rows.collect()
}

/// One stored record, as every store reads it back for the reports.
struct StoredRecord {
    request_id: String,
    ts_ms: i64,
    node: String,
    key: Option<String>,
    user_id: Option<String>,
    backend: Option<String>,
    model: Option<String>,
    path: String,
    is_stream: bool,
    status: i64,
    /// Prompt, completion, total, billable.
    tokens: [i64; 4],
    cost: Option<f64>,
    latency_ms: f64,
    record: String,
}

impl StoredRecord {
    /// The record as `llmproxy usage --records` prints it (the usage record
    /// as JSON when it parses).
    fn into_json(self) -> Value {
        let [prompt, completion, total, billable] = self.tokens;
        serde_json::json!({
            "request_id": self.request_id,
            "ts_ms": self.ts_ms,
            "node": self.node,
            "key": self.key,
            "user_id": self.user_id,
            "backend": self.backend,
            "model": self.model,
            "path": self.path,
            "is_stream": self.is_stream,
            "status": self.status,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "billable_tokens": billable,
            "cost": self.cost,
            "latency_ms": self.latency_ms,
            "record": serde_json::from_str::<Value>(&self.record).unwrap_or(Value::String(self.record)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database path of its own for test `name`, in a directory emptied
    /// first.
    fn fresh_db(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("llmproxy-ledger-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("u.db")
    }

    fn rec(i: u64, fp: &str, billable: u64) -> LedgerRecord {
        LedgerRecord {
            request_id: format!("req-{i}"),
            ts_ms: 1_000 + i as i64,
            node: "n1".into(),
            key_fp: Some(fp.into()),
            user_id: Some("u".into()),
            backend: Some("b".into()),
            model: Some("gpt-4".into()),
            path: "/v1/chat/completions".into(),
            is_stream: i.is_multiple_of(2),
            status: 200,
            prompt_tokens: 2,
            completion_tokens: 3,
            total_tokens: 5,
            billable_tokens: billable,
            cost: Some(0.5),
            latency_ms: 1.5,
            record: r#"{"billable_tokens":4}"#.into(),
            charge_quota: true,
        }
    }

    /// Issue 14, point 7: records answered before a reset but still
    /// queued when it happens are not added to the reset count.
    #[test]
    fn a_reset_is_not_undone_by_records_answered_before_it() {
        let path = fresh_db("reset");
        let ledger = Ledger::open(&path, Duration::from_millis(100), 100, 16).unwrap();
        ledger.record(rec(0, "fp-a", 4));
        ledger.flush();
        // Queued before the reset, committed after it.
        ledger.set_used("fp-a", 60, 60);
        std::thread::sleep(Duration::from_millis(2));
        let before = now_ms() - 10;
        // Answered (ts_ms) before the reset, committed after it.
        let mut late = rec(1, "fp-a", 4);
        late.ts_ms = before;
        reset_key_usage(&open_rw(&path).unwrap(), "fp-a", 7).unwrap();
        ledger.record(late);
        let mut after = rec(2, "fp-a", 4);
        after.ts_ms = now_ms() + 10;
        ledger.record(after);
        ledger.close();
        let conn = open_ro(&path).unwrap();
        assert_eq!(read_key_usage(&conn).unwrap()["fp-a"].used, 7 + 4);
        // The records themselves are all in the ledger.
        assert_eq!(summarize(&conn, &Query::default()).unwrap()[0].requests, 3);
    }

    /// A usage set between two records of the same batch replaces what
    /// came before it and keeps what came after, as one update per record
    /// did.
    #[test]
    fn a_usage_set_inside_a_batch_applies_in_order() {
        let path = fresh_db("order");
        // One batch: a gathering window far longer than the test, ended
        // by `close`.
        let ledger = Ledger::open(&path, Duration::from_millis(5_000), 100, 16).unwrap();
        for i in 0..3 {
            ledger.record(rec(i, "fp-a", 4));
            ledger.record(rec(10 + i, "fp-b", 5));
        }
        ledger.set_used("fp-a", 100, 100);
        ledger.record(rec(20, "fp-a", 4));
        ledger.record(rec(21, "fp-b", 5));
        ledger.close();
        assert_eq!(ledger.stats.batches.load(Ordering::Relaxed), 1);
        let conn = open_ro(&path).unwrap();
        let usage = read_key_usage(&conn).unwrap();
        assert_eq!(usage["fp-a"].used, 100 + 4);
        assert_eq!(usage["fp-b"].used, 4 * 5);
    }

    /// Rows are inserted several to a statement: every row of a batch,
    /// whatever its size against the statement's, reads back as it was
    /// given, in order.
    #[test]
    fn every_row_of_a_batch_reads_back_as_given() {
        for n in [1u64, 15, 16, 17, 40] {
            let path = fresh_db(&format!("rows-{n}"));
            let ledger = Ledger::open(&path, Duration::from_millis(5_000), 1_000, 1_000).unwrap();
            let given: Vec<LedgerRecord> = (0..n)
                .map(|i| {
                    let mut r = rec(i, "fp-a", i);
                    r.key_fp = (i % 3 != 0).then(|| format!("fp-{i}"));
                    r.cost = (i % 4 != 0).then_some(i as f64 / 8.0);
                    r.status = 200 + i as u16;
                    r.record = format!(r#"{{"n":{i}}}"#);
                    r
                })
                .collect();
            for r in &given {
                ledger.record(r.clone());
            }
            ledger.close();
            assert_eq!(ledger.stats.batches.load(Ordering::Relaxed), 1, "{n} rows");
            let read = records(&open_ro(&path).unwrap(), &Query::default()).unwrap();
            assert_eq!(read.len(), given.len(), "{n} rows");
            for (got, r) in read.iter().zip(&given) {
                let want = serde_json::json!({
                    "request_id": r.request_id, "ts_ms": r.ts_ms, "node": r.node, "key": r.key_fp,
                    "user_id": r.user_id, "backend": r.backend, "model": r.model, "path": r.path,
                    "is_stream": r.is_stream, "status": r.status, "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens, "total_tokens": r.total_tokens,
                    "billable_tokens": r.billable_tokens, "cost": r.cost, "latency_ms": r.latency_ms,
                    "record": serde_json::from_str::<Value>(&r.record).unwrap(),
                });
                assert_eq!(got, &want, "{n} rows");
            }
        }
    }

    #[test]
    fn batches_commit_and_close_loses_nothing() {
        let path = fresh_db("unit");
        let ledger = Ledger::open(&path, Duration::from_millis(20), 100, 16).unwrap();
        ledger.set_used("fp-a", 10, 10);
        for i in 0..1000 {
            ledger.record(rec(i, if i % 2 == 0 { "fp-a" } else { "fp-b" }, 4));
        }
        ledger.close();
        assert!(ledger.stats.batches.load(Ordering::Relaxed) >= 10);
        assert_eq!(ledger.stats.written.load(Ordering::Relaxed), 1000);
        assert_eq!(ledger.stats.pending.load(Ordering::Relaxed), 0);
        let conn = open_ro(&path).unwrap();
        let s = summarize(&conn, &Query::default()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.iter().map(|s| s.requests).sum::<u64>(), 1000);
        let usage = read_key_usage(&conn).unwrap();
        assert_eq!(usage["fp-a"].used, 10 + 500 * 4);
        assert_eq!(usage["fp-b"].used, 500 * 4);
        let q = Query {
            since_ms: Some(1_990),
            key_fp: Some("fp-a".into()),
        };
        let r = records(&conn, &q).unwrap();
        assert_eq!(r.len(), 5);
        assert_eq!(r[0]["record"]["billable_tokens"], 4);
    }
}
