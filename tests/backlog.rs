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

/// Masked binary frames of 16 KiB, back to back: a stream that can be written from any
/// frame boundary, over and over.
fn flood_buffer() -> Vec<u8> {
    let payload = vec![b'x'; 16 * 1024];
    let mut buf = Vec::new();
    for _ in 0..64 {
        write_frame(&mut buf, OP_BINARY, &payload).expect("to a Vec");
    }
    buf
}

#[test]
fn a_closing_flooder_is_read_no_more_and_dropped_at_its_deadline() {
    let server = Server::start(&["--raw-echo", "--max-buffered-bytes", "65536"]);
    let mut s = tiny_window(&server, "/echo");
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let buf = flood_buffer();
    let (mut pos, mut written) = (0usize, 0u64);
    let mut closed_at: Option<(Instant, u64)> = None;
    let give_up = Instant::now() + Duration::from_secs(60);
    // Echoes nobody reads: the server closes with 1008, and we go on sending, never
    // reading its close frame, as fast as the socket takes it.
    let why = loop {
        assert!(
            Instant::now() < give_up,
            "the flooding socket was not dropped within 60 s ({written} bytes written; 1008 at {:?})",
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
    let after = written - before;
    eprintln!(
        "flooder dropped ({why}) {:.1} s after the 1008; {before} bytes written before it, {after} after",
        at.elapsed().as_secs_f64()
    );
    assert!(
        after < 32 << 20,
        "a closing socket must not be read on: {after} bytes taken after the 1008"
    );
}
