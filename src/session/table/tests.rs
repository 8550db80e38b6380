//! Unit tests of the session table, on a fake clock.

use super::*;
use crate::agent::TurnEvent;
use crate::session::tests::{json, msg};
use serde_json::Value;

const S: Duration = Duration::from_secs(1);

fn limits() -> TableLimits {
    TableLimits {
        session: Limits {
            history_turns: 4,
            max_held_frames: 16,
            max_held_bytes: 1 << 20,
            max_queued_turns: 2,
            turn_timeout: 30 * S,
        },
        ttl: 100 * S,
        max_sessions: 2,
        max_held_bytes_total: 1 << 20,
        max_history_bytes_total: 1 << 20,
    }
}

/// A fake clock: `at(n)` is `n` seconds after the start.
struct Clock(Instant);

impl Clock {
    fn at(&self, secs: u64) -> Now {
        Now {
            mono: self.0 + Duration::from_secs(secs),
            unix: 1000.0 + secs as f64,
        }
    }
}

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

/// The frames sent to `conn`, as JSON, and the jobs started.
fn split(out: &mut Vec<Effect>, conn: ConnId) -> (Vec<Value>, Vec<Job>) {
    let (mut frames, mut jobs) = (Vec::new(), Vec::new());
    for e in out.drain(..) {
        match e {
            Effect::Send(c, f) if c == conn => frames.push(json(&f)),
            Effect::Start(job) => jobs.push(job),
            other => panic!("unexpected {other:?}"),
        }
    }
    (frames, jobs)
}

/// Attaches `conn` to `name`, sends one message and answers it; returns the ref.
fn chat(t: &mut Sessions, conn: ConnId, name: &str, text: &str, now: Now) -> SessionRef {
    let mut out = Vec::new();
    let at = t.attach(conn, &user(name), None, now, &mut out);
    t.message(conn, &at, msg(text, None), now, &mut out);
    let (_, jobs) = split(&mut out, conn);
    let done = TurnEvent::Done(Ok(text.to_uppercase()));
    t.turn_event(&jobs[0].key, done, now, &mut out);
    let (frames, _) = split(&mut out, conn);
    assert_eq!(frames[0]["type"], "chat");
    at
}

#[test]
fn a_detached_idle_session_expires_after_the_ttl_and_not_before() {
    let clock = Clock(Instant::now());
    let mut t = Sessions::new(limits());
    let c = ConnId::new(0, 1);
    let at = chat(&mut t, c, "ann", "hi", clock.at(0));
    // The finished turn's deadline stays scheduled; it comes and does nothing.
    assert_eq!(t.poll_at(), Some(clock.at(30).mono));
    t.expire(clock.at(30), &mut Vec::new());
    assert_eq!(t.len(), 1);
    assert_eq!(t.poll_at(), None, "attached: no expiry clock");
    assert_eq!(t.detach(c, &at, clock.at(10).mono), Detached::Idle);
    assert_eq!(t.poll_at(), Some(clock.at(110).mono));
    let mut out = Vec::new();
    t.expire(clock.at(109), &mut out);
    assert_eq!(t.len(), 1);
    t.expire(clock.at(110), &mut out);
    assert_eq!(t.len(), 0, "expired at idle + ttl");
    assert!(out.is_empty());
}

#[test]
fn a_reconnect_stops_the_expiry_clock() {
    let clock = Clock(Instant::now());
    let mut t = Sessions::new(limits());
    let (c1, c2) = (ConnId::new(0, 1), ConnId::new(0, 2));
    let at = chat(&mut t, c1, "ann", "hi", clock.at(0));
    t.detach(c1, &at, clock.at(10).mono);
    let mut out = Vec::new();
    let again = t.attach(c2, &user("ann"), None, clock.at(50), &mut out);
    assert_eq!(again, at, "the same session, same epoch");
    t.expire(clock.at(500), &mut out);
    assert_eq!(t.len(), 1, "attached sessions never expire");
    // Detached again: the clock starts from the new detach.
    t.detach(c2, &at, clock.at(600).mono);
    t.expire(clock.at(699), &mut out);
    assert_eq!(t.len(), 1);
    t.expire(clock.at(700), &mut out);
    assert_eq!(t.len(), 0);
}

