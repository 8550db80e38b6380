//! The socket under tungstenite: counts the bytes the kernel accepted, and reads through one
//! buffer shared by every connection of the loop thread.

use super::stream::Socket;
use std::io::{self, Read, Write};

/// Bytes read from the kernel per `read` call: a few messages' worth. Also the most a
/// connection keeps in its stash between two loop iterations (a flooding client whose read
/// budget ran out), the same order as tungstenite's own buffer for one large message.
pub const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    /// The loop thread's read buffer, shared by every connection.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

/// The socket under tungstenite, counting the bytes the kernel accepted, so the connection
/// knows how much the client has left unread without reaching into tungstenite's buffer.
///
/// Reads take up to [`SCRATCH_BYTES`] from the kernel at once into a buffer the loop
/// thread shares between all connections, although tungstenite asks for at most its read
/// buffer's size (2 KiB): a client with eight 1 KiB messages in flight costs one `read`
/// rather than five. What tungstenite did not take yet waits in a per-connection stash,
/// which is freed once emptied, so an idle connection holds nothing extra.
///
/// It also saves the `read` that would only say `WouldBlock`: a read that returns less than
/// was asked for emptied the kernel's receive queue, and with edge-triggered readiness any
/// byte that arrives after it raises a new readable event (which calls
/// [`Counted::readable_again`]). Until then a read answers `WouldBlock` without a system
/// call: one syscall fewer per message for a client that sends one message at a time. Not
/// once the peer has hung up: its end of stream (or error) may sit behind the bytes of a
/// short read and raises no new event, so from then on every read goes to the kernel.
///
/// A closing connection reads only up to a limit ([`Counted::limit_reads`]): past it a read
/// answers `WouldBlock` without a system call, whatever the peer still sends.
pub struct Counted<S> {
    inner: S,
    written: u64,
    /// Bytes taken from the kernel so far.
    read: u64,
    /// No more than this many bytes in all are taken from the kernel.
    read_limit: u64,
    /// The last read emptied the receive queue and no readable event came since.
    drained: bool,
    /// A hang-up or error event was seen: reads always go to the kernel.
    hung_up: bool,
    /// Bytes read from the kernel that tungstenite has not taken yet (from `stash_at`).
    stash: Vec<u8>,
    /// How much of `stash` tungstenite has taken.
    stash_at: usize,
}

impl<S: Socket> Counted<S> {
    /// Wraps `inner`; `hung_up` when a hang-up was already seen on it.
    pub fn new(inner: S, hung_up: bool) -> Counted<S> {
        Counted {
            inner,
            written: 0,
            read: 0,
            read_limit: u64::MAX,
            drained: false,
            hung_up,
            stash: Vec::new(),
            stash_at: 0,
        }
    }

    /// Bytes the kernel accepted so far. Over TLS, plaintext rustls took whose record is
    /// not all with the kernel yet does not count ([`Socket::unsent_accepted`]).
    pub fn written(&self) -> u64 {
        self.written.saturating_sub(self.inner.unsent_accepted())
    }

    /// Takes at most `more` further bytes from the kernel (never raises an earlier limit).
    pub fn limit_reads(&mut self, more: u64) {
        self.read_limit = self.read_limit.min(self.read.saturating_add(more));
    }

    /// Whether the read limit is reached: nothing more will be read.
    pub fn reads_exhausted(&self) -> bool {
        self.read >= self.read_limit
    }

    /// A readable event arrived (`hung_up`: with the peer's hang-up or an error).
    pub fn readable_again(&mut self, hung_up: bool) {
        self.drained = false;
        self.hung_up |= hung_up;
        self.inner.readable_again(hung_up);
    }

    /// The socket itself.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: Socket> Counted<S> {
    /// Reads from the kernel through the scratch buffer.
    fn read_kernel(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Below the limit by at least 1 (checked by the caller); on 32 bits a limit past
        // usize is no limit for one read.
        let room = usize::try_from(self.read_limit - self.read).unwrap_or(usize::MAX);
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let want = scratch.len().min(room);
            let n = self.inner.read(&mut scratch[..want])?;
            self.read += n as u64;
            // Over TLS a short read says nothing of the records rustls already holds: the
            // stream keeps its own account (`Socket::short_read_drains`).
            self.drained = n > 0 && n < want && self.inner.short_read_drains();
            let give = n.min(buf.len());
            buf[..give].copy_from_slice(&scratch[..give]);
            if n > give {
                self.stash.clear();
                self.stash.extend_from_slice(&scratch[give..n]);
                self.stash_at = 0;
            }
            Ok(give)
        })
    }
}

impl<S: Socket> Read for Counted<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.stash_at < self.stash.len() {
            let rest = &self.stash[self.stash_at..];
            let give = rest.len().min(buf.len());
            buf[..give].copy_from_slice(&rest[..give]);
            self.stash_at += give;
            if self.stash_at == self.stash.len() {
                // Emptied: give the memory back, an idle connection keeps none.
                self.stash = Vec::new();
                self.stash_at = 0;
            }
            return Ok(give);
        }
        if (self.drained && !self.hung_up) || self.reads_exhausted() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // n == 0 is the end of the stream, which every later read must see too.
        self.read_kernel(buf)
    }
}

