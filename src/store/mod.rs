//! The state dir (`--state-dir`): sessions that survive a restart, a crash and a power
//! cut. The session table says what changed ([`Change`]s, taken once per loop
//! iteration); the journal's thread (`journal.rs`) appends them as checksummed records
//! (`record.rs`) and syncs at most every [`SYNC_EVERY`]; start-up replays them. The event
//! loop never waits on the disk: it hands a batch over a channel and goes on.
//!
//! Compaction writes every session whole (a few per loop iteration, so the loop never
//! stalls) into a new segment, then deletes the older ones; it starts when the segments
//! hold more than twice what the last snapshot took, plus [`COMPACT_SLACK`].

mod journal;
mod queue;
mod record;

pub use record::Change;
#[cfg(feature = "fuzzing")]
pub(crate) use record::encode;

use crate::protocol::UserId;
use crate::session::{Effect, Now, Sessions};
use journal::{Journal, Msg, segment_number, segment_path};
use log::{error, info, warn};
use queue::Queue;
pub(crate) use record::{Decoded, decode};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Longest a change waits for `fdatasync` (group commit): at most 10 syncs a second, and
/// a change is durable within this plus the sync's own time.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);

/// Seqs skipped after a crash. Frames sent in the last moments before it may not have been
/// written, and their seqs must not be given again: the client that saw them resumes with
/// `since` above the journal's last. The loop sends at most about 100,000 frames a second
/// in all, so this covers ten seconds of writes lost, far more than a sync period.
pub const SEQ_GAP_AFTER_CRASH: u64 = 1 << 20;

/// Compaction starts when the segments hold more than twice the last snapshot plus this.
pub const COMPACT_SLACK: u64 = 4 << 20;

/// Sessions a snapshot writes per loop iteration.
const SNAPSHOT_BATCH: usize = 64;

/// A snapshot waits while this many bytes are queued for the journal: it is made far
/// faster than a disk writes it, and must not crowd out the changes of the live sessions
/// (nor overflow [`MAX_QUEUED_BYTES`]).
const SNAPSHOT_QUEUE_BYTES: usize = 4 << 20;

/// How often the loop looks again while a snapshot waits for the journal.
const SNAPSHOT_PACE: Duration = Duration::from_millis(5);

/// Bytes of changes in flight to the journal before the loop drops them (and the next
/// snapshot writes everything again): a disk that stalls must not grow the memory.
const MAX_QUEUED_BYTES: usize = 32 << 20;

/// After a failed write, the first retry (a snapshot) comes this late, doubling to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// How long the stop waits for the journal's last sync.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Counters shared with the journal's thread (and shown by `/health`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Records handed to the journal.
    queued: AtomicU64,
    /// Records written to a segment file.
    written: AtomicU64,
    /// Records known durable (`fdatasync` returned after they were written).
    synced: AtomicU64,
    /// Records dropped because the disk failed or fell behind.
    dropped: AtomicU64,
    bytes_written: AtomicU64,
    syncs: AtomicU64,
    errors: AtomicU64,
    /// Bytes of every segment file.
    disk_bytes: AtomicU64,
    /// Bytes the last snapshot's segment held when it became durable.
    snapshot_bytes: AtomicU64,
    /// Snapshots durable, with the segments before them deleted.
    snapshots_done: AtomicU64,
    queued_bytes: AtomicUsize,
    /// A write failed; cleared once a snapshot is durable again.
    degraded: AtomicBool,
    /// The journal dropped records and needs a snapshot to be whole again.
    need_snapshot: AtomicBool,
}

/// A snapshot in progress: the users it goes through.
struct Cursor {
    users: Vec<UserId>,
    next: usize,
}

/// The loop's end of the state dir.
pub struct Store {
    dir: PathBuf,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
    snapshot: Option<Cursor>,
    /// Records were dropped on the loop's side: send none until the next snapshot.
    lost: bool,
    retry_at: Option<Instant>,
    retry_after: Duration,
    /// Snapshots whose end was sent: one more than `snapshots_done` while the journal
    /// still writes or syncs one (the segments before it are not deleted yet).
    snapshots_ended: u64,
    /// A snapshot waits for the journal to catch up until then.
    paced_until: Option<Instant>,
    /// Keeps the lock on the state dir for the process's life.
    _lock: File,
}

/// What [`Store::open`] found.
pub struct Opened {
    /// The store, ready for [`Store::begin`].
    pub store: Store,
    /// Seqs must skip [`SEQ_GAP_AFTER_CRASH`]: the last run did not stop cleanly.
    pub gap: u64,
    /// There were segments: they are rewritten (and deleted) by a snapshot.
    pub had_state: bool,
}

