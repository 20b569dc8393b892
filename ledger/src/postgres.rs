//! The PostgreSQL ledger (`ledger: {url: "postgres://..."}`, docs/adr/052):
//! one usage table every node of a fleet writes, so that `llmproxy usage`
//! reports the fleet from one place. The writer is the SQLite ledger's
//! (batches of `flush_ms`, one transaction each, everything committed on
//! close); only the store differs:
//!
//! - a batch is one `INSERT ... SELECT FROM UNNEST(...)`: one round trip,
//!   whatever its size;
//! - every row carries a key unique to it (`row_key`: this ledger's boot id
//!   and the record's number), and the insert skips keys already there, so
//!   a batch retried after a lost connection (committed, answer lost) is
//!   not written twice;
//! - a failed batch is retried with backoff for up to a minute, reconnecting
//!   each time: a database restart loses nothing (producers wait once the
//!   queue is full, as with a slow disk).
//!
//! Quotas are not kept here: a fleet keeps them in Redis (`state.backend:
//! redis`), which the config requires with this ledger.

use std::path::PathBuf;
use std::time::Duration;

use postgres::{Client, NoTls};
use serde_json::Value;

use super::{clamp, Ledger, Msg, Query, Store, StoredRecord, Summary};

/// How long a failing batch is retried before its records count as lost.
const RETRY_FOR: Duration = Duration::from_secs(60);

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Create the table (idempotent; several nodes may start at once, so it
/// runs under an advisory lock).
const MIGRATE: &str = "
SELECT pg_advisory_xact_lock(7526300);
CREATE TABLE IF NOT EXISTS usage (
    id BIGSERIAL PRIMARY KEY,
    row_key TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL,
    ts_ms BIGINT NOT NULL,
    node TEXT NOT NULL,
    key_fp TEXT,
    user_id TEXT,
    backend TEXT,
    model TEXT,
    path TEXT NOT NULL,
    is_stream BOOLEAN NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens BIGINT NOT NULL,
    billable_tokens BIGINT NOT NULL,
    cost DOUBLE PRECISION,
    latency_ms DOUBLE PRECISION NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts_ms);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_fp, ts_ms);
";

const INSERT: &str = "
INSERT INTO usage (row_key, request_id, ts_ms, node, key_fp, user_id, backend, model, path,
    is_stream, status, prompt_tokens, completion_tokens, total_tokens, billable_tokens, cost,
    latency_ms, record)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::text[], $10::bool[], $11::int4[], $12::int8[], $13::int8[],
    $14::int8[], $15::int8[], $16::float8[], $17::float8[], $18::text[])
ON CONFLICT (row_key) DO NOTHING";

/// Is `url` a PostgreSQL URL (`postgres://` or `postgresql://`)?
pub fn is_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn connect(url: &str) -> Result<Client, String> {
    let mut cfg: postgres::Config = url.parse().map_err(|e| format!("ledger.url: {e}"))?;
    cfg.connect_timeout(CONNECT_TIMEOUT);
    cfg.application_name("llmproxy-ledger");
    cfg.connect(NoTls)
        .map_err(|e| format!("ledger: cannot connect to PostgreSQL: {e}"))
}

fn migrate(client: &mut Client) -> Result<(), String> {
    let mut tx = client.transaction().map_err(|e| e.to_string())?;
    tx.batch_execute(MIGRATE)
        .map_err(|e| format!("ledger: cannot create the usage table: {e}"))?;
    tx.commit().map_err(|e| e.to_string())
}

/// The PostgreSQL store of a [`Ledger`].
struct Pg {
    url: String,
    client: Option<Client>,
    /// This ledger's identity in row keys.
    boot: String,
}

impl Pg {
    fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(connect(&self.url)?);
        }
        self.client.as_mut().ok_or_else(|| String::from("no connection"))
    }
}

impl Store for Pg {
    fn write(&mut self, batch: &[Msg]) -> Result<(), String> {
        let mut cols = Columns::default();
        for m in batch {
            if let Msg::Record(r, n) = m {
                cols.push(&self.boot, r, *n);
            }
        }
        if cols.row_key.is_empty() {
            return Ok(());
        }
        let client = self.client()?;
        let r = client.execute(
            INSERT,
            &[
                &cols.row_key,
                &cols.request_id,
                &cols.ts_ms,
                &cols.node,
                &cols.key_fp,
                &cols.user_id,
                &cols.backend,
                &cols.model,
                &cols.path,
                &cols.is_stream,
                &cols.status,
                &cols.prompt_tokens,
                &cols.completion_tokens,
                &cols.total_tokens,
                &cols.billable_tokens,
                &cols.cost,
                &cols.latency_ms,
                &cols.record,
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                // Reconnect on the next try: the connection may be gone.
                self.client = None;
                Err(e.to_string())
            }
        }
    }

    fn retry_for(&self) -> Duration {
        RETRY_FOR
    }
}

/// A batch as one array per column.
#[derive(Default)]
struct Columns {
    row_key: Vec<String>,
    request_id: Vec<String>,
    ts_ms: Vec<i64>,
    node: Vec<String>,
    key_fp: Vec<Option<String>>,
    user_id: Vec<Option<String>>,
    backend: Vec<Option<String>>,
    model: Vec<Option<String>>,
    path: Vec<String>,
    is_stream: Vec<bool>,
    status: Vec<i32>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    total_tokens: Vec<i64>,
    billable_tokens: Vec<i64>,
    cost: Vec<Option<f64>>,
    latency_ms: Vec<f64>,
    record: Vec<String>,
}

