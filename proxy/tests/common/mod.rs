//! Helpers shared by the gateway integration tests: real sockets on
//! 127.0.0.1 with ephemeral ports, the real mock backend, a small client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llmproxy_core::Config;
use llmproxy_server::mock::{MockOptions, MockServer};
use llmproxy_server::{Gateway, GatewayOptions, UsageEntry, UsageSink};
use serde_json::Value;

/// The loopback address with a free port.
pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Start a mock backend.
pub async fn mock(name: &str, tweak: impl FnOnce(&mut MockOptions)) -> MockServer {
    let mut o = MockOptions {
        name: name.to_owned(),
        ..MockOptions::default()
    };
    tweak(&mut o);
    MockServer::start(any_port(), o).await.expect("mock backend")
}

/// A URL nothing listens on (a port that was just free).
pub fn refused_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

/// Usage records collected in memory.
#[derive(Default)]
pub struct Collect(pub Mutex<Vec<UsageEntry>>);

impl UsageSink for Collect {
    fn record(&self, entry: UsageEntry) {
        self.0.lock().unwrap().push(entry);
    }
}

impl Collect {
    /// Wait until a record for `request_id` shows up (usage runs after the
    /// response is sent).
    pub async fn wait_for(&self, request_id: &str) -> UsageEntry {
        for _ in 0..200 {
            if let Some(e) = self.0.lock().unwrap().iter().find(|e| e.request_id == request_id) {
                return e.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no usage record for {request_id}");
    }
}

/// A gateway under test.
pub struct TestGateway {
    pub gateway: Gateway,
    pub usage: Arc<Collect>,
    /// The public listener.
    pub base: String,
    /// The admin listener (`/metrics`, `/admin/reload`); the public one
    /// when the config puts the admin endpoints there.
    pub admin_base: String,
}

impl TestGateway {
    /// Start a gateway from YAML. Without `admin.listen` (and without
    /// `admin.on_public_listener`) the admin listener goes on a free
    /// loopback port, so that every test can read `/metrics`.
    pub async fn start(yaml: &str) -> TestGateway {
        let config = Config::from_yaml(yaml, Path::new(".")).expect("config");
        TestGateway::start_config(config).await
    }

    /// Start a gateway from a config (e.g. read from a file, for reloads);
    /// the admin listener as in [`TestGateway::start`].
    pub async fn start_config(mut config: Config) -> TestGateway {
        if config.admin.listen.is_none() && !config.admin.on_public_listener {
            config.admin.listen = Some(String::from("127.0.0.1:0"));
        }
        let usage = Arc::new(Collect::default());
        let options = GatewayOptions {
            usage_sink: Some(Arc::clone(&usage) as Arc<dyn UsageSink>),
            ..GatewayOptions::default()
        };
        let gateway = Gateway::start(config, any_port(), options).await.expect("gateway");
        let base = format!("http://{}", gateway.local_addr());
        let admin_base = gateway
            .admin_addr()
            .map_or_else(|| base.clone(), |a| format!("http://{a}"));
        TestGateway {
            gateway,
            usage,
            base,
            admin_base,
        }
    }

    /// The `/metrics` text (from the admin listener).
    pub async fn metrics(&self) -> String {
        let r = get(&format!("{}/metrics", self.admin_base)).await;
        assert_eq!(r.status, 200, "GET {}/metrics", self.admin_base);
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    /// The value of one metric sample (exact line prefix), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

/// A backend list entry for YAML.
pub fn backend(name: &str, url: &str) -> String {
    format!("  - name: \"{name}\"\n    url: \"{url}\"\n")
}

/// Indent a Lua script for a YAML block scalar.
pub fn script(source: &str) -> String {
    source.lines().map(|l| format!("      {l}\n")).collect::<String>()
}

/// A conformance case's script, joined.
pub fn conformance_script(file: &str) -> String {
    let path = format!("{}/../conformance/cases/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: Value = serde_json::from_str(&text).unwrap();
    match &v["script"] {
        Value::Array(lines) => lines.iter().map(|l| l.as_str().unwrap()).collect::<Vec<_>>().join("\n"),
        Value::String(s) => s.clone(),
        other => panic!("{file}: script is {other}"),
    }
}

/// A response, read whole.
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn backend(&self) -> Option<&str> {
        self.header("x-llmproxy-backend")
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Send a request and read the whole response.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Bytes) -> Reply {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client()
        .request(b.body(Full::new(body)).unwrap())
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply { status, headers, body }
}

/// `GET url`.
pub async fn get(url: &str) -> Reply {
    send(Method::GET, url, &[], Bytes::new()).await
}

/// `POST url` with a JSON body.
pub async fn post(url: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(Method::POST, url, &h, Bytes::from(body.to_string())).await
}

/// A streamed response: head plus each body chunk with its arrival time.
pub struct Streamed {
    pub status: u16,
    pub headers: HeaderMap,
    pub chunks: Vec<(Instant, Bytes)>,
}

impl Streamed {
    /// The `data:` payloads of all events, in order.
    pub fn data(&self) -> Vec<String> {
        let all: Vec<u8> = self.chunks.iter().flat_map(|(_, c)| c.to_vec()).collect();
        String::from_utf8(all)
            .unwrap()
            .split("\n\n")
            .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ").map(str::to_owned)))
            .collect()
    }

    /// The JSON events (everything but `[DONE]`).
    pub fn events(&self) -> Vec<Value> {
        self.data()
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// POST and read the body chunk by chunk.
pub async fn post_stream(url: &str, body: &Value, headers: &[(&str, &str)]) -> Streamed {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client()
        .request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut chunks = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            chunks.push((Instant::now(), data));
        }
    }
    Streamed {
        status,
        headers,
        chunks,
    }
}

/// A chat request body.
pub fn chat(model: &str, extra: Value) -> Value {
    let mut v = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "你好 there"}],
    });
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v
}

/// A fresh temporary directory for one test.
pub fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llmproxy-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `Authorization: Bearer <key>`.
pub fn bearer(key: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {key}"))
}

/// Headers as `send` takes them.
pub fn hdrs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

impl TestGateway {
    /// `POST /v1/chat/completions` with a chat body and a key.
    pub async fn chat(&self, key: Option<&str>, extra: Value) -> Reply {
        let h: Vec<(&str, String)> = key
            .map(|k| ("authorization", format!("Bearer {k}")))
            .into_iter()
            .collect();
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        post(&format!("{}/v1/chat/completions", self.base), &chat("gpt-4", extra), &h).await
    }

