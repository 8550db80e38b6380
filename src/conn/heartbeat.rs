//! Ping/pong deadlines of an open WebSocket: when to ping, and when a silent peer is given
//! up. Pure: the time comes in, the decision comes out.

use std::time::{Duration, Instant};

/// What [`Heartbeat::poll`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beat {
    /// Nothing is due.
    Nothing,
    /// Send a ping now.
    Ping,
    /// Nothing arrived for the ping timeout after a ping: drop the socket.
    Drop,
}

/// One socket's heartbeat: a ping every `interval`; a socket that sends nothing at all
/// (a pong, or any message) within `timeout` of the first unanswered ping is dropped.
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    /// Last time anything arrived from the client.
    last_rx: Instant,
    /// The first unanswered ping, if one is outstanding.
    ping_sent: Option<Instant>,
    /// When the next ping is due.
    next_ping: Instant,
}

impl Heartbeat {
    /// A heartbeat for a socket opened at `now`: the first ping is due an interval later.
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Heartbeat {
        Heartbeat {
            interval,
            timeout,
            last_rx: now,
            ping_sent: None,
            next_ping: now + interval,
        }
    }

    /// Something arrived from the client at `now`.
    pub fn on_rx(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// What is due at `now`. After `Ping`, the ping counts as sent.
    pub fn poll(&mut self, now: Instant) -> Beat {
        if let Some(sent) = self.ping_sent {
            if self.last_rx > sent {
                self.ping_sent = None;
            } else if now >= sent + self.timeout {
                return Beat::Drop;
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + self.interval;
            // Only the first unanswered ping starts the timeout: a peer that answers late
            // is not given more time by our own later pings.
            self.ping_sent.get_or_insert(now);
            return Beat::Ping;
        }
        Beat::Nothing
    }

    /// When [`Heartbeat::poll`] next has something to do.
    pub fn poll_at(&self) -> Instant {
        match self.ping_sent {
            Some(sent) => self.next_ping.min(sent + self.timeout),
            None => self.next_ping,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn pings_every_interval_while_the_peer_answers() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(t0, 20 * S, 10 * S);
        assert_eq!(h.poll_at(), t0 + 20 * S);
        assert_eq!(h.poll(t0 + 19 * S), Beat::Nothing);
        assert_eq!(h.poll(t0 + 20 * S), Beat::Ping);
        // Waiting for the pong: woken at the timeout.
        assert_eq!(h.poll_at(), t0 + 30 * S);
        h.on_rx(t0 + 21 * S);
        assert_eq!(h.poll(t0 + 30 * S), Beat::Nothing, "answered");
        assert_eq!(h.poll_at(), t0 + 40 * S);
        assert_eq!(h.poll(t0 + 40 * S), Beat::Ping);
    }

    #[test]
    fn a_silent_peer_is_dropped_at_the_timeout_of_the_first_ping() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(t0, 5 * S, 12 * S);
        assert_eq!(h.poll(t0 + 5 * S), Beat::Ping);
        assert_eq!(h.poll(t0 + 10 * S), Beat::Ping, "pings go on meanwhile");
        assert_eq!(h.poll_at(), t0 + 15 * S);
        assert_eq!(h.poll(t0 + 15 * S), Beat::Ping);
        assert_eq!(h.poll_at(), t0 + 17 * S, "the first ping's timeout");
        assert_eq!(h.poll(t0 + 16 * S), Beat::Nothing);
        assert_eq!(h.poll(t0 + 17 * S), Beat::Drop);
    }

    #[test]
    fn anything_received_before_the_ping_does_not_count_as_its_answer() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(t0, 5 * S, 5 * S);
        h.on_rx(t0 + 4 * S);
        assert_eq!(h.poll(t0 + 5 * S), Beat::Ping);
        assert_eq!(h.poll(t0 + 10 * S), Beat::Drop);
    }
}
