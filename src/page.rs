//! The chat page served at `GET /`: one self-contained HTML file with inline CSS and JS,
//! embedded in the binary so that a kiosk needs nothing but straycat and a browser.
//!
//! The page is sent with a strict Content-Security-Policy: nothing may load from anywhere but
//! this server, and the only script and style allowed to run are the page's own, named by
//! their SHA-256. The hashes are written here by hand (the build has no SHA-256 to compute
//! them with); `tests::csp_hashes_match_the_page` recomputes them and prints the new values
//! whenever `page/index.html` changes.

use std::sync::OnceLock;

/// The page itself.
const PAGE: &str = include_str!("page/index.html");

/// `sha256-…` of the text of the page's `<script>` element.
const SCRIPT_SHA256: &str = "HO0DEypNcl3OjeM52YtikuerSIKF8EBd/0U5viq743s=";

/// `sha256-…` of the text of the page's `<style>` element.
const STYLE_SHA256: &str = "CBiCYOnEouggybffBxNi4SmEtvl5WzCiHE70Dg/ELYY=";

/// The policy. `connect-src 'self'` covers the page's own `ws:` (and `wss:` behind a TLS
/// proxy) in CSP Level 3 browsers. Trusted Types make every HTML-parsing sink (`innerHTML`
/// and the like) throw, so server text can only ever become DOM text. `img-src data:` is
/// for the empty favicon that stops a `/favicon.ico` request.
fn content_security_policy() -> String {
    format!(
        "default-src 'none'; script-src 'sha256-{SCRIPT_SHA256}'; style-src 'sha256-{STYLE_SHA256}'; \
         connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'"
    )
}

/// The whole HTTP answer, headers and page, built once.
///
/// `no-cache`: the browser asks again on every load, so a kiosk picks up a new page with a
/// new server (there is no validator to revalidate against; the page is ~25 KiB on a
/// loopback). `no-referrer`: the page's address may carry `?token=`, and a link in a reply
/// must not hand it to another site.
pub fn response() -> &'static [u8] {
    static RESPONSE: OnceLock<Vec<u8>> = OnceLock::new();
    RESPONSE.get_or_init(|| {
        format!(
            "HTTP/1.1 200 OK\r\n\
             Content-Type: text/html; charset=utf-8\r\n\
             Content-Length: {}\r\n\
             Cache-Control: no-cache\r\n\
             Content-Security-Policy: {}\r\n\
             X-Content-Type-Options: nosniff\r\n\
             Referrer-Policy: no-referrer\r\n\
             X-Frame-Options: DENY\r\n\
             Connection: close\r\n\r\n{PAGE}",
            PAGE.len(),
            content_security_policy(),
        )
        .into_bytes()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// The text of the page's one `<tag>` element, exactly as the browser hashes it.
    fn inline(tag: &str) -> &'static str {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        assert_eq!(
            PAGE.matches(&format!("<{tag}")).count(),
            1,
            "the page must have exactly one <{tag}>, with no attributes (the CSP allows one hash)"
        );
        let start = PAGE.find(&open).expect("opening tag") + open.len();
        let len = PAGE[start..].find(&close).expect("closing tag");
        &PAGE[start..start + len]
    }

    fn sha256_base64(text: &str) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    }

    #[test]
    fn csp_hashes_match_the_page() {
        let script = sha256_base64(inline("script"));
        let style = sha256_base64(inline("style"));
        assert!(
            script == SCRIPT_SHA256 && style == STYLE_SHA256,
            "src/page/index.html changed; in src/page.rs set\n\
             const SCRIPT_SHA256: &str = \"{script}\";\n\
             const STYLE_SHA256: &str = \"{style}\";"
        );
    }

    #[test]
    fn page_is_self_contained_and_builds_no_html_from_strings() {
        assert!(PAGE.len() < 64 * 1024, "the page is {} bytes", PAGE.len());
        // No absolute URL at all: nothing can point at another origin (the page builds its
        // WebSocket URL from location).
        assert!(!PAGE.contains("://"), "the page names an absolute URL");
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!PAGE.contains(sink), "the page uses {sink}");
        }
        // The CSP hashes the elements only: inline handlers and style attributes would be
        // blocked (and are not wanted).
        for attr in [" onclick=", " onload=", " onerror=", " style="] {
            assert!(!PAGE.contains(attr), "the page has a{attr} attribute");
        }
        assert!(PAGE.starts_with("<!doctype html>\n<html lang=\"en\">"));
    }

    #[test]
    fn response_has_the_headers() {
        let text = std::str::from_utf8(response()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, PAGE);
        let mut lines = head.split("\r\n");
        assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"));
        let headers: Vec<(&str, &str)> = lines.map(|l| l.split_once(": ").unwrap()).collect();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no {name} header"))
        };
        assert_eq!(get("Content-Type"), "text/html; charset=utf-8");
        assert_eq!(get("Content-Length"), PAGE.len().to_string());
        let csp = get("Content-Security-Policy");
        for directive in [
            "default-src 'none'",
            &format!("script-src 'sha256-{SCRIPT_SHA256}'"),
            &format!("style-src 'sha256-{STYLE_SHA256}'"),
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(
                csp.split("; ").any(|d| d == directive),
                "CSP lacks {directive}: {csp}"
            );
        }
        assert!(!csp.contains("unsafe"), "{csp}");
    }
}
