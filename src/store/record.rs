//! The journal's records: what changed in one session, and how it is laid out on disk.
//! Pure: encoding and decoding touch no file, so a damaged journal is a unit test (and a
//! fuzz target) rather than a disaster.
//!
//! A record on disk is `len: u32 LE`, `crc: u32 LE` (CRC-32 of the payload), then `len`
//! payload bytes: a tag byte, the user id, and the tag's fields. Integers are LEB128
//! varints, texts a varint length and UTF-8 bytes, `f64`s eight bytes little-endian.

use crate::agent::Who;
use crate::protocol::{ClientMessage, UserId};
use serde_json::{Map, Value};
use std::sync::Arc;
use tungstenite::Utf8Bytes;

/// Longest payload written or read. A frame is bounded by `--max-message-bytes` and the
/// reply size of the agents; a length above this in a file is damage, not a record.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// Bytes of a record's header: the length and the checksum.
pub const HEADER_BYTES: usize = 8;

/// A change of one session, in the order it happened. Replayed in order onto an empty
/// table, the changes of a journal rebuild every session. Texts are shared with the
/// session (`Utf8Bytes`, `Arc<str>`), so a change in flight to the journal costs no copy.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// The whole session follows (compaction and start-up): forget what came before.
    /// `idle_unix` is when it became idle, if it had no socket.
    Reset {
        /// The next frame's seq.
        next_seq: u64,
        /// Every frame up to this seq reached some socket.
        handed: u64,
        /// Unix time it became idle; `None`: a socket was attached.
        idle_unix: Option<f64>,
    },
    /// A frame held for delivery and replay, exactly as sent.
    Frame {
        /// Its seq.
        seq: u64,
        /// Its JSON text.
        text: Utf8Bytes,
    },
    /// The oldest held frame went (the bound, or the server-wide budget).
    DropFrame,
    /// A line of the conversation history.
    Line {
        /// Who said it.
        who: Who,
        /// What was said.
        text: Arc<str>,
        /// When (Unix seconds).
        unix: f64,
    },
    /// The oldest line of the history went.
    ForgetLine,
    /// Every frame up to `seq` reached some socket.
    Handed {
        /// The seq.
        seq: u64,
    },
    /// A client message was accepted: it runs (again, after a restart) until `Finished`.
    Accepted(ClientMessage),
    /// The oldest accepted message was answered by the frame with `seq`.
    Finished {
        /// The answer's seq.
        seq: u64,
    },
    /// A message id answered by the frame with `seq` (compaction: the ids that make a
    /// resend safe).
    Answered {
        /// The client's id.
        id: String,
        /// The answer's seq.
        seq: u64,
    },
    /// A socket was attached.
    Attached,
    /// The session became idle at this Unix time (its socket went, or its last turn ended
    /// while away).
    Idle {
        /// Unix seconds.
        unix: f64,
    },
    /// The session was dropped (expired, or made room at the cap).
    Gone,
    /// The server stopped cleanly: everything before this was written (no seq gap).
    Clean,
}

const RESET: u8 = 1;
const FRAME: u8 = 2;
const DROP_FRAME: u8 = 3;
const LINE: u8 = 4;
const FORGET_LINE: u8 = 5;
const HANDED: u8 = 6;
const ACCEPTED: u8 = 7;
const FINISHED: u8 = 8;
const ANSWERED: u8 = 9;
const ATTACHED: u8 = 10;
const IDLE: u8 = 11;
const GONE: u8 = 12;
const CLEAN: u8 = 13;

/// The user id of records that belong to no session (`Clean`).
const NO_USER: &str = "";

