//! Server-sent events: splitting an upstream byte stream into events, and
//! reading or replacing an event's `data`.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use memchr::memmem;

/// Splits a byte stream into complete events (each with its terminating
/// blank line), however the stream was chunked.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
}

impl SseParser {
    /// Add bytes; return the events they completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            events.push(self.buf.split_to(end).freeze());
        }
        events
    }

    /// Whatever is left at the end of the stream (an unterminated event).
    pub fn finish(self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.freeze())
    }
}

/// End (exclusive) of the first complete event in `buf`.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
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
    fn crlf_and_multiline_data() {
        let mut p = SseParser::default();
        let ev = p.push(b"event: x\r\ndata: a\r\ndata: b\r\n\r\n");
        assert_eq!(ev.len(), 1);
        assert_eq!(data(&ev[0]).as_deref(), Some(&b"a\nb"[..]));
        assert_eq!(&with_data(&ev[0], b"{}")[..], b"event: x\ndata: {}\n\n");
        assert_eq!(data(b": comment\n\n"), None);
    }
}
