//! Server-sent events: splitting an upstream byte stream into events, and
//! reading or replacing an event's `data`.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// Splits a byte stream into complete events (each with its terminating
/// blank line), however the stream was chunked. Each byte is scanned once
/// (the search resumes where the last one stopped), and an unfinished event
/// may grow to `max` bytes: past it the parser stops buffering and reports
/// [`SseParser::overflowed`].
#[derive(Debug)]
pub struct SseParser {
    buf: BytesMut,
    /// Bytes of `buf` already searched for an event end.
    scanned: usize,
    max: usize,
    overflowed: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser::with_max(usize::MAX)
    }
}

impl SseParser {
    /// A parser whose unfinished event may hold at most `max` bytes.
    pub fn with_max(max: usize) -> Self {
        SseParser {
            buf: BytesMut::new(),
            scanned: 0,
            max,
            overflowed: false,
        }
    }

    /// Add bytes; return the events they completed. Once overflowed, bytes
    /// are dropped.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        if self.overflowed {
            return Vec::new();
        }
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buf, self.scanned) {
            events.push(self.buf.split_to(end).freeze());
            self.scanned = 0;
        }
        self.scanned = self.buf.len();
        if self.buf.len() > self.max {
            self.overflowed = true;
            self.buf = BytesMut::new();
            self.scanned = 0;
        }
        events
    }

    /// An event grew past the limit without ending: the stream is unusable.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Whatever is left at the end of the stream (an unterminated event).
    pub fn finish(self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.freeze())
    }
}

/// End (exclusive) of the first complete event in `buf`, searching from
/// `from` (bytes before it hold no event end): the first line feed that
/// ends a blank line (`\n\n`, `\n\r\n`, hence `\r\n\r\n`).
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let tail = buf.get(from..)?;
    memchr::memchr_iter(b'\n', tail).map(|i| i + from).find_map(|i| {
        let blank = (i >= 1 && buf[i - 1] == b'\n') || (i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n');
        blank.then_some(i + 1)
    })
}

/// The `data` of an event (several `data:` lines joined by `\n`), or `None`
/// when the event has no data line (a comment, a bare `event:`).
pub fn data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut out: Option<Cow<'_, [u8]>> = None;
    for line in lines(event) {
        let Some(rest) = line.strip_prefix(b"data:") else {
            continue;
        };
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        out = Some(match out {
            None => Cow::Borrowed(rest),
            Some(prev) => {
                let mut v = prev.into_owned();
                v.push(b'\n');
                v.extend_from_slice(rest);
                Cow::Owned(v)
            }
        });
    }
    out
}

/// The event with its data replaced by `new_data` (one line of JSON); the
/// other fields (`event:`, `id:`, comments) are kept.
pub fn with_data(event: &[u8], new_data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(new_data.len() + 16);
    for line in lines(event) {
        if line.is_empty() || line.starts_with(b"data:") {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(new_data);
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

/// An event carrying `data: <json>`.
pub fn data_event(json: &[u8]) -> Bytes {
    with_data(b"", json)
}

fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    event.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        let ev = p.push(b":1}\n\ndata: [DONE]\n\n: tail");
        assert_eq!(ev.len(), 2);
        assert_eq!(&ev[0][..], b"data: {\"a\":1}\n\n");
        assert_eq!(data(&ev[1]).as_deref(), Some(&b"[DONE]"[..]));
        assert_eq!(p.finish().as_deref(), Some(&b": tail"[..]));
    }

    #[test]
    fn events_end_wherever_the_chunks_split_them() {
        let stream: &[u8] = b"data: a\n\ndata: b\r\n\r\n: c\n\r\ndata: d\r\n\ndata: e";
        for size in 1..stream.len() {
            let mut p = SseParser::default();
            let events: Vec<Bytes> = stream.chunks(size).flat_map(|c| p.push(c)).collect();
            let want: [&[u8]; 4] = [b"data: a\n\n", b"data: b\r\n\r\n", b": c\n\r\n", b"data: d\r\n\n"];
            assert_eq!(events, want, "chunks of {size}");
            assert_eq!(p.finish().as_deref(), Some(&b"data: e"[..]));
        }
    }

    #[test]
    fn an_event_over_the_limit_overflows_and_is_dropped() {
        let mut p = SseParser::with_max(16);
        assert_eq!(p.push(b"data: 0123456789\n\n").len(), 1, "a complete event is fine");
        assert!(p.push(b"data: 0123456789").is_empty());
        assert!(!p.overflowed());
        assert!(p.push(b"x").is_empty());
        assert!(p.overflowed());
        assert!(p.push(b"\n\ndata: late\n\n").is_empty(), "nothing after an overflow");
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn crlf_and_multiline_data() {
        let mut p = SseParser::default();
        let ev = p.push(b"event: x\r\ndata: a\r\ndata: b\r\n\r\n");
        assert_eq!(ev.len(), 1);
        assert_eq!(data(&ev[0]).as_deref(), Some(&b"a\nb"[..]));
        assert_eq!(&with_data(&ev[0], b"{}")[..], b"event: x\ndata: {}\n\n");
        assert_eq!(data(b": comment\n\n"), None);
    }
}