impl Store {
    /// Opens (or makes) the state dir, replays its journal through `restore`, and starts
    /// the journal's thread on a new segment. An error is a sentence for the operator:
    /// the dir cannot be made, locked, read or written.
    pub fn open(dir: &Path, mut restore: impl FnMut(UserId, Change)) -> Result<Opened, String> {
        let shown = dir.display();
        fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(|e| format!("cannot create the state dir {shown}: {e}"))?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(|e| format!("cannot write to the state dir {shown}: {e}"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| format!("the state dir {shown} is in use by another straycat ({e})"))?;
        let mut segments: Vec<u64> = fs::read_dir(dir)
            .map_err(|e| format!("cannot read the state dir {shown}: {e}"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(segment_number))
            .collect();
        segments.sort_unstable();
        let mut older = Vec::new();
        let (mut kept, mut dropped, mut damaged_files) = (0u64, 0u64, 0);
        let mut clean = true;
        for &n in &segments {
            let path = segment_path(dir, n);
            let data = fs::read(&path)
                .map_err(|e| format!("cannot read the state file {}: {e}", path.display()))?;
            let replayed = replay(&data, &mut restore);
            kept += replayed.kept;
            if replayed.dropped > 0 {
                dropped += replayed.dropped as u64;
                damaged_files += 1;
            }
            if let Some(last) = replayed.clean {
                clean = last;
            }
            older.push((n, data.len() as u64));
        }
        if dropped > 0 {
            warn!(
                "state: kept {kept} records; dropped {dropped} bytes that are not whole records (a write torn by a crash, or damage) at the end of {damaged_files} file(s) in {shown}"
            );
        }
        let seg = segments.last().map_or(1, |n| n + 1);
        let path = segment_path(dir, seg);
        let file = File::options()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot write to the state dir {shown}: {e}"))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync the state dir {shown}: {e}"))?;
        let stats = Arc::new(Stats::default());
        let disk: u64 = older.iter().map(|(_, len)| len).sum();
        stats.disk_bytes.store(disk, Ordering::Relaxed);
        let had_state = !older.is_empty();
        let queue = Arc::new(Queue::default());
        let theirs = Arc::clone(&queue);
        let journal = Journal::new(dir.to_path_buf(), Arc::clone(&stats), file, seg, older);
        std::thread::Builder::new()
            .name("straycat-journal".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                journal.run(&theirs);
                theirs.stopped();
            })
            .map_err(|e| format!("cannot start the journal thread: {e}"))?;
        if had_state {
            info!(
                "state: replayed {kept} records from {} ({})",
                shown,
                if clean {
                    "stopped cleanly"
                } else {
                    "did not stop cleanly: seqs skip ahead"
                }
            );
        }
        Ok(Opened {
            store: Store {
                dir: dir.to_path_buf(),
                queue,
                stats,
                snapshot: None,
                lost: false,
                retry_at: None,
                retry_after: RETRY_FIRST,
                snapshots_ended: 0,
                paced_until: None,
                _lock: lock,
            },
            gap: if clean { 0 } else { SEQ_GAP_AFTER_CRASH },
            had_state,
        })
    }

    /// Starts a snapshot of every session (written a batch per loop iteration).
    pub fn begin(&mut self, sessions: &Sessions) {
        if self.snapshot.is_some() {
            return;
        }
        self.stats.need_snapshot.store(false, Ordering::Relaxed);
        self.lost = false;
        self.queue.push(Msg::Begin);
        self.snapshot = Some(Cursor {
            users: sessions.users(),
            next: 0,
        });
    }

    /// Once per loop iteration: hands this iteration's changes to the journal, writes the
    /// next batch of a snapshot in progress, and starts one when the journal has grown or
    /// needs one after a failure.
    pub fn after_iteration(&mut self, sessions: &mut Sessions, now: Now) {
        let records = sessions.take_records();
        if !records.is_empty() {
            self.send(records);
        }
        if self.snapshot.is_some()
            && self.stats.queued_bytes.load(Ordering::Relaxed) > SNAPSHOT_QUEUE_BYTES
        {
            self.paced_until = Some(now.mono + SNAPSHOT_PACE);
            return;
        }
        self.paced_until = None;
        if let Some(mut cursor) = self.snapshot.take() {
            let end = (cursor.next + SNAPSHOT_BATCH).min(cursor.users.len());
            let mut batch = Vec::new();
            for user in &cursor.users[cursor.next..end] {
                sessions.snapshot(user, now, &mut batch);
            }
            cursor.next = end;
            if !batch.is_empty() {
                self.send(batch);
            }
            if self.lost {
                // The queue overflowed: this snapshot has a hole; a later one starts over.
            } else if end == cursor.users.len() {
                self.snapshots_ended += 1;
                self.queue.push(Msg::End);
            } else {
                self.snapshot = Some(cursor);
            }
            return;
        }
        if self.stats.need_snapshot.load(Ordering::Relaxed) || self.lost {
            match self.retry_at {
                None => self.retry_at = Some(now.mono + self.retry_after),
                Some(at) if now.mono >= at => {
                    self.retry_at = None;
                    self.retry_after = (self.retry_after * 2).min(RETRY_MAX);
                    self.begin(sessions);
                }
                Some(_) => {}
            }
            return;
        }
        self.retry_after = RETRY_FIRST;
        if self.compacting() {
            // The last snapshot is not durable yet: its older segments still count.
            return;
        }
        let disk = self.stats.disk_bytes.load(Ordering::Relaxed);
        let live = self
            .stats
            .snapshot_bytes
            .load(Ordering::Relaxed)
            .max(sessions.live_bytes() as u64);
        if disk > 2 * live + COMPACT_SLACK {
            info!("state: compacting ({disk} bytes of segments, {live} live)");
            self.begin(sessions);
        }
    }

    fn send(&mut self, records: Vec<(UserId, Change)>) {
        if self.lost {
            return;
        }
        let bytes: usize = records.iter().map(|(_, c)| weight(c)).sum();
        if self.stats.queued_bytes.load(Ordering::Relaxed) + bytes > MAX_QUEUED_BYTES {
            self.lost = true;
            self.queue.push(Msg::Lost);
            return;
        }
        self.stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.stats
            .queued
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        self.queue.push(Msg::Records(records, bytes));
    }

    /// A snapshot has more to write now: the loop should come back at once rather than
    /// sleep.
    pub fn busy(&self) -> bool {
        self.snapshot.is_some() && self.paced_until.is_none()
    }

    /// A snapshot is being sent, written or synced.
    fn compacting(&self) -> bool {
        self.snapshot.is_some()
            || self.stats.snapshots_done.load(Ordering::Relaxed) < self.snapshots_ended
    }

    /// When the loop must wake: to retry after a failure, or to go on with a snapshot
    /// that waits for the journal.
    pub fn wake_at(&self) -> Option<Instant> {
        self.paced_until.or(self.retry_at)
    }

    /// Writes are failing: the server serves from memory.
    pub fn degraded(&self) -> bool {
        self.stats.degraded.load(Ordering::Relaxed) || self.lost
    }

    /// The state dir's part of `/health`.
    pub fn health(&self) -> serde_json::Value {
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let queued = get(&s.queued);
        let synced = get(&s.synced);
        let dropped = get(&s.dropped);
        serde_json::json!({
            "status": if self.degraded() { "degraded" } else { "ok" },
            "dir": self.dir.display().to_string(),
            "unsynced_records": queued.saturating_sub(synced + dropped),
            "records_written": get(&s.written),
            "bytes_written": get(&s.bytes_written),
            "syncs": get(&s.syncs),
            "write_errors": get(&s.errors),
            "disk_bytes": get(&s.disk_bytes),
            "compacting": self.compacting() && !self.degraded(),
        })
    }

    /// The shutdown: the last changes, a clean mark, a sync; waits for the journal's
    /// thread at most [`STOP_WAIT`].
    pub fn stop(mut self, sessions: &mut Sessions) {
        let records = sessions.take_records();
        if !records.is_empty() {
            self.send(records);
        }
        self.queue.push(Msg::Stop);
        match self.queue.wait_stopped(STOP_WAIT) {
            true => info!("state: written and synced"),
            false => error!(
                "state: the journal did not finish within {} s; the last changes may be lost",
                STOP_WAIT.as_secs()
            ),
        }
    }
}

