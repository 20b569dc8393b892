//! The gateway's SSE parser (`gateway::sse`) on any byte stream, split
//! into chunks in several ways.
//!
//! - The events (and the unterminated rest) are the same however the
//!   stream is split: whole, byte by byte, and at split points drawn from
//!   the input.
//! - Nothing is lost or added: events plus rest are the stream.
//! - Each event ends at its first blank line (`\n\n` or `\r\n\r\n`).
//! - `with_data` gives one event whose data is the new data.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use llmproxy_server::gateway::sse::{self, SseParser};

/// The events and the rest of `stream`, fed in chunks ending at `cuts`.
fn parse(stream: &[u8], cuts: impl IntoIterator<Item = usize>) -> (Vec<Bytes>, Option<Bytes>) {
    let mut p = SseParser::default();
    let mut events = Vec::new();
    let mut from = 0;
    for cut in cuts {
        let cut = cut.clamp(from, stream.len());
        events.extend(p.push(&stream[from..cut]));
        from = cut;
    }
    events.extend(p.push(&stream[from..]));
    (events, p.finish())
}

/// Where the first blank line of `event` ends, if it has one.
fn first_blank_line_end(event: &[u8]) -> Option<usize> {
    let find = |pat: &[u8]| event.windows(pat.len()).position(|w| w == pat).map(|i| i + pat.len());
    match (find(b"\n\n"), find(b"\r\n\r\n")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether `event` has a CR that is not part of a CRLF.
fn has_bare_cr(event: &[u8]) -> bool {
    event
        .iter()
        .enumerate()
        .any(|(i, b)| *b == b'\r' && event.get(i + 1) != Some(&b'\n'))
}

fuzz_target!(|data: &[u8]| {
    // The first byte seeds the split points; the rest is the stream.
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = parse(stream, []);

    let mut joined: Vec<u8> = whole.0.iter().flat_map(|e| e.to_vec()).collect();
    joined.extend_from_slice(whole.1.as_deref().unwrap_or_default());
    assert_eq!(joined, stream, "events plus rest are not the stream");
    for ev in &whole.0 {
        assert_eq!(
            first_blank_line_end(ev),
            Some(ev.len()),
            "event does not end at its first blank line: {ev:?}"
        );
        let _ = sse::data(ev);
        if has_bare_cr(ev) {
            // Known finding (docs/fuzzing.md): a kept line ending in a bare
            // CR makes with_data write a blank line, splitting the event.
            continue;
        }
        let rewritten = sse::with_data(ev, b"{\"x\":1}");
        let again = parse(&rewritten, []);
        assert_eq!(
            again.0.len(),
            1,
            "with_data gave {} events: {rewritten:?}",
            again.0.len()
        );
        assert!(again.1.is_none(), "with_data left a rest: {rewritten:?}");
        assert_eq!(
            sse::data(&again.0[0]).as_deref(),
            Some(&b"{\"x\":1}"[..]),
            "with_data: {rewritten:?}"
        );
    }
    if let Some(rest) = &whole.1 {
        let _ = sse::data(rest);
    }

    let bytewise = parse(stream, 1..stream.len());
    assert_eq!(bytewise, whole, "byte-by-byte split differs");
    // Cuts from a small generator seeded by the first byte.
    let mut x = u32::from(seed) | 1;
    let mut at = 0usize;
    let cuts: Vec<usize> = std::iter::from_fn(|| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        at += (x % 7) as usize;
        (at < stream.len()).then_some(at)
    })
    .collect();
    assert_eq!(parse(stream, cuts), whole, "seeded split differs");
});
