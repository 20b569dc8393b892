//! The shared state's connection to Redis, on the `redis` crate
//! (docs/adr/053): a few multiplexed connections (many calls in flight on
//! each, answered in order) used round robin, each reopened on the next
//! call after it failed; scripts by `EVALSHA`, loaded again after a
//! `NOSCRIPT`; and the deployments operators run:
//!
//! - `redis://[user:password@]host:port[/db]`: password or ACL user;
//! - `rediss://...`: TLS (rustls; the system's roots, or `state.tls_ca_file`
//!   for a private CA);
//! - `redis+sentinel://[user:password@]host:port[,host:port...]/master[/db]`
//!   (`rediss+sentinel://` with TLS to the master): the master is asked of
//!   the sentinels at every (re)connection, so a failover is followed
//!   without a restart.
//!
//! The URL is read by the core (`llmproxy_core::redis_url`), as for the
//! nginx module; the client is built from its parts, so both hosts log in
//! alike.
//!
//! Every call has a time limit (`state.timeout_ms`). The API (`cmd`,
//! `eval`, [`Reply`], [`RedisError`]) is what the state backend and the
//! operator commands use; nothing else here knows the crate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use llmproxy_core::redis_url::RedisUrl;
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisConnectionInfo, TlsCertificates,
    TlsMode,
};

/// A reply from Redis.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// No value.
    Nil,
    /// An integer.
    Int(i64),
    /// A bulk string.
    Bulk(Vec<u8>),
    /// A status (`OK` and friends) or other text.
    Status(String),
    /// A list.
    Array(Vec<Reply>),
}

impl Reply {
    fn of(v: redis::Value) -> Reply {
        match v {
            redis::Value::Nil => Reply::Nil,
            redis::Value::Int(n) => Reply::Int(n),
            redis::Value::BulkString(b) => Reply::Bulk(b),
            redis::Value::SimpleString(s) => Reply::Status(s),
            redis::Value::Okay => Reply::Status(String::from("OK")),
            redis::Value::Boolean(b) => Reply::Int(i64::from(b)),
            redis::Value::Double(d) => Reply::Status(d.to_string()),
            redis::Value::VerbatimString { text, .. } => Reply::Status(text),
            redis::Value::Array(a) | redis::Value::Set(a) => Reply::Array(a.into_iter().map(Reply::of).collect()),
            redis::Value::Map(m) => {
                Reply::Array(m.into_iter().flat_map(|(k, v)| [Reply::of(k), Reply::of(v)]).collect())
            }
            redis::Value::Attribute { data, .. } => Reply::of(*data),
            other => Reply::Status(format!("{other:?}")),
        }
    }

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
    /// Redis answered with an error (it is up).
    Command(String),
    /// A reply that could not be read.
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

impl RedisError {
    fn of(e: &redis::RedisError) -> RedisError {
        if e.is_timeout() {
            return RedisError::Timeout;
        }
        match e.kind() {
            ErrorKind::Server(_) | ErrorKind::Extension => RedisError::Command(e.to_string()),
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType => RedisError::Protocol(e.to_string()),
            _ => RedisError::Io(e.to_string()),
        }
    }

    /// Should the connection be dropped (and reopened by the next call)?
    fn breaks_connection(&self) -> bool {
        matches!(self, RedisError::Io(_) | RedisError::Timeout | RedisError::Protocol(_))
    }
}

/// A Lua script, called by its SHA-1 (loaded when Redis does not know it).
pub struct Script(OnceLock<redis::Script>, &'static str);

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Script").field(&self.1.len()).finish()
    }
}

impl Script {
    /// A script with this source.
    pub const fn new(source: &'static str) -> Script {
        Script(OnceLock::new(), source)
    }

    fn get(&self) -> &redis::Script {
        self.0.get_or_init(|| redis::Script::new(self.1))
    }
}

/// Where connections come from.
enum Source {
    /// One server (`redis://`, `rediss://`).
    Direct(Client),
    /// The master the sentinels name at connection time.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// A client: a few multiplexed connections used round robin.
pub struct RedisClient {
    source: Source,
    timeout: Duration,
    conns: Vec<Mutex<Option<MultiplexedConnection>>>,
    connecting: Vec<tokio::sync::Mutex<()>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("connections", &self.conns.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The TLS roots for `rediss://`: `ca` (PEM) when given, else the system's.
fn certificates(ca: Option<&[u8]>) -> TlsCertificates {
    TlsCertificates {
        client_tls: None,
        root_cert: ca.map(<[u8]>::to_vec),
    }
}

/// rustls needs one process-wide crypto provider. The gateway uses ring,
/// which builds with the C compiler every machine here has (aws-lc, the
/// default, needs more); rustls marks ring's provider deprecated for its
/// lack of post-quantum key exchange, which a link to the gateway's own
/// Redis does not need (docs/adr/053).
fn install_crypto() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let _ = provider.install_default();
    });
}