/// What the replay of one segment found.
pub(crate) struct Replayed {
    /// Records decoded and handed on.
    pub kept: u64,
    /// Bytes at the end that are not whole records (a write torn by a crash, or damage).
    pub dropped: usize,
    /// Whether the segment ends with a `Clean` mark; `None` for an empty segment.
    pub clean: Option<bool>,
}

/// Decodes the records of one segment in order, handing each to `restore`, up to the first
/// that is not whole. Pure, so a damaged segment is a fuzz target rather than a file.
pub(crate) fn replay(data: &[u8], mut restore: impl FnMut(UserId, Change)) -> Replayed {
    let mut at = 0;
    let mut kept = 0;
    let mut clean = None;
    while let Some(rest) = data.get(at..).filter(|r| !r.is_empty()) {
        match decode(rest) {
            Decoded::Record { user, change, len } => {
                at += len;
                kept += 1;
                clean = Some(change == Change::Clean);
                if let Some(user) = user {
                    restore(user, change);
                }
            }
            Decoded::Short | Decoded::Damaged => {
                clean = Some(false);
                break;
            }
        }
    }
    Replayed {
        kept,
        dropped: data.len().saturating_sub(at),
        clean,
    }
}

/// Opens the store for `sessions` at start-up: replays the journal into the table, makes
/// its bounds hold, and starts the snapshot that rewrites the old segments. The turns the
/// journal owes are in `effects`, to start when the loop runs.
pub fn restore_into(
    dir: &Path,
    sessions: &mut Sessions,
    now: Now,
    effects: &mut Vec<Effect>,
) -> Result<Store, String> {
    let opened = Store::open(dir, |user, change| sessions.restore(user, change, now))?;
    sessions.restored(opened.gap, now, effects);
    let mut store = opened.store;
    if opened.had_state {
        store.begin(sessions);
    }
    Ok(store)
}

/// About what a change costs in memory while queued: its texts and a record's overhead.
fn weight(change: &Change) -> usize {
    64 + match change {
        Change::Frame { text, .. } => text.len(),
        Change::Line { text, .. } => text.len(),
        Change::Accepted(msg) => msg.text.len() + 64 * msg.fields.len(),
        Change::Answered { id, .. } => id.len(),
        _ => 0,
    }
}
