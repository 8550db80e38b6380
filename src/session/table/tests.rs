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
            max_messages_per_minute: 0,
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
    assert_eq!(t.detach(c, &at, clock.at(10)), Detached::Idle);
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
    t.detach(c1, &at, clock.at(10));
    let mut out = Vec::new();
    let again = t.attach(c2, &user("ann"), None, clock.at(50), &mut out);
    assert_eq!(again, at, "the same session, same epoch");
    t.expire(clock.at(500), &mut out);
    assert_eq!(t.len(), 1, "attached sessions never expire");
    // Detached again: the clock starts from the new detach.
    t.detach(c2, &at, clock.at(600));
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
    assert_eq!(t.detach(c, &at, clock.at(1)), Detached::TurnRunning);
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
    t.detach(c2, &at, clock.at(33));
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
    t.detach(b, &at_b, clock.at(5));
    t.detach(a, &at_a, clock.at(7));
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
    assert_eq!(t.detach(old, &at, clock.at(3)), Detached::NotAttached);
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
    t.detach(c1, &old, clock.at(0));
    // Not handed: a plain reconnect gets the reply again.
    let c2 = ConnId::new(1, 2);
    let mut out = Vec::new();
    t.attach(c2, &user("ann"), None, clock.at(0), &mut out);
    let (frames, _) = split(&mut out, c2);
    assert_eq!(frames.len(), 1);
    t.handed(&old, 1);
    t.detach(c2, &old, clock.at(0));
    let c3 = ConnId::new(2, 3);
    t.attach(c3, &user("ann"), None, clock.at(0), &mut out);
    assert!(out.is_empty(), "handed once: not sent again without since");
    t.attach(c3, &user("ann"), Some(0), clock.at(0), &mut out);
    assert_eq!(split(&mut out, c3).0.len(), 1, "since=0 replays it");

    // The session expires and is made again: a mark from a socket of the old one
    // must not count for the new one.
    t.detach(c3, &old, clock.at(0));
    t.expire(clock.at(1), &mut out);
    assert_eq!(t.len(), 0);
    let c4 = ConnId::new(3, 4);
    let new = chat(&mut t, c4, "ann", "two", clock.at(2));
    assert_ne!(new.epoch, old.epoch);
    t.detach(c4, &new, clock.at(2));
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
    t.detach(c, &at, clock.at(0));
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

/// Every session of `t`, whole, as changes, by user: what two tables must agree on.
fn image(t: &Sessions, now: Now) -> Vec<(UserId, Change)> {
    let mut users = t.users();
    users.sort();
    let mut out = Vec::new();
    for u in &users {
        t.snapshot(u, now, &mut out);
    }
    out
}

/// A table rebuilt from `records` as start-up does it.
fn replayed(
    lim: TableLimits,
    records: Vec<(UserId, Change)>,
    gap: u64,
    now: Now,
) -> (Sessions, Vec<Effect>) {
    let mut t = Sessions::new(lim);
    for (u, c) in records {
        t.restore(u, c, now);
    }
    let mut out = Vec::new();
    t.restored(gap, now, &mut out);
    (t, out)
}