#[test]
fn a_running_turn_keeps_its_session_and_times_out() {
    let clock = Clock(Instant::now());
    let mut t = Sessions::new(limits());
    let c = ConnId::new(0, 1);
    let mut out = Vec::new();
    let at = t.attach(c, &user("ann"), None, clock.at(0), &mut out);
    t.message(c, &at, msg("slow", Some("m1")), clock.at(0), &mut out);
    let (_, jobs) = split(&mut out, c);
    assert_eq!(t.detach(c, &at, clock.at(1).mono), Detached::TurnRunning);
    assert_eq!(t.poll_at(), Some(clock.at(30).mono), "the turn's deadline");
    t.expire(clock.at(29), &mut out);
    assert!(!jobs[0].cancel.is_cancelled());
    t.expire(clock.at(30), &mut out);
    assert!(jobs[0].cancel.is_cancelled(), "the agent is told to stop");
    assert!(
        matches!(out.as_slice(), [Effect::Cancel(key)] if *key == jobs[0].key),
        "the loop is told to stop it too; nobody attached, so the Timeout is held: {out:?}"
    );
    out.clear();
    // The late result is dropped; the held Timeout goes to the next socket.
    let late = TurnEvent::Done(Ok("late".into()));
    t.turn_event(&jobs[0].key, late, clock.at(31), &mut out);
    assert!(out.is_empty());
    let c2 = ConnId::new(1, 2);
    t.attach(c2, &user("ann"), None, clock.at(32), &mut out);
    let (frames, _) = split(&mut out, c2);
    assert_eq!(frames.len(), 1);
    assert_eq!(
        (&frames[0]["name"], &frames[0]["reply_to"]),
        (&Value::from("Timeout"), &Value::from("m1"))
    );
    // And the session expires a ttl after the turn ended, not after the detach.
    t.detach(c2, &at, clock.at(33).mono);
    t.expire(clock.at(132), &mut out);
    assert_eq!(t.len(), 1);
    t.expire(clock.at(133), &mut out);
    assert_eq!(t.len(), 0);
}

#[test]
fn at_the_cap_the_longest_idle_detached_session_gives_way() {
    let clock = Clock(Instant::now());
    let mut t = Sessions::new(limits());
    let (a, b) = (ConnId::new(0, 1), ConnId::new(1, 2));
    let at_a = chat(&mut t, a, "ann", "hi", clock.at(0));
    let at_b = chat(&mut t, b, "bob", "hi", clock.at(0));
    assert!(
        !t.make_room_for(&user("cat")),
        "both attached: no room, 503"
    );
    assert!(
        t.make_room_for(&user("ann")),
        "an existing session needs no room"
    );
    t.detach(b, &at_b, clock.at(5).mono);
    t.detach(a, &at_a, clock.at(7).mono);
    assert!(t.make_room_for(&user("cat")));
    assert_eq!(t.len(), 1);
    // Bob had been idle longest: he went, and comes back to a new session.
    let mut out = Vec::new();
    let again = t.attach(ConnId::new(2, 3), &user("bob"), None, clock.at(8), &mut out);
    assert_ne!(again.epoch, at_b.epoch);
    assert!(out.is_empty(), "nothing of the old session");
}

#[test]
fn a_new_socket_replaces_the_old_and_only_the_attached_one_speaks() {
    let clock = Clock(Instant::now());
    let mut t = Sessions::new(limits());
    let (old, new) = (ConnId::new(0, 1), ConnId::new(1, 2));
    let mut out = Vec::new();
    let at = t.attach(old, &user("ann"), None, clock.at(0), &mut out);
    assert!(out.is_empty());
    t.attach(new, &user("ann"), None, clock.at(1), &mut out);
    assert!(matches!(out.as_slice(), [Effect::Replace(c)] if *c == old));
    out.clear();
    t.message(
        old,
        &at,
        msg("from the old socket", None),
        clock.at(2),
        &mut out,
    );
    t.error(
        old,
        &at,
        ErrorName::InvalidMessage,
        "x".into(),
        clock.at(2),
        &mut out,
    );
    assert!(
        out.is_empty(),
        "a replaced socket does not speak for the session"
    );
    // Its late hang-up does not detach the new one.
    assert_eq!(t.detach(old, &at, clock.at(3).mono), Detached::NotAttached);
    t.message(new, &at, msg("hello", None), clock.at(3), &mut out);
    let (_, jobs) = split(&mut out, new);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].turn.text, "hello");
}