    /// Number of usage records so far.
    pub fn records(&self) -> usize {
        self.usage.0.lock().unwrap().len()
    }

    /// Wait until there are `n` usage records.
    pub async fn wait_records(&self, n: usize) {
        for _ in 0..500 {
            if self.records() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} usage records, expected {n}", self.records());
    }
}

/// A `redis-server` child process on a free loopback port, in a temp dir,
/// killed on drop. `None` (and a note) when redis-server is not installed
/// and this is not CI (`make test` installs it; CI fails without it).
pub struct Redis {
    child: std::process::Child,
    pub port: u16,
    _dir: std::path::PathBuf,
    persistent: bool,
}

impl Redis {
    pub fn start(name: &str) -> Option<Redis> {
        Redis::start_with(name, false)
    }

    /// A server that keeps every acknowledged write across [`Redis::stop`]
    /// and [`Redis::restart`] (append-only file, fsync on every write), as
    /// a production Redis with persistence would.
    pub fn start_persistent(name: &str) -> Option<Redis> {
        Redis::start_with(name, true)
    }

    fn start_with(name: &str, persistent: bool) -> Option<Redis> {
        let found = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            assert!(
                std::env::var("CI").is_err(),
                "redis-server is missing (scripts/apt-ensure redis-server)"
            );
            eprintln!("SKIP: redis-server is not installed (scripts/apt-ensure redis-server)");
            return None;
        }
        let dir = tempdir(&format!("redis-{name}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let child = Redis::spawn(port, &dir, persistent);
        let mut r = Redis {
            child,
            port,
            _dir: dir,
            persistent,
        };
        r.wait_up();
        Some(r)
    }

    fn spawn(port: u16, dir: &std::path::Path, persistent: bool) -> std::process::Child {
        let aof = if persistent { "yes" } else { "no" };
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                aof,
                "--appendfsync",
                "always",
            ])
            .args(["--dir", dir.to_str().unwrap(), "--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server")
    }

    fn wait_up(&mut self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("redis-server did not come up on {}", self.port);
    }