impl RedisClient {
    /// A client for `url` with `connections` connections (opened lazily)
    /// and a time limit per call; `ca` is a PEM bundle of roots for TLS.
    pub fn with_tls(
        url: &str,
        connections: usize,
        timeout: Duration,
        ca: Option<&[u8]>,
    ) -> Result<RedisClient, String> {
        install_crypto();
        let u = RedisUrl::parse(url)?;
        let source = match &u.master {
            Some(master) => {
                let addrs = u.servers.iter().map(|(h, p)| ConnectionAddr::Tcp(h.clone(), *p));
                let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                    .map_err(|e| e.to_string())?
                    .set_client_to_redis_db(i64::from(u.db));
                if let Some(user) = &u.username {
                    b = b.set_client_to_redis_username(user);
                }
                if let Some(password) = &u.password {
                    b = b.set_client_to_redis_password(password);
                }
                if u.tls {
                    b = b
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_redis_certificates(certificates(ca));
                }
                Source::Sentinel(tokio::sync::Mutex::new(b.build().map_err(|e| e.to_string())?))
            }
            None => {
                let mut login = RedisConnectionInfo::default().set_db(i64::from(u.db));
                if let Some(user) = &u.username {
                    login = login.set_username(user);
                }
                if let Some(password) = &u.password {
                    login = login.set_password(password);
                }
                let (host, port) = (u.host().to_owned(), u.port());
                let addr = if u.tls {
                    ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(host, port)
                };
                let info = addr
                    .into_connection_info()
                    .map_err(|e| e.to_string())?
                    .set_redis_settings(login);
                let client = if u.tls {
                    Client::build_with_tls(info, certificates(ca))
                } else {
                    Client::open(info)
                };
                Source::Direct(client.map_err(|e| e.to_string())?)
            }
        };
        let n = connections.max(1);
        Ok(RedisClient {
            source,
            timeout,
            conns: (0..n).map(|_| Mutex::new(None)).collect(),
            connecting: (0..n).map(|_| tokio::sync::Mutex::new(())).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// [`RedisClient::with_tls`] with the system's TLS roots.
    pub fn new(url: &str, connections: usize, timeout: Duration) -> Result<RedisClient, String> {
        RedisClient::with_tls(url, connections, timeout, None)
    }

    /// Run one command.
    pub async fn cmd(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let Some((name, rest)) = args.split_first() else {
            return Err(RedisError::Protocol(String::from("an empty command")));
        };
        let mut c = redis::cmd(&String::from_utf8_lossy(name));
        for a in rest {
            c.arg(*a);
        }
        self.call(|mut conn| async move { c.query_async::<redis::Value>(&mut conn).await })
            .await
    }

    /// Run a Lua script (`EVALSHA`, loading it when Redis does not know it).
    pub async fn eval(&self, script: &Script, keys: &[&[u8]], args: &[&[u8]]) -> Result<Reply, RedisError> {
        let mut inv = script.get().prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        self.call(|mut conn| {
            let inv = &inv;
            async move { inv.invoke_async::<redis::Value>(&mut conn).await }
        })
        .await
    }

    /// Run `f` on one of the connections, within the time limit; a
    /// connection that failed is dropped (the next call reopens it).
    async fn call<F, Fut>(&self, f: F) -> Result<Reply, RedisError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<redis::Value>>,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let run = async {
            let conn = self.connection(i).await?;
            f(conn).await.map(Reply::of).map_err(|e| RedisError::of(&e))
        };
        let r = match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::Timeout),
        };
        if r.as_ref().is_err_and(RedisError::breaks_connection) {
            self.conns[i].lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        r
    }

    async fn connection(&self, i: usize) -> Result<MultiplexedConnection, RedisError> {
        let live = || self.conns[i].lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(c) = live() {
            return Ok(c);
        }
        // One connect per slot at a time; the others wait for it.
        let _guard = self.connecting[i].lock().await;
        if let Some(c) = live() {
            return Ok(c);
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let client = match &self.source {
            Source::Direct(c) => c.clone(),
            Source::Sentinel(s) => s
                .lock()
                .await
                .async_get_client()
                .await
                .map_err(|e| RedisError::of(&e))?,
        };
        let conn = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| RedisError::of(&e))?;
        *self.conns[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
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
    fn replies_of_every_kind_read_as_text_and_numbers() {
        let r = Reply::of(redis::Value::Array(vec![
            redis::Value::Okay,
            redis::Value::Int(3),
            redis::Value::BulkString(b"-1.5".to_vec()),
            redis::Value::Nil,
        ]));
        let Reply::Array(items) = r else { panic!("an array") };
        assert_eq!(items[0].as_text().as_deref(), Some("OK"));
        assert_eq!(items[1].as_i64(), Some(3));
        assert_eq!(items[2].as_text().as_deref(), Some("-1.5"));
        assert_eq!(items[3], Reply::Nil);
    }
}
