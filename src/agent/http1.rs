//! The client side of an HTTP/1.1 exchange, sans I/O: [`request`] builds the bytes to send,
//! [`ResponseReader`] turns the bytes that come back, in whatever pieces a non-blocking
//! socket hands them over, into a [`Head`] and the decoded body.
//!
//! Nothing here reads a socket or a clock, so an agent can drive it from the event loop or a
//! worker thread alike, and the tests can split a response at every byte. Every buffer is
//! bounded by the limits the caller passes: a misbehaving or hostile upstream costs at most
//! `max_head_bytes + max_body_bytes` of memory, then an [`HttpError`].

use std::fmt;

/// At most this many header fields in one response head; past it the head is refused
/// rather than parsed partially, because a missing `Transfer-Encoding` would misframe the body.
const MAX_HEADERS: usize = 64;

/// The status line and the header fields the caller acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// `200`, `404`, … (never a 1xx other than 101: interim responses are skipped).
    pub status: u16,
    /// The reason phrase as sent, for error messages; empty when it was not plain ASCII.
    pub reason: String,
    /// `Content-Type`, trimmed, so the caller can tell an event stream from a JSON error.
    pub content_type: Option<String>,
    /// How the body ends, which is also how [`ResponseReader::eof`] judges a closed
    /// connection.
    pub framing: Framing,
}

/// How the end of the body is known (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`: the body ends with the zero-size chunk and the trailers.
    Chunked,
    /// `Content-Length`, or `Length(0)` for 101, 204 and 304, which never have a body.
    Length(u64),
    /// Neither: the body ends when the server closes the connection.
    Close,
}

/// Where the response stands after a [`ResponseReader::feed`], so the caller knows whether
/// to keep reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The final head is not complete yet.
    HeadPending,
    /// The head is parsed ([`ResponseReader::head`] has it); more body may follow.
    Body,
    /// The body is complete; any further bytes are ignored.
    Complete,
}

/// Why a response could not be read; its `Display` is meant for the user, as the reason a
/// turn failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The connection closed before a single byte of the response.
    ClosedWithoutResponse,
    /// The response ended before its head was complete.
    EndedInHead,
    /// The head is not HTTP/1.x.
    MalformedHead,
    /// More than 64 header fields.
    TooManyHeaders,
    /// The heads (interim ones included) are larger than this limit.
    HeadTooLarge(usize),
    /// `Content-Length` is not a number, or several disagree.
    BadContentLength,
    /// A transfer coding other than a single `chunked`, which this reader cannot decode.
    UnsupportedTransferEncoding,
    /// A chunk-size line is not hex digits with optional extensions.
    BadChunkSize,
    /// A chunk-size line (extensions included) is longer than this limit.
    ChunkLineTooLong(usize),
    /// A chunk's data is not followed by a line end.
    MissingChunkCrlf,
    /// The trailer section has a bare CR.
    BadTrailers,
    /// The trailer section is larger than this limit.
    TrailersTooLarge(usize),
    /// The decoded body is (or announces it would be) larger than this limit.
    BodyTooLarge(usize),
    /// The connection closed this many bytes short of the `Content-Length`.
    EndedInBody {
        /// Bytes still expected.
        missing: u64,
    },
    /// The connection closed before the last chunk and the trailers were complete.
    EndedInChunk,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClosedWithoutResponse => f.write_str("the connection closed without a response"),
            Self::EndedInHead => f.write_str("the response ended inside its head"),
            Self::MalformedHead => f.write_str("malformed response head"),
            Self::TooManyHeaders => {
                write!(f, "more than {MAX_HEADERS} header fields in the response")
            }
            Self::HeadTooLarge(n) => write!(f, "response head larger than {n} bytes"),
            Self::BadContentLength => f.write_str("bad Content-Length in the response"),
            Self::UnsupportedTransferEncoding => {
                f.write_str("unsupported Transfer-Encoding in the response")
            }
            Self::BadChunkSize => f.write_str("bad chunk size"),
            Self::ChunkLineTooLong(n) => write!(f, "chunk size line longer than {n} bytes"),
            Self::MissingChunkCrlf => f.write_str("missing CRLF after chunk data"),
            Self::BadTrailers => f.write_str("malformed trailer section"),
            Self::TrailersTooLarge(n) => write!(f, "trailer section larger than {n} bytes"),
            Self::BodyTooLarge(n) => write!(f, "body larger than {n} bytes"),
            Self::EndedInBody { missing } => write!(
                f,
                "the response ended {missing} bytes short of its Content-Length"
            ),
            Self::EndedInChunk => f.write_str("the response ended inside a chunk"),
        }
    }
}

impl std::error::Error for HttpError {}

/// The chunked decoder's position. Everything but chunk data goes byte by byte: those lines
/// are short, and a byte at a time makes a CRLF split across two feeds a non-event.
#[derive(Clone, Copy, Debug)]
enum Chunk {
    /// Reading the hex size; `digits` tells "no digits yet" from a zero size.
    Size { value: u64, digits: bool },
    /// After the digits: optional whitespace before `;` or the line end.
    SizeWs { value: u64 },
    /// Inside chunk extensions, which are skipped: nothing here uses them.
    Ext { value: u64 },
    /// Saw the CR ending a size line.
    SizeLf { value: u64 },
    /// Inside chunk data.
    Data { remaining: u64 },
    /// Chunk data done; its line end comes next.
    DataCr,
    /// Saw the CR after chunk data.
    DataLf,
    /// At the start of a trailer line, or of the empty line ending the body.
    TrailerStart,
    /// Inside a trailer field line, which is skipped.
    TrailerLine,
    /// Saw a CR in the trailers; `last` when it ends the empty line, i.e. the body.
    TrailerLf { last: bool },
}

