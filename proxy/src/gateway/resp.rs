//! A minimal Redis client (RESP2 over TCP) for the shared state backend.
//!
//! Only what the gateway needs: commands as arrays of bulk strings, every
//! RESP2 reply type, pipelining (many requests in flight on one connection,
//! answered in order), a few connections used round robin, reconnection on
//! the next call after a failure, `AUTH`/`SELECT` from the URL, and Lua
//! scripts by `EVALSHA` with a reload on `NOSCRIPT` (docs/adr/033).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// A reply from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `$-1` / `*-1`.
    Nil,
    /// `:n`.
    Int(i64),
    /// `$n` bulk string.
    Bulk(Vec<u8>),
    /// `+OK` and friends.
    Status(String),
    /// `-ERR ...`: a command error (the connection stays usable).
    Error(String),
    /// `*n`.
    Array(Vec<Reply>),
}

impl Reply {
    /// The reply as an integer (integers, numeric strings).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            Reply::Bulk(b) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
            Reply::Status(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// The reply as text (bulk and status strings, integers).
    pub fn as_text(&self) -> Option<String> {
        match self {
            Reply::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Reply::Status(s) => Some(s.clone()),
            Reply::Int(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisError {
    /// Connecting, writing or reading failed, or the connection closed.
    Io(String),
    /// No answer within the time limit.
    Timeout,
    /// Redis answered with an error.
    Command(String),
    /// A reply that could not be parsed.
    Protocol(String),
    /// Not called: the circuit breaker is open (recent calls failed).
    CircuitOpen,
}

impl std::fmt::Display for RedisError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisError::Io(e) => write!(f, "redis: {e}"),
            RedisError::Timeout => write!(f, "redis: no answer in time"),
            RedisError::Command(e) => write!(f, "redis: {e}"),
            RedisError::Protocol(e) => write!(f, "redis: protocol error: {e}"),
            RedisError::CircuitOpen => write!(f, "redis: not called, its circuit is open (recent calls failed)"),
        }
    }
}

pub use llmproxy_core::shared_state::RedisUrl;

/// Encode a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parse one reply from the front of `buf`: `Ok(None)` when it is not
/// complete yet, else the reply and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    parse_at(buf, 0, 0)
}

fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rel = memchr::memmem::find(&buf[from..], b"\r\n")?;
    Some((&buf[from..from + rel], from + rel + 2))
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Reply, usize)>, String> {
    if depth > 16 {
        return Err(String::from("reply nested too deeply"));
    }
    if at >= buf.len() {
        return Ok(None);
    }
    let Some((l, next)) = line(buf, at + 1) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(l).map_err(|_| String::from("non-UTF-8 header"))?;
    let num = || text.parse::<i64>().map_err(|_| format!("bad length '{text}'"));
    match buf[at] {
        b'+' => Ok(Some((Reply::Status(text.to_owned()), next))),
        b'-' => Ok(Some((Reply::Error(text.to_owned()), next))),
        b':' => Ok(Some((Reply::Int(num()?), next))),
        b'$' => {
            let n = num()?;
            if n < 0 {
                return Ok(Some((Reply::Nil, next)));
            }
            let n = usize::try_from(n).map_err(|_| String::from("bad length"))?;
            if buf.len() < next + n + 2 {
                return Ok(None);
            }
            Ok(Some((Reply::Bulk(buf[next..next + n].to_vec()), next + n + 2)))
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                return Ok(Some((Reply::Nil, next)));
            }
            let mut items = Vec::with_capacity(usize::try_from(n.min(1024)).unwrap_or(0));
            let mut pos = next;
            for _ in 0..n {
                match parse_at(buf, pos, depth + 1)? {
                    Some((r, p)) => {
                        items.push(r);
                        pos = p;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(items), pos)))
        }
        other => Err(format!("unexpected reply type byte {other:#x}")),
    }
}

struct Request {
    bytes: Vec<u8>,
    reply: oneshot::Sender<Result<Reply, RedisError>>,
}

/// A Lua script, loaded once per Redis server and called by its SHA-1.
#[derive(Debug)]
pub struct Script {
    source: &'static str,
    sha: Mutex<Option<String>>,
}

impl Script {
    /// A script with this source.
    pub const fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: Mutex::new(None),
        }
    }
}