impl<S: Write> Write for Counted<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A stand-in socket for tests: reads come from `input` (then `WouldBlock`, or the end of
/// the stream once `eof`), writes are taken up to `room` bytes (then `WouldBlock`).
#[cfg(any(test, feature = "fuzzing"))]
#[derive(Default)]
pub(crate) struct MockStream {
    pub input: std::collections::VecDeque<u8>,
    pub eof: bool,
    pub reads: usize,
    pub room: usize,
    pub output: Vec<u8>,
}

#[cfg(any(test, feature = "fuzzing"))]
impl Read for MockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        if self.input.is_empty() {
            return match self.eof {
                true => Ok(0),
                false => Err(io::ErrorKind::WouldBlock.into()),
            };
        }
        let n = buf.len().min(self.input.len());
        for (b, x) in buf.iter_mut().zip(self.input.drain(..n)) {
            *b = x;
        }
        Ok(n)
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl Socket for MockStream {
    fn shutdown_write(&mut self) {}
}

#[cfg(any(test, feature = "fuzzing"))]
impl Write for MockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        self.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn would_block(r: io::Result<usize>) -> bool {
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn counts_only_what_the_kernel_took() {
        let mut c = Counted::new(
            MockStream {
                room: 5,
                ..Default::default()
            },
            false,
        );
        assert_eq!(c.write(b"abcdefgh").unwrap(), 5);
        assert!(c.write(b"fgh").is_err(), "full: WouldBlock");
        assert_eq!(c.written(), 5);
        c.inner_mut().room = 100;
        assert_eq!(c.write(b"fgh").unwrap(), 3);
        assert_eq!(c.written(), 8);
        assert_eq!(c.inner_mut().output, b"abcdefgh");
    }

    #[test]
    fn reads_ahead_into_a_stash_and_frees_it_when_empty() {
        let mut c = Counted::new(
            MockStream {
                input: (0..100u8).collect(),
                ..Default::default()
            },
            false,
        );
        let mut buf = [0u8; 30];
        assert_eq!(c.read(&mut buf).unwrap(), 30);
        assert_eq!(c.inner_mut().reads, 1, "one kernel read took all 100 bytes");
        assert_eq!(c.read(&mut buf).unwrap(), 30);
        assert_eq!(c.read(&mut buf).unwrap(), 30);
        assert_eq!(c.read(&mut buf).unwrap(), 10);
        assert_eq!(buf[9], 99);
        assert_eq!(c.stash.capacity(), 0, "emptied stash is freed");
        assert_eq!(c.inner_mut().reads, 1);
    }

    #[test]
    fn a_short_read_saves_the_would_block_read_until_readable_again() {
        let mut c = Counted::new(
            MockStream {
                input: vec![7u8; 10].into(),
                ..Default::default()
            },
            false,
        );
        let mut buf = [0u8; 64];
        assert_eq!(c.read(&mut buf).unwrap(), 10);
        assert!(would_block(c.read(&mut buf)));
        assert_eq!(c.inner_mut().reads, 1, "no syscall for the WouldBlock");
        // New bytes raise a readable event: the next read goes to the kernel again.
        c.inner_mut().input.extend([1, 2, 3]);
        c.readable_again(false);
        assert_eq!(c.read(&mut buf).unwrap(), 3);
        assert_eq!(c.inner_mut().reads, 2);
    }

    #[test]
    fn a_read_limit_stops_reading_at_the_byte() {
        let mut c = Counted::new(
            MockStream {
                input: vec![7u8; 100].into(),
                ..Default::default()
            },
            true,
        );
        c.limit_reads(40);
        let mut buf = [0u8; 30];
        let mut got = 0;
        while let Ok(n) = c.read(&mut buf) {
            got += n;
        }
        assert_eq!(got, 40, "30, then 10 from the stash; the kernel keeps 60");
        assert_eq!(c.inner_mut().input.len(), 60);
        assert!(c.reads_exhausted());
        let reads = c.inner_mut().reads;
        assert!(would_block(c.read(&mut buf)));
        assert_eq!(c.inner_mut().reads, reads, "no syscall past the limit");
        c.limit_reads(1000);
        assert!(c.reads_exhausted(), "a limit is never raised");
    }

    #[test]
    fn after_a_hang_up_every_read_goes_to_the_kernel() {
        let mut c = Counted::new(
            MockStream {
                input: vec![7u8; 10].into(),
                eof: true,
                ..Default::default()
            },
            false,
        );
        let mut buf = [0u8; 64];
        c.readable_again(true);
        assert_eq!(c.read(&mut buf).unwrap(), 10);
        // The end of stream behind the short read is seen, not hidden by a WouldBlock.
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        assert_eq!(c.inner_mut().reads, 3);
    }
}
