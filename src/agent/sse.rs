//! A server-sent events decoder (the `text/event-stream` format of the WHATWG HTML
//! standard, "Server-sent events", §9.2.6 "Event stream interpretation"), sans I/O.
//!
//! Streaming model APIs answer with such a stream; the agent feeds the decoded HTTP body to
//! [`SseDecoder::feed`] in whatever pieces it arrived and gets whole [`Event`]s back. Bytes
//! may be split anywhere, even inside a line end or a UTF-8 character, and every buffer is
//! bounded by the caller's limit.
//!
//! Deliberate departures from the standard, none of which a model API relies on:
//! - `id` and `retry` are ignored like unknown fields: there is no reconnection here, so
//!   the last event id and the reconnection time have no use.
//! - Invalid UTF-8 is an error, not U+FFFD (see [`SseError::InvalidUtf8`]).

use std::fmt;

/// The UTF-8 byte order mark, which the standard says to skip at the start of a stream.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field; `None` when absent or empty, which the standard calls `message`.
    /// Kept apart from the data because some APIs (Anthropic's) name the kind of event here.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`, for a model API usually one JSON document or
    /// `[DONE]`.
    pub data: String,
}

/// Why a stream could not be decoded; its `Display` is meant for the user, as the reason a
/// turn failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SseError {
    /// A line (without its line end) is longer than this limit.
    LineTooLong(usize),
    /// An event's data is larger than this limit.
    EventTooLarge(usize),
    /// A line is not valid UTF-8. The standard would replace the bad bytes with U+FFFD, but
    /// the data here is JSON from an API that always sends UTF-8: bad bytes mean a broken
    /// stream or the wrong decoding upstream, and passing replacement characters on to the
    /// user as if they were the answer would hide that.
    InvalidUtf8,
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LineTooLong(n) => write!(f, "event stream line longer than {n} bytes"),
            Self::EventTooLarge(n) => write!(f, "event stream event larger than {n} bytes"),
            Self::InvalidUtf8 => f.write_str("the event stream is not valid UTF-8"),
        }
    }
}

impl std::error::Error for SseError {}

/// Decodes one event stream. Feed it the body bytes as they arrive; call
/// [`finish`](Self::finish) at the end of the stream (or to reuse it for another).
#[derive(Debug)]
pub struct SseDecoder {
    max_event_bytes: usize,
    /// The current line's bytes, decoded only once the line is complete so that a UTF-8
    /// character split across feeds is whole by then.
    line: Vec<u8>,
    /// The data buffer: each `data` value followed by `\n`, as the standard keeps it.
    data: String,
    /// The event type buffer.
    event: String,
    /// The previous feed ended with a CR: an LF first in this one belongs to that line end.
    after_cr: bool,
    /// Bytes of the BOM matched so far at the start of the stream.
    bom_matched: usize,
    /// The start of the stream has been checked for a BOM.
    bom_done: bool,
    /// Kept so that every later feed reports the first error instead of misreading the rest.
    failed: Option<SseError>,
}