/// A client: a few pipelined connections used round robin.
#[derive(Debug)]
pub struct RedisClient {
    url: RedisUrl,
    timeout: Duration,
    conns: Vec<Mutex<Option<mpsc::Sender<Request>>>>,
    connecting: Vec<tokio::sync::Mutex<()>>,
    next: AtomicUsize,
}

impl RedisClient {
    /// A client for `url` with `connections` connections (opened lazily)
    /// and a time limit per call.
    pub fn new(url: &str, connections: usize, timeout: Duration) -> Result<RedisClient, String> {
        let n = connections.max(1);
        Ok(RedisClient {
            url: RedisUrl::parse(url)?,
            timeout,
            conns: (0..n).map(|_| Mutex::new(None)).collect(),
            connecting: (0..n).map(|_| tokio::sync::Mutex::new(())).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// Run one command.
    pub async fn cmd(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let bytes = encode(args);
        match tokio::time::timeout(self.timeout, self.send(bytes)).await {
            Ok(Ok(Reply::Error(e))) => Err(RedisError::Command(e)),
            Ok(r) => r,
            Err(_) => Err(RedisError::Timeout),
        }
    }

    /// Run a Lua script (`EVALSHA`, loading it first when needed).
    pub async fn eval(&self, script: &Script, keys: &[&[u8]], args: &[&[u8]]) -> Result<Reply, RedisError> {
        for _ in 0..2 {
            let sha = self.script_sha(script).await?;
            let numkeys = keys.len().to_string();
            let mut all: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), numkeys.as_bytes()];
            all.extend_from_slice(keys);
            all.extend_from_slice(args);
            match self.cmd(&all).await {
                Err(RedisError::Command(e)) if e.starts_with("NOSCRIPT") => {
                    // Redis restarted or its script cache was flushed.
                    *script.sha.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                other => return other,
            }
        }
        Err(RedisError::Command(String::from("NOSCRIPT after loading the script")))
    }

    async fn script_sha(&self, script: &Script) -> Result<String, RedisError> {
        if let Some(sha) = script.sha.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(sha);
        }
        let r = self.cmd(&[b"SCRIPT", b"LOAD", script.source.as_bytes()]).await?;
        let sha = r
            .as_text()
            .ok_or_else(|| RedisError::Protocol(String::from("SCRIPT LOAD gave no SHA")))?;
        *script.sha.lock().unwrap_or_else(|p| p.into_inner()) = Some(sha.clone());
        Ok(sha)
    }

    async fn send(&self, bytes: Vec<u8>) -> Result<Reply, RedisError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let tx = self.sender(i).await?;
        let (reply, rx) = oneshot::channel();
        tx.send(Request { bytes, reply })
            .await
            .map_err(|_| RedisError::Io(String::from("connection closed")))?;
        rx.await
            .map_err(|_| RedisError::Io(String::from("connection closed")))?
    }

    async fn sender(&self, i: usize) -> Result<mpsc::Sender<Request>, RedisError> {
        let live = |slot: &Mutex<Option<mpsc::Sender<Request>>>| {
            slot.lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|t| !t.is_closed())
                .cloned()
        };
        if let Some(tx) = live(&self.conns[i]) {
            return Ok(tx);
        }
        let _connecting = self.connecting[i].lock().await;
        if let Some(tx) = live(&self.conns[i]) {
            return Ok(tx);
        }
        let tx = self.connect().await?;
        *self.conns[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        Ok(tx)
    }

    async fn connect(&self) -> Result<mpsc::Sender<Request>, RedisError> {
        let mut stream = tokio::time::timeout(self.timeout, TcpStream::connect(&self.url.addr))
            .await
            .map_err(|_| RedisError::Timeout)?
            .map_err(|e| RedisError::Io(format!("cannot connect to {}: {e}", self.url.addr)))?;
        let _ = stream.set_nodelay(true);
        let mut hello: Vec<Vec<u8>> = Vec::new();
        if let Some(p) = &self.url.password {
            hello.push(encode(&[b"AUTH", p.as_bytes()]));
        }
        if self.url.db != 0 {
            hello.push(encode(&[b"SELECT", self.url.db.to_string().as_bytes()]));
        }
        let mut buf = BytesMut::with_capacity(4096);
        for cmd in hello {
            let setup = async {
                stream
                    .write_all(&cmd)
                    .await
                    .map_err(|e| RedisError::Io(e.to_string()))?;
                loop {
                    if let Some((r, n)) = parse(&buf).map_err(RedisError::Protocol)? {
                        buf.advance(n);
                        return match r {
                            Reply::Error(e) => Err(RedisError::Command(e)),
                            _ => Ok(()),
                        };
                    }
                    if stream
                        .read_buf(&mut buf)
                        .await
                        .map_err(|e| RedisError::Io(e.to_string()))?
                        == 0
                    {
                        return Err(RedisError::Io(String::from("closed during setup")));
                    }
                }
            };
            tokio::time::timeout(self.timeout, setup)
                .await
                .map_err(|_| RedisError::Timeout)??;
        }
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(io_loop(stream, buf, rx));
        Ok(tx)
    }
}

