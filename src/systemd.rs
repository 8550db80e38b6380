//! systemd integration without libsystemd: the `sd_notify` datagram protocol (READY,
//! WATCHDOG, STOPPING) and the environment of socket activation. Without `NOTIFY_SOCKET`
//! none of it does anything.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct SdNotify {
    socket: UnixDatagram,
    addr: SocketAddr,
}

/// The service manager's notification socket when run by systemd: `None` without
/// `NOTIFY_SOCKET`, and also (with a warning) when it is set but unusable, because a server
/// that cannot report readiness should still serve.
pub fn notifier() -> Option<SdNotify> {
    match SdNotify::from_env()? {
        Ok(n) => Some(n),
        Err(e) => {
            log::warn!("NOTIFY_SOCKET is set but unusable, not notifying systemd: {e}");
            None
        }
    }
}

impl SdNotify {
    /// From `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace); `None` when
    /// unset, as when not run by systemd.
    pub fn from_env() -> Option<io::Result<SdNotify>> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        Some(SdNotify::connect(&target.to_string_lossy()))
    }

    /// A notifier for `target`.
    pub fn connect(target: &str) -> io::Result<SdNotify> {
        let addr = match target.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(target)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(SdNotify { socket, addr })
    }

    /// Sends one state line such as `READY=1`. A full or absent manager socket must not
    /// stop the server, so failures are only logged.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            log::warn!("sd_notify {state:?} failed: {e}");
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set for this process
/// (`WATCHDOG_PID` absent or ours), as sd_watchdog_enabled(3) describes.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Whether systemd handed this process listening sockets: `LISTEN_PID` is ours and
/// `LISTEN_FDS` is at least 1 (sd_listen_fds(3)). The first one is file descriptor 3.
pub fn listen_fds() -> usize {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if !ours {
        return 0;
    }
    std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether stderr is connected to the journal (`JOURNAL_STREAM` names its device and
/// inode), so logs should carry `<N>` priorities and no timestamps of their own.
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("straycat-sd-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        let sd = SdNotify::connect(path.to_str().unwrap()).unwrap();
        sd.send("READY=1");
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
