//! The built-in echo agent: streams the message back piece by piece, then echoes the whole
//! text. It stands in for a slow language model in tests and demos (`--echo-delay-ms`).
//!
//! Each token carries the whitespace before its word (`"hello"`, `" there"`), so tokens
//! concatenated give the text, as Cheshire Cat's LLM tokens do.

use super::{Agent, AgentError, PolledAgent, Step, Task, TaskCtx, Turn, TurnOutput};
use mio::Registry;
use std::time::{Duration, Instant};

/// The pieces the echo agent streams for `text`: each word with the whitespace before it,
/// the trailing whitespace on the last one. Empty for a text with no word.
pub fn pieces(text: &str) -> Vec<&str> {
    let mut cuts = Vec::new();
    let (mut prev_space, mut words) = (true, false);
    for (i, c) in text.char_indices() {
        let space = c.is_whitespace();
        if space && !prev_space {
            cuts.push(i);
        }
        prev_space = space;
        words |= !space;
    }
    if !words {
        return Vec::new();
    }
    if prev_space {
        // Only whitespace after the last word: it stays with that word.
        cuts.pop();
    }
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts {
        out.push(&text[start..cut]);
        start = cut;
    }
    out.push(&text[start..]);
    out
}

/// The echo agent on a worker thread (for embedders that want the blocking form).
#[derive(Clone, Debug, Default)]
pub struct EchoAgent {
    /// Pause before each piece.
    pub delay: Duration,
}

impl Agent for EchoAgent {
    fn name(&self) -> &str {
        "echo"
    }

    fn answer(&self, turn: &Turn, out: &mut TurnOutput) -> Result<String, AgentError> {
        for piece in pieces(&turn.text) {
            if !self.delay.is_zero() {
                out.sleep(self.delay)?;
            }
            out.token(piece)?;
        }
        Ok(turn.text.clone())
    }
}

/// The echo agent driven by the event loop: its pauses are timers, so a thousand users
/// waiting on `--echo-delay-ms` hold no thread. What the server runs by default.
#[derive(Clone, Debug, Default)]
pub struct PolledEcho {
    /// Pause before each piece.
    pub delay: Duration,
}

impl PolledAgent for PolledEcho {
    fn name(&self) -> &str {
        "echo"
    }

    fn start(&self, turn: Turn, now: Instant) -> Box<dyn Task> {
        // The cuts are found once: finding them again at every wake-up made a long message
        // cost quadratic time (the abuse soak found 75% of the CPU there).
        let ends = pieces(&turn.text)
            .iter()
            .map(|p| p.as_ptr() as usize - turn.text.as_ptr() as usize + p.len())
            .collect();
        Box::new(EchoTask {
            text: turn.text,
            ends,
            sent: 0,
            delay: self.delay,
            next_at: now + self.delay,
        })
    }
}

/// One echo turn: which pieces are out, and when the next one is due.
struct EchoTask {
    text: String,
    /// Where each piece ends in `text` (a piece starts where the one before ended).
    ends: Vec<usize>,
    /// Pieces sent so far.
    sent: usize,
    delay: Duration,
    next_at: Instant,
}

impl EchoTask {
    /// Sends what is due; the reply once every piece is out.
    fn advance(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        while let Some(&end) = self.ends.get(self.sent) {
            if !self.delay.is_zero() && ctx.now() < self.next_at {
                return Step::Pending;
            }
            let start = self.sent.checked_sub(1).map_or(0, |i| self.ends[i]);
            ctx.token_text(self.text[start..end].to_string());
            self.sent += 1;
            self.next_at = ctx.now() + self.delay;
        }
        Step::Done(Ok(std::mem::take(&mut self.text)))
    }
}

impl Task for EchoTask {
    fn start(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        self.advance(ctx)
    }

    fn ready(&mut self, _: usize, _: bool, _: bool, ctx: &mut TaskCtx<'_>) -> Step {
        self.advance(ctx)
    }

