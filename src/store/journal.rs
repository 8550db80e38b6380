//! The journal's own thread: it encodes the records the loop hands over, appends them to
//! the current segment file, and makes them durable with one `fdatasync` per
//! [`SYNC_EVERY`] at most (group commit), so that the event loop never waits on the disk
//! and an SD card sees a few large writes rather than one per frame.
//!
//! Segments are `NNNNNNNNNNNNNNNNNNNN.log` files, replayed in number order. A snapshot
//! starts a new segment; once the snapshot's end is durable, the older segments hold
//! nothing the new one does not, and are deleted. After a write error the journal drops
//! records (they would leave a hole) until the next snapshot writes everything again.

use super::queue::Queue;
use super::record::{self, Change};
use super::{SYNC_EVERY, Stats};
use crate::protocol::UserId;
use log::{debug, error, info, warn};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// What the loop sends the journal, in order.
pub(super) enum Msg {
    /// One loop iteration's changes, and the bytes they were counted as in the queue.
    Records(Vec<(UserId, Change)>, usize),
    /// The loop dropped records (the queue was over its bound): write nothing until the
    /// next snapshot.
    Lost,
    /// A snapshot begins: later records go to a new segment.
    Begin,
    /// The snapshot is complete: once it is durable, older segments can go.
    End,
    /// Write a `Clean` mark, sync, and stop.
    Stop,
}

/// The name of segment `n` in `dir`.
pub(super) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.log"))
}

/// The segment number of a file name, if it is one.
pub(super) fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The writer's state; lives on its own thread.
pub(super) struct Journal {
    dir: PathBuf,
    stats: Arc<Stats>,
    /// The current segment, its number and its length.
    file: Option<File>,
    seg: u64,
    seg_len: u64,
    /// Older segments and their lengths.
    older: Vec<(u64, u64)>,
    buf: Vec<u8>,
    /// Records in `buf`.
    buffered: u64,
    /// Records written to the file but not yet synced.
    unsynced: u64,
    /// A sync is wanted even with no record written since the last (a snapshot's end).
    sync_due: bool,
    last_sync: Instant,
    /// The directory changed (a segment made or deleted) since its last sync.
    dir_dirty: bool,
    /// A write failed: drop records until the next snapshot.
    failed: bool,
    /// A snapshot is being written to the current segment.
    in_snapshot: bool,
    /// A snapshot ended in the current segment: at the next sync, older segments go.
    compact: bool,
}

impl Journal {
    /// A journal writing to segment `seg` (an empty file already made) after `older`.
    pub(super) fn new(
        dir: PathBuf,
        stats: Arc<Stats>,
        file: File,
        seg: u64,
        older: Vec<(u64, u64)>,
    ) -> Journal {
        Journal {
            dir,
            stats,
            file: Some(file),
            seg,
            seg_len: 0,
            older,
            buf: Vec::with_capacity(64 * 1024),
            buffered: 0,
            unsynced: 0,
            sync_due: false,
            last_sync: Instant::now(),
            dir_dirty: true,
            failed: false,
            in_snapshot: false,
            compact: false,
        }
    }

    /// Serves the loop's messages until `Stop` or until the loop is gone.
    pub(super) fn run(mut self, queue: &Queue) {
        loop {
            let due = (self.unsynced > 0 || self.sync_due).then_some(self.last_sync + SYNC_EVERY);
            let first = queue.pop(due);
            let mut stop = false;
            if let Some(msg) = first {
                stop = self.take(msg);
                // Whatever else is waiting goes into the same write.
                while !stop && self.buf.len() < 1 << 20 {
                    match queue.try_pop() {
                        Some(msg) => stop = self.take(msg),
                        None => break,
                    }
                }
            }
            self.write_out();
            if stop {
                self.stop();
                return;
            }
            if (self.unsynced > 0 || self.sync_due) && Instant::now() >= self.last_sync + SYNC_EVERY
            {
                self.sync();
            }
        }
    }

