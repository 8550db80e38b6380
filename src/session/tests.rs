//! Unit tests of one session: held frames, replay, ids, queue, timeouts, history, budgets.

use super::*;
use serde_json::{Map, Value};
use std::sync::atomic::Ordering;

const LIMITS: Limits = Limits {
    history_turns: 2,
    max_held_frames: 4,
    max_held_bytes: 1 << 20,
    max_queued_turns: 1,
    turn_timeout: Duration::from_secs(5),
    max_messages_per_minute: 0,
};

fn now(t0: Instant, secs: u64) -> Now {
    Now {
        mono: t0 + Duration::from_secs(secs),
        unix: 1000.0 + secs as f64,
    }
}

/// A client message (shared with the table's tests).
pub(super) fn msg(text: &str, id: Option<&str>) -> ClientMessage {
    ClientMessage {
        text: text.into(),
        id: id.map(String::from),
        fields: Map::new(),
    }
}

/// A frame as JSON.
pub(super) fn json(o: &Outgoing) -> Value {
    serde_json::from_str(o.text.as_str()).unwrap()
}

fn conn(slot: usize, generation: u64) -> ConnId {
    ConnId::new(slot, generation)
}

/// Runs one message to completion with the echo reply.
fn answer(s: &mut Session, text: &str, id: Option<&str>, turn_id: u64, t: Now) -> Outgoing {
    assert!(matches!(
        s.accept(msg(text, id), &LIMITS, t),
        Accepted::Queued
    ));
    s.start_next(turn_id, &LIMITS, t).unwrap();
    s.finish(turn_id, Ok(text.to_uppercase()), &LIMITS, t)
        .unwrap()
}

#[test]
fn held_frames_are_bounded_in_bytes_and_the_newest_always_stays() {
    let t0 = Instant::now();
    // A chat frame carries its 300-byte text three times: about 1.1 KB each.
    let limits = Limits {
        max_held_frames: 100,
        max_held_bytes: 3000,
        ..LIMITS
    };
    let mut s = Session::new(UserId::default_user(), t0);
    let text = "x".repeat(300);
    for turn_id in 1..=5 {
        let t = now(t0, turn_id);
        assert!(matches!(
            s.accept(msg(&text, None), &limits, t),
            Accepted::Queued
        ));
        s.start_next(turn_id, &limits, t).unwrap();
        s.finish(turn_id, Ok(text.clone()), &limits, t).unwrap();
    }
    assert!(s.held_bytes() <= 3000, "{} bytes held", s.held_bytes());
    let (_, frames) = s.attach(conn(0, 1), Some(0), &limits, now(t0, 9));
    let kinds: Vec<(String, u64)> = frames
        .iter()
        .map(|f| {
            let v = json(f);
            let kind = v["name"].as_str().or(v["type"].as_str()).unwrap_or("");
            (kind.to_string(), v["seq"].as_u64().unwrap_or(0))
        })
        .collect();
    assert_eq!(kinds[0].0, "ResumeGap", "{kinds:?}");
    let chats: Vec<u64> = kinds[1..].iter().map(|(_, seq)| *seq).collect();
    assert_eq!(chats, [4, 5], "the two newest fit in 3000 bytes");

    // One frame larger than the bound is still held: the newest always stays.
    let tiny = Limits {
        max_held_bytes: 100,
        ..limits
    };
    let mut s = Session::new(UserId::default_user(), t0);
    assert!(matches!(
        s.accept(msg(&text, None), &tiny, now(t0, 0)),
        Accepted::Queued
    ));
    s.start_next(1, &tiny, now(t0, 0)).unwrap();
    s.finish(1, Ok(text.clone()), &tiny, now(t0, 0)).unwrap();
    let (_, frames) = s.attach(conn(0, 1), Some(0), &tiny, now(t0, 1));
    assert_eq!(frames.len(), 1);
    assert_eq!(json(&frames[0])["seq"].as_u64(), Some(1));
}

#[test]
fn held_bytes_are_counted_in_the_shared_total_until_the_session_goes() {
    let t0 = Instant::now();
    let total = Arc::new(AtomicUsize::new(0));
    let mut a = Session::new(UserId::parse("a").unwrap(), t0);
    a.count_held_in(Arc::clone(&total));
    let mut b = Session::new(UserId::parse("b").unwrap(), t0);
    b.count_held_in(Arc::clone(&total));
    for turn_id in 1..=3 {
        answer(&mut a, "hello", None, turn_id, now(t0, turn_id));
    }
    answer(&mut b, "hi", None, 9, now(t0, 9));
    let sum = a.held_bytes() + b.held_bytes();
    assert_eq!(total.load(Ordering::Relaxed), sum);
    assert_eq!(a.held_frames(), 3);

    // Shedding takes the oldest and never the newest frame.
    assert!(a.shed_oldest());
    assert!(a.shed_oldest());
    assert!(!a.shed_oldest(), "the newest frame stays");
    assert_eq!(a.held_frames(), 1);
    assert_eq!(
        total.load(Ordering::Relaxed),
        a.held_bytes() + b.held_bytes()
    );
    let (_, frames) = a.attach(conn(0, 1), Some(0), &LIMITS, now(t0, 10));
    assert_eq!(json(&frames[0])["name"], "ResumeGap");
    assert_eq!(json(frames.last().unwrap())["seq"], 3);

    drop(a);
    assert_eq!(total.load(Ordering::Relaxed), b.held_bytes());
    drop(b);
    assert_eq!(total.load(Ordering::Relaxed), 0);
}

