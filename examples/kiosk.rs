//! A kiosk help desk: straycat used as a library, with an agent of its own that answers
//! visitors' questions (opening hours, toilets, Wi-Fi, …) from a small built-in table.
//!
//! ```text
//! cargo run --example kiosk                                 # listens on 127.0.0.1:1865
//! cargo run --example kiosk -- --listen 0.0.0.0:8080 --api-key s3cret
//! cargo run --example kiosk -- --help                       # every straycat option works
//! cargo run --example chat -- ws://127.0.0.1:1865/ws/alice  # then ask "where are the toilets?"
//! ```
//!
//! What a vendor's own agent does here: match the question to a topic by keywords, send a
//! `notification` while it "looks it up", stream the answer word by word as `chat_token`
//! previews, mention when the visitor asked the same thing earlier (from the history the
//! session hands it), and send the visitor to staff when it has no answer. Every pause goes
//! through `TurnOutput::sleep`, so a turn that times out or is cut short by a shutdown stops at
//! once instead of holding a worker thread.
//!
//! The program around it is what a vendor's `main` needs: straycat's options (with a
//! loopback default), SIGTERM/SIGINT for a graceful stop, and systemd's readiness and
//! watchdog notifications, so it can replace `ExecStart=` of cross/straycat.service.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use straycat::agent::Who;
use straycat::config::{self, Command};
use straycat::systemd;
use straycat::{Agent, AgentError, Server, Turn, TurnOutput};

/// The kiosk's browser runs on the same device, so by default the chat is not offered to the
/// network at all (straycat has no TLS); `--listen` opens it up deliberately.
const DEFAULT_LISTEN: &str = "127.0.0.1:1865";

/// Pause that stands in for a real look-up (a database, a booking system), so the kiosk UI
/// has time to show the notification.
const LOOKUP_DELAY: Duration = Duration::from_millis(400);

/// Pause between streamed words: fast enough to read along, slow enough to look typed.
const WORD_DELAY: Duration = Duration::from_millis(60);

/// One thing the help desk knows about.
#[derive(Debug)]
struct Topic {
    /// How the topic is named in notifications and "you asked me about … earlier".
    name: &'static str,
    /// Lower-case words that point at this topic; a word of four letters or more also
    /// matches longer words it starts (`toilet` matches `toilets`).
    keywords: &'static [&'static str],
    /// The reply, single-spaced so that the streamed words add up to it exactly.
    answer: &'static str,
    /// Whether answering means looking something up: a notification and a pause first, and
    /// a reminder when the visitor asks again. Small talk (hello, thanks) is answered at once.
    looked_up: bool,
}

/// The help desk's table. On a tie the earlier topic wins, so small talk comes last: "can you
/// help me find the toilets" is about the toilets.
const TOPICS: &[Topic] = &[
    Topic {
        name: "opening hours",
        keywords: &[
            "open", "opening", "hours", "close", "closing", "closed", "when",
        ],
        answer: "We are open Monday to Friday from 9:00 to 19:00 and on Saturday from 10:00 to \
                 17:00. We are closed on Sundays and public holidays.",
        looked_up: true,
    },
    Topic {
        name: "the toilets",
        keywords: &["toilet", "restroom", "bathroom", "washroom", "loo", "wc"],
        answer: "The toilets are on the ground floor, behind the lifts. The accessible toilet \
                 is next to the main entrance.",
        looked_up: true,
    },
    Topic {
        name: "the Wi-Fi",
        keywords: &[
            "wifi", "wireless", "internet", "password", "network", "online",
        ],
        answer: "Join the network \"Kiosk-Guest\" with the password \"cheshire-cat\". It is \
                 free, and you may need to accept the terms in your browser.",
        looked_up: true,
    },
    Topic {
        name: "the café",
        keywords: &[
            "cafe", "café", "coffee", "tea", "food", "eat", "drink", "lunch", "snack",
        ],
        answer: "The café is on the first floor, next to the reading room. It serves hot \
                 drinks, sandwiches and cakes until 30 minutes before closing.",
        looked_up: true,
    },
    Topic {
        name: "lost property",
        keywords: &[
            "lost", "lose", "found", "missing", "property", "forgot", "left",
        ],
        answer: "Lost property is kept at the information desk by the main entrance for 30 \
                 days. Bring an ID to collect it.",
        looked_up: true,
    },
    Topic {
        name: "the lifts",
        keywords: &[
            "lift",
            "elevator",
            "wheelchair",
            "accessible",
            "stairs",
            "pram",
            "stroller",
        ],
        answer: "There are two lifts in the main hall, to the left of this kiosk. Every floor \
                 is step-free, and wheelchairs can be borrowed at the information desk.",
        looked_up: true,
    },
    Topic {
        name: "parking",
        keywords: &["parking", "park", "car", "bike", "bicycle"],
        answer: "The car park is behind the building, entrance on Mill Street: the first two \
                 hours are free. Bicycle racks are by the main entrance.",
        looked_up: true,
    },
    Topic {
        name: "thanks",
        keywords: &["thanks", "thank", "thx", "cheers"],
        answer: "You're welcome! Is there anything else I can help you with?",
        looked_up: false,
    },
    Topic {
        name: "what I can help with",
        keywords: &["hello", "hi", "hey", "help"],
        answer: "Hello! I am the help desk kiosk. Ask me about opening hours, the toilets, the \
                 Wi-Fi, the café, lost property, the lifts or parking.",
        looked_up: false,
    },
];

