//! `X-Request-ID`: accepted from the client when sane, generated otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use llmproxy_core::http::client::request_id_acceptable;

/// The header name, lower case as hyper stores it.
pub const HEADER: &str = "x-request-id";

/// The client's id when core accepts it
/// ([`llmproxy_core::http::client::request_id_acceptable`]), else a new one.
pub fn accept_or_generate(client: Option<&[u8]>) -> String {
    match client {
        Some(id) if request_id_acceptable(id) => String::from_utf8_lossy(id).into_owned(),
        _ => generate(),
    }
}

/// A new id, `req_` + 24 hex digits: a per-process random prefix and a
/// counter, so ids are unique within a process and unlikely to collide
/// across processes.
pub fn generate() -> String {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        splitmix(nanos ^ (u64::from(std::process::id()) << 32))
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("req_{:08x}{:016x}", prefix as u32, splitmix(prefix ^ n))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sane_ids_and_replaces_others() {
        assert_eq!(accept_or_generate(Some(b"abc-123")), "abc-123");
        for bad in [&b""[..], b"has space", b"tab\t", &[b'x'; 129][..], b"\xff"] {
            let id = accept_or_generate(Some(bad));
            assert!(id.starts_with("req_") && id.len() == 28, "{id}");
        }
        assert_ne!(generate(), generate());
    }
}