/// Appends the record for `change` of `user`'s session to `out`; returns its length.
/// `None` (and nothing appended) if the payload would exceed [`MAX_RECORD_BYTES`].
pub fn encode(user: Option<&UserId>, change: &Change, out: &mut Vec<u8>) -> Option<usize> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    let body = out.len();
    let tag = match change {
        Change::Reset { .. } => RESET,
        Change::Frame { .. } => FRAME,
        Change::DropFrame => DROP_FRAME,
        Change::Line { .. } => LINE,
        Change::ForgetLine => FORGET_LINE,
        Change::Handed { .. } => HANDED,
        Change::Accepted(_) => ACCEPTED,
        Change::Finished { .. } => FINISHED,
        Change::Answered { .. } => ANSWERED,
        Change::Attached => ATTACHED,
        Change::Idle { .. } => IDLE,
        Change::Gone => GONE,
        Change::Clean => CLEAN,
    };
    out.push(tag);
    put_text(out, user.map_or(NO_USER, UserId::as_str));
    match change {
        Change::Reset {
            next_seq,
            handed,
            idle_unix,
        } => {
            put_varint(out, *next_seq);
            put_varint(out, *handed);
            match idle_unix {
                Some(t) => {
                    out.push(1);
                    out.extend_from_slice(&t.to_le_bytes());
                }
                None => out.push(0),
            }
        }
        Change::Frame { seq, text } => {
            put_varint(out, *seq);
            put_text(out, text);
        }
        Change::Line { who, text, unix } => {
            out.push(match who {
                Who::Human => 0,
                Who::Ai => 1,
            });
            put_text(out, text);
            out.extend_from_slice(&unix.to_le_bytes());
        }
        Change::Handed { seq } | Change::Finished { seq } => put_varint(out, *seq),
        Change::Accepted(msg) => {
            put_text(out, &msg.text);
            match &msg.id {
                Some(id) => {
                    out.push(1);
                    put_text(out, id);
                }
                None => out.push(0),
            }
            // Serializing a map of JSON values cannot fail.
            let fields = serde_json::to_string(&msg.fields).unwrap_or_default();
            put_text(out, &fields);
        }
        Change::Answered { id, seq } => {
            put_text(out, id);
            put_varint(out, *seq);
        }
        Change::Idle { unix } => out.extend_from_slice(&unix.to_le_bytes()),
        Change::DropFrame
        | Change::ForgetLine
        | Change::Attached
        | Change::Gone
        | Change::Clean => {}
    }
    let len = out.len() - body;
    if len > MAX_RECORD_BYTES {
        out.truncate(start);
        return None;
    }
    let crc = crc32(&out[body..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..body].copy_from_slice(&crc.to_le_bytes());
    Some(HEADER_BYTES + len)
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A record, and its length on disk. `user` is `None` for `Clean`.
    Record {
        /// Whose session.
        user: Option<UserId>,
        /// What changed.
        change: Change,
        /// Bytes taken, header included.
        len: usize,
    },
    /// The buffer ends inside a record: a torn write, or more to read.
    Short,
    /// Not a record: a bad checksum, an impossible length or a malformed payload.
    Damaged,
}

/// The payload length a header announces, if the header is complete and the length
/// possible.
pub fn announced_len(buf: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    Some(len)
}

/// Decodes the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    let Some(len) = announced_len(buf) else {
        return Decoded::Short;
    };
    if len == 0 || len > MAX_RECORD_BYTES {
        return Decoded::Damaged;
    }
    let Some(payload) = buf.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Decoded::Short;
    };
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if crc32(payload) != crc {
        return Decoded::Damaged;
    }
    let mut r = Reader(payload);
    match r.payload() {
        Some((user, change)) if r.0.is_empty() => Decoded::Record {
            user,
            change,
            len: HEADER_BYTES + len,
        },
        _ => Decoded::Damaged,
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// A cursor over a payload; every read is checked, so no input can panic it.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn payload(&mut self) -> Option<(Option<UserId>, Change)> {
        let tag = self.byte()?;
        let user = self.text()?;
        let user = if tag == CLEAN {
            None
        } else {
            Some(UserId::parse(user)?)
        };
        let change = match tag {
            RESET => Change::Reset {
                next_seq: self.varint()?,
                handed: self.varint()?,
                idle_unix: match self.byte()? {
                    0 => None,
                    1 => Some(self.f64()?),
                    _ => return None,
                },
            },
            FRAME => Change::Frame {
                seq: self.varint()?,
                text: Utf8Bytes::from(self.text()?.to_owned()),
            },
            DROP_FRAME => Change::DropFrame,
            LINE => Change::Line {
                who: match self.byte()? {
                    0 => Who::Human,
                    1 => Who::Ai,
                    _ => return None,
                },
                text: Arc::from(self.text()?),
                unix: self.f64()?,
            },
            FORGET_LINE => Change::ForgetLine,
            HANDED => Change::Handed {
                seq: self.varint()?,
            },
            ACCEPTED => {
                let text = self.text()?.to_owned();
                let id = match self.byte()? {
                    0 => None,
                    1 => Some(self.text()?.to_owned()),
                    _ => return None,
                };
                let fields: Map<String, Value> = serde_json::from_str(self.text()?).ok()?;
                Change::Accepted(ClientMessage { text, id, fields })
            }
            FINISHED => Change::Finished {
                seq: self.varint()?,
            },
            ANSWERED => Change::Answered {
                id: self.text()?.to_owned(),
                seq: self.varint()?,
            },
            ATTACHED => Change::Attached,
            IDLE => Change::Idle { unix: self.f64()? },
            GONE => Change::Gone,
            CLEAN => Change::Clean,
            _ => return None,
        };
        Some((user, change))
    }

    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn text(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.varint()?).ok()?;
        std::str::from_utf8(self.take(len)?).ok()
    }

    fn f64(&mut self) -> Option<f64> {
        let bytes: [u8; 8] = self.take(8)?.try_into().ok()?;
        Some(f64::from_le_bytes(bytes)).filter(|t| t.is_finite())
    }
}

/// CRC-32 (ISO-HDLC, zlib's), over a 1 KiB table: crc32fast's 16 KiB table was 1% of the
/// armv7 binary, for records whose cost is their `fdatasync`, not their checksum.
pub(super) fn crc32(bytes: &[u8]) -> u32 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    CRC.checksum(bytes)
}

#[cfg(test)]
mod tests;
