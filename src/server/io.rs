//! WebSocket bytes in and out: reading messages with a per-connection budget, writing
//! frames, flushing once per loop iteration, the server-wide unsent-bytes budget, closing
//! and removing connections.

use super::{Server, Slot, slot_in};
use crate::conn::{ConnId, Stage, WsRead, WsWrite};
use crate::limits::Client;
use crate::session::Detached;
use crate::session::Outgoing;
use log::{debug, info, warn};
use mio::{Interest, Token};
use std::time::Duration;
use tungstenite::protocol::frame::coding::CloseCode;

/// Messages read from one connection before the loop moves on to others (fairness: a
/// flooding client gets its turn again on the next iteration, not the whole loop).
const READ_BUDGET_MESSAGES: usize = 32;

/// How long a close handshake may take before the socket is dropped. Set once, when the
/// close starts; nothing the peer does moves it.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Server {
    /// Serves `id` again later in this iteration's read queue (or the next's).
    pub(super) fn queue_read(&mut self, id: ConnId) {
        if let Some(slot) = self.slot(id)
            && !slot.queued_read
        {
            slot.queued_read = true;
            self.read_queue.push_back(id);
        }
    }

    /// One read budget for each connection that may have unread data.
    pub(super) fn serve_read_queue(&mut self) {
        for _ in 0..self.read_queue.len() {
            let Some(id) = self.read_queue.pop_front() else {
                break;
            };
            let Some(slot) = self.slot(id) else { continue };
            slot.queued_read = false;
            self.read_messages(id);
        }
    }

    /// Reads up to a budget of messages from `id` and hands each on.
    pub(super) fn read_messages(&mut self, id: ConnId) {
        for _ in 0..READ_BUDGET_MESSAGES {
            let now = self.now.mono;
            let Some(conn) = self.conn(id) else { return };
            let closing = conn.stage() == Some(Stage::Closing);
            match conn.read_message(now) {
                WsRead::Idle if closing && conn.is_deaf() => return self.stop_reading(id),
                WsRead::Idle => return,
                WsRead::Closed => return self.remove(id, "closed"),
                WsRead::Lost(why) => return self.remove(id, &why),
                // Our close frame is queued already: no second one, and its deadline
                // stands. What is left is drained up to the closing read limit.
                WsRead::Fail(_, why) if closing => debug!(
                    "user={} peer={} closing: {why}; discarding the rest",
                    conn.user(),
                    conn.peer()
                ),
                WsRead::Fail(code, why) => {
                    warn!(
                        "user={} peer={} closing with {}: {why}",
                        conn.user(),
                        conn.peer(),
                        u16::from(code)
                    );
                    self.close_conn(id, code, why);
                    return;
                }
                // What a closing socket still says is not listened to.
                WsRead::Message(_) if closing => {}
                WsRead::Message(msg) => self.on_message(id, msg),
            }
        }
        // Budget spent: come back to this connection after the others had their turn.
        self.queue_read(id);
    }

    /// A closing socket read all it may (`CLOSING_READ_BYTES` since the close): it is not
    /// listened to again. Its interest becomes writable only, so a peer that keeps sending
    /// wakes the loop no more (its bytes stay in the kernel, and TCP's window stops it);
    /// the socket goes at its close deadline, or when a write to it fails.
    fn stop_reading(&mut self, id: ConnId) {
        let Some(slot) = slot_in(&mut self.conns, id) else {
            return;
        };
        // Hung up: nothing more will come that we would read, and the close reply we wait
        // for cannot come either.
        if slot.conn.hung_up() {
            return self.remove(id, "hung up while closing");
        }
        if slot.deaf {
            return;
        }
        slot.deaf = true;
        debug!(
            "user={} peer={} closing: read the most a closing socket may; reading no more",
            slot.conn.user(),
            slot.conn.peer()
        );
        let registered = match slot.conn.stream_mut() {
            Some(s) => self
                .poll
                .registry()
                .reregister(s, Token(id.slot()), Interest::WRITABLE),
            None => Ok(()),
        };
        if let Err(e) = registered {
            self.remove(id, &format!("cannot stop reading: {e}"));
        }
    }

    /// Past `--max-buffered-bytes-total`: closes the open socket with the largest backlog
    /// with 1008, then the next, until the open sockets' unsent bytes are within it; their
    /// frames stay held for the user's next socket, as with `--max-buffered-bytes`. Run
    /// after the iteration's flush, so that only what the kernel refused counts. Closing
    /// sockets' backlogs are not counted (see `UnsentTotals`), so they cannot close others.
    ///
    /// The largest is found by a scan of the connections, made only while over the budget
    /// and ended by a close each time: O(n) per close, where a structure ordered by backlog
    /// would cost O(log n) on every write and flush of every connection instead.
    pub(super) fn enforce_unsent_budget(&mut self) {
        let budget = self.config.max_buffered_bytes_total;
        let mut closed = false;
        while self.unsent.open() > budget {
            let largest = self
                .conns
                .iter()
                .filter(|(_, s)| s.conn.is_open())
                .map(|(_, s)| (s.conn.unsent(), s.conn.id()))
                .max();
            let Some((unsent, id)) = largest.filter(|(n, _)| *n > 0) else {
                break;
            };
            if let Some(conn) = self.conn(id) {
                warn!(
                    "user={} peer={} slow consumer: {unsent} bytes unread, the largest backlog while all sockets together hold more than {budget}; closing with 1008; undelivered frames stay held",
                    conn.user(),
                    conn.peer()
                );
            }
            self.metrics.unsent_budget_closed();
            self.close_conn(id, CloseCode::Policy, "slow consumer");
            closed = true;
        }
        if closed {
            // The close frames go out now, not at the next event.
            self.flush_all();
        }
    }

    /// Writes a session frame to `id` if it is still open.
    pub(super) fn write_to(&mut self, id: ConnId, frame: Outgoing) {
        // The slab alone, so that the metrics can be borrowed beside it.
        let Some(Slot { conn, .. }) = slot_in(&mut self.conns, id) else {
            return;
        };
        if !conn.is_open() {
            return;
        }
        self.metrics.frame_sent(frame.seq, frame.text.as_str());
        let result = conn.write_text(frame.text, frame.seq);
        self.settle(id, result);
    }

    /// Acts on the outcome of a write or flush to `id`.
    pub(super) fn settle(&mut self, id: ConnId, result: WsWrite) {
        match result {
            WsWrite::Ok | WsWrite::Pending => {
                if self.conn(id).is_some_and(|c| c.is_dirty()) {
                    self.flush_queue.push(id);
                }
            }
            WsWrite::Full => {
                if let Some(Slot { conn, .. }) = slot_in(&mut self.conns, id) {
                    warn!(
                        "user={} peer={} slow consumer: more than {} bytes unread, closing with 1008; undelivered frames stay held",
                        conn.user(),
                        conn.peer(),
                        self.config.max_buffered_bytes
                    );
                }
                self.close_conn(id, CloseCode::Policy, "slow consumer");
            }
            WsWrite::Closed => self.remove(id, "closed"),
            WsWrite::Lost(why) => self.remove(id, &why),
        }
    }

    /// Flushes every connection written to since the last time.
    pub(super) fn flush_all(&mut self) {
        let mut queue = std::mem::take(&mut self.flush_queue);
        for id in queue.drain(..) {
            if self.conn(id).is_some_and(|c| c.is_dirty()) {
                self.flush(id);
            }
        }
        // Keep the allocation, unless flushing queued more (a close after a failed flush).
        if self.flush_queue.is_empty() {
            self.flush_queue = queue;
        }
    }

    /// Flushes `id`, and tells its session which frames the kernel took.
    pub(super) fn flush(&mut self, id: ConnId) {
        let Some(conn) = self.conn(id) else { return };
        let result = conn.flush();
        // Frames the kernel took are handed, whether or not this socket is still the
        // session's: a closing socket still delivers what it had queued.
        if let Some(seq) = conn.take_handed()
            && let Some(at) = conn.session()
        {
            let at = at.clone();
            self.sessions.handed(&at, seq);
        }
        match result {
            WsWrite::Ok | WsWrite::Pending => {}
            other => self.settle(id, other),
        }
    }

    /// Starts the close handshake and detaches the socket from its session; a socket not
    /// open (closing already) is left as it is.
    pub(super) fn close_conn(&mut self, id: ConnId, code: CloseCode, reason: &str) {
        if !self.conn(id).is_some_and(|c| c.is_open()) {
            return;
        }
        self.detach(id);
        let deadline = self.now.mono + CLOSE_TIMEOUT;
        let Some(Slot { conn, .. }) = slot_in(&mut self.conns, id) else {
            return;
        };
        self.metrics.closed(code.into());
        match conn.close(code, reason, deadline) {
            WsWrite::Ok | WsWrite::Pending | WsWrite::Full => {
                if let Some(slot) = self.slot(id) {
                    slot.timer_at = None;
                }
                self.schedule_conn(id, deadline);
                self.flush_queue.push(id);
            }
            WsWrite::Closed => self.remove(id, "closed"),
            WsWrite::Lost(why) => self.remove(id, &why),
        }
    }

    /// The client sent a close frame: tungstenite queued our reply; the socket goes once it
    /// is flushed.
    pub(super) fn begin_closing(&mut self, id: ConnId) {
        let deadline = self.now.mono + CLOSE_TIMEOUT;
        if let Some(slot) = self.slot(id)
            && slot.conn.begin_closing(deadline)
        {
            slot.timer_at = None;
            self.flush_queue.push(id);
            self.schedule_conn(id, deadline);
        }
    }

    /// Takes the socket out of its session (the session lives on).
    pub(super) fn detach(&mut self, id: ConnId) {
        let now = self.now;
        let Some(conn) = self.conn(id) else { return };
        let Some(at) = conn.session().cloned() else {
            return;
        };
        let peer = conn.peer();
        match self.sessions.detach(id, &at, now) {
            Detached::NotAttached => {}
            Detached::TurnRunning => warn!(
                "user={} peer={peer} left while a turn was running; its reply will be held for the next connection",
                at.user
            ),
            Detached::Idle => info!("user={} peer={peer} disconnected", at.user),
        }
    }

    /// Drops connection `id` (detaching it first).
    pub(super) fn remove(&mut self, id: ConnId, why: &str) {
        self.detach(id);
        let Some(Slot { conn, .. }) = slot_in(&mut self.conns, id) else {
            return;
        };
        if let Some(e) = conn.tls_error() {
            info!(
                "user={} peer={} TLS error: {e}; connection dropped",
                conn.user(),
                conn.peer()
            );
        }
        debug!(
            "user={} peer={} connection ended: {why}",
            conn.user(),
            conn.peer()
        );
        if let Some(stream) = conn.stream_mut() {
            let _ = self.poll.registry().deregister(stream);
        }
        let slot = self.conns.remove(id.slot());
        if slot.conn.is_refusing() {
            self.refusing = self.refusing.saturating_sub(1);
        }
        if slot.per_client {
            self.per_client
                .close(Client::of(slot.conn.peer().ip()), self.now.mono);
        }
        self.resume_accept();
    }
}