/// Write requests as they come, read replies as they come, answer the
/// oldest waiting request with each reply. On any failure every waiting
/// request gets an error and the connection is dropped.
async fn io_loop(stream: TcpStream, mut buf: BytesMut, mut rx: mpsc::Receiver<Request>) {
    let (mut rd, mut wr) = stream.into_split();
    let mut pending: VecDeque<oneshot::Sender<Result<Reply, RedisError>>> = VecDeque::new();
    let mut out: Vec<u8> = Vec::with_capacity(8192);
    let error: String = loop {
        tokio::select! {
            req = rx.recv() => {
                let Some(req) = req else { break String::from("client closed") };
                out.clear();
                out.extend_from_slice(&req.bytes);
                pending.push_back(req.reply);
                // Pipeline whatever else is already queued.
                while out.len() < 64 << 10 {
                    match rx.try_recv() {
                        Ok(r) => {
                            out.extend_from_slice(&r.bytes);
                            pending.push_back(r.reply);
                        }
                        Err(_) => break,
                    }
                }
                if let Err(e) = wr.write_all(&out).await {
                    break e.to_string();
                }
            }
            read = rd.read_buf(&mut buf) => {
                match read {
                    Ok(0) => break String::from("connection closed by redis"),
                    Err(e) => break e.to_string(),
                    Ok(_) => {}
                }
                let mut failed = None;
                loop {
                    match parse(&buf) {
                        Ok(Some((reply, n))) => {
                            buf.advance(n);
                            match pending.pop_front() {
                                Some(tx) => { let _ = tx.send(Ok(reply)); }
                                None => { failed = Some(String::from("reply without a request")); break; }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => { failed = Some(e); break; }
                    }
                }
                if let Some(e) = failed {
                    break e;
                }
            }
        }
    };
    rx.close();
    for tx in pending.drain(..) {
        let _ = tx.send(Err(RedisError::Io(error.clone())));
    }
    while let Ok(r) = rx.try_recv() {
        let _ = r.reply.send(Err(RedisError::Io(error.clone())));
    }
}

/// A process-wide random instance id (hex), for concurrency leases.
pub fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let mut bytes = [0u8; 8];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            use std::io::Read;
            let _ = f.read_exact(&mut bytes);
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut s = String::new();
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        format!("{s}-{}-{nanos:x}", std::process::id())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reply_type_parses_and_partial_input_waits() {
        let wire = b"+OK\r\n-ERR bad\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*3\r\n:1\r\n$2\r\nab\r\n*1\r\n+x\r\n";
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((r, n)) = parse(&wire[at..]).unwrap() {
            got.push(r);
            at += n;
        }
        assert_eq!(at, wire.len());
        assert_eq!(
            got,
            vec![
                Reply::Status("OK".into()),
                Reply::Error("ERR bad".into()),
                Reply::Int(42),
                Reply::Bulk(b"hello".to_vec()),
                Reply::Nil,
                Reply::Array(vec![
                    Reply::Int(1),
                    Reply::Bulk(b"ab".to_vec()),
                    Reply::Array(vec![Reply::Status("x".into())])
                ]),
            ]
        );
        for cut in 1..wire.len() {
            // A prefix parses to the replies it holds completely, never to
            // garbage.
            let mut at = 0;
            while let Ok(Some((_, n))) = parse(&wire[at..cut]) {
                at += n;
            }
            assert!(at <= cut);
        }
        assert!(parse(b"?x\r\n").is_err());
        assert_eq!(encode(&[b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec());
    }
}