impl Columns {
    fn push(&mut self, boot: &str, r: &super::LedgerRecord, n: u64) {
        self.row_key.push(format!("{boot}:{n}"));
        self.request_id.push(r.request_id.clone());
        self.ts_ms.push(r.ts_ms);
        self.node.push(r.node.clone());
        self.key_fp.push(r.key_fp.clone());
        self.user_id.push(r.user_id.clone());
        self.backend.push(r.backend.clone());
        self.model.push(r.model.clone());
        self.path.push(r.path.clone());
        self.is_stream.push(r.is_stream);
        self.status.push(i32::from(r.status));
        self.prompt_tokens.push(clamp(r.prompt_tokens));
        self.completion_tokens.push(clamp(r.completion_tokens));
        self.total_tokens.push(clamp(r.total_tokens));
        self.billable_tokens.push(clamp(r.billable_tokens));
        self.cost.push(r.cost);
        self.latency_ms.push(r.latency_ms);
        self.record.push(r.record.clone());
    }
}

impl Ledger {
    /// Connect to the PostgreSQL database at `url`, create the usage table
    /// if it is missing, and start the writer thread (batches as
    /// [`Ledger::open`]). Fails when the database cannot be reached now.
    pub fn open_postgres(url: &str, flush: Duration, batch_max: usize, queue: usize) -> Result<Ledger, String> {
        let boot = format!(
            "{}-{}-{}",
            std::process::id(),
            super::now_ms(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        let url = url.to_owned();
        let open = move || {
            let mut client = connect(&url)?;
            migrate(&mut client)?;
            Ok(Pg {
                url,
                client: Some(client),
                boot,
            })
        };
        Ledger::start(open, PathBuf::new(), flush, batch_max, queue)
    }
}

fn where_clause(q: &Query) -> (String, Vec<Box<dyn postgres::types::ToSql + Sync>>) {
    let mut clauses = Vec::new();
    let mut args: Vec<Box<dyn postgres::types::ToSql + Sync>> = Vec::new();
    if let Some(s) = q.since_ms {
        args.push(Box::new(s));
        clauses.push(format!("ts_ms >= ${}", args.len()));
    }
    if let Some(k) = &q.key_fp {
        args.push(Box::new(k.clone()));
        clauses.push(format!("key_fp = ${}", args.len()));
    }
    let w = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    (w, args)
}

fn query(url: &str, sql: &str, args: &[Box<dyn postgres::types::ToSql + Sync>]) -> Result<Vec<postgres::Row>, String> {
    let mut client = connect(url)?;
    let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = args.iter().map(|a| a.as_ref()).collect();
    client.query(sql, &refs).map_err(|e| format!("ledger: {e}"))
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Per-key totals over `q`, the whole fleet's ([`super::summarize`]).
pub fn summarize(url: &str, q: &Query) -> Result<Vec<Summary>, String> {
    let (w, args) = where_clause(q);
    let sql = format!(
        "SELECT COALESCE(key_fp, '-'), COALESCE(user_id, '-'), COUNT(*)::int8,
         COUNT(*) FILTER (WHERE status >= 400)::int8, SUM(prompt_tokens)::int8,
         SUM(completion_tokens)::int8, SUM(total_tokens)::int8, SUM(billable_tokens)::int8,
         COALESCE(SUM(cost), 0)::float8 FROM usage{w} GROUP BY 1, 2 ORDER BY 1, 2"
    );
    let rows = query(url, &sql, &args)?;
    rows.iter()
        .map(|r| {
            let n = |i: usize| r.try_get::<_, i64>(i).map(count);
            Ok(Summary {
                key: r.try_get(0)?,
                user_id: r.try_get(1)?,
                requests: n(2)?,
                errors: n(3)?,
                prompt_tokens: n(4)?,
                completion_tokens: n(5)?,
                total_tokens: n(6)?,
                billable_tokens: n(7)?,
                cost: r.try_get(8)?,
            })
        })
        .collect::<Result<_, postgres::Error>>()
        .map_err(|e| format!("ledger: {e}"))
}

/// The records selected by `q`, oldest first ([`super::records`]).
pub fn records(url: &str, q: &Query) -> Result<Vec<Value>, String> {
    let (w, args) = where_clause(q);
    let sql = format!(
        "SELECT request_id, ts_ms, node, key_fp, user_id, backend, model, path, is_stream, status,
         prompt_tokens, completion_tokens, total_tokens, billable_tokens, cost, latency_ms, record
         FROM usage{w} ORDER BY ts_ms, id"
    );
    let rows = query(url, &sql, &args)?;
    rows.iter()
        .map(|r| {
            Ok(StoredRecord {
                request_id: r.try_get(0)?,
                ts_ms: r.try_get(1)?,
                node: r.try_get(2)?,
                key: r.try_get(3)?,
                user_id: r.try_get(4)?,
                backend: r.try_get(5)?,
                model: r.try_get(6)?,
                path: r.try_get(7)?,
                is_stream: r.try_get(8)?,
                status: i64::from(r.try_get::<_, i32>(9)?),
                tokens: [r.try_get(10)?, r.try_get(11)?, r.try_get(12)?, r.try_get(13)?],
                cost: r.try_get(14)?,
                latency_ms: r.try_get(15)?,
                record: r.try_get(16)?,
            }
            .into_json())
        })
        .collect::<Result<_, postgres::Error>>()
        .map_err(|e| format!("ledger: {e}"))
}
