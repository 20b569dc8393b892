//! Listen addresses as configs write them.

use std::net::{SocketAddr, ToSocketAddrs};

/// Parse a listen address: `":8000"` (every interface, as in the seed's
/// config), `"host:port"`, `"[::1]:8000"`, or a bare port `"8000"`.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let bad = |why: &str| format!("listen address '{text}': {why}");
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("the host name has no address"))
}

#[cfg(test)]
mod tests {
    use super::parse_listen;

    #[test]
    fn forms() {
        assert_eq!(parse_listen(":8000").unwrap().to_string(), "0.0.0.0:8000");
        assert_eq!(parse_listen("8001").unwrap().to_string(), "0.0.0.0:8001");
        assert_eq!(parse_listen("127.0.0.1:9").unwrap().to_string(), "127.0.0.1:9");
        assert_eq!(parse_listen("[::1]:9").unwrap().to_string(), "[::1]:9");
        assert!(parse_listen("localhost:9").unwrap().ip().is_loopback());
        assert!(parse_listen(":http").is_err());
        assert!(parse_listen("").is_err());
    }
}