#[derive(Debug)]
enum State {
    /// Collecting the head; `used` counts the bytes of interim heads already dropped.
    Head {
        buf: Vec<u8>,
        used: usize,
    },
    Length {
        remaining: u64,
    },
    Close,
    Chunked(Chunk),
    Complete,
    /// Kept so that every later call reports the first error instead of misreading the rest.
    Failed(HttpError),
}

/// Reads one HTTP/1.x response fed in arbitrary pieces. One reader per response: the
/// requests [`request`] builds say `Connection: close`.
///
/// It does not know the request method, so it cannot be used for the answer to a `HEAD`
/// (which would announce a `Content-Length` it never sends).
#[derive(Debug)]
pub struct ResponseReader {
    max_head_bytes: usize,
    max_body_bytes: usize,
    state: State,
    head: Option<Head>,
    body_len: usize,
    /// Bytes of the current chunk-size line, or of the whole trailer section, bounded by
    /// `max_head_bytes` so a stream of extensions or trailers cannot go on forever.
    line_len: usize,
}

impl ResponseReader {
    /// A reader for one response. `max_head_bytes` bounds all heads together (interim 1xx
    /// ones included), and also each chunk-size line and the trailer section;
    /// `max_body_bytes` bounds the decoded body.
    pub fn new(max_head_bytes: usize, max_body_bytes: usize) -> Self {
        Self {
            max_head_bytes,
            max_body_bytes,
            state: State::Head {
                buf: Vec::new(),
                used: 0,
            },
            head: None,
            body_len: 0,
            line_len: 0,
        }
    }

