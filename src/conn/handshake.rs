//! The byte loops of the HTTP phase: reading the request head, writing the answer, and
//! draining a refused client, each until done or the socket would block.

use super::ws::{is_interrupted, is_would_block};
use crate::http::{self, Head, MAX_HEAD_BYTES};
use std::io::{Read, Write};

/// What reading the request head gave.
pub enum HeadRead {
    /// More is needed.
    Partial,
    /// A full head, and whatever followed it.
    Complete(http::Request, Vec<u8>),
    /// Not a request we can read.
    Invalid(&'static str),
    /// The client went away.
    Gone,
}

/// Reads into `buf` until the head is complete, invalid or the socket would block. Reads
/// at most 1 KiB at a time and never past `MAX_HEAD_BYTES` (+1, to tell "too large").
pub(super) fn read_head(stream: &mut impl Read, buf: &mut Vec<u8>) -> HeadRead {
    loop {
        let start = buf.len();
        let room = (MAX_HEAD_BYTES + 1).saturating_sub(start).min(1024);
        if room == 0 {
            return HeadRead::Invalid("request head too large");
        }
        buf.resize(start + room, 0);
        let got = stream.read(&mut buf[start..]);
        buf.truncate(start + *got.as_ref().unwrap_or(&0));
        match got {
            Ok(0) => return HeadRead::Gone,
            Ok(_) => match http::parse_head(buf) {
                Head::Partial => continue,
                Head::Invalid(why) => return HeadRead::Invalid(why),
                Head::Complete(req, len) => return HeadRead::Complete(req, buf.split_off(len)),
            },
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
        assert!(matches!(read_head(&mut s, &mut buf), HeadRead::Partial));
        s.input.extend(b"\r\n\x81\x80");
        match read_head(&mut s, &mut buf) {
            HeadRead::Complete(req, rest) => {
                assert_eq!(req.path, "/ws");
                assert_eq!(rest, b"\x81\x80", "the first frame's bytes are kept");
            }
            _ => panic!("expected a complete head"),
        }
    }

    #[test]
    fn a_head_too_large_or_a_hang_up_ends_the_read() {
        let mut s = MockStream::default();
        let mut buf = Vec::new();
        s.input.extend(b"GET / HTTP/1.1\r\n");
        s.input
            .extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        assert!(matches!(
            read_head(&mut s, &mut buf),
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
        assert!(matches!(read_head(&mut s, &mut Vec::new()), HeadRead::Gone));
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
