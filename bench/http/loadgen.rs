//! HTTP load generator for `make bench-http` (built as an example of the
//! proxy crate: `cargo run --release -p llmproxy-server --example loadgen`).
//!
//! Modes (each prints one JSON line on stdout):
//!
//! - `rps URL BODY CONNECTIONS SECONDS`: closed loop, as fast as possible;
//!   requests per second and latency percentiles.
//! - `rate URL BODY RATE CONNECTIONS SECONDS`: open loop at a fixed rate;
//!   latency is measured from each request's scheduled start, so a stall
//!   shows up in the percentiles (no coordinated omission).
//! - `streams URL BODY N PID`: N concurrent streamed requests, one
//!   connection each; peak RSS of process PID while all are open.
//! - `ttfb URL BODY SECONDS`: one connection, sequential streamed requests;
//!   percentiles of the time from sending a request to its first `data:`
//!   event (the rest of each stream is read before the next request).
//! - `isolation URL FAST_BODY SLOW_BODY N`: p99 of N concurrent fast
//!   requests, alone and while one slow request runs.
//!
//! BODY is a JSON string (not a file). Only loopback targets are accepted.
//! `LOADGEN_HEADER="name: value"` adds one header to every request (an API
//! key for the account benchmark).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Sender = SendRequest<Full<Bytes>>;

struct Target {
    host: String,
    path: String,
    body: Bytes,
    header: Option<(String, String)>,
}

impl Target {
    fn new(url: &str, body: &str) -> Target {
        let rest = url
            .strip_prefix("http://")
            .unwrap_or_else(|| fail("URL must start with http://"));
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let ip = host.rsplit_once(':').map_or(host, |(h, _)| h);
        if !(ip == "localhost" || ip.starts_with("127.") || ip == "[::1]") {
            fail("only loopback targets are allowed");
        }
        let header = std::env::var("LOADGEN_HEADER").ok().and_then(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        });
        Target {
            host: host.to_owned(),
            path: if path.is_empty() { "/".into() } else { path.to_owned() },
            body: Bytes::from(body.to_owned()),
            header,
        }
    }

    fn request(&self, body: &Bytes) -> Request<Full<Bytes>> {
        let mut b = Request::post(&self.path)
            .header("host", &self.host)
            .header("content-type", "application/json");
        if let Some((k, v)) = &self.header {
            b = b.header(k.as_str(), v.as_str());
        }
        b.body(Full::new(body.clone())).unwrap_or_else(|_| fail("bad request"))
    }

    async fn connect(&self) -> Sender {
        let stream = TcpStream::connect(&self.host)
            .await
            .unwrap_or_else(|e| fail(&format!("connect {}: {e}", self.host)));
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap_or_else(|e| fail(&format!("handshake: {e}")));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    std::process::exit(2)
}