    /// The final head, once it is parsed; still there after the body is complete and after a
    /// body error, so the caller can report the status with the error.
    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    /// Consumes all of `input`, appending the decoded body bytes to `out` so the caller can
    /// pass them straight on (to an SSE decoder, say) without a second buffer. After an
    /// error, every later call returns the same error.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Progress, HttpError> {
        let result = self.feed_inner(input, out);
        if let Err(e) = &result {
            self.state = State::Failed(e.clone());
        }
        result
    }

    /// Tells the reader that the peer closed the connection: fine for a close-delimited body
    /// (which it completes) or a body already complete, an error naming where the response
    /// was cut short otherwise.
    pub fn eof(&mut self) -> Result<(), HttpError> {
        let err = match &self.state {
            State::Complete => return Ok(()),
            State::Close => {
                self.state = State::Complete;
                return Ok(());
            }
            State::Failed(e) => return Err(e.clone()),
            State::Head { buf, used } if buf.is_empty() && *used == 0 => {
                HttpError::ClosedWithoutResponse
            }
            State::Head { .. } => HttpError::EndedInHead,
            State::Length { remaining } => HttpError::EndedInBody {
                missing: *remaining,
            },
            State::Chunked(_) => HttpError::EndedInChunk,
        };
        self.state = State::Failed(err.clone());
        Err(err)
    }

    fn progress(&self) -> Result<Progress, HttpError> {
        match &self.state {
            State::Head { .. } => Ok(Progress::HeadPending),
            State::Length { .. } | State::Close | State::Chunked(_) => Ok(Progress::Body),
            State::Complete => Ok(Progress::Complete),
            State::Failed(e) => Err(e.clone()),
        }
    }

    fn feed_inner(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Progress, HttpError> {
        let Some(rest) = self.feed_head(input, out)? else {
            return Ok(Progress::HeadPending);
        };
        self.feed_body(rest, out)?;
        self.progress()
    }

    /// Adds `input` to the head; once the final head is parsed, feeds what followed it in the
    /// buffer to the body and returns the part of `input` not looked at yet. `None`: all of
    /// `input` went into a head still incomplete.
    fn feed_head<'a>(
        &mut self,
        input: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<&'a [u8]>, HttpError> {
        let State::Head { buf, used } = &mut self.state else {
            return Ok(Some(input));
        };
        // Only as much as the limit allows goes into the buffer, so one large read carrying
        // the head and much of the body does not trip the head limit; the rest is body.
        let room = self
            .max_head_bytes
            .saturating_sub(*used)
            .saturating_sub(buf.len());
        let (now, later) = input.split_at(room.min(input.len()));
        // A head ends with an empty line, so a parse can only succeed once a new line end
        // arrived; skipping the others keeps a byte-by-byte feed from costing O(n²).
        let mut may_end = now.contains(&b'\n');
        buf.extend_from_slice(now);
        loop {
            let parsed = if may_end { parse_head(buf)? } else { None };
            if let Some((len, head)) = parsed {
                if (100..200).contains(&head.status) && head.status != 101 {
                    // An interim response (100 Continue, 103 Early Hints): the real one
                    // follows.
                    *used = used.saturating_add(len);
                    buf.drain(..len.min(buf.len()));
                    may_end = buf.contains(&b'\n');
                    continue;
                }
                let leftover = buf.split_off(len.min(buf.len()));
                self.start_body(head)?;
                self.feed_body(&leftover, out)?;
                return Ok(Some(later));
            }
            // A partial head that already fills the limit needs at least one byte more.
            if used.saturating_add(buf.len()) >= self.max_head_bytes {
                return Err(HttpError::HeadTooLarge(self.max_head_bytes));
            }
            return Ok(None);
        }
    }

    fn start_body(&mut self, head: Head) -> Result<(), HttpError> {
        let framing = head.framing;
        // Kept even if the body is refused below, so the caller can still show the status.
        self.head = Some(head);
        self.state = match framing {
            Framing::Length(0) => State::Complete,
            Framing::Length(n) => {
                // Refused now rather than after reading up to the limit for nothing.
                if n > limit_u64(self.max_body_bytes) {
                    return Err(HttpError::BodyTooLarge(self.max_body_bytes));
                }
                State::Length { remaining: n }
            }
            Framing::Close => State::Close,
            Framing::Chunked => {
                self.line_len = 0;
                State::Chunked(Chunk::Size {
                    value: 0,
                    digits: false,
                })
            }
        };
        Ok(())
    }

    fn push_body(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), HttpError> {
        let total = self.body_len.saturating_add(bytes.len());
        if total > self.max_body_bytes {
            return Err(HttpError::BodyTooLarge(self.max_body_bytes));
        }
        self.body_len = total;
        out.extend_from_slice(bytes);
        Ok(())
    }

    fn feed_body(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), HttpError> {
        while !input.is_empty() {
            match self.state {
                State::Head { .. } | State::Complete => return Ok(()),
                State::Failed(ref e) => return Err(e.clone()),
                State::Close => {
                    self.push_body(input, out)?;
                    return Ok(());
                }
                State::Length { remaining } => {
                    let (data, _ignored) = input.split_at(take(remaining, input.len()));
                    self.push_body(data, out)?;
                    let remaining = remaining.saturating_sub(len_u64(data.len()));
                    self.state = if remaining == 0 {
                        State::Complete
                    } else {
                        State::Length { remaining }
                    };
                    return Ok(());
                }
                State::Chunked(chunk) => {
                    let (state, rest) = self.chunk_step(chunk, input, out)?;
                    self.state = state;
                    input = rest;
                }
            }
        }
        Ok(())
    }

    /// Takes chunk data in bulk, or one byte of anything else: a chunk-size line, the line
    /// end after data, or the trailers. Returns the next state and the unread input.
    fn chunk_step<'a>(
        &mut self,
        chunk: Chunk,
        input: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<(State, &'a [u8]), HttpError> {
        if let Chunk::Data { remaining } = chunk {
            let (data, rest) = input.split_at(take(remaining, input.len()));
            self.push_body(data, out)?;
            let remaining = remaining.saturating_sub(len_u64(data.len()));
            let next = if remaining == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data { remaining }
            };
            return Ok((State::Chunked(next), rest));
        }
        let Some((&b, rest)) = input.split_first() else {
            return Ok((State::Chunked(chunk), input));
        };
        let in_size_line = matches!(
            chunk,
            Chunk::Size { .. } | Chunk::SizeWs { .. } | Chunk::Ext { .. } | Chunk::SizeLf { .. }
        );
        let in_trailers = matches!(
            chunk,
            Chunk::TrailerStart | Chunk::TrailerLine | Chunk::TrailerLf { .. }
        );
        if in_size_line || in_trailers {
            self.line_len = self.line_len.saturating_add(1);
            if self.line_len > self.max_head_bytes {
                return Err(if in_size_line {
                    HttpError::ChunkLineTooLong(self.max_head_bytes)
                } else {
                    HttpError::TrailersTooLarge(self.max_head_bytes)
                });
            }
        }
        // A bare LF is taken as a line end wherever a CRLF is due, as RFC 9112 §2.2 allows
        // and as httparse does for the head; a bare CR is not.
        let next = match chunk {
            Chunk::Size { value, digits } => match hex_digit(b) {
                Some(d) => {
                    let value = value
                        .checked_mul(16)
                        .and_then(|v| v.checked_add(d))
                        .ok_or(HttpError::BadChunkSize)?;
                    State::Chunked(Chunk::Size {
                        value,
                        digits: true,
                    })
                }
                None if !digits => return Err(HttpError::BadChunkSize),
                None => self.after_size(value, b)?,
            },
            Chunk::SizeWs { value } => self.after_size(value, b)?,
            Chunk::Ext { value } => match b {
                b'\r' => State::Chunked(Chunk::SizeLf { value }),
                b'\n' => self.size_line_done(value)?,
                _ => State::Chunked(Chunk::Ext { value }),
            },
            Chunk::SizeLf { value } => match b {
                b'\n' => self.size_line_done(value)?,
                _ => return Err(HttpError::BadChunkSize),
            },
            // Taken in bulk above; one byte of it is the same thing, only slower.
            Chunk::Data { remaining } => {
                self.push_body(&[b], out)?;
                State::Chunked(match remaining.saturating_sub(1) {
                    0 => Chunk::DataCr,
                    remaining => Chunk::Data { remaining },
                })
            }
            Chunk::DataCr => match b {
                b'\r' => State::Chunked(Chunk::DataLf),
                b'\n' => self.next_size_line(),
                _ => return Err(HttpError::MissingChunkCrlf),
            },
            Chunk::DataLf => match b {
                b'\n' => self.next_size_line(),
                _ => return Err(HttpError::MissingChunkCrlf),
            },
            Chunk::TrailerStart => match b {
                b'\r' => State::Chunked(Chunk::TrailerLf { last: true }),
                b'\n' => State::Complete,
                _ => State::Chunked(Chunk::TrailerLine),
            },
            Chunk::TrailerLine => match b {
                b'\r' => State::Chunked(Chunk::TrailerLf { last: false }),
                b'\n' => State::Chunked(Chunk::TrailerStart),
                _ => State::Chunked(Chunk::TrailerLine),
            },
            Chunk::TrailerLf { last } => match b {
                b'\n' if last => State::Complete,
                b'\n' => State::Chunked(Chunk::TrailerStart),
                _ => return Err(HttpError::BadTrailers),
            },
        };
        Ok((next, rest))
    }

    /// The byte after the size digits: whitespace, extensions or the line end.
    fn after_size(&mut self, value: u64, b: u8) -> Result<State, HttpError> {
        let next = match b {
            // RFC 9112 §7.1.1 allows BWS before `;`; some servers also leave it before the CRLF.
            b' ' | b'\t' => Chunk::SizeWs { value },
            b';' => Chunk::Ext { value },
            b'\r' => Chunk::SizeLf { value },
            b'\n' => return self.size_line_done(value),
            _ => return Err(HttpError::BadChunkSize),
        };
        Ok(State::Chunked(next))
    }

    fn size_line_done(&mut self, value: u64) -> Result<State, HttpError> {
        // The trailers' own bound starts here.
        self.line_len = 0;
        if value == 0 {
            return Ok(State::Chunked(Chunk::TrailerStart));
        }
        // Refused as soon as announced, not after buffering up to the limit.
        let room = self.max_body_bytes.saturating_sub(self.body_len);
        if value > limit_u64(room) {
            return Err(HttpError::BodyTooLarge(self.max_body_bytes));
        }
        Ok(State::Chunked(Chunk::Data { remaining: value }))
    }

    fn next_size_line(&mut self) -> State {
        self.line_len = 0;
        State::Chunked(Chunk::Size {
            value: 0,
            digits: false,
        })
    }
}