    /// Takes one message; `true` for `Stop`.
    fn take(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Records(records, bytes) => {
                self.stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                if self.failed {
                    self.stats
                        .dropped
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    return false;
                }
                for (user, change) in &records {
                    if record::encode(Some(user), change, &mut self.buf).is_some() {
                        self.buffered += 1;
                    } else {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        warn!("user={user} state: a change over 64 MiB is not written");
                    }
                }
            }
            Msg::Lost => self.fail(&io::Error::other(
                "the journal fell behind the server and records were dropped",
            )),
            Msg::Begin => {
                self.write_out();
                self.rotate();
            }
            Msg::End => {
                if !self.failed && self.in_snapshot {
                    self.in_snapshot = false;
                    self.compact = true;
                    // The snapshot's end is worth a sync of its own as soon as allowed.
                    self.sync_due = true;
                } else {
                    // A snapshot that failed is over too; the loop tries another.
                    self.stats.snapshots_done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Msg::Stop => return true,
        }
        false
    }

    /// Starts a new segment for a snapshot (the current one if it is still empty).
    fn rotate(&mut self) {
        self.in_snapshot = true;
        self.compact = false;
        if self.file.is_some() && self.seg_len == 0 && !self.failed {
            return;
        }
        if self.file.is_some() && !self.failed {
            // The old segment stays replayable until the snapshot is durable.
            self.sync();
            self.older.push((self.seg, self.seg_len));
        }
        self.file = None;
        let next = self.seg + 1;
        let path = segment_path(&self.dir, next);
        match File::options().create_new(true).append(true).open(&path) {
            Ok(f) => {
                self.file = Some(f);
                self.seg = next;
                self.seg_len = 0;
                self.dir_dirty = true;
                self.failed = false;
            }
            Err(e) => {
                self.seg = next;
                self.fail(&e);
            }
        }
    }

    fn write_out(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let result = match (&mut self.file, self.failed) {
            (Some(f), false) => f.write_all(&self.buf),
            _ => Ok(()),
        };
        let n = self.buf.len() as u64;
        self.buf.clear();
        let records = std::mem::take(&mut self.buffered);
        if self.failed {
            self.stats.dropped.fetch_add(records, Ordering::Relaxed);
            return;
        }
        match result {
            Ok(()) => {
                self.seg_len += n;
                self.unsynced += records;
                self.stats.bytes_written.fetch_add(n, Ordering::Relaxed);
                self.stats.written.fetch_add(records, Ordering::Relaxed);
                self.stats.disk_bytes.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.dropped.fetch_add(records, Ordering::Relaxed);
                self.fail(&e);
            }
        }
    }

    fn sync(&mut self) {
        let Some(file) = &self.file else {
            return;
        };
        if self.failed {
            return;
        }
        let mut result = file.sync_data();
        if result.is_ok() && self.dir_dirty {
            result = sync_dir(&self.dir);
        }
        self.last_sync = Instant::now();
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.fail(&e);
            return;
        }
        self.dir_dirty = false;
        self.unsynced = 0;
        self.sync_due = false;
        self.stats.synced.store(
            self.stats.written.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if self.compact {
            self.compact = false;
            self.drop_older();
            if self.stats.degraded.swap(false, Ordering::Relaxed) {
                info!("state: writes succeed again; the state dir is up to date");
            }
        }
    }

    /// Deletes the segments a durable snapshot made redundant.
    fn drop_older(&mut self) {
        let snapshot = self.seg_len;
        self.stats.snapshot_bytes.store(snapshot, Ordering::Relaxed);
        for (n, len) in std::mem::take(&mut self.older) {
            let path = segment_path(&self.dir, n);
            match fs::remove_file(&path) {
                Ok(()) => {
                    self.stats.disk_bytes.fetch_sub(len, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Replaying it again is harmless (the snapshot after it resets every
                    // session); it is tried again at the next compaction.
                    warn!("state: cannot delete {}: {e}", path.display());
                    self.older.push((n, len));
                }
            }
        }
        if let Err(e) = sync_dir(&self.dir) {
            debug!("state: directory sync after compaction: {e}");
        }
        self.stats.snapshots_done.fetch_add(1, Ordering::Relaxed);
    }

    /// A write or sync failed: one error in the log, `degraded` for `/health`, and
    /// nothing more is written until a snapshot succeeds.
    fn fail(&mut self, e: &io::Error) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if !self.stats.degraded.swap(true, Ordering::Relaxed) {
            error!(
                "state dir {}: {e}; serving from memory, and writing again once the disk takes it",
                self.dir.display()
            );
        } else {
            debug!("state dir {}: still failing: {e}", self.dir.display());
        }
        if self.in_snapshot && self.file.is_some() {
            // A half-written snapshot after a hole is worse than none: the older
            // segments alone replay to the state as of the first failure.
            let _ = fs::remove_file(segment_path(&self.dir, self.seg));
            self.stats
                .disk_bytes
                .fetch_sub(self.seg_len, Ordering::Relaxed);
            self.seg_len = 0;
        } else if self.file.is_some() {
            self.older.push((self.seg, self.seg_len));
        }
        self.file = None;
        self.failed = true;
        self.in_snapshot = false;
        if std::mem::take(&mut self.compact) {
            self.stats.snapshots_done.fetch_add(1, Ordering::Relaxed);
        }
        // Written but never synced: as good as lost.
        self.stats
            .dropped
            .fetch_add(self.unsynced, Ordering::Relaxed);
        self.unsynced = 0;
        self.sync_due = false;
        self.buf.clear();
        self.stats.need_snapshot.store(true, Ordering::Relaxed);
    }

    /// The last records, a `Clean` mark if nothing was lost, and a sync.
    fn stop(&mut self) {
        if !self.failed {
            let clean = record::encode(None, &Change::Clean, &mut self.buf).is_some();
            self.buffered += u64::from(clean);
            self.write_out();
            self.sync_due = true;
            self.sync();
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
