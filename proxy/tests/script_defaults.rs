//! The defaults scripts meet (docs/adr/041): `current_time` follows the
//! machine's local zone (`TZ`) unless `limits.time_zone` overrides it, and
//! `llmproxy check` names the zone in effect and warns about the old
//! `total_quota: 0`. Real `llmproxy` processes with `TZ` set, a real mock
//! backend, real sockets.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{FixedOffset, Timelike, Utc};
use common::*;
use serde_json::{json, Value};

const TZ: &str = "Asia/Kolkata"; // UTC+05:30 all year (no daylight saving)

const SCRIPT: &str = "return {allow = false, reason = json.encode(current_time)}";

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(dir: &Path, backend_url: &str, zone: Option<&str>) -> std::path::PathBuf {
    let zone = zone.map_or(String::new(), |z| format!(", time_zone: \"{z}\""));
    let yaml = format!(
        "backends:\n{}keys:\n  - {{key: sk-a, user_id: u}}\nlimits: {{key_rpm: 100{zone}}}\nscripts:\n  rate_limit:\n    script: '{SCRIPT}'\n",
        backend("m", backend_url)
    );
    let path = dir.join(format!("tz-{}.yaml", zone.len()));
    std::fs::write(&path, yaml).unwrap();
    path
}

async fn serve_with_tz(config: &Path) -> (Serve, String) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args(["serve", "--config", config.to_str().unwrap(), "--listen"])
        .arg(addr.to_string())
        .env("TZ", TZ)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Serve(child);
    for _ in 0..1000 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return (s, format!("http://{addr}/v1/chat/completions"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("llmproxy serve did not start");
}

/// The hour in `offset_s` just before and just after the call (an hour
/// may turn during it).
fn hours(offset_s: i32, before: chrono::DateTime<Utc>) -> [u32; 2] {
    let tz = FixedOffset::east_opt(offset_s).unwrap();
    [before.with_timezone(&tz).hour(), Utc::now().with_timezone(&tz).hour()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_time_is_local_by_default_and_time_zone_overrides_it() {
    let m = mock("m", |_| {}).await;
    let dir = tempdir("time-zone");
    // (limits.time_zone, offset the script must see)
    let cases = [(None, 5 * 3600 + 1800), (Some("UTC"), 0), (Some("-03:00"), -3 * 3600)];
    for (zone, offset) in cases {
        let (_serve, url) = serve_with_tz(&config(&dir, &m.url(), zone)).await;
        let before = Utc::now();
        let r = post(&url, &chat("gpt-4", json!({})), &[("authorization", "Bearer sk-a")]).await;
        assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
        let seen: Value = serde_json::from_str(r.json()["error"]["message"].as_str().unwrap()).unwrap();
        let hour = seen["hour"].as_u64().unwrap() as u32;
        assert!(
            hours(offset, before).contains(&hour),
            "time_zone {zone:?} with TZ={TZ}: hour {hour}, want {:?}",
            hours(offset, before)
        );
        assert!((seen["timestamp"].as_i64().unwrap() - before.timestamp()).abs() <= 5);
    }
}

#[test]
fn check_names_the_zone_in_effect() {
    let dir = tempdir("time-zone-check");
    // (limits.time_zone, what the summary says)
    let cases = [
        (None, format!("current_time zone: local (TZ={TZ}, UTC+05:30 now)")),
        (Some("+08:00"), String::from("current_time zone: UTC+08:00")),
    ];
    for (zone, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
            .arg("check")
            .arg(config(&dir, "http://127.0.0.1:9", zone))
            .env("TZ", TZ)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(&want), "{zone:?}: {stdout}");
    }
}

#[test]
fn check_warns_that_a_zero_quota_reads_as_unlimited() {
    let dir = tempdir("quota-warning");
    // (total_quota, warns)
    for (quota, warns) in [("0", true), ("unlimited", false), ("100", false)] {
        let path = dir.join(format!("q-{quota}.yaml"));
        std::fs::write(
            &path,
            format!("keys:\n  - {{key: sk-a, user_id: u, total_quota: {quota}}}\n"),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "total_quota {quota}: it still loads");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.contains("total_quota: 0 is read as unlimited"),
            warns,
            "total_quota {quota}: {stderr}"
        );
    }
}