/// The reply when no topic matches: a kiosk must never leave a visitor without a next step.
const DONT_KNOW: &str = "I'm sorry, I don't know the answer to that. Please ask a member of \
                         staff at the information desk by the main entrance: they will be \
                         happy to help.";

/// The help desk agent: one value serves every visitor from every worker thread.
#[derive(Debug)]
struct HelpDesk {
    /// What it knows.
    topics: &'static [Topic],
    /// See [`LOOKUP_DELAY`]; zero in tests.
    lookup_delay: Duration,
    /// See [`WORD_DELAY`]; zero in tests.
    word_delay: Duration,
}

impl HelpDesk {
    /// The help desk with the built-in table and the pauses a visitor sees.
    fn new() -> HelpDesk {
        HelpDesk {
            topics: TOPICS,
            lookup_delay: LOOKUP_DELAY,
            word_delay: WORD_DELAY,
        }
    }

    /// The topic whose keywords match most words of `text`, if any matches at all.
    fn lookup(&self, text: &str) -> Option<&'static Topic> {
        let words = words(text);
        let mut best: Option<(usize, &'static Topic)> = None;
        for topic in self.topics {
            let score = words
                .iter()
                .filter(|w| topic.keywords.iter().any(|k| matches_keyword(w, k)))
                .count();
            // Strictly greater: on a tie the earlier topic in the table keeps the place.
            if score > 0 && best.is_none_or(|(s, _)| score > s) {
                best = Some((score, topic));
            }
        }
        best.map(|(_, topic)| topic)
    }

    /// Whether the visitor already asked about `topic` in this session.
    fn asked_before(&self, turn: &Turn, topic: &Topic) -> bool {
        turn.history
            .iter()
            .filter(|line| line.who == Who::Human)
            .any(|line| {
                self.lookup(&line.text)
                    .is_some_and(|t| t.name == topic.name)
            })
    }

    /// Streams `reply` one word at a time. Cheshire Cat clients concatenate `chat_token`
    /// contents (a language model's tokens carry their own spaces), so each word keeps the
    /// space after it and the tokens add up to the reply exactly.
    fn stream(&self, reply: &str, out: &mut TurnOutput) -> Result<(), AgentError> {
        for word in reply.split_inclusive(' ') {
            out.sleep(self.word_delay)?;
            out.token(word)?;
        }
        Ok(())
    }
}

impl Agent for HelpDesk {
    fn name(&self) -> &str {
        "kiosk-help-desk"
    }

    fn answer(&self, turn: &Turn, out: &mut TurnOutput) -> Result<String, AgentError> {
        let reply = match self.lookup(&turn.text) {
            Some(topic) if !topic.looked_up => topic.answer.to_string(),
            Some(topic) => {
                out.notify(&format!("Looking up {}…", topic.name))?;
                // `?` on every pause: a cancelled turn (timeout, shutdown) ends here with
                // `Err(Cancelled)` and nothing more is sent for it.
                out.sleep(self.lookup_delay)?;
                if self.asked_before(turn, topic) {
                    format!(
                        "You asked me about {} earlier, so here it is again: {}",
                        topic.name, topic.answer
                    )
                } else {
                    topic.answer.to_string()
                }
            }
            None => DONT_KNOW.to_string(),
        };
        self.stream(&reply, out)?;
        Ok(reply)
    }
}

