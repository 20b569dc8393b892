//! The gateway's request path on any request bytes: one in-process gateway
//! per fuzz process (example scripts on every hook, API keys, the real mock
//! backend; see `llmproxy_fuzz::gateway`), each input written as is to a
//! new 127.0.0.1 connection, followed by a `GET /healthz` with
//! `connection: close` that ends the connection once the input is answered.
//!
//! - What comes back is a sequence of well-formed HTTP/1.1 responses
//!   (status line, header lines, body framed by Content-Length or chunks),
//!   and JSON error bodies carry `error.message`.
//! - The gateway answers within a bound and stays up: every connection is
//!   accepted, and `GET /healthz` answers 200 every few inputs.
//! - A panic on any gateway thread aborts the process (libFuzzer's panic
//!   hook): a crash.
//!
//! Inputs naming the mock backend's steering headers (`x-mock-*`: delays,
//! failures) are skipped: a real upstream does not obey them, and delays
//! only slow the search down.

#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use llmproxy_fuzz::gateway::harness;
use llmproxy_fuzz::http::{check_error_body, read_responses, Framing};

/// Longer than anything the gateway may legitimately take (upstream
/// timeouts are 3 s, one retry), with room for a loaded machine.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// Silence after which a connection whose responses are all complete is
/// taken as waiting for more request bytes (an input cut short).
const IDLE: Duration = Duration::from_millis(500);
/// Check `/healthz` every this many inputs.
const HEALTH_EVERY: u64 = 16;
/// Written after each input: the connection ends soon after a complete
/// input. A half-close cannot mark the end: the gateway takes it as a
/// client that left and answers nothing (docs/gateway.md, "Bounds").
/// After an incomplete input it becomes part of it.
const SENTINEL: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n\r\n";

/// What one connection brought back.
struct Wire {
    bytes: Vec<u8>,
    /// Ended by EOF, not a reset (a reset may cut the last response).
    complete: bool,
}

/// Write `request`, read until the server closes, resets, or falls silent
/// with every response it started complete.
fn exchange(request: &[u8], framing: Framing) -> Wire {
    let addr = harness().addr;
    let mut s = match TcpStream::connect_timeout(&addr, ANSWER_WITHIN) {
        Ok(s) => s,
        Err(e) => panic!("the gateway no longer accepts connections: {e}"),
    };
    let _ = s.set_read_timeout(Some(IDLE));
    let _ = s.set_write_timeout(Some(ANSWER_WITHIN));
    let _ = s.set_nodelay(true);
    // The server may answer and close before it read everything.
    let _ = s.write_all(request);
    let started = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Wire { bytes, complete: true },
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if read_responses(&bytes, true, framing).is_ok() {
                    return Wire { bytes, complete: true };
                }
                assert!(
                    started.elapsed() < ANSWER_WITHIN,
                    "the gateway started a response and did not finish it within {ANSWER_WITHIN:?}: {:?}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            Err(_) => return Wire { bytes, complete: false },
        }
    }
}

fn check_alive() {
    let wire = exchange(SENTINEL, Framing::Strict);
    let ok = read_responses(&wire.bytes, true, Framing::Strict)
        .ok()
        .and_then(|r| r.into_iter().next())
        .is_some_and(|r| r.status == 200);
    assert!(ok, "GET /healthz failed: {:?}", String::from_utf8_lossy(&wire.bytes));
}

fn mentions_mock_header(data: &[u8]) -> bool {
    data.windows(7).any(|w| w.eq_ignore_ascii_case(b"x-mock-"))
}

fuzz_target!(|data: &[u8]| {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    if mentions_mock_header(data) {
        return;
    }
    // A HEAD response announces a body it does not send.
    let framing = if data.windows(5).any(|w| w.eq_ignore_ascii_case(b"HEAD ")) {
        Framing::HeadsOnly
    } else {
        Framing::Strict
    };
    let mut request = data.to_vec();
    request.extend_from_slice(SENTINEL);
    let wire = exchange(&request, framing);
    match read_responses(&wire.bytes, wire.complete, framing) {
        Ok(responses) => {
            for r in &responses {
                if let Err(e) = check_error_body(r) {
                    panic!("malformed error response: {e}");
                }
            }
        }
        Err(e) => panic!("malformed HTTP from the gateway: {e}"),
    }
    if RUNS.fetch_add(1, Ordering::Relaxed).is_multiple_of(HEALTH_EVERY) {
        check_alive();
    }
});
