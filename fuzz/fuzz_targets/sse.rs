//! The core's SSE parser (`http::sse`, every host's) on any byte stream, split
//! into chunks in several ways, against a plain reading of the SSE spec.
//!
//! - Lines end at a CR, a LF or a CRLF; an event ends with its first blank
//!   line (the LF of a CRLF included). The events and the rest are those of
//!   a reference splitter written from that rule, whole and however the
//!   stream is chunked (whole, byte by byte, at seeded points). A blank
//!   line ended by the stream's last byte, a CR, stays in the rest (it may
//!   be a CRLF cut short).
//! - Nothing is lost or added: events plus rest are the stream.
//! - `data` is the `data:` lines' values joined by LF.
//! - `with_data` gives exactly one event, with the new data and the other
//!   lines of the event in order.
//! - With an event size cap, the events before the overflow are the first
//!   events of the stream, and a cap no event reaches changes nothing.

#![no_main]

use libfuzzer_sys::fuzz_target;
use llmproxy_core::http::sse::{self, SseParser};

type Parsed = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// The events and the rest of `stream`, fed to `p` in chunks ending at `cuts`.
fn parse_with(mut p: SseParser, stream: &[u8], cuts: impl IntoIterator<Item = usize>) -> (Parsed, bool) {
    let mut events = Vec::new();
    let mut from = 0;
    for cut in cuts {
        let cut = cut.clamp(from, stream.len());
        events.extend(p.push(&stream[from..cut]));
        from = cut;
    }
    events.extend(p.push(&stream[from..]));
    let overflowed = p.overflowed();
    ((events, p.finish()), overflowed)
}

fn parse(stream: &[u8], cuts: impl IntoIterator<Item = usize>) -> Parsed {
    parse_with(SseParser::default(), stream, cuts).0
}

/// The lines of `bytes` with the length of their ending (0: unterminated).
/// In a stream (`stream`), a CR that is the last byte may be half a CRLF
/// and ends nothing; in an event it ends its line.
fn lines(bytes: &[u8], stream: bool) -> Vec<(&[u8], usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                out.push((&bytes[start..i], 1));
                i += 1;
                start = i;
            }
            b'\r' if i + 1 == bytes.len() && stream => break,
            b'\r' => {
                let end = if bytes.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                out.push((&bytes[start..i], end));
                i += end;
                start = i;
            }
            _ => i += 1,
        }
    }
    if start < bytes.len() {
        out.push((&bytes[start..], 0));
    }
    out
}

/// The reference splitter: events end after a terminated blank line.
fn reference(stream: &[u8]) -> Parsed {
    let mut events = Vec::new();
    let (mut start, mut at) = (0, 0);
    for (line, end) in lines(stream, true) {
        at += line.len() + end;
        if line.is_empty() && end > 0 {
            events.push(stream[start..at].to_vec());
            start = at;
        }
    }
    let rest = (start < stream.len()).then(|| stream[start..].to_vec());
    (events, rest)
}

/// The reference `data`: `data:` lines' values (one leading space off).
fn reference_data(event: &[u8]) -> Option<Vec<u8>> {
    let values: Vec<&[u8]> = lines(event, false)
        .into_iter()
        .filter_map(|(l, _)| l.strip_prefix(b"data:"))
        .map(|v| v.strip_prefix(b" ").unwrap_or(v))
        .collect();
    (!values.is_empty()).then(|| values.join(&b'\n'))
}

/// The non-empty lines that are not `data:` lines.
fn other_lines(event: &[u8]) -> Vec<&[u8]> {
    lines(event, false)
        .into_iter()
        .map(|(l, _)| l)
        .filter(|l| !l.is_empty() && !l.starts_with(b"data:"))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // The first byte seeds the split points and the cap; the rest is the stream.
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = parse(stream, []);
    assert_eq!(whole, reference(stream), "differs from the reference splitter");

    let mut joined: Vec<u8> = whole.0.iter().flat_map(|e| e.to_vec()).collect();
    joined.extend_from_slice(whole.1.as_deref().unwrap_or_default());
    assert_eq!(joined, stream, "events plus rest are not the stream");
    let new_data: &[u8] = b"{\"x\":1}";
    for ev in whole.0.iter().chain(whole.1.iter()) {
        assert_eq!(
            sse::data(ev).as_deref(),
            reference_data(ev).as_deref(),
            "data of {ev:?}"
        );
        let rewritten = sse::with_data(ev, new_data);
        let (events, rest) = parse(&rewritten, []);
        assert_eq!(events.len(), 1, "with_data gave {} events: {rewritten:?}", events.len());
        assert!(rest.is_none(), "with_data left a rest: {rewritten:?}");
        assert_eq!(
            sse::data(&events[0]).as_deref(),
            Some(new_data),
            "with_data: {rewritten:?}"
        );
        assert_eq!(
            other_lines(&events[0]),
            other_lines(ev),
            "with_data lost lines: {rewritten:?}"
        );
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
    assert_eq!(parse(stream, cuts.clone()), whole, "seeded split differs");

    // A cap: what completes before the overflow is the stream's first events.
    let cap = usize::from(seed);
    let ((capped, rest), overflowed) = parse_with(SseParser::with_max(cap), stream, cuts);
    assert!(
        capped.len() <= whole.0.len() && capped[..] == whole.0[..capped.len()],
        "capped events differ"
    );
    if overflowed {
        assert_eq!(rest, None, "an overflowed parser keeps bytes");
    }
    let largest = whole.0.iter().chain(whole.1.iter()).map(Vec::len).max().unwrap_or(0);
    if largest < cap {
        assert!(!overflowed, "overflowed below the cap");
        assert_eq!((capped, rest), whole, "a cap no event reaches changed the events");
    }
});