#[test]
fn history_bytes_are_counted_in_the_shared_total_and_shed_by_turn() {
    let t0 = Instant::now();
    let total = Arc::new(AtomicUsize::new(0));
    let mut s = Session::new(UserId::default_user(), t0);
    s.count_history_in(Arc::clone(&total));
    answer(&mut s, "one", None, 1, now(t0, 1));
    answer(&mut s, "two", None, 2, now(t0, 2));
    // "one" + "ONE" + "two" + "TWO"
    assert_eq!(s.history_bytes(), 12);
    assert_eq!(total.load(Ordering::Relaxed), 12);
    assert!(s.shed_oldest_turn());
    assert_eq!(total.load(Ordering::Relaxed), 6);
    assert!(matches!(
        s.accept(msg("three", None), &LIMITS, now(t0, 3)),
        Accepted::Queued
    ));
    let (turn, _) = s.start_next(3, &LIMITS, now(t0, 3)).unwrap();
    let lines: Vec<&str> = turn.history.iter().map(|h| &*h.text).collect();
    assert_eq!(lines, ["two", "TWO"], "the oldest turn went whole");
    assert!(s.shed_oldest_turn());
    assert!(!s.shed_oldest_turn(), "nothing left to forget");
    assert_eq!(total.load(Ordering::Relaxed), 0);
    s.finish(3, Ok("THREE".into()), &LIMITS, now(t0, 4))
        .unwrap();
    assert_eq!(total.load(Ordering::Relaxed), 10);
    drop(s);
    assert_eq!(total.load(Ordering::Relaxed), 0);
}

#[test]
fn replies_while_away_are_delivered_on_the_next_socket() {
    let t0 = Instant::now();
    let mut s = Session::new(UserId::default_user(), t0);
    assert!(s.attach(conn(0, 1), None, &LIMITS, now(t0, 0)).1.is_empty());
    assert!(matches!(
        s.accept(msg("hi", Some("c-1")), &LIMITS, now(t0, 0)),
        Accepted::Queued
    ));
    let (turn, _) = s.start_next(7, &LIMITS, now(t0, 0)).unwrap();
    assert_eq!(turn.text, "hi");
    assert!(s.detach(conn(0, 1), now(t0, 0)));
    let reply = s.finish(7, Ok("HI".into()), &LIMITS, now(t0, 1)).unwrap();
    assert_eq!(reply.seq, Some(1));
    // A connection in the same slot but a later generation is a different socket.
    let (replaced, frames) = s.attach(conn(0, 2), None, &LIMITS, now(t0, 2));
    assert_eq!(replaced, None);
    assert_eq!(frames.len(), 1);
    let v = json(&frames[0]);
    assert_eq!(
        (
            v["type"].as_str(),
            v["text"].as_str(),
            v["reply_to"].as_str()
        ),
        (Some("chat"), Some("HI"), Some("c-1"))
    );
    // Once handed, a plain reconnect gets nothing again.
    s.mark_handed(1);
    assert!(s.attach(conn(1, 3), None, &LIMITS, now(t0, 3)).1.is_empty());
}

#[test]
fn a_new_connection_replaces_the_old_one() {
    let t0 = Instant::now();
    let mut s = Session::new(UserId::default_user(), t0);
    s.attach(conn(0, 1), None, &LIMITS, now(t0, 0));
    let (replaced, _) = s.attach(conn(1, 2), None, &LIMITS, now(t0, 0));
    assert_eq!(replaced, Some(conn(0, 1)));
    // The replaced connection's later hang-up must not detach the new one.
    assert!(!s.detach(conn(0, 1), now(t0, 0)));
    assert_eq!(s.conn(), Some(conn(1, 2)));
}

#[test]
fn since_replays_in_order_and_reports_gaps() {
    let t0 = Instant::now();
    let mut s = Session::new(UserId::default_user(), t0);
    for i in 0..6 {
        answer(&mut s, &format!("m{i}"), None, i, now(t0, 0));
    }
    s.mark_handed(6);
    // Seqs 3..=6 are held (bound 4).
    let (_, frames) = s.attach(conn(0, 1), Some(4), &LIMITS, now(t0, 1));
    assert_eq!(
        frames.iter().map(|f| f.seq.unwrap()).collect::<Vec<_>>(),
        [5, 6]
    );
    let (_, frames) = s.attach(conn(0, 2), Some(1), &LIMITS, now(t0, 1));
    let v = json(&frames[0]);
    assert_eq!(v["name"], "ResumeGap");
    assert_eq!(v["seq"], 7);
    assert_eq!(
        frames[1..]
            .iter()
            .map(|f| f.seq.unwrap())
            .collect::<Vec<_>>(),
        [3, 4, 5, 6]
    );
}

