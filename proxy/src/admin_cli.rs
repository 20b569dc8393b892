//! The operator's subcommands: `llmproxy keys` (list, add, disable, enable,
//! set-quota) and `llmproxy usage` (reports from the ledger).
//!
//! `keys` edits the config's `keys_file` (rewritten atomically as a YAML
//! list, keeping the file's mode and owner; comments are not kept; `add`
//! creates a missing file with mode 0600); a running gateway picks the
//! change up by hot reload. Quota usage is not stored in the file but in the state
//! backend: the file's `used_quota` is where a new key starts, and changing
//! it (`set-quota --used N`) resets the key's count to N on the next load.
//!
//! Both read only the config's account sections ([`AccountsConfig`]:
//! `keys`, `keys_file`, `state`, `ledger`), never its scripts: a script
//! that does not compile must not stop an operator from disabling a key.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use llmproxy_core::config::{read_keys_file, AccountsConfig, StateBackend};
use llmproxy_core::error::redact_url;
use llmproxy_core::keys::{key_fingerprint, KeyRecord, KeyStatus};
use serde_json::{json, Value};

use crate::atomic_file;
use crate::gateway::ledger::{self, Query};
use crate::gateway::redis_conn::RedisClient;

/// `llmproxy keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List the configured keys with their live quota usage.
    List {
        /// The gateway's config file.
        #[arg(long)]
        config: PathBuf,
        /// `table` or `json`.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Add a key to the keys_file and print it (the only time it is shown).
    /// The file stores its SHA-256 (`key_sha256`) unless `--plaintext`.
    Add {
        /// The gateway's config file.
        #[arg(long)]
        config: PathBuf,
        /// The user the key belongs to.
        #[arg(long)]
        user: String,
        /// A display name.
        #[arg(long, default_value = "")]
        name: String,
        /// The key itself (default: a new random `sk-...`).
        #[arg(long)]
        key: Option<String>,
        /// Token quota (0 or absent: unlimited).
        #[arg(long, default_value_t = 0)]
        total_quota: u64,
        /// Allowed client range (CIDR); repeat for several.
        #[arg(long = "allowed-ip")]
        allowed_ips: Vec<String>,
        /// Expiry, RFC 3339.
        #[arg(long)]
        expires_at: Option<String>,
        /// Store the key in clear (`key:`) instead of its SHA-256.
        #[arg(long)]
        plaintext: bool,
    },
    /// Set a key's status to disabled.
    Disable {
        /// The gateway's config file.
        #[arg(long)]
        config: PathBuf,
        /// The key or its fingerprint (`sha256:...`).
        key: String,
    },
    /// Set a key's status to active.
    Enable {
        /// The gateway's config file.
        #[arg(long)]
        config: PathBuf,
        /// The key or its fingerprint (`sha256:...`).
        key: String,
    },
    /// Change a key's quota; `--used` also resets its usage count.
    SetQuota {
        /// The gateway's config file.
        #[arg(long)]
        config: PathBuf,
        /// The key or its fingerprint (`sha256:...`).
        key: String,
        /// New total quota (0: unlimited, written as `unlimited`).
        #[arg(long)]
        total: Option<u64>,
        /// Reset the tokens used to this value.
        #[arg(long)]
        used: Option<u64>,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("llmproxy: {msg}");
    ExitCode::from(2)
}

/// The account sections of `config` only: no script is read or compiled,
/// so the commands work while a script is broken (an incident is when a
/// key most needs disabling).
fn load(config: &Path) -> Result<AccountsConfig, ExitCode> {
    AccountsConfig::from_file(config).map_err(|e| {
        eprintln!("{}: {} problem(s)", config.display(), e.problems.len());
        for p in &e.problems {
            eprintln!("  {p}");
        }
        ExitCode::from(2)
    })
}

/// Run `llmproxy keys ...`.
pub fn keys(cmd: KeysCommand) -> ExitCode {
    match cmd {
        KeysCommand::List { config, format } => list(&config, &format),
        KeysCommand::Add {
            config,
            user,
            name,
            key,
            total_quota,
            allowed_ips,
            expires_at,
            plaintext,
        } => {
            let key = match key {
                Some(k) => k,
                None => match new_key() {
                    Ok(k) => k,
                    Err(e) => return fail(e),
                },
            };
            let record = KeyRecord {
                key: key.clone(),
                key_sha256: None,
                user_id: user,
                name,
                status: KeyStatus::Active,
                total_quota: Some(total_quota).filter(|q| *q > 0),
                used_quota: 0,
                allowed_ips,
                expires_at,
            };
            let problems = record.validate("key");
            if !problems.is_empty() {
                return fail(problems.join("; "));
            }
            let record = if plaintext { record } else { record.hashed() };
            if let Err(e) = create_missing_keys_file(&config) {
                return fail(e);
            }
            edit(&config, None, |keys| {
                keys.push(record.clone());
                Ok(())
            })
            .map_or_else(
                |c| c,
                |_| {
                    println!("{key}");
                    eprintln!(
                        "added {} for user {} ({}); the key is not shown again",
                        key_fingerprint(&key),
                        record.user_id,
                        if plaintext {
                            "stored in clear"
                        } else {
                            "stored as its SHA-256"
                        }
                    );
                    ExitCode::SUCCESS
                },
            )
        }
        KeysCommand::Disable { config, key } => set_status(&config, &key, KeyStatus::Disabled),
        KeysCommand::Enable { config, key } => set_status(&config, &key, KeyStatus::Active),
        KeysCommand::SetQuota {
            config,
            key,
            total,
            used,
        } => {
            if total.is_none() && used.is_none() {
                return fail("set-quota needs --total and/or --used");
            }
            if let Some(n) = used {
                // The store first: the file change that follows makes a
                // running gateway reload and pick the reset up.
                if let Err(e) = reset_usage(&config, &key, n) {
                    return fail(e);
                }
            }
            edit(&config, Some(&key), |keys| {
                let k = find(keys, &key)?;
                if let Some(t) = total {
                    // 0 on the command line keeps its old meaning: unlimited.
                    k.total_quota = Some(t).filter(|q| *q > 0);
                }
                if let Some(u) = used {
                    k.used_quota = u;
                }
                Ok(())
            })
            .map_or_else(
                |c| c,
                |fp| {
                    eprintln!("updated {fp}");
                    ExitCode::SUCCESS
                },
            )
        }
    }
}

/// Reset a key's usage in the state backend (`set-quota --used N`).
fn reset_usage(config: &Path, key: &str, used: u64) -> Result<(), String> {
    let cfg = AccountsConfig::from_file(config).map_err(|e| e.to_string())?;
    let record = cfg
        .keys
        .iter()
        .find(|k| matches(k, key))
        .ok_or_else(|| format!("no key '{}' in {}", mask(key), config.display()))?;
    let fp = record.fingerprint();
    match cfg.state.backend {
        StateBackend::Local => {
            let Some(l) = &cfg.ledger else {
                return Ok(());
            };
            let conn = ledger::open_rw(&l.path)?;
            ledger::reset_key_usage(&conn, &fp, used).map_err(|e| format!("{}: {e}", l.path.display()))
        }
        StateBackend::Redis => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let url = cfg.state.url.clone().unwrap_or_default();
            let q = format!("{}q:{fp}", cfg.state.prefix);
            let n = used.to_string();
            // `reset`: charges of requests answered before now are not
            // added to the new count (docs/adr/043).
            let at = ledger::now_ms().to_string();
            rt.block_on(async {
                let client = RedisClient::new(&url, 1, Duration::from_millis(cfg.state.timeout_ms.max(1000)))?;
                client
                    .cmd(&[
                        b"HSET",
                        q.as_bytes(),
                        b"used",
                        n.as_bytes(),
                        b"cfg",
                        n.as_bytes(),
                        b"reset",
                        at.as_bytes(),
                    ])
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        }
    }
}

fn set_status(config: &Path, key: &str, status: KeyStatus) -> ExitCode {
    edit(config, Some(key), |keys| {
        find(keys, key)?.status = status;
        Ok(())
    })
    .map_or_else(
        |c| c,
        |fp| {
            eprintln!(
                "{fp}: {}",
                if status == KeyStatus::Active {
                    "active"
                } else {
                    "disabled"
                }
            );
            ExitCode::SUCCESS
        },
    )
}

/// Whether `wanted` (a key or a `sha256:` fingerprint) names `k`, held in
/// clear or hashed.
fn matches(k: &KeyRecord, wanted: &str) -> bool {
    k.matches_secret(wanted) || k.fingerprint() == wanted
}

fn find<'a>(keys: &'a mut [KeyRecord], wanted: &str) -> Result<&'a mut KeyRecord, String> {
    keys.iter_mut()
        .find(|k| matches(k, wanted))
        .ok_or_else(|| format!("no key '{}' in the keys_file", mask(wanted)))
}