/// The lower-case words of `text`. Hyphens and apostrophes are dropped first, so "Wi-Fi"
/// is `wifi` and "where's" one word rather than a stray `s`.
fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .replace(['-', '\'', '’'], "")
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether `word` is `keyword`, or a longer form of a keyword long enough not to match by
/// accident (`toilet` in `toilets`, but not `car` in `card`).
fn matches_keyword(word: &str, keyword: &str) -> bool {
    word == keyword || (keyword.chars().count() >= 4 && word.starts_with(keyword))
}

fn main() -> ExitCode {
    // The kiosk's default address goes in as the lowest layer, under STRAYCAT_LISTEN and
    // --listen, so both still win over it exactly as they do for the straycat binary.
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .or_else(|| (name == "STRAYCAT_LISTEN").then(|| DEFAULT_LISTEN.to_string()))
    };
    let config = match config::parse(std::env::args().skip(1), env) {
        Ok(Command::Run(c)) => *c,
        Ok(Command::Help) => {
            println!(
                "kiosk: the straycat help desk example. It takes straycat's options; --listen \
                 defaults to {DEFAULT_LISTEN}.\n"
            );
            print!("{}", config::help_text());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("kiosk (straycat {})", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::Token { .. }) => {
            eprintln!("kiosk: tokens are made by `straycat token`");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("kiosk: {e}");
            return ExitCode::from(2);
        }
    };
    straycat::logging::init(&config.log_level);

    let listen = config.listen;
    let server = match Server::bind(config, Arc::new(HelpDesk::new())) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiosk: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Under a `Type=notify` unit with `WatchdogSec=` (like cross/straycat.service, with
    // ExecStart= pointed here) systemd waits for READY=1 and kills a silent loop; outside
    // systemd NOTIFY_SOCKET is unset and this does nothing.
    let server = server.with_systemd(systemd::notifier(), systemd::watchdog_interval());

    // SIGTERM or SIGINT asks the loop to stop: it closes every socket with 1001 and `run`
    // returns.
    if let Err(e) = server.shutdown_handle().on_termination_signals() {
        eprintln!("kiosk: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }

    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiosk: event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use std::sync::mpsc;
    use straycat::UserId;
    use straycat::agent::{CancelToken, HistoryEntry, Stream};

    /// The help desk without pauses, so tests run in microseconds.
    fn desk() -> HelpDesk {
        HelpDesk {
            topics: TOPICS,
            lookup_delay: Duration::ZERO,
            word_delay: Duration::ZERO,
        }
    }

    /// A turn of `text` after the history `earlier` (user lines and replies alternating,
    /// user first, as the session hands them over).
    fn turn(text: &str, earlier: &[&str]) -> Turn {
        let history = earlier
            .iter()
            .enumerate()
            .map(|(i, line)| HistoryEntry {
                who: if i % 2 == 0 { Who::Human } else { Who::Ai },
                text: (*line).into(),
            })
            .collect();
        Turn {
            user: UserId::parse("alice").expect("a valid user id"),
            text: text.into(),
            fields: Map::new(),
            history,
        }
    }

    /// Runs one turn; returns the reply and everything streamed before it.
    fn ask(agent: &HelpDesk, turn: &Turn) -> (Result<String, AgentError>, Vec<Stream>) {
        let (tx, rx) = mpsc::channel();
        let mut out = TurnOutput::new(CancelToken::new(), Box::new(move |s| drop(tx.send(s))));
        let reply = agent.answer(turn, &mut out);
        drop(out);
        (reply, rx.iter().collect())
    }

    fn topic_of(text: &str) -> Option<&'static str> {
        desk().lookup(text).map(|t| t.name)
    }

    /// The table's answer for the topic called `name`.
    fn answer_of(name: &str) -> &'static str {
        let topic = TOPICS.iter().find(|t| t.name == name);
        topic.expect("a topic of the table").answer
    }

    #[test]
    fn questions_find_their_topic() {
        assert_eq!(topic_of("When do you open?"), Some("opening hours"));
        assert_eq!(topic_of("Where are the TOILETS"), Some("the toilets"));
        assert_eq!(topic_of("what's the wi-fi password"), Some("the Wi-Fi"));
        assert_eq!(topic_of("Is there a café?"), Some("the café"));
        assert_eq!(topic_of("I lost my scarf"), Some("lost property"));
        assert_eq!(topic_of("where can I park my car"), Some("parking"));
        assert_eq!(topic_of("hello"), Some("what I can help with"));
        assert_eq!(topic_of("Thank you!"), Some("thanks"));
        // "what" is in no keyword list: an open question is not a greeting.
        assert_eq!(topic_of("What is the meaning of life?"), None);
    }

    #[test]
    fn the_topic_matching_most_words_wins_and_ties_go_to_the_table_order() {
        // "help" (greeting) against "toilets": a tie, and the toilets come first.
        assert_eq!(
            topic_of("can you help me find the toilets"),
            Some("the toilets")
        );
        // "when" and "open" (hours) outweigh "coffee" (café).
        assert_eq!(
            topic_of("when does the coffee place open"),
            Some("opening hours")
        );
        // A short keyword only matches whole words: "card" is not "car".
        assert_eq!(topic_of("my card"), None);
    }

    #[test]
    fn a_known_question_notifies_then_streams_the_answer_word_by_word() {
        let (reply, streamed) = ask(&desk(), &turn("Where are the toilets?", &[]));
        let reply = reply.expect("an answer");
        assert_eq!(reply, answer_of("the toilets"));
        assert_eq!(
            streamed[0],
            Stream::Notification("Looking up the toilets…".into())
        );
        let tokens: Vec<&str> = streamed[1..]
            .iter()
            .map(|s| match s {
                Stream::Token(t) => t.as_str(),
                other => panic!("expected only tokens after the notification, got {other:?}"),
            })
            .collect();
        assert_eq!(tokens.len(), reply.split(' ').count());
        assert!(tokens[..tokens.len() - 1].iter().all(|t| t.ends_with(' ')));
        assert_eq!(tokens.concat(), reply);
    }

    #[test]
    fn small_talk_is_answered_without_looking_anything_up() {
        let earlier = ["hi", answer_of("what I can help with")];
        let (reply, streamed) = ask(&desk(), &turn("hello again", &earlier));
        // No notification, and no "you asked me about … earlier" for a second hello.
        assert_eq!(reply.as_deref(), Ok(answer_of("what I can help with")));
        assert!(streamed.iter().all(|s| matches!(s, Stream::Token(_))));
    }

    #[test]
    fn an_unknown_question_sends_the_visitor_to_staff_without_looking_anything_up() {
        for question in ["What is the meaning of life?", "", "   ?!"] {
            let (reply, streamed) = ask(&desk(), &turn(question, &[]));
            assert_eq!(reply.as_deref(), Ok(DONT_KNOW));
            assert!(streamed.iter().all(|s| matches!(s, Stream::Token(_))));
        }
    }

    #[test]
    fn a_repeated_question_is_recognised_from_the_history() {
        let earlier = ["what's the wifi password?", answer_of("the Wi-Fi")];
        let (reply, _) = ask(&desk(), &turn("wi-fi please", &earlier));
        let reply = reply.expect("an answer");
        assert!(
            reply.starts_with("You asked me about the Wi-Fi earlier"),
            "{reply}"
        );
        assert!(reply.ends_with(answer_of("the Wi-Fi")));
        // Only the visitor's lines count: the agent mentioning the café is not a question.
        let earlier = ["hello", answer_of("what I can help with")];
        let (reply, _) = ask(&desk(), &turn("is the cafe open for lunch?", &earlier));
        assert_eq!(reply.as_deref(), Ok(answer_of("the café")));
    }

    #[test]
    fn a_cancelled_turn_stops_without_a_reply() {
        let cancel = CancelToken::new();
        cancel.cancel();
        let mut out = TurnOutput::new(cancel, Box::new(|_| {}));
        let got = desk().answer(&turn("opening hours?", &[]), &mut out);
        assert_eq!(got, Err(AgentError::Cancelled));
    }

    #[test]
    fn cancel_wakes_the_help_desk_while_it_looks_up() {
        let cancel = CancelToken::new();
        let mut out = TurnOutput::new(cancel.clone(), Box::new(|_| {}));
        let slow = HelpDesk {
            lookup_delay: Duration::from_secs(3600),
            ..desk()
        };
        let t = std::thread::spawn(move || slow.answer(&turn("parking?", &[]), &mut out));
        cancel.cancel();
        assert_eq!(t.join().expect("no panic"), Err(AgentError::Cancelled));
    }
}
