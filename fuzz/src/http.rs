//! Reading what a server wrote back on one connection as HTTP/1.1
//! responses, and checking that each one is well formed.

use serde_json::Value;

/// One response, as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

/// How strictly bodies can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Every response has a body as its headers say.
    Strict,
    /// A `HEAD` request may be among those answered: a Content-Length may
    /// announce a body that is not sent, so bodies are not checked.
    HeadsOnly,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Split `wire` into responses. `complete`: the connection ended cleanly
/// (EOF), so a response cut short is an error; otherwise (reset) the last
/// one may be cut short and is dropped.
pub fn read_responses(wire: &[u8], complete: bool, framing: Framing) -> Result<Vec<Response>, String> {
    let mut out = Vec::new();
    let mut rest = wire;
    while !rest.is_empty() {
        match read_one(rest, framing) {
            Ok((resp, used)) => {
                out.push(resp);
                rest = &rest[used..];
            }
            Err(Cut::Short) if !complete => break,
            Err(Cut::Short) => return Err(format!("response cut short: {:?}", String::from_utf8_lossy(rest))),
            Err(Cut::Bad(why)) => return Err(format!("{why}: {:?}", String::from_utf8_lossy(rest))),
        }
        if framing == Framing::HeadsOnly {
            // Without body lengths the next head cannot be found reliably.
            break;
        }
    }
    Ok(out)
}

enum Cut {
    Short,
    Bad(String),
}

fn read_one(wire: &[u8], framing: Framing) -> Result<(Response, usize), Cut> {
    let head_end = find(wire, b"\r\n\r\n").ok_or(Cut::Short)?;
    let head = &wire[..head_end];
    let mut lines = head.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix(b"HTTP/1.0 "))
        .filter(|r| r.len() >= 3 && r[..3].iter().all(u8::is_ascii_digit) && (r.len() == 3 || r[3] == b' '))
        .and_then(|r| std::str::from_utf8(&r[..3]).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| Cut::Bad(String::from("bad status line")))?;
    let mut headers = Vec::new();
    for line in lines {
        let colon = line.iter().position(|b| *b == b':');
        let (name, value) = match colon {
            Some(i) if i > 0 && line[..i].iter().copied().all(is_token) => (&line[..i], &line[i + 1..]),
            _ => return Err(Cut::Bad(format!("bad header line {:?}", String::from_utf8_lossy(line)))),
        };
        if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(Cut::Bad(String::from("CR, LF or NUL in a header value")));
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        headers.push((name, value.trim_ascii().to_vec()));
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let mut used = head_end + 4;
    let no_body = matches!(status, 100..=199 | 204 | 304);
    if no_body || framing == Framing::HeadsOnly {
        return Ok((resp, used));
    }
    let body = &wire[used..];
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
    let lengths: Vec<&[u8]> = resp
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_slice())
        .collect();
    if chunked && !lengths.is_empty() {
        return Err(Cut::Bad(String::from(
            "both Transfer-Encoding: chunked and Content-Length",
        )));
    }
    if lengths.len() > 1 {
        return Err(Cut::Bad(String::from("several Content-Length headers")));
    }
    if chunked {
        let (data, n) = dechunk(body)?;
        resp.body = data;
        used += n;
    } else if let Some(len) = lengths.first() {
        let len = std::str::from_utf8(len)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| Cut::Bad(String::from("bad Content-Length")))?;
        if body.len() < len {
            return Err(Cut::Short);
        }
        resp.body = body[..len].to_vec();
        used += len;
    } else {
        // Delimited by the end of the connection.
        resp.body = body.to_vec();
        used += body.len();
    }
    Ok((resp, used))
}

fn dechunk(mut wire: &[u8]) -> Result<(Vec<u8>, usize), Cut> {
    let total = wire.len();
    let mut data = Vec::new();
    loop {
        let line_end = find(wire, b"\r\n").ok_or(Cut::Short)?;
        let size = std::str::from_utf8(&wire[..line_end])
            .ok()
            .map(|l| l.split(';').next().unwrap_or_default().trim())
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or_else(|| Cut::Bad(String::from("bad chunk size")))?;
        wire = &wire[line_end + 2..];
        if size == 0 {
            // Trailers (none expected), then the blank line.
            let end = find(wire, b"\r\n").ok_or(Cut::Short)?;
            if end != 0 {
                return Err(Cut::Bad(String::from("trailers after the last chunk")));
            }
            wire = &wire[2..];
            return Ok((data, total - wire.len()));
        }
        if wire.len() < size + 2 {
            return Err(Cut::Short);
        }
        if &wire[size..size + 2] != b"\r\n" {
            return Err(Cut::Bad(String::from("chunk not followed by CRLF")));
        }
        data.extend_from_slice(&wire[..size]);
        wire = &wire[size + 2..];
    }
}

/// Whether an error response's body is well formed: a JSON error body
/// (`{"error": {"message": "...", ...}}`) when it says it is JSON (or the
/// admin endpoint's `{"status": "rejected", "problems": [...]}`), or empty
/// (hyper's own answers to unparsable requests).
pub fn check_error_body(resp: &Response) -> Result<(), String> {
    if resp.status < 400 || resp.body.is_empty() {
        return Ok(());
    }
    let is_json = resp
        .header("content-type")
        .is_some_and(|v| v.starts_with(b"application/json"));
    if !is_json {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(&resp.body)
        .map_err(|e| format!("status {}: the JSON error body does not parse: {e}", resp.status))?;
    // `POST /admin/reload` answers a rejected config with its own shape.
    if v.get("status") == Some(&Value::from("rejected")) && v.get("problems").is_some_and(Value::is_array) {
        return Ok(());
    }
    match v.get("error").and_then(|e| e.get("message")) {
        Some(Value::String(_)) => Ok(()),
        _ => Err(format!("status {}: no error.message in {v}", resp.status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_framed_responses() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhiHTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n5\r\n{\"err\r\n1f\r\nor\":{\"message\":\"x\",\"type\":\"t\"}}\r\n0\r\n\r\n";
        let r = read_responses(wire, true, Framing::Strict).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].body, b"hi");
        assert!(
            check_error_body(&r[1]).is_ok(),
            "{:?}",
            String::from_utf8_lossy(&r[1].body)
        );
        assert!(read_responses(&wire[..wire.len() - 3], true, Framing::Strict).is_err());
        assert!(read_responses(&wire[..wire.len() - 3], false, Framing::Strict).is_ok());
        assert!(read_responses(b"HTTP/1.1 20 OK\r\n\r\n", true, Framing::Strict).is_err());
        assert!(read_responses(b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", true, Framing::Strict).is_err());
    }
}
