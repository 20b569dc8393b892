//! Server-sent events: splitting a backend's byte stream into events, and
//! reading or replacing an event's `data`. Every host relays streams
//! through these rules: the gateway, and nginx through the Lua module's
//! `llmproxy.sse_parser`.

use std::borrow::Cow;

/// Splits a byte stream into complete events (each with its terminating
/// blank line), however the stream was chunked. Lines end as the SSE spec
/// says: at a CR, a LF, or a CRLF pair; an event ends at its first blank
/// line. Each byte is scanned once (the scan state carries over between
/// chunks), and an unfinished event may grow to `max` bytes: past it the
/// parser stops buffering and reports [`SseParser::overflowed`].
///
/// A blank line ended by a CR that is the last byte seen so far is held
/// until the next byte shows whether it is a CRLF (the LF then belongs to
/// this event, not to the next as an extra blank line), or the stream ends
/// ([`SseParser::finish`] returns it).
#[derive(Debug)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Where the scan of `buf` goes on, and what it knows there.
    scan: Scan,
    max: usize,
    overflowed: bool,
}

/// The line-ending state of the scan at `at`.
#[derive(Debug, Clone, Copy)]
struct Scan {
    /// Bytes of `buf` already scanned.
    at: usize,
    /// No byte of the current line seen yet (true at an event's start).
    line_empty: bool,
    /// The byte before `at` is a CR that ended a line: a LF at `at` is
    /// the rest of that CRLF, not a line of its own.
    after_cr: bool,
}

impl Scan {
    const START: Scan = Scan {
        at: 0,
        line_empty: true,
        after_cr: false,
    };
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
            buf: Vec::new(),
            scan: Scan::START,
            max,
            overflowed: false,
        }
    }

    /// Add bytes; return the events they completed. Once overflowed, bytes
    /// are dropped.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        if self.overflowed {
            return Vec::new();
        }
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        // Events are copied out and the buffer shifted once per push.
        let mut start = 0;
        while let Some(end) = event_end(&self.buf[start..], &mut self.scan) {
            events.push(self.buf[start..start + end].to_vec());
            start += end;
            self.scan = Scan::START;
        }
        self.buf.drain(..start);
        if self.buf.len() > self.max {
            self.overflowed = true;
            self.buf = Vec::new();
            self.scan = Scan::START;
        }
        events
    }

    /// An event grew past the limit without ending: the stream is unusable.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Whatever is left at the end of the stream: an unterminated event, or
    /// one ended by a CR the parser was holding (see [`SseParser`]).
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then_some(self.buf)
    }
}

/// End (exclusive) of the first complete event in `buf`, scanning on from
/// `scan` and leaving it where the scan stopped: the end of the first blank
/// line, with the LF of a CRLF. `None` when `buf` holds no complete event
/// yet (or ends in a CR that ends a blank line: the next byte decides).
fn event_end(buf: &[u8], scan: &mut Scan) -> Option<usize> {
    while scan.at < buf.len() {
        // Bytes other than CR and LF only say that the line is not empty.
        let Some(skip) = memchr::memchr2(b'\r', b'\n', &buf[scan.at..]) else {
            scan.at = buf.len();
            scan.line_empty = false;
            scan.after_cr = false;
            return None;
        };
        if skip > 0 {
            scan.at += skip;
            scan.line_empty = false;
            scan.after_cr = false;
        }
        let i = scan.at;
        if buf[i] == b'\n' && scan.after_cr {
            // The LF of a CRLF whose CR ended a (non-blank) line.
            scan.after_cr = false;
            scan.at += 1;
            continue;
        }
        if !scan.line_empty {
            scan.line_empty = true;
            scan.after_cr = buf[i] == b'\r';
            scan.at += 1;
            continue;
        }
        // A blank line ends here.
        if buf[i] == b'\n' {
            return Some(i + 1);
        }
        return match buf.get(i + 1) {
            Some(b'\n') => Some(i + 2),
            Some(_) => Some(i + 1),
            None => None, // hold the CR: `scan.at` stays on it
        };
    }
    None
}

