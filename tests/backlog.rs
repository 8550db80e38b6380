//! Unsent backlogs: a connection closed with 1008 whose peer floods it is read no more and
//! dropped at its close deadline; the server-wide unsent-bytes budget closes the largest
//! backlogs first, and their frames wait for the user's next socket.

mod common;

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// A socket whose receive buffer is tiny, so the server's frames pile up unsent.
fn tiny_window(server: &Server, path: &str) -> TcpStream {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = server.addr();
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .expect("connect");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    raw_handshake(&mut s, addr, path);
    s
}

/// `count` masked binary frames of `size` bytes, back to back: a stream that can be
/// written from its start over and over.
fn frames(count: usize, size: usize) -> Vec<u8> {
    let payload = vec![b'x'; size];
    let mut buf = Vec::new();
    for _ in 0..count {
        write_frame(&mut buf, OP_BINARY, &payload).expect("to a Vec");
    }
    buf
}

/// The most the kernel may buffer for one connection on 127.0.0.1: the server's receive
/// buffer and the client's send buffer at their autotuning maxima (net.ipv4.tcp_rmem and
/// tcp_wmem), which a flooder fills once the server stops reading.
fn socket_buffers_max() -> u64 {
    let max = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse::<u64>().ok())
            .unwrap_or(32 << 20)
    };
    max("tcp_rmem") + max("tcp_wmem")
}

/// How the flooder's close handshake starts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum CloseBy {
    /// The server: echoes nobody reads get the socket closed with 1008.
    Server,
    /// The client: a close frame behind a backlog of echoes (so the server's reply waits),
    /// then data frames, which are a protocol error after a close (RFC 6455 §5.5.1).
    Client,
}

/// Floods an `/echo` socket past the start of its close handshake, as fast as the socket
/// takes it, never reading. Returns the bytes written before the close started and after it,
/// and the seconds from it to the drop.
fn flood_past_close(by: CloseBy) -> (u64, u64, f64) {
    let max_unsent = if by == CloseBy::Server { "65536" } else { "16777216" };
    let server = Server::start(&["--raw-echo", "--max-buffered-bytes", max_unsent]);
    let mut s = tiny_window(&server, "/echo");
    let buf = frames(64, 16 * 1024);
    let (mut pos, mut written) = (0usize, 0u64);
    let mut closed_at: Option<(Instant, u64)> = None;
    if by == CloseBy::Client {
        // More than the kernel's buffers take (tcp_wmem's maximum, 4 MiB by default).
        for _ in 0..8 {
            s.write_all(&buf).expect("echoes to owe");
        }
        write_frame(&mut s, OP_CLOSE, &1000u16.to_be_bytes()).expect("close frame");
        written = 8 * buf.len() as u64;
        closed_at = Some((Instant::now(), written));
    }
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let give_up = Instant::now() + Duration::from_secs(60);
    let why = loop {
        assert!(
            Instant::now() < give_up,
            "the flooding socket was not dropped within 60 s ({written} bytes written; close at {:?})",
            closed_at.map(|(_, n)| n)
        );
        match s.write(&buf[pos..]) {
            Ok(0) => break "wrote 0".to_string(),
            Ok(n) => {
                written += n as u64;
                pos = (pos + n) % buf.len();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break e.to_string(),
        }
        if closed_at.is_none() && server.has_log("slow consumer") {
            closed_at = Some((Instant::now(), written));
        }
    };
    let (at, before) = closed_at.expect("the server closed the echo socket with 1008");
    let secs = at.elapsed().as_secs_f64();
    eprintln!(
        "{by:?} close: flooder dropped ({why}) {secs:.1} s after the close began; {before} bytes written before, {} after",
        written - before
    );
    let closes: Vec<String> = server
        .logs()
        .into_iter()
        .filter(|l| l.contains("closing with"))
        .collect();
    assert!(
        closes.len() <= usize::from(by == CloseBy::Server),
        "a closing socket is not closed again (nor its deadline moved): {closes:?}"
    );
    (before, written - before, secs)
}

#[test]
fn a_closing_flooder_is_read_no_more_and_dropped_at_its_deadline() {
    let bound = socket_buffers_max() + (1 << 20);
    for by in [CloseBy::Server, CloseBy::Client] {
        let (_, after, _) = flood_past_close(by);
        assert!(
            after < bound,
            "{by:?} close: a closing socket must not be read on: {after} bytes taken after the close began (bound {bound})"
        );
    }
}
