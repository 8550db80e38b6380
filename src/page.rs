//! The chat page served at `GET /`: one self-contained HTML file with inline CSS and JS,
//! embedded in the binary so that a kiosk needs nothing but straycat and a browser.

use std::sync::OnceLock;

/// The page itself.
const PAGE: &str = include_str!("page/index.html");

/// The whole HTTP answer, headers and page, built once.
pub fn response() -> &'static [u8] {
    static RESPONSE: OnceLock<Vec<u8>> = OnceLock::new();
    RESPONSE.get_or_init(|| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n{PAGE}",
            PAGE.len()
        )
        .into_bytes()
    })
}