/// Whether `data`, an event's `data`, is content: anything but the
/// stream's end marker `[DONE]`. Content events are what a usage estimate
/// charges ([`crate::usage_estimate`]) when a stream's usage never comes.
pub fn is_content(data: &[u8]) -> bool {
    data != b"[DONE]"
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
pub fn with_data(event: &[u8], new_data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(new_data.len() + 16);
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
    out
}

/// An event carrying `data: <json>`.
pub fn data_event(json: &[u8]) -> Vec<u8> {
    with_data(b"", json)
}

/// The lines of an event, without their endings (CR, LF or CRLF); the
/// last piece is a line only when it is not empty.
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = event;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(end) = memchr::memchr2(b'\r', b'\n', rest) else {
            return Some(std::mem::take(&mut rest));
        };
        let line = &rest[..end];
        let next = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
            end + 2
        } else {
            end + 1
        };
        rest = &rest[next..];
        Some(line)
    })
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
            let events: Vec<Vec<u8>> = stream.chunks(size).flat_map(|c| p.push(c)).collect();
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

    /// The events and rest of `stream` fed whole and in every chunk size.
    fn split_every_way(stream: &[u8]) -> (Vec<Vec<u8>>, Option<Vec<u8>>) {
        let mut p = SseParser::default();
        let whole = (p.push(stream), p.finish());
        for size in 1..stream.len() {
            let mut p = SseParser::default();
            let events: Vec<Vec<u8>> = stream.chunks(size).flat_map(|c| p.push(c)).collect();
            assert_eq!((events, p.finish()), whole, "chunks of {size}: {stream:?}");
        }
        whole
    }

    #[test]
    fn a_lone_cr_ends_a_line_as_lf_and_crlf_do() {
        // (stream, events, rest): a CR, a LF and a CRLF each end one line,
        // in any mix; a CRLF is one line end, never a line and a blank one.
        type Case = (&'static [u8], &'static [&'static [u8]], Option<&'static [u8]>);
        let cases: &[Case] = &[
            (b"data: a\r\rdata: b\r\r", &[b"data: a\r\r"], Some(b"data: b\r\r")),
            (b"data: a\r\r\n: x\n\n", &[b"data: a\r\r\n", b": x\n\n"], None),
            (b"data: a\r\ndata: b\r\n\r\n", &[b"data: a\r\ndata: b\r\n\r\n"], None),
            (b"event: e\rdata: a\n\r\n", &[b"event: e\rdata: a\n\r\n"], None),
            (b"data: a\n\rdata: b", &[b"data: a\n\r"], Some(b"data: b")),
            (b"data: a\r\n\r", &[], Some(b"data: a\r\n\r")),
            (b"\ndata: a\n\n", &[b"\n", b"data: a\n\n"], None),
        ];
        for (stream, events, rest) in cases {
            let (got, got_rest) = split_every_way(stream);
            assert_eq!(got, events.to_vec(), "{stream:?}");
            assert_eq!(got_rest.as_deref(), *rest, "{stream:?}");
        }
    }

    #[test]
    fn a_cr_at_the_end_of_a_chunk_waits_for_the_next_byte() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: a\r\n\r").is_empty(), "the CR may be a CRLF");
        let ev = p.push(b"\ndata: b\n\n");
        assert_eq!(
            ev,
            [&b"data: a\r\n\r\n"[..], &b"data: b\n\n"[..]],
            "no extra blank line"
        );
        let mut p = SseParser::default();
        assert!(p.push(b"data: a\r\r").is_empty());
        assert_eq!(p.push(b"data: b"), [&b"data: a\r\r"[..]]);
        assert_eq!(p.finish().as_deref(), Some(&b"data: b"[..]));
    }

    #[test]
    fn lines_split_at_cr_lf_and_crlf() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"data: a\rdata: b\r\r", Some(b"a\nb")),
            (b"data: a\r\ndata: b\ndata: c\r\r\n", Some(b"a\nb\nc")),
            (b"id: 1\r: c\r\r", None),
            (b"data: a\r", Some(b"a")),
        ];
        for (event, want) in cases {
            assert_eq!(data(event).as_deref(), *want, "{event:?}");
        }
    }

    #[test]
    fn with_data_writes_one_event_whatever_the_line_ends() {
        // Found by the sse fuzz target: a kept line ending in a bare CR
        // became a blank line, so the rewrite was two events.
        for event in [
            &b": a\r\r\n\r\r\ndata: x\n\n"[..],
            b"event: e\rid: 1\rdata: x\r\r",
            b"event: e\r\ndata: x\r\n\r\n",
            b": c\n\n",
        ] {
            let rewritten = with_data(event, b"{}");
            let (events, rest) = split_every_way(&rewritten);
            assert_eq!(events.len(), 1, "{event:?} -> {rewritten:?}");
            assert_eq!(rest, None, "{event:?} -> {rewritten:?}");
            assert_eq!(data(&events[0]).as_deref(), Some(&b"{}"[..]), "{event:?}");
        }
        assert_eq!(
            &with_data(b"event: e\rdata: x\r\r", b"{}")[..],
            b"event: e\ndata: {}\n\n"
        );
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