fn mask(key: &str) -> String {
    if key.starts_with("sha256:") {
        return key.to_owned();
    }
    let head: String = key.chars().take(6).collect();
    format!("{head}…")
}

/// Read the keys_file, change it, check the result, write it back
/// atomically. Returns the fingerprint of `key` (when given).
fn edit(
    config: &Path,
    key: Option<&str>,
    change: impl FnOnce(&mut Vec<KeyRecord>) -> Result<(), String>,
) -> Result<String, ExitCode> {
    let cfg = load(config)?;
    let Some(path) = cfg.keys_file.clone() else {
        return Err(fail(format!(
            "{} has no keys_file: `llmproxy keys` edits a keys_file (inline `keys:` are edited by hand)",
            config.display()
        )));
    };
    let mut keys = read_keys_file(&path).map_err(fail)?;
    if let Some(k) = key {
        if cfg.keys.iter().any(|r| matches(r, k)) && !keys.iter().any(|r| matches(r, k)) {
            return Err(fail(format!(
                "key '{}' is defined inline in {}, not in the keys_file",
                mask(k),
                config.display()
            )));
        }
    }
    change(&mut keys).map_err(fail)?;
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, k) in keys.iter().enumerate() {
        problems.extend(k.validate(&format!("keys_file[{i}]")));
        let digest = k.key_digest();
        if !seen.insert(digest) || cfg.keys.iter().filter(|c| c.key_digest() == digest).count() > 1 {
            problems.push(format!("keys_file[{i}]: the key is already defined"));
        }
    }
    if !problems.is_empty() {
        return Err(fail(problems.join("; ")));
    }
    let yaml = serde_norway::to_string(&keys).map_err(fail)?;
    let text = format!("# API keys of llmproxy; edited by `llmproxy keys` (comments are not kept).\n{yaml}");
    // Atomic, and never more readable than the file it replaces.
    atomic_file::replace(&path, text.as_bytes(), atomic_file::PRIVATE_MODE).map_err(fail)?;
    if let Some(mode) = atomic_file::readable_by_others(&path) {
        eprintln!(
            "llmproxy: warning: {} holds API keys and is readable by others (mode {mode:04o}); `chmod 600` it",
            path.display()
        );
    }
    Ok(key
        .map(|k| {
            keys.iter()
                .find(|r| matches(r, k))
                .map_or_else(|| k.to_owned(), KeyRecord::fingerprint)
        })
        .unwrap_or_default())
}