/// How many of `available` bytes to take when `remaining` are still due.
fn take(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn limit_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn hex_digit(b: u8) -> Option<u64> {
    char::from(b).to_digit(16).map(u64::from)
}

/// Parses one head at the start of `buf`: `None` while incomplete, else its length and what
/// it says.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Head)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(_) => return Err(HttpError::MalformedHead),
    };
    let status = resp.code.ok_or(HttpError::MalformedHead)?;
    let mut content_type = None;
    let mut chunked = false;
    let mut length: Option<u64> = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-type") {
            if content_type.is_none() {
                content_type = Some(String::from_utf8_lossy(h.value).trim().to_string());
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only a lone `chunked` is accepted: the requests sent carry no `TE`, so a server
            // may not use other codings (RFC 9112 §6.1), and passing on a still-gzipped body
            // as if it were text would be worse than failing.
            let value =
                std::str::from_utf8(h.value).map_err(|_| HttpError::UnsupportedTransferEncoding)?;
            for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if chunked || !coding.eq_ignore_ascii_case("chunked") {
                    return Err(HttpError::UnsupportedTransferEncoding);
                }
                chunked = true;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // RFC 9110 §8.6: a list of identical values is one value; anything else cannot
            // be trusted to frame the body (RFC 9112 §6.3 says treat it as an error).
            let value = std::str::from_utf8(h.value).map_err(|_| HttpError::BadContentLength)?;
            for v in value.split(',').map(str::trim) {
                // Digits only: `str::parse` alone would accept a leading `+`.
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HttpError::BadContentLength);
                }
                let n: u64 = v.parse().map_err(|_| HttpError::BadContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(HttpError::BadContentLength);
                }
                length = Some(n);
            }
        }
    }
    // RFC 9112 §6.3, in its order: no body for these statuses whatever the headers say,
    // then chunked over Content-Length, then close-delimited.
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let head = Head {
        status,
        reason: resp.reason.unwrap_or("").to_string(),
        content_type,
        framing,
    };
    Ok(Some((len, head)))
}

