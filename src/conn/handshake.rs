//! The byte loops of the HTTP phase: reading the request head, writing the answer, and
//! draining a refused client, each until done or the socket would block.

use super::ws::{is_interrupted, is_would_block};
use crate::http::{self, Head, MAX_HEAD_BYTES};
use std::io::{Read, Write};

/// What reading the request head gave.
pub enum HeadRead {
    /// More is needed.
    Partial,
    /// A full head (and its body, if it announced one), and whatever followed the head.
    Complete(Box<http::Request>, Vec<u8>),
    /// Not a request we can read.
    Invalid(&'static str),
    /// A body over the bound.
    TooLarge,
    /// The client went away.
    Gone,
}

/// Reads into `buf` until the head (and the body its `Content-Length` announces, at most
/// `max_body` bytes) is complete, invalid or the socket would block. Never reads past
/// `MAX_HEAD_BYTES` (+1, to tell "too large") before the head is complete, nor past the
/// body after it.
pub(crate) fn read_head(stream: &mut impl Read, buf: &mut Vec<u8>, max_body: usize) -> HeadRead {
    loop {
        let limit = match http::parse_head(buf) {
            Head::Complete(req, len) => {
                let body = req.content_length.unwrap_or(0);
                if body > max_body {
                    return HeadRead::TooLarge;
                }
                if buf.len() >= len + body {
                    return HeadRead::Complete(req, buf.split_off(len));
                }
                len + body
            }
            Head::Invalid(why) => return HeadRead::Invalid(why),
            Head::Partial => MAX_HEAD_BYTES + 1,
        };
        let start = buf.len();
        let room = limit.saturating_sub(start).min(16 * 1024);
        if room == 0 {
            return HeadRead::Invalid("request head too large");
        }
        buf.resize(start + room, 0);
        let got = stream.read(&mut buf[start..]);
        buf.truncate(start + *got.as_ref().unwrap_or(&0));
        match got {
            Ok(0) => return HeadRead::Gone,
            Ok(_) => continue,
            Err(e) if is_would_block(&e) => return HeadRead::Partial,
            Err(e) if is_interrupted(&e) => continue,
            Err(_) => return HeadRead::Gone,
        }
    }
}

/// Writes `out` from `pos` on; `Ok(true)` once all of it is written, `Ok(false)` when the
/// socket would block.
pub(super) fn write_out(
    stream: &mut impl Write,
    out: &[u8],
    pos: &mut usize,
) -> Result<bool, String> {
    while *pos < out.len() {
        match stream.write(&out[*pos..]) {
            Ok(0) => return Err("connection closed while answering".into()),
            Ok(n) => *pos += n,
            Err(e) if is_would_block(&e) => return Ok(false),
            Err(e) if is_interrupted(&e) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(true)
}

/// Reads and drops what a refused client still sends; `true` once it closed, failed, or
/// sent more than `max` bytes in all.
pub(super) fn drain(stream: &mut impl Read, discarded: &mut usize, max: usize) -> bool {
    let mut scratch = [0u8; 1024];
    loop {
        match stream.read(&mut scratch) {
            Ok(0) => return true,
            Ok(n) => {
                *discarded += n;
                if *discarded > max {
                    return true;
                }
            }
            Err(e) if is_would_block(&e) => return false,
            Err(e) if is_interrupted(&e) => {}
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::counted::MockStream;
    use super::*;

    #[test]
    fn a_head_split_across_reads_completes_and_keeps_what_follows() {
        let mut s = MockStream::default();
        let mut buf = Vec::new();
        s.input.extend(b"GET /ws HTTP/1.1\r\nHost: x\r\n");
        assert!(matches!(read_head(&mut s, &mut buf, 0), HeadRead::Partial));
        s.input.extend(b"\r\n\x81\x80");
        match read_head(&mut s, &mut buf, 0) {
            HeadRead::Complete(req, rest) => {
                assert_eq!(req.path, "/ws");
                assert_eq!(rest, b"\x81\x80", "the first frame's bytes are kept");
            }
            _ => panic!("expected a complete head"),
        }
    }

    #[test]
    fn a_body_is_read_to_its_length_and_no_further_than_the_bound() {
        let mut s = MockStream::default();
        let mut buf = Vec::new();
        s.input
            .extend(b"POST /message HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"text\"");
        assert!(matches!(read_head(&mut s, &mut buf, 64), HeadRead::Partial));
        s.input.extend(b":1}");
        match read_head(&mut s, &mut buf, 64) {
            HeadRead::Complete(req, body) => {
                assert_eq!(req.content_length, Some(10));
                assert_eq!(body, b"{\"text\":1}");
            }
            _ => panic!("expected a complete request"),
        }
        let mut s = MockStream::default();
        s.input
            .extend(b"POST /message HTTP/1.1\r\nContent-Length: 65\r\n\r\n");
        assert!(matches!(
            read_head(&mut s, &mut Vec::new(), 64),
            HeadRead::TooLarge
        ));
    }

    #[test]
    fn a_head_too_large_or_a_hang_up_ends_the_read() {
        let mut s = MockStream::default();
        let mut buf = Vec::new();
        s.input.extend(b"GET / HTTP/1.1\r\n");
        s.input
            .extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        assert!(matches!(
            read_head(&mut s, &mut buf, 0),
            HeadRead::Invalid("request head too large")
        ));
        assert!(
            buf.len() <= MAX_HEAD_BYTES + 1,
            "never reads past the bound"
        );
        let mut s = MockStream {
            eof: true,
            ..MockStream::default()
        };
        assert!(matches!(
            read_head(&mut s, &mut Vec::new(), 0),
            HeadRead::Gone
        ));
    }

    #[test]
    fn the_answer_is_written_across_would_blocks_and_a_drain_is_bounded() {
        let mut s = MockStream {
            room: 3,
            ..MockStream::default()
        };
        let mut pos = 0;
        assert_eq!(write_out(&mut s, b"HTTP/1.1 503", &mut pos), Ok(false));
        assert_eq!(pos, 3);
        s.room = 100;
        assert_eq!(write_out(&mut s, b"HTTP/1.1 503", &mut pos), Ok(true));
        assert_eq!(s.output, b"HTTP/1.1 503");

        let mut s = MockStream::default();
        s.input.extend(vec![0u8; 5000]);
        let mut discarded = 0;
        assert!(
            drain(&mut s, &mut discarded, 4096),
            "more than the bound: done"
        );
        let mut s = MockStream::default();
        s.input.extend(vec![0u8; 100]);
        let mut discarded = 0;
        assert!(
            !drain(&mut s, &mut discarded, 4096),
            "would block: not done yet"
        );
        assert_eq!(discarded, 100);
    }
}
