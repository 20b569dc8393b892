//! Message headers as scripts see them (`request.headers`,
//! `response.headers`), made from the headers of the HTTP message.
//!
//! HTTP/1 does not keep the case of a header name and every server hands
//! names over lower-cased (hyper, nginx), so the form scripts see is the
//! host's choice, and it must be the same in every host: `Title-Case` names
//! (`Content-Type`, as in the seed design's examples), values as text (bytes
//! that are not UTF-8, which HTTP allows, read as U+FFFD: a client's odd
//! header does not fail its request), a header sent more than once as one
//! entry with its values joined by `, ` (RFC 9110 §5.3), in the order of
//! first appearance. An answer's headers leave out those a script could
//! not set back ([`super::hop_by_hop::script_may_set`]: hop-by-hop ones and
//! `Content-Length`, which the host writes for the client's hop). Scripts
//! also look names up case-insensitively (`request.headers["content-type"]`), which
//! the lazy views provide.

/// Which message the headers are of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// The client's request: every header line.
    Request,
    /// A backend's answer: the lines a script may set
    /// ([`super::hop_by_hop::script_may_set`]).
    Answer,
}

/// Builds the script form from a message's headers, line by line.
///
/// ```
/// use llmproxy_core::http::script_headers::{Message, ScriptHeaders};
/// let mut h = ScriptHeaders::new(Message::Answer, 4);
/// h.add("content-type", b"application/json");
/// h.add("content-length", b"42");
/// h.add("x-tag", b"a");
/// h.add("X-TAG", b"b");
/// assert_eq!(
///     h.into_pairs(),
///     vec![("Content-Type".into(), "application/json".into()), ("X-Tag".into(), "a, b".into())]
/// );
/// ```
#[derive(Debug)]
pub struct ScriptHeaders {
    message: Message,
    pairs: Vec<(String, String)>,
}

impl ScriptHeaders {
    /// The headers of a `message`, with room for `n` distinct names.
    pub fn new(message: Message, n: usize) -> ScriptHeaders {
        ScriptHeaders {
            message,
            pairs: Vec::with_capacity(n),
        }
    }

    /// Add one header line: its name in script form; its value, read as
    /// UTF-8 (lossily), joined to the one before of the same name, if any.
    pub fn add(&mut self, name: &str, value: &[u8]) {
        if self.message == Message::Answer && !super::hop_by_hop::script_may_set(name) {
            return;
        }
        let name = title_case(name);
        let value = String::from_utf8_lossy(value);
        match self.pairs.iter_mut().find(|(n, _)| *n == name) {
            Some((_, joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            None => self.pairs.push((name, value.into_owned())),
        }
    }

    /// The headers, each name once, in the order first seen.
    pub fn into_pairs(self) -> Vec<(String, String)> {
        self.pairs
    }
}

/// `content-type` (or `CONTENT-TYPE`) -> `Content-Type`: the first letter
/// and each one after a `-` upper-cased, the others lower-cased. Header
/// names are ASCII tokens, so ASCII case mapping is all it takes; other
/// bytes are kept.
pub fn title_case(name: &str) -> String {
    let mut out = name.to_ascii_lowercase();
    // The first letter and each one after a `-`: changed in place in the
    // copy (a letter at a time into a new string cost ten times as much).
    let starts = std::iter::once(0).chain(name.match_indices('-').map(|(i, _)| i + 1));
    for i in starts {
        if let Some(first) = out.get_mut(i..i + 1) {
            first.make_ascii_uppercase();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_title_cased() {
        for (name, want) in [
            ("content-type", "Content-Type"),
            ("x-request-id", "X-Request-Id"),
            ("X-API-KEY", "X-Api-Key"),
            ("Content-Type", "Content-Type"),
            ("", ""),
            ("-", "-"),
            ("a--b-", "A--B-"),
            ("x-é-y", "X-é-Y"),
            ("é-a", "é-A"),
        ] {
            assert_eq!(title_case(name), want, "{name}");
        }
    }

    /// Header lines, name and value.
    type Lines<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn repeated_names_join_in_order_of_first_appearance() {
        let cases: [(Lines, Lines); 5] = [
            (&[], &[]),
            (&[("accept", "a")], &[("Accept", "a")]),
            (
                &[
                    ("set-cookie", "a=1"),
                    ("x-b", "2"),
                    ("Set-Cookie", "b=2"),
                    ("set-cookie", ""),
                ],
                &[("Set-Cookie", "a=1, b=2, "), ("X-B", "2")],
            ),
            (&[("x-a", "1"), ("x-b", "2")], &[("X-A", "1"), ("X-B", "2")]),
            (&[("x-a", "caf\u{e9}")], &[("X-A", "caf\u{e9}")]),
        ];
        for (lines, want) in cases {
            let mut h = ScriptHeaders::new(Message::Request, 0);
            for (name, value) in lines {
                h.add(name, value.as_bytes());
            }
            let want: Vec<(String, String)> = want.iter().map(|(n, v)| ((*n).into(), (*v).into())).collect();
            assert_eq!(h.into_pairs(), want, "{lines:?}");
        }
    }

    #[test]
    fn an_answer_shows_only_what_a_script_may_set() {
        for (message, want) in [
            (Message::Request, vec!["Host", "Content-Length", "Connection", "X-A"]),
            (Message::Answer, vec!["X-A"]),
        ] {
            let mut h = ScriptHeaders::new(message, 4);
            for name in ["host", "content-length", "connection", "x-a"] {
                h.add(name, b"v");
            }
            let names: Vec<String> = h.into_pairs().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, want, "{message:?}");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_read_as_replacement_characters() {
        let mut h = ScriptHeaders::new(Message::Request, 1);
        h.add("x-latin", b"caf\xe9");
        h.add("x-latin", b"ok");
        assert_eq!(
            h.into_pairs(),
            vec![("X-Latin".to_owned(), "caf\u{fffd}, ok".to_owned())]
        );
    }
}