#[test]
fn since_beyond_the_session_continues_numbering_above_it() {
    let t0 = Instant::now();
    let mut s = Session::new(UserId::default_user(), t0);
    let (_, frames) = s.attach(conn(0, 1), Some(40), &LIMITS, now(t0, 0));
    assert_eq!(json(&frames[0])["name"], "ResumeGap");
    assert_eq!(frames[0].seq, Some(41));
    assert_eq!(answer(&mut s, "x", None, 1, now(t0, 0)).seq, Some(42));
}

#[test]
fn a_resent_id_runs_once() {
    let t0 = Instant::now();
    let mut s = Session::new(UserId::default_user(), t0);
    let t = now(t0, 0);
    assert!(matches!(
        s.accept(msg("a", Some("x")), &LIMITS, t),
        Accepted::Queued
    ));
    s.start_next(1, &LIMITS, t).unwrap();
    assert!(matches!(
        s.accept(msg("a", Some("x")), &LIMITS, t),
        Accepted::StillRunning
    ));
    let reply = s.finish(1, Ok("A".into()), &LIMITS, t).unwrap();
    match s.accept(msg("a", Some("x")), &LIMITS, t) {
        Accepted::Resend(again) => assert_eq!(again.text, reply.text),
        other => panic!("{other:?}"),
    }
    assert!(s.start_next(2, &LIMITS, t).is_none(), "nothing was queued");
    // Push the reply out of the held frames: the resend now gets a ResumeGap.
    for i in 0..4 {
        answer(&mut s, "b", None, 10 + i, t);
    }
    match s.accept(msg("a", Some("x")), &LIMITS, t) {
        Accepted::ReplyGone(err) => assert_eq!(json(&err)["reply_to"], "x"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn queue_bound_answers_busy_and_does_not_record_the_id() {
    let t0 = Instant::now();
    let mut s = Session::new(UserId::default_user(), t0);
    let t = now(t0, 0);
    s.accept(msg("1", None), &LIMITS, t);
    s.start_next(1, &LIMITS, t).unwrap();
    assert!(matches!(
        s.accept(msg("2", None), &LIMITS, t),
        Accepted::Queued
    ));
    match s.accept(msg("3", Some("z")), &LIMITS, t) {
        Accepted::Busy(err) => assert_eq!(json(&err)["name"], "Busy"),
        other => panic!("{other:?}"),
    }
    s.finish(1, Ok("1".into()), &LIMITS, t);
    let (turn, _) = s.start_next(2, &LIMITS, t).unwrap();
    assert_eq!(turn.text, "2");
    assert!(
        matches!(s.accept(msg("3", Some("z")), &LIMITS, t), Accepted::Queued),
        "a refused id may be sent again"
    );
}

#[test]
fn timeout_ends_the_turn_and_drops_its_late_result() {
    let t0 = Instant::now();
    let mut s = Session::new(UserId::default_user(), t0);
    s.accept(msg("slow", Some("q")), &LIMITS, now(t0, 0));
    let (_, cancel) = s.start_next(1, &LIMITS, now(t0, 0)).unwrap();
    assert!(s.check_timeout(&LIMITS, now(t0, 4)).is_none());
    let err = s.check_timeout(&LIMITS, now(t0, 5)).unwrap();
    assert_eq!(json(&err)["name"], "Timeout");
    assert!(cancel.is_cancelled());
    assert!(s.token(1, "late").is_none());
    assert!(
        s.finish(1, Ok("late".into()), &LIMITS, now(t0, 6))
            .is_none()
    );
}

#[test]
fn history_is_bounded_and_handed_to_the_agent() {
    let t0 = Instant::now();
    let mut s = Session::new(UserId::default_user(), t0);
    for i in 0..3 {
        answer(&mut s, &format!("m{i}"), None, i, now(t0, 0));
    }
    s.accept(msg("next", None), &LIMITS, now(t0, 0));
    let (turn, _) = s.start_next(9, &LIMITS, now(t0, 0)).unwrap();
    let lines: Vec<&str> = turn.history.iter().map(|h| &*h.text).collect();
    assert_eq!(lines, ["m1", "M1", "m2", "M2"]);
    assert_eq!(turn.history[0].who, Who::Human);
}

#[test]
fn idle_only_without_socket_or_work() {
    let t0 = Instant::now();
    let mut s = Session::new(UserId::default_user(), t0);
    assert!(s.idle_since().is_some());
    s.attach(conn(0, 1), None, &LIMITS, now(t0, 0));
    assert!(s.idle_since().is_none());
    s.accept(msg("x", None), &LIMITS, now(t0, 0));
    s.start_next(1, &LIMITS, now(t0, 0));
    s.detach(conn(0, 1), now(t0, 1));
    assert!(s.idle_since().is_none(), "a running turn keeps the session");
    s.finish(1, Ok("x".into()), &LIMITS, now(t0, 2));
    assert_eq!(s.idle_since(), Some(t0 + Duration::from_secs(2)));
    assert_eq!(s.undelivered(), 1);
}