/// Builds an HTTP/1.1 request: request line, `Host`, `Content-Length`, `Connection: close`,
/// then `headers` in order, then `body`.
///
/// `host` is sent as given (add `:port` for a port other than the scheme's). `Content-Length`
/// is left out only for a `GET` or `HEAD` without a body (RFC 9110 §8.6); `Host`,
/// `Content-Length`, `Connection` and `Transfer-Encoding` in `headers` are skipped, since
/// this function owns the framing. The strings usually come from configuration, so rather
/// than fail it makes them harmless: control characters and spaces are dropped from the
/// method, host, path and header names (and `:` from names), and header values are trimmed
/// with inner control characters turned into spaces, so no input can inject a line.
#[must_use]
pub fn request(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len().saturating_add(128));
    push_token(&mut out, method, b"");
    out.push(b' ');
    if path.is_empty() {
        out.push(b'/');
    } else {
        push_token(&mut out, path, b"");
    }
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    push_token(&mut out, host, b"");
    out.extend_from_slice(b"\r\n");
    let bodiless = method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD");
    if !body.is_empty() || !bodiless {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n");
    for (name, value) in headers {
        let reserved = ["host", "content-length", "connection", "transfer-encoding"];
        if reserved.iter().any(|r| name.trim().eq_ignore_ascii_case(r)) {
            continue;
        }
        let start = out.len();
        push_token(&mut out, name, b":");
        if out.len() == start {
            continue;
        }
        out.extend_from_slice(b": ");
        for b in value.trim().bytes() {
            out.push(if b.is_ascii_control() && b != b'\t' {
                b' '
            } else {
                b
            });
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Appends `s` without spaces, control characters or any byte of `also`.
fn push_token(out: &mut Vec<u8>, s: &str, also: &[u8]) {
    out.extend(
        s.bytes()
            .filter(|b| !b.is_ascii_control() && *b != b' ' && !also.contains(b)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD_MAX: usize = 8 * 1024;
    const BODY_MAX: usize = 64 * 1024;

    /// What a whole feed of `input` produced: the body, the last progress or the error, the
    /// head, and what `eof` said when asked.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        body: Vec<u8>,
        progress: Result<Progress, HttpError>,
        head: Option<Head>,
        eof: Option<Result<(), HttpError>>,
    }

    fn run(pieces: &[&[u8]], eof: bool) -> Outcome {
        let mut r = ResponseReader::new(HEAD_MAX, BODY_MAX);
        let mut body = Vec::new();
        let mut progress = Ok(Progress::HeadPending);
        for p in pieces {
            progress = r.feed(p, &mut body);
            if progress.is_err() {
                break;
            }
        }
        let eof = eof.then(|| r.eof());
        Outcome {
            body,
            progress,
            head: r.head().cloned(),
            eof,
        }
    }

    /// Feeds `input` whole, split in two at every point, and byte by byte, and checks all
    /// of them agree; returns the whole-feed outcome.
    fn same_everywhere(input: &[u8], eof: bool) -> Outcome {
        let whole = run(&[input], eof);
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(run(&[a, b], eof), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes, eof), whole, "byte by byte");
        whole
    }

    fn chunked(head: &str, chunks: &[&str]) -> Vec<u8> {
        let mut v = head.as_bytes().to_vec();
        for (i, c) in chunks.iter().enumerate() {
            // Alternate hex case and add an extension now and then, as real servers vary.
            let size = if i % 2 == 0 {
                format!("{:x}", c.len())
            } else {
                format!("{:X}", c.len())
            };
            let ext = if i % 3 == 2 { ";n=v" } else { "" };
            v.extend_from_slice(format!("{size}{ext}\r\n{c}\r\n").as_bytes());
        }
        v.extend_from_slice(b"0\r\n\r\n");
        v
    }

    const OPENAI_HEAD: &str = "HTTP/1.1 200 OK\r\nDate: Tue, 01 Jul 2025 10:00:00 GMT\r\n\
        Content-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\
        Connection: keep-alive\r\nopenai-processing-ms: 120\r\n\r\n";

    const OPENAI_EVENTS: &[&str] = &[
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        ": keep-alive\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo, \"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"h\u{e9}llo \u{1f408}\"}}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\n\n",
        "data: [DONE]\n\n",
    ];

    #[test]
    fn openai_stream_decodes_the_same_at_every_split() {
        let input = chunked(OPENAI_HEAD, OPENAI_EVENTS);
        // The body and, fed straight into the SSE decoder, the events.
        let decode = |pieces: &[&[u8]]| {
            let mut r = ResponseReader::new(HEAD_MAX, BODY_MAX);
            let mut sse = super::super::sse::SseDecoder::new(4096);
            let (mut body, mut events) = (Vec::new(), Vec::new());
            let mut last = Progress::HeadPending;
            for p in pieces {
                let mut fresh = Vec::new();
                last = r.feed(p, &mut fresh).unwrap();
                sse.feed(&fresh, &mut events).unwrap();
                body.extend_from_slice(&fresh);
            }
            r.eof().unwrap();
            (last, body, events, r.head().cloned())
        };
        let whole = decode(&[&input]);
        assert_eq!(whole.0, Progress::Complete);
        assert_eq!(whole.1, OPENAI_EVENTS.concat().as_bytes());
        let data: Vec<&str> = whole.2.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data.len(), 6);
        assert!(data[3].contains("h\u{e9}llo \u{1f408}"));
        assert!(data[4].starts_with("{\"choices\":[]"));
        assert_eq!(data[5], "[DONE]");
        let head = whole.3.clone().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.reason, "OK");
        assert_eq!(
            head.content_type.as_deref(),
            Some("text/event-stream; charset=utf-8")
        );
        assert_eq!(head.framing, Framing::Chunked);
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(decode(&[a, b]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(decode(&bytes), whole, "byte by byte");
    }

    #[test]
    fn content_length_body_at_every_split() {
        let body =
            "{\"id\":\"x\",\"choices\":[{\"message\":{\"content\":\"h\u{e9}llo \u{1f408}\"}}]}";
        let input = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let o = same_everywhere(input.as_bytes(), true);
        assert_eq!(o.body, body.as_bytes());
        assert_eq!(o.progress, Ok(Progress::Complete));
        assert_eq!(o.eof, Some(Ok(())));
        assert_eq!(
            o.head.unwrap().framing,
            Framing::Length(u64::try_from(body.len()).unwrap())
        );
    }

    #[test]
    fn bytes_after_a_complete_body_are_ignored() {
        let o = same_everywhere(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 junk",
            true,
        );
        assert_eq!(o.body, b"abc");
        assert_eq!(o.progress, Ok(Progress::Complete));
        let o = same_everywhere(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nzz",
            true,
        );
        assert_eq!(o.body, b"abc");
        assert_eq!(o.progress, Ok(Progress::Complete));
    }

    #[test]
    fn close_delimited_body_at_every_split() {
        let input = "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: h\u{e9}llo \u{1f408}\n\ndata: [DONE]\n\n";
        let o = same_everywhere(input.as_bytes(), true);
        assert_eq!(
            o.body,
            "data: h\u{e9}llo \u{1f408}\n\ndata: [DONE]\n\n".as_bytes()
        );
        assert_eq!(o.progress, Ok(Progress::Body));
        assert_eq!(o.eof, Some(Ok(())));
        assert_eq!(o.head.unwrap().framing, Framing::Close);
    }

    #[test]
    fn chunk_extensions_hex_case_trailers_and_bare_lf() {
        let input = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n\
            A ; name=\"quoted;value\"\r\n0123456789\r\n\
            1a;x\r\nabcdefghijklmnopqrstuvwxyz\r\n\
            000f\nFIFTEEN-BYTES!!\n\
            0;last\r\nX-Trailer: 1\r\nServer-Timing: total;dur=5\r\n\r\n";
        let o = same_everywhere(input, true);
        assert_eq!(
            o.body,
            b"0123456789abcdefghijklmnopqrstuvwxyzFIFTEEN-BYTES!!"
        );
        assert_eq!(o.progress, Ok(Progress::Complete));
        assert_eq!(o.eof, Some(Ok(())));
    }

    #[test]
    fn eof_anywhere_inside_a_chunked_body_is_an_error() {
        let input = chunked(OPENAI_HEAD, OPENAI_EVENTS);
        let head_len = OPENAI_HEAD.len();
        for cut in 0..input.len() {
            let o = run(&[&input[..cut]], true);
            let want = if cut == 0 {
                HttpError::ClosedWithoutResponse
            } else if cut < head_len {
                HttpError::EndedInHead
            } else {
                HttpError::EndedInChunk
            };
            assert_eq!(o.eof, Some(Err(want)), "cut at {cut}");
        }
        assert_eq!(run(&[&input], true).eof, Some(Ok(())));
        assert_eq!(
            HttpError::EndedInChunk.to_string(),
            "the response ended inside a chunk"
        );
    }

    #[test]
    fn eof_short_of_content_length_is_an_error() {
        let o = same_everywhere(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd", true);
        assert_eq!(o.body, b"abcd");
        assert_eq!(o.eof, Some(Err(HttpError::EndedInBody { missing: 6 })));
        assert_eq!(
            HttpError::EndedInBody { missing: 6 }.to_string(),
            "the response ended 6 bytes short of its Content-Length"
        );
    }

    #[test]
    fn interim_responses_are_skipped() {
        let input = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
            HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let o = same_everywhere(input, true);
        let head = o.head.unwrap();
        assert_eq!((head.status, head.reason.as_str()), (200, "OK"));
        assert_eq!(o.body, b"ok");
        assert_eq!(o.progress, Ok(Progress::Complete));
        // Up to the final head, the reader is still waiting for it.
        assert_eq!(
            run(&[b"HTTP/1.1 100 Continue\r\n\r\n"], false).progress,
            Ok(Progress::HeadPending)
        );
    }

    #[test]
    fn switching_protocols_is_final_and_bodiless() {
        let o = run(
            &[b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00"],
            true,
        );
        let head = o.head.unwrap();
        assert_eq!((head.status, head.framing), (101, Framing::Length(0)));
        assert_eq!(o.progress, Ok(Progress::Complete));
        assert!(o.body.is_empty());
    }

    #[test]
    fn no_content_and_not_modified_have_no_body() {
        for status in ["204 No Content", "304 Not Modified"] {
            // Even with a Content-Length or chunked, which these statuses cannot mean.
            let input = format!(
                "HTTP/1.1 {status}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nstray"
            );
            let o = same_everywhere(input.as_bytes(), true);
            assert_eq!(o.head.unwrap().framing, Framing::Length(0));
            assert_eq!(o.progress, Ok(Progress::Complete));
            assert!(o.body.is_empty());
            assert_eq!(o.eof, Some(Ok(())));
        }
    }

    #[test]
    fn server_error_with_json_body() {
        let body = r#"{"error":{"message":"model not found","type":"invalid_request_error"}}"#;
        let input = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let o = same_everywhere(input.as_bytes(), true);
        let head = o.head.unwrap();
        assert_eq!(head.status, 500);
        assert_eq!(head.reason, "Internal Server Error");
        assert_eq!(head.content_type.as_deref(), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&o.body).unwrap();
        assert_eq!(v["error"]["message"], "model not found");
    }

    #[test]
    fn chunked_wins_over_content_length() {
        let o = same_everywhere(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            true,
        );
        assert_eq!(o.head.unwrap().framing, Framing::Chunked);
        assert_eq!(o.body, b"hello");
    }

    #[test]
    fn bad_chunks_are_refused() {
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let cases: &[(&str, HttpError)] = &[
            ("zz\r\n", HttpError::BadChunkSize),
            ("\r\n", HttpError::BadChunkSize),
            (";ext\r\n", HttpError::BadChunkSize),
            ("-1\r\n", HttpError::BadChunkSize),
            ("5x\r\n", HttpError::BadChunkSize),
            ("5\rx", HttpError::BadChunkSize),
            ("1ffffffffffffffff\r\n", HttpError::BadChunkSize),
            ("3\r\nabcX", HttpError::MissingChunkCrlf),
            ("3\r\nabc\rX", HttpError::MissingChunkCrlf),
            ("0\r\nX-T: 1\rX", HttpError::BadTrailers),
            ("0\r\n\rX", HttpError::BadTrailers),
            ("fffffffffffffff\r\n", HttpError::BodyTooLarge(BODY_MAX)),
        ];
        for (chunks, want) in cases {
            let input = format!("{head}{chunks}");
            let o = same_everywhere(input.as_bytes(), true);
            assert_eq!(o.progress, Err(want.clone()), "{chunks:?}");
            // The error sticks.
            assert_eq!(o.eof, Some(Err(want.clone())), "{chunks:?}");
        }
        assert_eq!(HttpError::BadChunkSize.to_string(), "bad chunk size");
        assert_eq!(
            HttpError::MissingChunkCrlf.to_string(),
            "missing CRLF after chunk data"
        );
    }

    #[test]
    fn bad_heads_are_refused() {
        let cases: &[(&[u8], HttpError)] = &[
            (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", HttpError::MalformedHead),
            (b"HTTP/1.1 2000 OK\r\n\r\n", HttpError::MalformedHead),
            (
                b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
                HttpError::MalformedHead,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                HttpError::UnsupportedTransferEncoding,
            ),
        ];
        for (input, want) in cases {
            let o = same_everywhere(input, false);
            assert_eq!(
                o.progress,
                Err(want.clone()),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            HttpError::MalformedHead.to_string(),
            "malformed response head"
        );
        // Repeated identical lengths are one length.
        let o = same_everywhere(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok",
            false,
        );
        assert_eq!(o.body, b"ok");
    }

    #[test]
    fn header_count_is_bounded() {
        let head = |n: usize| {
            let fields: String = (0..n).map(|i| format!("X-H{i}: v\r\n")).collect();
            format!("HTTP/1.1 200 OK\r\n{fields}\r\n")
        };
        assert_eq!(
            run(&[head(64).as_bytes()], false).progress,
            Ok(Progress::Body)
        );
        assert_eq!(
            run(&[head(65).as_bytes()], false).progress,
            Err(HttpError::TooManyHeaders)
        );
    }

    #[test]
    fn head_size_is_bounded() {
        let head = |total: usize| {
            let start = "HTTP/1.1 200 OK\r\nX-Pad: ";
            let pad = "a".repeat(total - start.len() - 4);
            format!("{start}{pad}\r\n\r\n")
        };
        let max = 256;
        let feed = |input: &[u8]| {
            let mut r = ResponseReader::new(max, BODY_MAX);
            let mut body = Vec::new();
            let p = r.feed(input, &mut body);
            (p, body)
        };
        assert_eq!(feed(head(max).as_bytes()).0, Ok(Progress::Body));
        // A large read carrying head and body together is not held against the head.
        let mut both = head(max).into_bytes();
        both.extend_from_slice(&[b'x'; 1000]);
        assert_eq!(feed(&both), (Ok(Progress::Body), vec![b'x'; 1000]));
        assert_eq!(
            feed(head(max + 1).as_bytes()).0,
            Err(HttpError::HeadTooLarge(max))
        );
        // An endless head without line ends is cut off at the limit too.
        let mut r = ResponseReader::new(max, BODY_MAX);
        let mut body = Vec::new();
        let mut last = Ok(Progress::HeadPending);
        for _ in 0..max {
            last = r.feed(b"HT", &mut body);
        }
        assert_eq!(last, Err(HttpError::HeadTooLarge(max)));
        // Interim heads count towards the same limit.
        let interim = "HTTP/1.1 100 Continue\r\n\r\n".repeat(max / 25 + 1);
        assert_eq!(
            feed(interim.as_bytes()).0,
            Err(HttpError::HeadTooLarge(max))
        );
        assert_eq!(
            HttpError::HeadTooLarge(max).to_string(),
            "response head larger than 256 bytes"
        );
    }

    #[test]
    fn chunk_lines_and_trailers_are_bounded() {
        let mut r = ResponseReader::new(64, BODY_MAX);
        let mut body = Vec::new();
        r.feed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;",
            &mut body,
        )
        .unwrap();
        assert_eq!(
            r.feed(&[b'e'; 100], &mut body),
            Err(HttpError::ChunkLineTooLong(64))
        );
        let mut r = ResponseReader::new(64, BODY_MAX);
        r.feed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
            &mut body,
        )
        .unwrap();
        let mut last = Ok(Progress::Body);
        for _ in 0..10 {
            last = r.feed(b"X-T: 1\r\n", &mut body);
        }
        assert_eq!(last, Err(HttpError::TrailersTooLarge(64)));
    }

    #[test]
    fn body_size_is_bounded() {
        let max = 16;
        let feed_all = |input: &[u8], eof: bool| {
            let mut r = ResponseReader::new(HEAD_MAX, max);
            let mut body = Vec::new();
            let mut last = Ok(Progress::HeadPending);
            for b in input.chunks(3) {
                last = r.feed(b, &mut body);
            }
            if eof && last.is_ok() {
                last = r.eof().map(|()| Progress::Complete);
            }
            (last, body.len(), r.head().map(|h| h.status))
        };
        let exact = "x".repeat(max);
        let over = "x".repeat(max + 1);
        let too_large = Err(HttpError::BodyTooLarge(max));
        // Chunked: exactly the limit passes, one byte more fails, whether in one chunk or two.
        let c = |chunks: &[&str]| {
            chunked(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                chunks,
            )
        };
        assert_eq!(feed_all(&c(&[&exact]), true).0, Ok(Progress::Complete));
        assert_eq!(
            feed_all(&c(&[&exact[1..], "y"]), true).0,
            Ok(Progress::Complete)
        );
        assert_eq!(feed_all(&c(&[&over]), true).0, too_large);
        assert_eq!(feed_all(&c(&[&exact, "y"]), true).0, too_large);
        // Content-Length over the limit fails at once, with the head still there.
        let cl = |n: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
        assert_eq!(
            feed_all(cl(max + 1).as_bytes(), false),
            (too_large.clone(), 0, Some(200))
        );
        assert_eq!(
            feed_all(format!("{}{exact}", cl(max)).as_bytes(), true).0,
            Ok(Progress::Complete)
        );
        // Close-delimited: counted as it arrives.
        let close = "HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(
            feed_all(format!("{close}{exact}").as_bytes(), true).0,
            Ok(Progress::Complete)
        );
        assert_eq!(
            feed_all(format!("{close}{over}").as_bytes(), true).0,
            too_large
        );
        assert_eq!(
            HttpError::BodyTooLarge(65536).to_string(),
            "body larger than 65536 bytes"
        );
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: mutate a realistic response and feed it in odd pieces.
        let base = chunked(OPENAI_HEAD, OPENAI_EVENTS);
        let mut seed: u32 = 0x2545_f491;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..2000 {
            let mut input = base.clone();
            for _ in 0..(next() % 4) {
                let i = usize::try_from(next()).unwrap() % input.len();
                input[i] = u8::try_from(next() % 256).unwrap();
            }
            let mut r = ResponseReader::new(512, 512);
            let mut body = Vec::new();
            let mut rest: &[u8] = &input;
            while !rest.is_empty() {
                let n = (usize::try_from(next()).unwrap() % 17).min(rest.len());
                let (a, b) = rest.split_at(n);
                let _ = r.feed(a, &mut body);
                rest = b;
            }
            let _ = r.eof();
            assert!(body.len() <= 512);
        }
    }

    #[test]
    fn request_is_well_formed() {
        let got = request(
            "POST",
            "api.example.com:8443",
            "/v1/chat/completions",
            &[
                ("Authorization", "Bearer sk-123\n"),
                ("Content-Type", "application/json"),
            ],
            b"{\"stream\":true}",
        );
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "POST /v1/chat/completions HTTP/1.1\r\nHost: api.example.com:8443\r\n\
             Content-Length: 15\r\nConnection: close\r\nAuthorization: Bearer sk-123\r\n\
             Content-Type: application/json\r\n\r\n{\"stream\":true}"
        );
        let got = request("GET", "localhost", "", &[], b"");
        assert_eq!(
            got,
            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn request_cannot_be_injected() {
        let got = request(
            "POST",
            "h\r\nX-Evil: 1",
            "/a b\r\n",
            &[
                ("X-A", "one\r\nX-Evil: 2"),
                ("Bad:\r\nName", "v"),
                ("\r\n", "dropped"),
                ("content-length", "999"),
                ("Connection", "keep-alive"),
                ("Host", "other"),
                ("Transfer-Encoding", "chunked"),
            ],
            b"",
        );
        let text = String::from_utf8(got).unwrap();
        assert_eq!(
            text,
            "POST /ab HTTP/1.1\r\nHost: hX-Evil:1\r\nContent-Length: 0\r\n\
             Connection: close\r\nX-A: one  X-Evil: 2\r\nBadName: v\r\n\r\n"
        );
        // And it parses as one request with exactly those fields.
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(text.as_bytes()).unwrap().is_complete());
        assert_eq!(req.headers.len(), 5);
    }
}
