//! Client connections: the cap on how many are open (`gateway.max_connections`)
//! with a clear refusal, the write timeout (`gateway.write_timeout_ms`)
//! that drops a client which stopped reading (docs/adr/036), and the JSON
//! error in place of hyper's empty answer to a head it refused
//! ([`super::unparsed`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Sleep;

use super::errors::error_body;
use super::metrics::Metrics;
use super::unparsed;

/// Refusals being written at once; connections over this are closed
/// without an answer (each refusal holds its socket for a moment).
const MAX_REFUSING: usize = 64;
/// How long a refusal may take to write, and then to let the client read it.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// An I/O stream whose writes fail with `TimedOut` when one stays blocked
/// (the peer does not read) for longer than the timeout. hyper then drops
/// the connection and the response body: a relay feeding it stops and
/// drops its upstream. hyper's empty answer to a head it refused is
/// written as the gateway's JSON error instead ([`unparsed`]).
pub struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    metrics: Arc<Metrics>,
    /// The answer being written in place of hyper's refusal, and how much
    /// of it is written.
    replacing: Option<(Vec<u8>, usize)>,
}

impl<T> WriteTimeout<T> {
    /// Wrap `inner`; timeouts are counted in `metrics`.
    pub fn new(inner: T, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        WriteTimeout {
            inner,
            timeout,
            timer: None,
            metrics,
            replacing: None,
        }
    }

    /// After a write made progress: the timer starts again at the next stall.
    fn progressed<R>(&mut self, r: Poll<R>) -> Poll<R> {
        if r.is_ready() {
            self.timer = None;
        }
        r
    }

    /// A write is blocked: `Ready(Err)` once it has been for too long.
    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timeout = self.timeout;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.timer = None;
                self.metrics.bounds.write_timeouts.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not read within gateway.write_timeout_ms",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> WriteTimeout<T> {
    /// When `first` (the first bytes of a write of `total`) is hyper's
    /// answer to a head it refused, or the write of its replacement is
    /// under way: write the replacement and report the whole write done.
    /// `None` for any other write.
    fn replaced(&mut self, cx: &mut Context<'_>, first: &[u8], total: usize) -> Option<Poll<io::Result<usize>>> {
        if self.replacing.is_none() {
            // Cheap for every other write: hyper's refusals are 4xx heads
            // of about 120 bytes.
            if first.len() > 160 || !first.starts_with(b"HTTP/1.1 4") {
                return None;
            }
            self.replacing = Some((unparsed::replacement(first, &self.metrics)?, 0));
        }
        loop {
            let (bytes, written) = self.replacing.as_mut()?;
            if *written == bytes.len() {
                self.replacing = None;
                return Some(Poll::Ready(Ok(total)));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(n)) => {
                    *written += n;
                    self.timer = None;
                }
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => return Some(self.stalled(cx)),
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(r) = this.replaced(cx, buf, buf.len()) {
            return r;
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.stalled(cx),
            r => this.progressed(r),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        if let Some(r) = this.replaced(cx, first, bufs.iter().map(|b| b.len()).sum()) {
            return r;
        }
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.stalled(cx),
            r => this.progressed(r),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.stalled(cx),
            r => this.progressed(r),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.stalled(cx),
            r => this.progressed(r),
        }
    }
}

/// The cap on open client connections.
#[derive(Debug)]
pub struct ConnectionCap {
    open: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// One admitted connection: holds its place under the cap until dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.metrics.bounds.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionCap {
    /// A cap of `max` connections, counted in `metrics`.
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        ConnectionCap {
            open: Arc::new(Semaphore::new(max.max(1))),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            metrics,
        }
    }

    /// Admit a new connection, or refuse it: a 503 `too_many_connections`
    /// with `Connection: close` written from a short-lived task (or, when
    /// too many refusals are in flight already, the socket just closes).
    pub fn admit(&self, stream: TcpStream) -> Option<(TcpStream, Admitted)> {
        match Arc::clone(&self.open).try_acquire_owned() {
            Ok(permit) => {
                self.metrics.bounds.connections_open.fetch_add(1, Ordering::Relaxed);
                Some((
                    stream,
                    Admitted {
                        _permit: permit,
                        metrics: Arc::clone(&self.metrics),
                    },
                ))
            }
            Err(_) => {
                self.metrics.bounds.connections_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "llmproxy::gateway", "connection refused: gateway.max_connections reached");
                if let Ok(slot) = Arc::clone(&self.refusing).try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(slot);
                    });
                }
                None
            }
        }
    }
}

/// The refusal: write the 503, stop writing, and read (and discard) what
/// the client sent for a moment, so closing does not reset the connection
/// before the client has read the answer.
async fn refuse(mut stream: TcpStream) {
    let body = error_body(
        "the gateway is at its connection limit (gateway.max_connections); retry later",
        "backend_error",
        "too_many_connections",
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    };
    if !matches!(tokio::time::timeout(REFUSAL_TIME, write).await, Ok(Ok(()))) {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