/// A day in the life of a journaling table: replies, a reply held for an absent user, a
/// turn still running and one queued, held frames and history over their bounds, errors,
/// an expired session and a victim of the cap. Its records, replayed, give the same table.
#[test]
fn the_journal_replays_to_the_same_sessions() {
    let clock = Clock(Instant::now());
    let mut lim = limits();
    lim.session.max_held_frames = 3;
    lim.session.history_turns = 2;
    lim.max_sessions = 3;
    lim.session.turn_timeout = 1000 * S;
    let mut t = Sessions::new(lim);
    t.journal_on();
    let (a, b, c, d) = (
        ConnId::new(0, 1),
        ConnId::new(1, 1),
        ConnId::new(2, 1),
        ConnId::new(3, 1),
    );
    let mut out = Vec::new();
    let at_a = t.attach(a, &user("ann"), None, clock.at(0), &mut out);
    for (i, text) in ["one", "two", "three", "four"].iter().enumerate() {
        let id = format!("m{i}");
        t.message(a, &at_a, msg(text, Some(&id)), clock.at(1), &mut out);
        let (_, jobs) = split(&mut out, a);
        let done = TurnEvent::Done(Ok(text.to_uppercase()));
        t.turn_event(&jobs[0].key, done, clock.at(1), &mut out);
        out.clear();
    }
    t.handed(&at_a, 5);
    t.error(
        a,
        &at_a,
        ErrorName::InvalidMessage,
        "no".into(),
        clock.at(2),
        &mut out,
    );
    out.clear();
    // Bob leaves while his turn runs; it ends while he is away; a second one runs and a
    // third waits when everything stops.
    let at_b = t.attach(b, &user("bob"), None, clock.at(3), &mut out);
    t.message(b, &at_b, msg("away", Some("b1")), clock.at(3), &mut out);
    let (_, jobs) = split(&mut out, b);
    assert_eq!(t.detach(b, &at_b, clock.at(4)), Detached::TurnRunning);
    t.turn_event(
        &jobs[0].key,
        TurnEvent::Done(Ok("HELD".into())),
        clock.at(5),
        &mut out,
    );
    let at_b = t.attach(b, &user("bob"), Some(0), clock.at(6), &mut out);
    out.clear();
    t.message(b, &at_b, msg("running", Some("b2")), clock.at(6), &mut out);
    t.message(b, &at_b, msg("queued", None), clock.at(6), &mut out);
    out.clear();
    // Carol's session expires; dave's takes the last place at the cap.
    let at_c = t.attach(c, &user("carol"), None, clock.at(7), &mut out);
    t.detach(c, &at_c, clock.at(7));
    t.expire(clock.at(200), &mut out);
    assert_eq!(t.len(), 2);
    t.attach(d, &user("dave"), None, clock.at(200), &mut out);
    out.clear();
    let records = t.take_records();
    assert!(records.iter().any(|(_, c)| *c == Change::DropFrame));
    assert!(records.iter().any(|(_, c)| *c == Change::ForgetLine));
    assert!(
        records
            .iter()
            .any(|(u, c)| *u == user("carol") && *c == Change::Gone)
    );

    let now = clock.at(201);
    let (r, owed) = replayed(lim, records, 0, now);
    let mut want = image(&t, now);
    // Restored, nobody is attached: ann, bob and dave are idle since the restart.
    for (_, c) in &mut want {
        if let Change::Reset { idle_unix, .. } = c {
            idle_unix.get_or_insert(now.unix);
        }
    }
    assert_eq!(image(&r, now), want);
    // Bob's running turn and his queued one are owed; the first starts again.
    let jobs: Vec<_> = owed
        .iter()
        .filter_map(|e| match e {
            Effect::Start(job) => Some(job),
            _ => None,
        })
        .collect();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].key.user, user("bob"));
    assert_eq!(jobs[0].turn.text, "running");
    assert_eq!(jobs[0].turn.history.len(), 2, "bob's history came back");
}

/// A snapshot, replayed after older records, replaces what they said; seqs skip the gap
/// after a crash; a resent id is answered from the held frame, not run again.
#[test]
fn a_snapshot_resets_and_a_crash_skips_seqs() {
    let clock = Clock(Instant::now());
    let mut t = Sessions::new(limits());
    t.journal_on();
    let a = ConnId::new(0, 1);
    let mut out = Vec::new();
    let at = t.attach(a, &user("ann"), None, clock.at(0), &mut out);
    t.message(a, &at, msg("hi", Some("x")), clock.at(0), &mut out);
    let (_, jobs) = split(&mut out, a);
    t.turn_event(
        &jobs[0].key,
        TurnEvent::Done(Ok("HI".into())),
        clock.at(0),
        &mut out,
    );
    let (frames, _) = split(&mut out, a);
    let reply = frames[0].clone();
    // The records, then a snapshot of the same session: replayed, it is there once.
    let mut records = t.take_records();
    t.snapshot(&user("ann"), clock.at(1), &mut records);
    let (mut r, owed) = replayed(limits(), records, SEQ_GAP, clock.at(2));
    assert!(owed.is_empty());
    let b = ConnId::new(1, 1);
    let at = r.attach(b, &user("ann"), None, clock.at(2), &mut out);
    out.clear();
    r.message(b, &at, msg("hi", Some("x")), clock.at(2), &mut out);
    let (frames, jobs) = split(&mut out, b);
    assert!(jobs.is_empty(), "a resent id runs once");
    assert_eq!(
        frames,
        std::slice::from_ref(&reply),
        "the same bytes, the same seq"
    );
    r.message(b, &at, msg("more", None), clock.at(2), &mut out);
    let (_, jobs) = split(&mut out, b);
    r.turn_event(
        &jobs[0].key,
        TurnEvent::Done(Ok("MORE".into())),
        clock.at(2),
        &mut out,
    );
    let (frames, _) = split(&mut out, b);
    let seq = reply["seq"].as_u64().unwrap();
    assert_eq!(frames[0]["seq"].as_u64(), Some(seq + 1 + SEQ_GAP));
}

const SEQ_GAP: u64 = 1000;
