//! One usage store for a fleet (docs/adr/052): gateways on one Redis write
//! their ledger rows to one PostgreSQL database, and `llmproxy usage`
//! reports the fleet from it, with the SQLite ledger's guarantees: nothing
//! lost on SIGTERM, at most the last flush interval on `kill -9`, nothing
//! lost or written twice across cut connections and a database restart.
//! Real servers on 127.0.0.1: `redis-server`, PostgreSQL (Debian's,
//! started by the test), `llmproxy serve` processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn base(s: &Serve) -> String {
    format!("http://127.0.0.1:{}", s.port)
}

fn write_config(dir: &Path, mock: &str, redis: &str, pg: &str) -> PathBuf {
    write_config_flush(dir, mock, redis, pg, 20)
}

fn write_config_flush(dir: &Path, mock: &str, redis: &str, pg: &str, flush_ms: u64) -> PathBuf {
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "backends:\n{}keys:\n  - {{key: sk-1, user_id: u1}}\n  - {{key: sk-2, user_id: u2}}\n\
             state: {{backend: redis, url: \"{redis}\", prefix: \"pgfleet:\"}}\n\
             ledger: {{url: \"{pg}\", flush_ms: {flush_ms}}}\n",
            backend("m", mock)
        ),
    )
    .unwrap();
    config
}

/// `llmproxy usage --db URL [--records]`, parsed.
fn usage(pg: &str, records: bool) -> Vec<Value> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmproxy"));
    c.args(["usage", "--db", pg]);
    if records {
        c.arg("--records");
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Chats from `conns` tasks over `bases` until `stop` (or `limit` in all);
/// the 200s.
fn load(bases: Vec<String>, conns: usize, stop: Arc<AtomicBool>, limit: u64) -> Vec<tokio::task::JoinHandle<u64>> {
    let next = Arc::new(AtomicU64::new(0));
    (0..conns)
        .map(|_| {
            let (bases, stop, next) = (bases.clone(), Arc::clone(&stop), Arc::clone(&next));
            tokio::spawn(async move {
                let mut ok = 0;
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= limit {
                        break;
                    }
                    let key = if i % 2 == 0 { "sk-1" } else { "sk-2" };
                    let base = &bases[i as usize % bases.len()];
                    let r = post(
                        &format!("{base}/v1/chat/completions"),
                        &chat("gpt-4", json!({"stream": i % 3 == 0})),
                        &[("authorization", &format!("Bearer {key}"))],
                    )
                    .await;
                    assert_eq!(r.status, 200, "request {i}");
                    ok += 1;
                }
                ok
            })
        })
        .collect()
}

async fn total(tasks: Vec<tokio::task::JoinHandle<u64>>) -> u64 {
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_one_ledger_nothing_lost_across_sigterm_and_usage_reports_the_fleet() {
    let Some(redis) = Redis::start("pgfleet") else { return };
    let Some(pg) = Postgres::start("fleet") else { return };
    let m = mock("m", |_| {}).await;
    let dir = tempdir("pgfleet");
    let config = write_config(&dir, &m.url(), &redis.url(), &pg.url());
    let mut gws = Vec::new();
    for i in 0..3 {
        gws.push(Serve::start(&config, dir.join(format!("serve-{i}.log"))).await);
    }
    const N: u64 = 3_000;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = total(load(gws.iter().map(base).collect(), 24, stop, N)).await;
    assert_eq!(ok, N);
    // Every node stops at once, with its last records still queued.
    for g in &gws {
        g.signal("-TERM");
    }
    for g in &mut gws {
        assert!(
            g.wait_exit().await.success(),
            "{}",
            std::fs::read_to_string(&g.log).unwrap()
        );
    }
    assert_eq!(
        pg.sql("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM usage"),
        format!("{N}|{N}")
    );
    // Three nodes wrote.
    assert_eq!(pg.sql("SELECT COUNT(DISTINCT node) FROM usage"), "3");
    // The fleet's report: one row per key, every request in it.
    let summary = usage(&pg.url(), false);
    assert_eq!(summary.len(), 2, "{summary:?}");
    let requests: u64 = summary.iter().map(|s| s["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, N);
    let billable: u64 = summary.iter().map(|s| s["billable_tokens"].as_u64().unwrap()).sum();
    let in_db: u64 = pg.sql("SELECT SUM(billable_tokens) FROM usage").parse().unwrap();
    assert_eq!(billable, in_db);
    assert!(billable > 0);
    let rows = usage(&pg.url(), true);
    assert_eq!(rows.len() as u64, N);
    assert_eq!(rows[0]["path"], "/v1/chat/completions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_and_cut_connections_lose_no_row_and_write_none_twice() {
    let Some(redis) = Redis::start("pgrestart") else {
        return;
    };
    let Some(mut pg) = Postgres::start("restart") else {
        return;
    };
    let m = mock("m", |_| {}).await;
    let dir = tempdir("pgrestart");
    let config = write_config(&dir, &m.url(), &redis.url(), &pg.url());
    let mut gw = Serve::start(&config, dir.join("serve.log")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(vec![base(&gw)], 8, Arc::clone(&stop), u64::MAX);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The ledger's connection is cut a few times (a commit's answer may be
    // lost: the batch is sent again)...
    for _ in 0..5 {
        pg.sql(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'llmproxy-ledger'",
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...then the server restarts, for about a second, under load.
    pg.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    pg.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let ok = total(tasks).await;
    gw.signal("-TERM");
    assert!(gw.wait_exit().await.success());
    assert!(ok > 100, "{ok} requests");
    assert_eq!(
        pg.sql("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM usage"),
        format!("{ok}|{ok}")
    );
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(log.contains("ledger write failed, retrying"), "{log}");
    assert!(!log.contains("records lost"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_at_most_the_last_flush_interval() {
    let Some(redis) = Redis::start("pgkill") else { return };
    let Some(pg) = Postgres::start("kill") else { return };
    let m = mock("m", |_| {}).await;
    let dir = tempdir("pgkill");
    let config = write_config_flush(&dir, &m.url(), &redis.url(), &pg.url(), 100);
    let mut gw = Serve::start(&config, dir.join("serve.log")).await;
    let (done, killed_at) = kill_9_under_load(&mut gw, "sk-1", Duration::from_millis(1500)).await;
    // flush_ms 100, and the batch being committed: 250 ms.
    let before = done
        .iter()
        .filter(|t| **t + Duration::from_millis(250) <= killed_at)
        .count();
    let rows: usize = pg.sql("SELECT COUNT(*) FROM usage").parse().unwrap();
    assert!(before > 100, "{before} requests before the kill");
    assert!(
        rows >= before && rows <= done.len(),
        "{rows} rows; {before} requests completed more than 250 ms before kill -9, {} in all",
        done.len()
    );
}
