//! The Redis deployments operators run (docs/adr/053), each a real
//! `redis-server` on 127.0.0.1: an ACL user with a password, TLS with a
//! private CA (`rediss://`, `state.tls_ca_file`), and Sentinel with a
//! failover the gateway follows without a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use llmproxy_server::gateway::redis_conn::RedisClient;
use serde_json::json;

/// A redis-server (or sentinel) child with the given arguments, killed on
/// drop.
struct Server(Child);

impl Server {
    /// `args` for redis-server, in `dir` (where it writes any file).
    fn spawn(args: &[&str], port: u16, dir: &Path) -> Server {
        let child = Command::new("redis-server")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let s = Server(child);
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server {args:?} did not come up");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gateway_yaml(mock: &str, state: &str) -> String {
    let spare: String = (0..100)
        .map(|i| format!("  - {{key: sk-f{i}, user_id: uf}}\n"))
        .collect();
    format!(
        "backends:\n{}keys:\n  - {{key: sk-d, user_id: ud}}\n{spare}limits: {{key_rpm: 2}}\n\
         state: {{backend: redis, {state}}}\n",
        backend("m", mock)
    )
}

/// Two chats pass and the third is refused: the limit is counted, and a
/// key's first request on a node needs a Redis round (so a 200 means the
/// gateway reached Redis).
async fn limit_holds(gw: &TestGateway) {
    for _ in 0..2 {
        let r = gw.chat(Some("sk-d"), json!({})).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(gw.chat(Some("sk-d"), json!({})).await.status, 429);
    assert_eq!(gw.metric("llmproxy_state_errors_total").await, 0.0);
}

async fn refused_503(gw: &TestGateway) {
    let r = gw.chat(Some("sk-d"), json!({})).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (503, json!("state_unavailable"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_with_a_password() {
    let Some(redis) = Redis::start("acl") else { return };
    let m = mock("m", |_| {}).await;
    let admin = RedisClient::new(&redis.url(), 1, Duration::from_secs(2)).unwrap();
    for cmd in [
        &["ACL", "SETUSER", "llm", "on", ">s3:cr@t%", "~*", "&*", "+@all"][..],
        &["ACL", "SETUSER", "default", "off"][..],
    ] {
        let args: Vec<&[u8]> = cmd.iter().map(|s| s.as_bytes()).collect();
        admin.cmd(&args).await.expect("ACL SETUSER");
    }
    // The password percent-encoded, as the core reads it for every host
    // (t/019 TEST 10 logs the nginx module in with the same URL).
    let url = format!("redis://llm:s3%3Acr%40t%25@127.0.0.1:{}", redis.port);
    let gw = TestGateway::start(&gateway_yaml(&m.url(), &format!("url: \"{url}\""))).await;
    limit_holds(&gw).await;
    // The counts are in Redis, under the user's connection.
    let as_llm = RedisClient::new(&url, 1, Duration::from_secs(2)).unwrap();
    let bucket = format!("llmproxy:k:{}:rpm", llmproxy_core::keys::key_fingerprint("sk-d"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while as_llm.cmd(&[b"EXISTS", bucket.as_bytes()]).await.unwrap().as_i64() != Some(1) {
        assert!(Instant::now() < deadline, "no {bucket} in Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A wrong password is a failing state backend: 503 (on_error: deny).
    let bad = format!("url: \"redis://llm:wrong@127.0.0.1:{}\"", redis.port);
    let gw = TestGateway::start(&gateway_yaml(&m.url(), &bad)).await;
    refused_503(&gw).await;
}

/// A CA and a server certificate for 127.0.0.1, made with openssl.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=llmproxy test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    if Redis::start("tls-probe").is_none() {
        return;
    }
    let dir = tempdir("redis-tls");
    let (ca, cert, key) = make_certs(&dir);
    let port = free_port();
    let p = port.to_string();
    let _server = Server::spawn(
        &[
            "--port",
            "0",
            "--tls-port",
            &p,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-ca-cert-file",
            ca.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ],
        port,
        &dir,
    );
    let m = mock("m", |_| {}).await;
    let state = format!("url: \"rediss://127.0.0.1:{port}\", tls_ca_file: \"{}\"", ca.display());
    let gw = TestGateway::start(&gateway_yaml(&m.url(), &state)).await;
    limit_holds(&gw).await;
    // Plain text to the TLS port, or TLS without the CA: not connected.
    for state in [
        format!("url: \"redis://127.0.0.1:{port}\", timeout_ms: 200"),
        format!("url: \"rediss://127.0.0.1:{port}\", timeout_ms: 200"),
    ] {
        let gw = TestGateway::start(&gateway_yaml(&m.url(), &state)).await;
        refused_503(&gw).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_finds_the_master_and_a_failover_is_followed_without_a_restart() {
    let Some(master) = Redis::start("sentinel-master") else {
        return;
    };
    let dir = tempdir("redis-sentinel");
    let replica_port = free_port();
    let rp = replica_port.to_string();
    let mp = master.port.to_string();
    let _replica = Server::spawn(
        &[
            "--port",
            &rp,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--replicaof",
            "127.0.0.1",
            &mp,
        ],
        replica_port,
        &dir,
    );
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let info = |port: u16, args: &[&str]| -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait("the replica to sync", &|| {
        info(master.port, &["INFO", "replication"]).contains("connected_slaves:1")
            && info(replica_port, &["INFO", "replication"]).contains("master_link_status:up")
    });
    let sentinel_port = free_port();
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel_port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds mymaster 400\nsentinel failover-timeout mymaster 3000\n",
            dir.display(),
            master.port
        ),
    )
    .unwrap();
    let _sentinel = Server::spawn(&[conf.to_str().unwrap(), "--sentinel"], sentinel_port, &dir);
    wait("the sentinel to see the replica", &|| {
        info(sentinel_port, &["SENTINEL", "replicas", "mymaster"]).contains(&rp)
    });

    let m = mock("m", |_| {}).await;
    let state =
        format!("url: \"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster\", timeout_ms: 300, on_error: fail_closed");
    let gw = TestGateway::start(&gateway_yaml(&m.url(), &state)).await;
    limit_holds(&gw).await;

    // The master dies; the sentinel promotes the replica; the gateway asks
    // the sentinel again when it reconnects. Each request below uses a key
    // this gateway has not seen: it is admitted only after a round with
    // Redis, so a 200 means the gateway reached the new master.
    drop(master);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut statuses = Vec::new();
    let recovered = loop {
        let key = format!("sk-f{}", statuses.len() % 100);
        let r = gw.chat(Some(&key), json!({})).await;
        statuses.push(r.status);
        if r.status == 200 {
            break key;
        }
        assert_eq!(r.status, 503, "fail_closed while no master answers");
        assert!(
            Instant::now() < deadline,
            "no recovery after the failover: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(info(replica_port, &["INFO", "replication"]).contains("role:master"));
    // Its count is on the promoted replica.
    let bucket = format!("llmproxy:k:{}:rpm", llmproxy_core::keys::key_fingerprint(&recovered));
    wait("the count on the new master", &|| {
        info(replica_port, &["EXISTS", &bucket]).trim() == "1"
    });
}
