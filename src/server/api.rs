//! The chat part of Cheshire Cat's HTTP API, which its clients call beside the socket:
//! `GET`/`DELETE /memory/conversation_history` answer at once; `POST /message` runs a turn
//! in the user's session and its connection waits (`Stage::Await`) for the final frame.

use super::Server;
use crate::agent::Who;
use crate::conn::ConnId;
use crate::http::{self, Api};
use crate::protocol::{UserId, parse_client_message};
use crate::session::Outgoing;
use log::{debug, info};
use serde_json::{Value, json};

impl Server {
    /// Serves a call of the API; `body` is the request's body (and anything after it).
    pub(super) fn serve_api(&mut self, id: ConnId, api: Api, user: UserId, body: Vec<u8>) {
        let peer = self
            .conn(id)
            .map(|c| c.peer().to_string())
            .unwrap_or_default();
        match api {
            Api::History => {
                debug!("user={user} peer={peer} GET /memory/conversation_history");
                let history: Vec<Value> = self
                    .sessions
                    .history(&user)
                    .iter()
                    .map(|(h, when)| {
                        let who = match h.who {
                            Who::Human => "Human",
                            Who::Ai => "AI",
                        };
                        json!({"who": who, "role": who, "message": &*h.text,
                            "content": &*h.text, "when": when, "why": {}})
                    })
                    .collect();
                let body = json!({ "history": history }).to_string();
                self.answer(id, http::response(200, "application/json", &body), None);
            }
            Api::ForgetHistory => {
                info!("user={user} peer={peer} forgot the conversation history (DELETE)");
                self.sessions.forget_history(&user);
                let body = json!({ "deleted": true }).to_string();
                self.answer(id, http::response(200, "application/json", &body), None);
            }
            Api::Message => {
                let msg = std::str::from_utf8(&body)
                    .map_err(|_| "the body is not UTF-8".to_string())
                    .and_then(|text| parse_client_message(text).map_err(|e| e.0));
                let msg = match msg {
                    Ok(m) => m,
                    Err(why) => {
                        info!("user={user} peer={peer} POST /message refused with 400: {why}");
                        self.metrics.refused(400);
                        let body = json!({ "detail": why }).to_string();
                        self.answer(id, http::response(400, "application/json", &body), None);
                        return;
                    }
                };
                let now = self.now;
                if !self
                    .sessions
                    .http_message(id, &user, msg, now, &mut self.effects)
                {
                    let why = "too many sessions";
                    info!("user={user} peer={peer} POST /message refused with 503: {why}");
                    self.refuse(id, 503, why);
                    return;
                }
                // The answer comes through the session table; until then the connection
                // waits, at most for every turn that may be ahead of it.
                let turns = self.config.max_queued_turns as u32 + 1;
                let deadline = now.mono + self.config.turn_timeout * turns;
                if let Some(conn) = self.conn(id) {
                    conn.await_answer(deadline);
                }
                self.schedule_conn(id, deadline);
                self.apply_effects();
            }
        }
    }

    /// The frame that answers a `POST /message`: its JSON is the body, its kind the status.
    pub(super) fn answer_frame(&mut self, id: ConnId, frame: Outgoing) {
        self.metrics.frame_sent(frame.seq, frame.text.as_str());
        let v: Value = serde_json::from_str(frame.text.as_str()).unwrap_or_default();
        let status = match (v["type"].as_str(), v["name"].as_str()) {
            (Some("chat"), _) => 200,
            (_, Some("InvalidMessage")) => 400,
            (_, Some("Busy" | "RateLimited")) => 429,
            (_, Some("ResumeGap")) => 410,
            (_, Some("Timeout")) => 504,
            _ => 502,
        };
        let mut answer = http::response(status, "application/json", frame.text.as_str());
        if v["name"] == "RateLimited" {
            // The bucket is empty: one message is allowed again after 60 s / the limit.
            let per_minute = u64::from(self.config.max_messages_per_minute.max(1));
            let wait = std::time::Duration::from_millis(60_000u64.div_ceil(per_minute));
            answer = http::with_retry_after(answer, wait);
        }
        self.answer(id, answer, None);
    }

    /// A waiting request hung up, or waited too long: its reply is only held.
    pub(super) fn end_wait(&mut self, id: ConnId, timed_out: bool) {
        self.sessions.forget_waiter(id);
        if timed_out {
            let body = json!({ "detail": "no answer in time; the reply will be held" });
            self.answer(
                id,
                http::response(504, "application/json", &body.to_string()),
                None,
            );
        } else {
            self.remove(id, "left before its answer");
        }
    }
}
