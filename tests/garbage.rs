//! Bad bytes of every kind, from a seeded generator: random requests, random headers,
//! random frames after a real handshake, random JSON. None may crash the server, leak a
//! connection, or stop it serving everybody else.

mod common;

use common::{Server, http_get, poll, raw_ws, tcp, write_frame};
use std::io::Write;
use std::time::Duration;

/// xorshift64*: reproducible without a dependency; the seed is in the failure message.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const SEED: u64 = 0x5eed_cafe_f00d_0001;

#[test]
fn random_input_never_crashes_or_leaks_and_others_keep_chatting() {
    let server = Server::start(&[
        "--handshake-timeout-secs",
        "1",
        "--max-message-bytes",
        "4096",
    ]);
    let addr = server.addr();
    let mut bystander = server.connect("bystander", "");
    let mut rng = Rng(SEED);

    // Raw garbage and mangled requests before any handshake.
    let starts = [
        "GET /ws/x HTTP/1.1\r\n",
        "GET / HTTP/1.1\r\n",
        "POST /ws HTTP/1.1\r\n",
        "GET /ws/%",
        "\x16\x03\x01",
        "",
    ];
    let headers = [
        "Upgrade: websocket\r\n",
        "Connection: Upgrade\r\n",
        "Sec-WebSocket-Version: 13\r\n",
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        "Host: x\r\n",
        ": \r\n",
        "X\r\n",
        "\r\n",
    ];
    for round in 0..150 {
        let mut req = rng.pick(&starts).as_bytes().to_vec();
        for _ in 0..rng.below(6) {
            req.extend_from_slice(rng.pick(&headers).as_bytes());
        }
        req.extend(rng.bytes(if round % 10 == 0 { 12_000 } else { 300 }));
        let mut s = tcp(addr);
        let _ = s.write_all(&req);
    }

    // Random frames after a real handshake: random opcodes, flags, lengths, payloads.
    for _ in 0..150 {
        let mut s = raw_ws(addr, "/ws/fuzz");
        for _ in 0..rng.below(5) + 1 {
            let r = rng.below(4);
            let result = if r == 0 {
                let raw = rng.bytes(64);
                s.write_all(&raw)
            } else if r == 1 {
                let v = rng.pick(&[
                    r#"{"text":"a b","id":"x"}"#,
                    r#"{"text":"#,
                    r#"{"text":"\ud800"}"#,
                    r#"[{"text":"x"}]"#,
                    r#"{"text":"x","id":"x","id":"y"}"#,
                    "\u{0}",
                ]);
                write_frame(&mut s, 0x1, v.as_bytes())
            } else {
                let opcode = rng.below(16) as u8;
                let payload = rng.bytes(200);
                write_frame(&mut s, opcode, &payload)
            };
            if result.is_err() {
                break;
            }
        }
    }

    // Everybody else is served throughout.
    bystander.say("still fine", Some("b1"));
    let (_, chat) = bystander.recv_until_chat();
    common::assert_chat(&chat, "bystander", "still fine", Some("b1"));
    assert_eq!(http_get(addr, "/health").status, 200);

    // Every garbage connection is cleaned up (handshake deadline 1 s, close handshakes 5 s).
    poll(
        "garbage connections to be closed",
        Duration::from_secs(20),
        || {
            let h = server.health();
            // The bystander and the /health request itself.
            (h["connections"].as_u64() == Some(2)).then_some(())
        },
    );
    let logs = server.logs().join("\n");
    assert!(
        !logs.contains("panicked"),
        "seed {SEED:#x}: the server panicked"
    );
    assert!(
        !logs.contains("internal error"),
        "seed {SEED:#x}: a connection hit an internal error"
    );
}