    /// Stop the server (kill -9; its data is gone unless it is persistent).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Redis::spawn(self.port, &self._dir, self.persistent);
        self.wait_up();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL server (Debian's `postgresql`) on a free loopback port,
/// its data in a temp dir, run as the `postgres` user when the tests run
/// as root (it refuses root). User `llmproxy`, trust authentication,
/// database `postgres`. `None` (and a note) when it is not installed and
/// this is not CI. Stopped (fast shutdown) on drop.
pub struct Postgres {
    child: std::process::Child,
    pub port: u16,
    bin: std::path::PathBuf,
    data: std::path::PathBuf,
    owner: Option<(u32, u32)>,
}

impl Postgres {
    pub fn start(name: &str) -> Option<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("postgres").exists())
            .max();
        let Some(bin) = bin else {
            assert!(
                std::env::var("CI").is_err(),
                "postgresql is missing (scripts/apt-ensure postgresql)"
            );
            eprintln!("SKIP: postgresql is not installed (scripts/apt-ensure postgresql)");
            return None;
        };
        let dir = tempdir(&format!("pg-{name}"));
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let id = |args: &[&str]| -> u32 {
            let out = std::process::Command::new("id").args(args).output().expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("a numeric id")
        };
        let root = id(&["-u"]) == 0;
        let owner = root.then(|| (id(&["-u", "postgres"]), id(&["-g", "postgres"])));
        if root {
            let ok = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres", dir.to_str().unwrap()])
                .status()
                .expect("chown");
            assert!(ok.success());
        }
        let mut initdb = std::process::Command::new(bin.join("initdb"));
        initdb.args([
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "llmproxy",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        let out = as_owner(&mut initdb, owner).output().expect("initdb");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let child = Postgres::spawn(&bin, &data, port, owner);
        let mut pg = Postgres {
            child,
            port,
            bin,
            data,
            owner,
        };
        pg.wait_up();
        Some(pg)
    }

    fn spawn(bin: &Path, data: &Path, port: u16, owner: Option<(u32, u32)>) -> std::process::Child {
        let mut c = std::process::Command::new(bin.join("postgres"));
        c.args([
            "-D",
            data.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-k",
            data.to_str().unwrap(),
        ])
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        as_owner(&mut c, owner).spawn().expect("spawn postgres")
    }

    fn wait_up(&mut self) {
        for _ in 0..500 {
            if self.sql_status("SELECT 1") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("postgres did not come up on {}", self.port);
    }

    /// `postgres://llmproxy@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://llmproxy@127.0.0.1:{}/postgres", self.port)
    }

    fn psql(&self, sql: &str) -> std::process::Output {
        std::process::Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "llmproxy",
                "-d",
                "postgres",
            ])
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql")
    }

    fn sql_status(&self, sql: &str) -> bool {
        self.psql(sql).status.success()
    }

    /// Run one statement; its rows, `|`-separated, one per line.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.psql(sql);
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stop (fast shutdown: sessions are cut, committed data stays).
    pub fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Start it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Postgres::spawn(&self.bin, &self.data, self.port, self.owner);
        self.wait_up();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn as_owner(c: &mut std::process::Command, owner: Option<(u32, u32)>) -> &mut std::process::Command {
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        c.uid(uid).gid(gid);
    }
    c
}

/// A free port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A real `llmproxy serve` process (killed on drop), with its admin
/// listener on a port of its own.
pub struct Serve {
    pub child: std::process::Child,
    pub port: u16,
    /// The admin listener (`--admin-listen`): `/admin/reload`, `/metrics`.
    pub admin_port: u16,
    pub log: std::path::PathBuf,
}

impl Serve {
    /// Start it on `config`, its log in `log`, and wait until it listens.
    pub async fn start(config: &Path, log: std::path::PathBuf) -> Serve {
        let port = free_port();
        let admin_port = free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
            .args(["serve", "--config", config.to_str().unwrap(), "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin_port}"))
            .env("RUST_LOG", "warn,llmproxy::reload=info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Serve {
            child,
            port,
            admin_port,
            log,
        };
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_ok()
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "llmproxy serve did not start: {}",
            std::fs::read_to_string(&s.log).unwrap_or_default()
        );
    }

    /// The chat completions URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/chat/completions", self.port)
    }

    /// Send a signal (`-TERM`, `-HUP`, `-9`).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Wait for it to exit (at most 30 s).
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..3000 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.child.kill();
        panic!("llmproxy did not exit");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Load `gw` with chats of `key` from 8 keep-alive connections for
/// `load_for`, then `kill -9` it: when each 200 was answered, and when the
/// kill was sent. (The ledger tests count what survived against these.)
pub async fn kill_9_under_load(gw: &mut Serve, key: &str, load_for: Duration) -> (Vec<Instant>, Instant) {
    let done: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (done, stop, url) = (Arc::clone(&done), Arc::clone(&stop), gw.url());
        let auth = format!("Bearer {key}");
        tasks.push(tokio::spawn(async move {
            let c = client();
            let body = Bytes::from(chat("gpt-4", serde_json::json!({})).to_string());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = Request::post(&url)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .unwrap();
                // A request cut by the kill ends the task.
                let Ok(resp) = c.request(req).await else { break };
                let ok = resp.status() == 200;
                if resp.into_body().collect().await.is_err() || !ok {
                    break;
                }
                done.lock().unwrap().push(Instant::now());
            }
        }));
    }
    tokio::time::sleep(load_for).await;
    let killed_at = Instant::now();
    gw.signal("-KILL");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    gw.wait_exit().await;
    for t in tasks {
        let _ = t.await;
    }
    let done = done.lock().unwrap().clone();
    (done, killed_at)
}