#[test]
fn handed_marks_count_only_for_the_same_session() {
    let clock = Clock(Instant::now());
    let mut t = Sessions::new(TableLimits { ttl: S, ..limits() });
    let c1 = ConnId::new(0, 1);
    let old = chat(&mut t, c1, "ann", "one", clock.at(0));
    t.detach(c1, &old, clock.at(0).mono);
    // Not handed: a plain reconnect gets the reply again.
    let c2 = ConnId::new(1, 2);
    let mut out = Vec::new();
    t.attach(c2, &user("ann"), None, clock.at(0), &mut out);
    let (frames, _) = split(&mut out, c2);
    assert_eq!(frames.len(), 1);
    t.handed(&old, 1);
    t.detach(c2, &old, clock.at(0).mono);
    let c3 = ConnId::new(2, 3);
    t.attach(c3, &user("ann"), None, clock.at(0), &mut out);
    assert!(out.is_empty(), "handed once: not sent again without since");
    t.attach(c3, &user("ann"), Some(0), clock.at(0), &mut out);
    assert_eq!(split(&mut out, c3).0.len(), 1, "since=0 replays it");

    // The session expires and is made again: a mark from a socket of the old one
    // must not count for the new one.
    t.detach(c3, &old, clock.at(0).mono);
    t.expire(clock.at(1), &mut out);
    assert_eq!(t.len(), 0);
    let c4 = ConnId::new(3, 4);
    let new = chat(&mut t, c4, "ann", "two", clock.at(2));
    assert_ne!(new.epoch, old.epoch);
    t.detach(c4, &new, clock.at(2).mono);
    t.handed(&old, 1);
    let c5 = ConnId::new(4, 5);
    t.attach(c5, &user("ann"), None, clock.at(2), &mut out);
    let (frames, _) = split(&mut out, c5);
    assert_eq!(frames.len(), 1, "the old epoch's mark was ignored");
    assert_eq!(frames[0]["text"], "TWO");
}

#[test]
fn resume_replays_after_since_with_a_gap_first() {
    let clock = Clock(Instant::now());
    let mut t = Sessions::new(TableLimits {
        session: Limits {
            max_held_frames: 2,
            ..limits().session
        },
        ..limits()
    });
    let c = ConnId::new(0, 1);
    let mut at = None;
    for word in ["one", "two", "three"] {
        at = Some(chat(&mut t, c, "ann", word, clock.at(0)));
    }
    let at = at.unwrap();
    t.detach(c, &at, clock.at(0).mono);
    let mut out = Vec::new();
    let c2 = ConnId::new(1, 2);
    t.attach(c2, &user("ann"), Some(0), clock.at(1), &mut out);
    let (frames, _) = split(&mut out, c2);
    let seqs: Vec<u64> = frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(frames[0]["name"], "ResumeGap");
    assert_eq!(seqs, [4, 2, 3], "the gap (a new frame), then what is held");
}

#[test]
fn over_the_budgets_the_largest_sessions_shed_first() {
    let clock = Clock(Instant::now());
    let mut t = Sessions::new(TableLimits {
        max_held_bytes_total: 2000,
        max_history_bytes_total: 300,
        max_sessions: 10,
        ..limits()
    });
    let big = "x".repeat(200);
    let (a, b) = (ConnId::new(0, 1), ConnId::new(1, 2));
    for _ in 0..3 {
        chat(&mut t, a, "ann", &big, clock.at(0));
    }
    chat(&mut t, b, "bob", "hi", clock.at(0));
    assert!(t.held_total.load(Ordering::Relaxed) > 2000);
    assert!(t.history_total.load(Ordering::Relaxed) > 300);
    t.enforce_budgets();
    assert!(t.held_total.load(Ordering::Relaxed) <= 2000);
    assert!(t.history_total.load(Ordering::Relaxed) <= 300);
    let ann = &t.map[&user("ann")].session;
    let bob = &t.map[&user("bob")].session;
    assert_eq!(bob.held_frames(), 1, "the small session kept its frame");
    assert_eq!(bob.history_bytes(), 4, "and its history");
    assert!(ann.held_frames() < 3 && ann.held_frames() >= 1);
}