/// Send one request and read the whole body; `Ok(status)`.
async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>) -> Result<u16, String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn rps(t: Arc<Target>, connections: usize, secs: f64) {
    let warmup = Duration::from_secs_f64((secs * 0.1).min(2.0));
    let start = Instant::now() + warmup;
    let end = start + Duration::from_secs_f64(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let t = Arc::clone(&t);
        let errors = Arc::clone(&errors);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut s = t.connect().await;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                match exchange(&mut s, t.request(&t.body)).await {
                    Ok(200) => {
                        if now >= start {
                            lat.push(now.elapsed().as_micros() as u64);
                        }
                    }
                    Ok(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        s = t.connect().await;
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    all.sort_unstable();
    println!(
        "{{\"mode\":\"rps\",\"connections\":{connections},\"seconds\":{secs},\"requests\":{},\"errors\":{},\"rps\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}}",
        all.len(),
        errors.load(Ordering::Relaxed),
        all.len() as f64 / secs,
        percentile(&all, 0.50),
        percentile(&all, 0.99)
    );
}

async fn rate(t: Arc<Target>, rate: f64, connections: usize, secs: f64) {
    let total = (rate * secs) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let t = Arc::clone(&t);
        let next = Arc::clone(&next);
        let errors = Arc::clone(&errors);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut s = t.connect().await;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + interval.mul_f64(i as f64);
                tokio::time::sleep_until(due.into()).await;
                match exchange(&mut s, t.request(&t.body)).await {
                    Ok(200) => lat.push(due.elapsed().as_micros() as u64),
                    Ok(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        s = t.connect().await;
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    let took = start.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "{{\"mode\":\"rate\",\"target_rps\":{rate:.0},\"achieved_rps\":{:.0},\"requests\":{},\"errors\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3}}}",
        all.len() as f64 / took,
        all.len(),
        errors.load(Ordering::Relaxed),
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 0.999)
    );
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

async fn streams(t: Arc<Target>, n: usize, pid: u32) {
    let rss_before = rss_mb(pid);
    let opened = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..n {
        let t = Arc::clone(&t);
        let opened = Arc::clone(&opened);
        tasks.push(tokio::spawn(async move {
            let mut s = t.connect().await;
            if s.ready().await.is_err() {
                return (false, 0, 0);
            }
            let Ok(resp) = s.send_request(t.request(&t.body)).await else {
                return (false, 0, 0);
            };
            let mut body = resp.into_body();
            let mut first = None;
            let mut events = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(d) = frame.into_data() {
                    if first.is_none() {
                        first = Some(started.elapsed().as_micros() as u64);
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    events += memchr::memmem::find_iter(&d, b"data:").count();
                }
            }
            (true, first.unwrap_or(0), events)
        }));
    }
    let mut peak = 0f64;
    let mut all_open_at = None;
    while tasks.iter().any(|t| !t.is_finished()) {
        let r = rss_mb(pid);
        if r > peak {
            peak = r;
        }
        if all_open_at.is_none() && opened.load(Ordering::Relaxed) as usize >= n {
            all_open_at = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ok = 0;
    let mut firsts = Vec::new();
    let mut events = 0;
    for task in tasks {
        if let Ok((done, first, ev)) = task.await {
            ok += usize::from(done && ev > 0);
            firsts.push(first);
            events += ev;
        }
    }
    firsts.sort_unstable();
    println!(
        "{{\"mode\":\"streams\",\"streams\":{n},\"completed\":{ok},\"events\":{events},\"all_open_after_s\":{},\"rss_before_mb\":{rss_before:.1},\"rss_peak_mb\":{peak:.1},\"first_event_p99_ms\":{:.1}}}",
        all_open_at.map_or(String::from("null"), |s| format!("{s:.2}")),
        percentile(&firsts, 0.99)
    );
}

async fn ttfb(t: Arc<Target>, secs: f64) {
    let warmup = Duration::from_secs_f64((secs * 0.1).min(2.0));
    let start = Instant::now() + warmup;
    let end = start + Duration::from_secs_f64(secs);
    let mut s = t.connect().await;
    let (mut firsts, mut errors) = (Vec::new(), 0u64);
    while Instant::now() < end {
        let sent = Instant::now();
        let mut first = None;
        let ok = async {
            s.ready().await.ok()?;
            let resp = s.send_request(t.request(&t.body)).await.ok()?;
            if resp.status() != 200 {
                return None;
            }
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.ok()?;
                if let Ok(d) = frame.into_data() {
                    if first.is_none() && memchr::memmem::find(&d, b"data:").is_some() {
                        first = Some(sent.elapsed().as_micros() as u64);
                    }
                }
            }
            Some(())
        }
        .await;
        match (ok, first) {
            (Some(()), Some(us)) if sent >= start => firsts.push(us),
            (Some(()), Some(_)) => {}
            _ => {
                errors += 1;
                s = t.connect().await;
            }
        }
    }
    firsts.sort_unstable();
    println!(
        "{{\"mode\":\"ttfb\",\"seconds\":{secs},\"requests\":{},\"errors\":{errors},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}}",
        firsts.len(),
        percentile(&firsts, 0.50),
        percentile(&firsts, 0.99)
    );
}

async fn burst(t: &Arc<Target>, n: usize) -> Vec<u64> {
    let mut senders = Vec::new();
    for _ in 0..n {
        senders.push(t.connect().await);
    }
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut s| {
            let t = Arc::clone(t);
            tokio::spawn(async move {
                let at = Instant::now();
                let _ = exchange(&mut s, t.request(&t.body)).await;
                at.elapsed().as_micros() as u64
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap_or(u64::MAX));
    }
    out.sort_unstable();
    out
}

async fn isolation(t: Arc<Target>, slow_body: &str, n: usize) {
    // Warm up, then 5 rounds each: alone, and with one slow request.
    for _ in 0..3 {
        burst(&t, n).await;
    }
    let mut alone = Vec::new();
    let mut with_slow = Vec::new();
    let mut slow_ms = Vec::new();
    let slow = Bytes::from(slow_body.to_owned());
    for _ in 0..5 {
        alone.push(percentile(&burst(&t, n).await, 0.99));
        let mut s = t.connect().await;
        let req = t.request(&slow);
        let slow_task = tokio::spawn(async move {
            let at = Instant::now();
            let _ = exchange(&mut s, req).await;
            at.elapsed().as_secs_f64() * 1e3
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        with_slow.push(percentile(&burst(&t, n).await, 0.99));
        slow_ms.push(slow_task.await.unwrap_or(f64::NAN));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (a, w, s) = (median(&mut alone), median(&mut with_slow), median(&mut slow_ms));
    println!(
        "{{\"mode\":\"isolation\",\"fast_requests\":{n},\"p99_alone_ms\":{a:.3},\"p99_with_slow_ms\":{w:.3},\"p99_added_ms\":{:.3},\"slow_request_ms\":{s:.1}}}",
        (w - a).max(0.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> &str {
        args.get(i)
            .map(String::as_str)
            .unwrap_or_else(|| fail("usage: see the doc comment of bench/http/loadgen.rs"))
    };
    let num = |i: usize| -> f64 { arg(i).parse().unwrap_or_else(|_| fail("bad number")) };
    let threads = std::env::var("LOADGEN_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let t = Arc::new(Target::new(arg(1), arg(2)));
    rt.block_on(async {
        match arg(0) {
            "rps" => rps(t, num(3) as usize, num(4)).await,
            "rate" => rate(t, num(3), num(4) as usize, num(5)).await,
            "streams" => streams(t, num(3) as usize, num(4) as u32).await,
            "ttfb" => ttfb(t, num(3)).await,
            "isolation" => isolation(Arc::clone(&t), arg(3), num(4) as usize).await,
            other => fail(&format!("unknown mode {other}")),
        }
    });
}
