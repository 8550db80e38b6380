//! Where an agent's upstream lives: a URL taken apart (scheme, host, port, path), and its
//! address resolved once at start-up, so that no DNS lookup ever runs on the event loop.

use std::net::{SocketAddr, ToSocketAddrs};

/// An upstream URL: `http://`, `https://` or `ws://`, a host, an optional port, a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// `http`, `https` or `ws`.
    pub scheme: String,
    /// The host as written (a name, an IPv4 address, or an IPv6 address without brackets):
    /// the `Host` header and the name TLS checks the certificate against.
    pub host: String,
    /// The port, the scheme's default if none was written.
    pub port: u16,
    /// The path without a trailing `/` (`/v1`), empty for none.
    pub path: String,
}

impl Upstream {
    /// Takes `url` apart; `schemes` are the ones this agent speaks.
    pub fn parse(url: &str, schemes: &[&str]) -> Result<Upstream, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("expected {}://HOST[:PORT][/PATH]", schemes.join("|")))?;
        let scheme = scheme.to_ascii_lowercase();
        if !schemes.contains(&scheme.as_str()) {
            return Err(format!(
                "scheme {scheme} is not one of {}",
                schemes.join(", ")
            ));
        }
        if rest.contains(['?', '#', '@']) {
            return Err("no query, fragment or user name here".into());
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let default_port = if scheme == "https" { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
            match after.strip_prefix(':') {
                Some(p) => (host, parse_port(p)?),
                None if after.is_empty() => (host, default_port),
                None => return Err("unexpected text after the IPv6 address".into()),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, parse_port(p)?),
                None => (authority, default_port),
            }
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        {
            return Err("expected a host name or address".into());
        }
        Ok(Upstream {
            scheme,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// Whether the connection is TLS.
    pub fn tls(&self) -> bool {
        self.scheme == "https"
    }

    /// `host:port` for the `Host` header (the port only when it is not the default).
    pub fn host_header(&self) -> String {
        let default = if self.tls() { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Resolves the host, blocking: call it at start-up, never on the event loop.
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", self.host))
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad port {p:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart() {
        let u = Upstream::parse("http://127.0.0.1:8080/v1/", &["http", "https"]).unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str(), u.tls()),
            ("127.0.0.1", 8080, "/v1", false)
        );
        assert_eq!(u.host_header(), "127.0.0.1:8080");
        let u = Upstream::parse("HTTPS://api.openai.com/v1", &["http", "https"]).unwrap();
        assert_eq!(
            (u.port, u.tls(), u.host_header()),
            (443, true, "api.openai.com".into())
        );
        let u = Upstream::parse("ws://[::1]:1865", &["ws"]).unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 1865, "")
        );
        assert_eq!(u.host_header(), "[::1]:1865");
        for bad in [
            "127.0.0.1:8080",
            "ftp://x",
            "http://",
            "http://h:0",
            "http://h:99999",
            "http://u@h",
            "http://h/v1?x=1",
            "http://[::1",
            "http://bad host",
        ] {
            assert!(Upstream::parse(bad, &["http"]).is_err(), "{bad}");
        }
    }
}
