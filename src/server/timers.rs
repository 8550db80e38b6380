//! Deadlines of the loop: connection phases and heartbeats, the accept back-off, the
//! systemd watchdog. Sessions keep their own (`Sessions::poll_at`); they are run from here.

use super::{Server, Slot, slot_in};
use crate::conn::{Beat, ConnId, Stage};
use crate::timer::schedule;
use log::{info, warn};
use std::time::Instant;
use tungstenite::protocol::frame::coding::CloseCode;

/// Something with a deadline.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TimerKey {
    Conn(ConnId),
    /// The task in this slot of `Tasks`.
    Task(usize),
    Accept,
    Watchdog,
}

impl Server {
    /// Wakes the loop for connection `id` at `at`, unless it is already due no later.
    pub(super) fn schedule_conn(&mut self, id: ConnId, at: Instant) {
        if let Some(slot) = slot_in(&mut self.conns, id) {
            schedule(&mut self.timers, &mut slot.timer_at, at, TimerKey::Conn(id));
        }
    }

    /// Runs everything due now: the loop's own deadlines, then the session table's.
    pub(super) fn run_timers(&mut self) {
        let now = self.now.mono;
        while let Some((at, key)) = self.timers.pop_due(now) {
            match key {
                TimerKey::Accept => self.resume_accept(),
                TimerKey::Task(slot) => self.task_due(slot, at),
                TimerKey::Watchdog => {
                    if let (Some(sd), Some(every)) = (&self.sd_notify, self.watchdog) {
                        sd.send("WATCHDOG=1");
                        self.timers.push(now + every, TimerKey::Watchdog);
                    }
                }
                TimerKey::Conn(id) => {
                    // A stale entry (rescheduled since, or another occupant) is skipped.
                    if let Some(slot) = self.slot(id)
                        && slot.timer_at == Some(at)
                    {
                        slot.timer_at = None;
                        self.conn_due(id, now);
                    }
                }
            }
        }
        self.sessions.expire(self.now, &mut self.effects);
        self.apply_effects();
    }

    /// Connection `id`'s deadline came: a phase ran out of time, or its heartbeat is due.
    fn conn_due(&mut self, id: ConnId, now: Instant) {
        let Some(Slot { conn, .. }) = slot_in(&mut self.conns, id) else {
            return;
        };
        let Some(heartbeat) = conn.heartbeat_mut() else {
            // Handshake, answer, linger or close: each has a deadline of its own.
            if now >= conn.poll_at() {
                if conn.stage() == Some(Stage::Await) {
                    self.end_wait(id, true);
                    return;
                }
                if conn.stage() == Some(Stage::Handshake) {
                    info!(
                        "user={} peer={} handshake timed out",
                        conn.user(),
                        conn.peer()
                    );
                }
                self.remove(id, "deadline passed");
            } else {
                let at = conn.poll_at();
                self.schedule_conn(id, at);
            }
            return;
        };
        match heartbeat.poll(now) {
            Beat::Nothing => {}
            Beat::Ping => {
                let result = conn.ping();
                self.settle(id, result);
            }
            Beat::Drop => {
                warn!(
                    "user={} peer={} heartbeat: nothing received for {} s after a ping; dropping the socket (1011)",
                    conn.user(),
                    conn.peer(),
                    self.config.ping_timeout.as_secs()
                );
                // The peer is gone or stuck: a close handshake would only wait for it
                // again, so the close frame is a courtesy and the socket goes now.
                self.detach(id);
                self.metrics.closed(CloseCode::Error.into());
                if let Some(c) = self.conn(id) {
                    let _ = c.close(CloseCode::Error, "heartbeat timeout", now);
                    let _ = c.flush();
                }
                self.remove(id, "heartbeat timeout");
                return;
            }
        }
        if let Some(at) = self.conn(id).map(|c| c.poll_at()) {
            self.schedule_conn(id, at);
        }
    }
}