/// `keys add` on a config whose `keys_file` does not exist yet creates it
/// (empty, mode 0600) so that the config loads and the key can be added.
fn create_missing_keys_file(config: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    let Ok(raw) = serde_norway::from_str::<Value>(&text) else {
        return Ok(()); // the config loader reports the problem
    };
    let Some(file) = raw.get("keys_file").and_then(Value::as_str) else {
        return Ok(());
    };
    let base = config.parent().unwrap_or_else(|| Path::new("."));
    let path = base.join(file);
    if path.exists() {
        return Ok(());
    }
    atomic_file::replace(&path, b"[]\n", atomic_file::PRIVATE_MODE)?;
    eprintln!("created {} (mode 0600)", path.display());
    Ok(())
}

fn new_key() -> Result<String, String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    let mut s = String::from("sk-");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    Ok(s)
}

/// Live usage per key fingerprint from the state backend (best effort).
fn live_usage(cfg: &AccountsConfig) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    match cfg.state.backend {
        StateBackend::Local => {
            if let Some(l) = &cfg.ledger {
                if l.path.exists() {
                    if let Ok(rows) =
                        ledger::open_ro(&l.path).and_then(|c| ledger::read_key_usage(&c).map_err(|e| e.to_string()))
                    {
                        out.extend(rows.into_iter().map(|(k, v)| (k, v.used)));
                    }
                }
            }
        }
        StateBackend::Redis => {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return out;
            };
            let url = cfg.state.url.clone().unwrap_or_default();
            let prefix = cfg.state.prefix.clone();
            let fps: Vec<String> = cfg.keys.iter().map(KeyRecord::fingerprint).collect();
            rt.block_on(async {
                let Ok(client) = RedisClient::new(&url, 1, Duration::from_millis(cfg.state.timeout_ms.max(1000)))
                else {
                    return;
                };
                for fp in fps {
                    let q = format!("{prefix}q:{fp}");
                    match client.cmd(&[b"HGET", q.as_bytes(), b"used"]).await {
                        Ok(r) => {
                            if let Some(v) = r.as_i64() {
                                out.insert(fp, u64::try_from(v).unwrap_or(0));
                            }
                        }
                        Err(e) => {
                            eprintln!("llmproxy: cannot read usage from redis: {e}");
                            return;
                        }
                    }
                }
            });
        }
    }
    out
}