impl SseDecoder {
    /// A decoder for one stream. `max_event_bytes` bounds each line (field name included)
    /// and each event's data, so a stream that never ends a line or an event costs at most
    /// about twice that in memory.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            line: Vec::new(),
            data: String::new(),
            event: String::new(),
            after_cr: false,
            bom_matched: 0,
            bom_done: false,
            failed: None,
        }
    }

    /// Consumes all of `bytes`, appending each event completed by them to `out`. After an
    /// error, every later call returns the same error until [`finish`](Self::finish).
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.feed_inner(bytes, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// Ends the stream: an event not yet dispatched by an empty line, and a last line
    /// without a line end, are dropped, as the standard says. The decoder is then as new,
    /// ready for another stream.
    pub fn finish(&mut self) {
        *self = Self::new(self.max_event_bytes);
    }

    fn feed_inner(&mut self, mut rest: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        if !self.bom_done {
            rest = self.skip_bom(rest);
        }
        while !rest.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if let Some(tail) = rest.strip_prefix(b"\n") {
                    rest = tail;
                    continue;
                }
            }
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.push_line(rest)?;
                return Ok(());
            };
            let Some((line, tail)) = rest.split_at_checked(end) else {
                return Ok(());
            };
            self.push_line(line)?;
            let Some((&terminator, tail)) = tail.split_first() else {
                return Ok(());
            };
            rest = tail;
            if terminator == b'\r' {
                match rest.strip_prefix(b"\n") {
                    Some(tail) => rest = tail,
                    // The LF of a CRLF may come in the next feed; it must not count as an
                    // empty line, which would dispatch the event early.
                    None if rest.is_empty() => self.after_cr = true,
                    None => {}
                }
            }
            self.end_line(out)?;
        }
        Ok(())
    }

    /// Consumes the part of the BOM at the start of `bytes`; returns what follows it. The
    /// BOM can itself be split across feeds, so the bytes matched so far are remembered.
    fn skip_bom<'a>(&mut self, mut bytes: &'a [u8]) -> &'a [u8] {
        while let Some((&b, tail)) = bytes.split_first() {
            if BOM.get(self.bom_matched) == Some(&b) {
                self.bom_matched = self.bom_matched.saturating_add(1);
                bytes = tail;
                if self.bom_matched == BOM.len() {
                    self.bom_done = true;
                    return bytes;
                }
            } else {
                // Not a BOM after all: what looked like its start is line content (invalid
                // UTF-8 on its own, which the line's decoding will report).
                self.bom_done = true;
                let matched = BOM.get(..self.bom_matched).unwrap_or_default();
                self.line.extend_from_slice(matched);
                return bytes;
            }
        }
        bytes
    }

    fn push_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len().saturating_add(bytes.len()) > self.max_event_bytes {
            return Err(SseError::LineTooLong(self.max_event_bytes));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// Interprets the complete line in `self.line`.
    fn end_line(&mut self, out: &mut Vec<Event>) -> Result<(), SseError> {
        let line = std::mem::take(&mut self.line);
        let text = std::str::from_utf8(&line).map_err(|_| SseError::InvalidUtf8)?;
        if text.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if text.starts_with(':') {
            // A comment, such as the `: keep-alive` servers send to hold the connection open.
            return Ok(());
        }
        let (field, value) = match text.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (text, ""),
        };
        match field {
            "data" => {
                // The size of the data if the event were dispatched now: the previous values
                // with their separators, plus this one.
                if self.data.len().saturating_add(value.len()) > self.max_event_bytes {
                    return Err(SseError::EventTooLarge(self.max_event_bytes));
                }
                self.data.push_str(value);
                self.data.push('\n');
            }
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            _ => {}
        }
        // The line's buffer is handed back so that it is not reallocated for every line.
        self.line = line;
        self.line.clear();
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<Event>) {
        let event = std::mem::take(&mut self.event);
        if self.data.is_empty() {
            // The standard drops an event without data, its type included.
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        out.push(Event {
            event: (!event.is_empty()).then_some(event),
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(pieces: &[&[u8]], max: usize) -> (Vec<Event>, Result<(), SseError>) {
        let mut d = SseDecoder::new(max);
        let mut events = Vec::new();
        for p in pieces {
            if let Err(e) = d.feed(p, &mut events) {
                return (events, Err(e));
            }
        }
        (events, Ok(()))
    }

    /// Decodes `input` whole, split in two at every point, and byte by byte, checks all of
    /// them agree, and returns the events.
    fn same_everywhere(input: &[u8]) -> Vec<Event> {
        let whole = decode(&[input], 4096);
        assert_eq!(whole.1, Ok(()));
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(decode(&[a, b], 4096), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(decode(&bytes, 4096), whole, "byte by byte");
        whole.0
    }

    fn data(s: &str) -> Event {
        Event {
            event: None,
            data: s.to_string(),
        }
    }

    const OPENAI: &str = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
        : keep-alive\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"lo, \"}}]}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"h\u{e9}llo \u{1f408}\"}}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn openai_stream_at_every_split() {
        let events = same_everywhere(OPENAI.as_bytes());
        assert_eq!(events.len(), 6);
        assert!(events.iter().all(|e| e.event.is_none()));
        let text: String = events
            .iter()
            .filter(|e| e.data != "[DONE]")
            .filter_map(|e| {
                let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(text, "Hello, h\u{e9}llo \u{1f408}");
        assert_eq!(events[5], data("[DONE]"));
    }

    #[test]
    fn crlf_and_cr_line_ends_at_every_split() {
        for end in ["\r\n", "\r", "\n"] {
            let input = OPENAI.replace('\n', end);
            assert_eq!(
                same_everywhere(input.as_bytes()),
                same_everywhere(OPENAI.as_bytes()),
                "{end:?}"
            );
        }
        // Mixed in one stream, and a CR ending one feed with the LF starting the next.
        let mixed = "data: a\r\ndata: b\rdata: c\n\r\nevent: e\r\rdata: d\r\n\n";
        assert_eq!(
            same_everywhere(mixed.as_bytes()),
            vec![
                data("a\nb\nc"),
                Event {
                    event: None,
                    data: "d".into()
                }
            ]
        );
        let (events, _) = decode(&[b"data: x\r", b"\n", b"\r", b"\n"], 64);
        assert_eq!(events, vec![data("x")]);
    }

    #[test]
    fn anthropic_style_named_events() {
        let input = "event: message_start\ndata: {\"type\":\"message_start\"}\n\n\
            event: ping\ndata: {\"type\": \"ping\"}\n\n\
            data: unnamed\n\n";
        let events = same_everywhere(input.as_bytes());
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].event.as_deref(), Some("message_start"));
        assert_eq!(events[1].event.as_deref(), Some("ping"));
        // The type does not carry over to the next event.
        assert_eq!(events[2], data("unnamed"));
    }

    #[test]
    fn field_parsing_follows_the_standard() {
        let input = "data:no space\n\n\
            data:  two spaces\n\n\
            data\n\n\
            data:\n\n\
            data: first\ndata: second\ndata\n\n\
            event: lonely\n\n\
            id: 7\nretry: 1000\nfoo: bar\nnocolon\ndata: kept\n\n\
            data: a:b: c\n\n\
            :comment\n: another\ndata: after comments\n\n\
            event\ndata: empty event name\n\n\
            data: pending";
        assert_eq!(
            same_everywhere(input.as_bytes()),
            vec![
                data("no space"),
                data(" two spaces"),
                data(""),
                data(""),
                data("first\nsecond\n"),
                data("kept"),
                data("a:b: c"),
                data("after comments"),
                data("empty event name"),
            ]
        );
    }

    #[test]
    fn bom_is_skipped_only_at_the_start() {
        let input = b"\xEF\xBB\xBFdata: x\n\n\xEF\xBB\xBFdata: y\n\ndata: z\n\n";
        // A BOM later in the stream is U+FEFF, part of a field name nobody knows.
        assert_eq!(same_everywhere(input), vec![data("x"), data("z")]);
        // Half a BOM is not a BOM.
        let (events, result) = decode(&[b"\xEF\xBB", b"data: x\n\n"], 64);
        assert_eq!((events, result), (vec![], Err(SseError::InvalidUtf8)));
    }

    #[test]
    fn split_utf8_is_whole_again() {
        let input = "data: \u{1f408}\u{e9}\u{4e2d}\n\n".as_bytes();
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let (events, result) = decode(&[&input[..i], &input[i..j], &input[j..]], 64);
                assert_eq!(result, Ok(()));
                assert_eq!(events, vec![data("\u{1f408}\u{e9}\u{4e2d}")]);
            }
        }
    }

    #[test]
    fn invalid_utf8_is_an_error_that_sticks() {
        let mut d = SseDecoder::new(64);
        let mut events = Vec::new();
        d.feed(b"data: ok\n\n", &mut events).unwrap();
        assert_eq!(
            d.feed(b"data: \xC3\x28\n\n", &mut events),
            Err(SseError::InvalidUtf8)
        );
        assert_eq!(
            d.feed(b"data: fine\n\n", &mut events),
            Err(SseError::InvalidUtf8)
        );
        assert_eq!(events, vec![data("ok")]);
        assert_eq!(
            SseError::InvalidUtf8.to_string(),
            "the event stream is not valid UTF-8"
        );
        // finish() gives a fresh decoder.
        d.finish();
        d.feed(b"data: again\n\n", &mut events).unwrap();
        assert_eq!(events.last(), Some(&data("again")));
    }

    #[test]
    fn finish_drops_what_was_not_dispatched() {
        let mut d = SseDecoder::new(64);
        let mut events = Vec::new();
        d.feed(b"event: e\ndata: half\ndata: unended", &mut events)
            .unwrap();
        d.finish();
        assert!(events.is_empty());
        // Nothing of the old stream leaks into the next one, and a BOM is skipped again.
        d.feed(b"\xEF\xBB\xBF\ndata: new\n\n", &mut events).unwrap();
        assert_eq!(events, vec![data("new")]);
    }

    #[test]
    fn lines_and_events_are_bounded() {
        let max = 32;
        // A line of exactly the limit passes; one byte more fails, however it arrives.
        let line = format!("data: {}\n\n", "x".repeat(max - 6));
        assert_eq!(decode(&[line.as_bytes()], max).1, Ok(()));
        let long = format!("data: {}\n\n", "x".repeat(max - 5));
        assert_eq!(
            decode(&[long.as_bytes()], max).1,
            Err(SseError::LineTooLong(max))
        );
        let pieces: Vec<&[u8]> = long.as_bytes().chunks(1).collect();
        assert_eq!(decode(&pieces, max).1, Err(SseError::LineTooLong(max)));
        // Comments count too: an endless one would otherwise grow forever.
        let endless = vec![b':'; 1000];
        assert_eq!(decode(&[&endless], max).1, Err(SseError::LineTooLong(max)));
        // The data joined: 3 × 10 bytes + 2 separators = 32 passes, one more line fails.
        let ten = "data: 0123456789\n";
        let three = format!("{ten}{ten}{ten}\n");
        let (events, result) = decode(&[three.as_bytes()], max);
        assert_eq!(result, Ok(()));
        assert_eq!(events[0].data.len(), 32);
        let four = format!("{ten}{ten}{ten}{ten}\n");
        assert_eq!(
            decode(&[four.as_bytes()], max).1,
            Err(SseError::EventTooLarge(max))
        );
        assert_eq!(
            SseError::EventTooLarge(max).to_string(),
            "event stream event larger than 32 bytes"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed: u32 = 0x9e37_79b9;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let alphabet = b"data:event \r\n\xEF\xBB\xBF\xC3\xA9:x";
        for _ in 0..2000 {
            let len = usize::try_from(next() % 64).unwrap();
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[usize::try_from(next()).unwrap() % alphabet.len()])
                .collect();
            let mut d = SseDecoder::new(16);
            let mut events = Vec::new();
            for piece in input.chunks(1 + usize::try_from(next() % 5).unwrap()) {
                let _ = d.feed(piece, &mut events);
            }
            d.finish();
            assert!(events.iter().all(|e| e.data.len() <= 16));
        }
    }
}
