//! The usage ledger from nginx (docs/adr/028): the standalone gateway's
//! ledger crate (`llmproxy-ledger`), so the schema, the batching writer and
//! the quota charging are the same code; `llmproxy usage --config FILE`
//! reads what nginx wrote.
//!
//! `log()` hands a request's row to the writer with `h:ledger(served)`
//! (`handle.rs`; the row is `LedgerRecord::of`, as in the gateway), which
//! never blocks: [`Ledger::try_record`] drops (and counts) a record when the queue
//! is full rather than wait in an nginx phase. The writer is per process and
//! per database file: engines rebuilt by a reload share it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use llmproxy_core::config::LedgerConfig;
use llmproxy_ledger::{open_ro, read_one_key_usage, Ledger};

fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<Ledger>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Arc<Ledger>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The writer of `cfg.path` in this process (started on first use).
pub(crate) fn writer(cfg: &LedgerConfig) -> Result<Arc<Ledger>, String> {
    if cfg.url.is_some() {
        return Err(String::from(
            "ledger.url: the nginx module writes a SQLite ledger (ledger.path); a PostgreSQL ledger is the standalone gateway's",
        ));
    }
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = reg.get(&cfg.path) {
        return Ok(Arc::clone(w));
    }
    let w = Arc::new(Ledger::open(
        &cfg.path,
        Duration::from_millis(cfg.flush_ms),
        cfg.batch_max,
        cfg.queue,
    )?);
    reg.insert(cfg.path.clone(), Arc::clone(&w));
    Ok(w)
}

/// The starting quota usage of each key (fingerprint, configured
/// `used_quota`), as the gateway's local state computes it: the ledger's
/// count while the configured value is unchanged (or an operator reset it),
/// else the configured value (queued as the key's new count, never waiting).
pub(crate) fn sync_keys(ledger: &Ledger, keys: &[(String, u64)]) -> Result<Vec<(String, u64)>, String> {
    let conn = open_ro(ledger.path())?;
    let mut out = Vec::with_capacity(keys.len());
    for (fp, configured) in keys {
        let row = read_one_key_usage(&conn, fp).map_err(|e| format!("ledger: {e}"))?;
        let used = match row {
            Some(u) if u.reset_ms > 0 || u.config_used == *configured => u.used,
            _ => {
                let _ = ledger.try_set_used(fp, *configured, *configured);
                *configured
            }
        };
        out.push((fp.clone(), used));
    }
    Ok(out)
}