fn list(config: &Path, format: &str) -> ExitCode {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let usage = live_usage(&cfg);
    let rows: Vec<Value> = cfg
        .keys
        .iter()
        .map(|k| {
            let fp = k.fingerprint();
            json!({
                "fingerprint": fp,
                "key": if k.key_sha256.is_some() { String::from("(hashed)") } else { mask(&k.key) },
                "user_id": k.user_id,
                "name": k.name,
                "status": if k.status == KeyStatus::Active { "active" } else { "disabled" },
                "total_quota": k.quota_limit().map_or_else(|| json!("unlimited"), |q| json!(q)),
                "used_quota": usage.get(&fp).copied().unwrap_or(k.used_quota),
                "allowed_ips": k.allowed_ips,
                "expires_at": k.expires_at,
            })
        })
        .collect();
    match format {
        "json" => println!("{}", Value::Array(rows)),
        "table" => print!("{}", keys_table(&rows)),
        other => return fail(format!("--format must be table or json, not '{other}'")),
    }
    ExitCode::SUCCESS
}

/// The rows of `keys list` as a table: every column as wide as its widest
/// cell, text left-aligned, the TOTAL and USED numbers right-aligned under
/// their headers.
fn keys_table(rows: &[Value]) -> String {
    const HEADERS: [&str; 7] = ["FINGERPRINT", "KEY", "USER", "STATUS", "TOTAL", "USED", "EXPIRES"];
    const NUMERIC: [bool; 7] = [false, false, false, false, true, true, false];
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::from("-"),
        other => other.to_string(),
    };
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                text(&r["fingerprint"]),
                text(&r["key"]),
                text(&r["user_id"]),
                text(&r["status"]),
                text(&r["total_quota"]),
                text(&r["used_quota"]),
                text(&r["expires_at"]),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |row: [&str; 7]| {
        let mut out = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = " ".repeat(widths[i].saturating_sub(cell.chars().count()));
            if i > 0 {
                out.push_str("  ");
            }
            if NUMERIC[i] {
                out.push_str(&pad);
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if i + 1 < row.len() {
                    out.push_str(&pad);
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(HEADERS);
    for row in &cells {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

/// Parse `--since`: RFC 3339, or an age such as `30s`, `15m`, `2h`, `7d`.
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<i64, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    let t = text.trim();
    let (num, unit) = t.split_at(t.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("--since '{text}': use RFC 3339 or an age like 30s, 15m, 2h, 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(format!(
                "--since '{text}': use RFC 3339 or an age like 30s, 15m, 2h, 7d"
            ))
        }
    };
    Ok(now.timestamp_millis() - secs * 1000)
}

/// Run `llmproxy usage`.
pub fn usage(
    config: Option<&Path>,
    dbs: &[PathBuf],
    since: Option<&str>,
    key: Option<&str>,
    format: &str,
    records: bool,
) -> ExitCode {
    // A `--db` is a SQLite file or a PostgreSQL URL (a fleet's ledger).
    let mut paths: Vec<String> = dbs.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if let Some(c) = config {
        let cfg = match load(c) {
            Ok(c) => c,
            Err(code) => return code,
        };
        match &cfg.ledger {
            Some(l) if dbs.is_empty() => {
                paths.push(l.url.clone().unwrap_or_else(|| l.path.to_string_lossy().into_owned()))
            }
            Some(_) => {}
            None if dbs.is_empty() => return fail(format!("{} has no ledger", c.display())),
            None => {}
        }
    }
    if paths.is_empty() {
        return fail("usage needs --config FILE or --db FILE");
    }
    let q = Query {
        since_ms: match since.map(|s| parse_since(s, Utc::now())).transpose() {
            Ok(v) => v,
            Err(e) => return fail(e),
        },
        key_fp: key.map(|k| {
            if k.starts_with("sha256:") {
                k.to_owned()
            } else {
                key_fingerprint(k)
            }
        }),
    };
    // Several ledgers (one per node) are reported together.
    let mut summaries: Vec<ledger::Summary> = Vec::new();
    let mut rows: Vec<Value> = Vec::new();
    for p in &paths {
        let r = if ledger::postgres::is_url(p) {
            if records {
                ledger::postgres::records(p, &q).map(|r| rows.extend(r))
            } else {
                ledger::postgres::summarize(p, &q).map(|s| summaries.extend(s))
            }
        } else {
            let conn = match ledger::open_ro(Path::new(p)) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let r = if records {
                ledger::records(&conn, &q).map(|r| rows.extend(r))
            } else {
                ledger::summarize(&conn, &q).map(|s| summaries.extend(s))
            };
            r.map_err(|e| e.to_string())
        };
        if let Err(e) = r {
            return fail(format!("{}: {e}", redact_url(p)));
        }
    }
    if records {
        rows.sort_by_key(|r| r["ts_ms"].as_i64().unwrap_or(0));
        return print_rows(&rows, format);
    }
    // Merge per-node summaries of the same key.
    let mut merged: Vec<ledger::Summary> = Vec::new();
    for s in summaries {
        match merged.iter_mut().find(|m| m.key == s.key && m.user_id == s.user_id) {
            Some(m) => {
                m.requests += s.requests;
                m.errors += s.errors;
                m.prompt_tokens += s.prompt_tokens;
                m.completion_tokens += s.completion_tokens;
                m.total_tokens += s.total_tokens;
                m.billable_tokens += s.billable_tokens;
                m.cost += s.cost;
            }
            None => merged.push(s),
        }
    }
    merged.sort_by(|a, b| (&a.key, &a.user_id).cmp(&(&b.key, &b.user_id)));
    let rows: Vec<Value> = merged
        .iter()
        .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
        .collect();
    print_rows(&rows, format)
}

fn csv_field(v: &Value) -> String {
    let s = match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn print_rows(rows: &[Value], format: &str) -> ExitCode {
    match format {
        "json" => println!("{}", Value::Array(rows.to_vec())),
        "csv" => {
            let Some(Value::Object(first)) = rows.first() else {
                return ExitCode::SUCCESS;
            };
            let cols: Vec<&String> = first.keys().collect();
            println!("{}", cols.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(","));
            for r in rows {
                let line: Vec<String> = cols.iter().map(|c| csv_field(&r[c.as_str()])).collect();
                println!("{}", line.join(","));
            }
        }
        other => return fail(format!("--format must be json or csv, not '{other}'")),
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_ages() {
        let now = DateTime::parse_from_rfc3339("2026-01-02T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let base = now.timestamp_millis();
        assert_eq!(parse_since("2026-01-01T00:00:00Z", now), Ok(base - 86_400_000));
        assert_eq!(parse_since("1d", now), Ok(base - 86_400_000));
        assert_eq!(parse_since("90s", now), Ok(base - 90_000));
        assert_eq!(parse_since("2h", now), Ok(base - 7_200_000));
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("5w", now).is_err());
        assert_eq!(csv_field(&json!("a,b")), "\"a,b\"");
        assert_eq!(mask("sk-abcdefgh"), "sk-abc…");
    }
}