    fn timeout(&mut self, ctx: &mut TaskCtx<'_>) -> Step {
        self.advance(ctx)
    }

    fn poll_at(&self) -> Option<Instant> {
        (!self.delay.is_zero()).then_some(self.next_at)
    }

    fn abort(&mut self, _: &Registry) {}
}

#[cfg(test)]
mod tests {
    use super::super::{CancelToken, Stream};
    use super::*;
    use crate::protocol::UserId;
    use serde_json::Map;
    use std::sync::mpsc;

    fn turn(text: &str) -> Turn {
        Turn {
            user: UserId::default_user(),
            text: text.into(),
            fields: Map::new(),
            history: vec![],
        }
    }

    #[test]
    fn pieces_carry_their_leading_space_and_join_to_the_text() {
        assert_eq!(pieces("hello there"), ["hello", " there"]);
        assert_eq!(pieces("hello  big world"), ["hello", "  big", " world"]);
        assert_eq!(pieces("  hi \n"), ["  hi \n"]);
        assert_eq!(pieces("héllo 世界 🐈"), ["héllo", " 世界", " 🐈"]);
        assert!(pieces("   ").is_empty());
        assert!(pieces("").is_empty());
        for text in ["a b  c ", " x", "one\ttwo\nthree"] {
            assert_eq!(pieces(text).concat(), text);
        }
    }

    #[test]
    fn echo_streams_pieces_then_replies() {
        let (tx, rx) = mpsc::channel();
        let mut out = TurnOutput::new(CancelToken::new(), Box::new(move |s| drop(tx.send(s))));
        let reply = EchoAgent::default()
            .answer(&turn("hello  big world"), &mut out)
            .unwrap();
        assert_eq!(reply, "hello  big world");
        drop(out);
        let got: Vec<Stream> = rx.iter().collect();
        assert_eq!(
            got,
            ["hello", "  big", " world"].map(|w| Stream::Token(w.into()))
        );
    }

    #[test]
    fn cancel_wakes_a_sleeping_agent() {
        let cancel = CancelToken::new();
        let mut out = TurnOutput::new(cancel.clone(), Box::new(|_| {}));
        let agent = EchoAgent {
            delay: Duration::from_secs(3600),
        };
        let t = std::thread::spawn(move || agent.answer(&turn("a b"), &mut out));
        cancel.cancel();
        assert_eq!(t.join().unwrap(), Err(AgentError::Cancelled));
    }

    #[test]
    fn the_polled_echo_sends_one_piece_per_delay_on_a_fake_clock() {
        let poll = mio::Poll::new().unwrap();
        let t0 = Instant::now();
        let d = Duration::from_millis(50);
        let mut task = PolledEcho { delay: d }.start(turn("a b c"), t0);
        let mut out = Vec::new();
        fn at<'a>(poll: &'a mio::Poll, now: Instant, out: &'a mut Vec<Stream>) -> TaskCtx<'a> {
            TaskCtx::new(poll.registry(), 0, now, out)
        }
        assert_eq!(task.start(&mut at(&poll, t0, &mut out)), Step::Pending);
        assert!(out.is_empty(), "the first piece comes after one delay");
        assert_eq!(task.poll_at(), Some(t0 + d));
        assert_eq!(
            task.timeout(&mut at(&poll, t0 + d, &mut out)),
            Step::Pending
        );
        assert_eq!(
            task.timeout(&mut at(&poll, t0 + 2 * d, &mut out)),
            Step::Pending
        );
        let last = task.timeout(&mut at(&poll, t0 + 3 * d, &mut out));
        assert_eq!(last, Step::Done(Ok("a b c".into())));
        assert_eq!(out, ["a", " b", " c"].map(|w| Stream::Token(w.into())));
        // Without a delay, the whole answer comes at once.
        let mut task = PolledEcho::default().start(turn("x y"), t0);
        assert_eq!(
            task.start(&mut at(&poll, t0, &mut out)),
            Step::Done(Ok("x y".into()))
        );
    }
}
