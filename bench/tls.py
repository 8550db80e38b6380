#!/usr/bin/env python3
"""What TLS towards clients costs straycat: memory per idle wss:// connection and server
CPU per full handshake, against the same over plain TCP. Python's own ssl module is the
client (no verification: the point is the server's cost), everything on 127.0.0.1, every
process started here stopped here.

    cargo build --release && python3 bench/tls.py target/release/straycat

It makes a throwaway P-256 certificate with openssl(1) in a temp dir.
"""
import os, shutil, socket, ssl, subprocess, sys, tempfile, time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/straycat"
IDLE, HANDSHAKES = 1000, 300
HZ = os.sysconf("SC_CLK_TCK")
tmp = tempfile.mkdtemp(prefix="straycat-tls-bench-")
CERT, KEY = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", KEY, "-out", CERT,
                "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
CTX = ssl.create_default_context()
CTX.check_hostname, CTX.verify_mode = False, ssl.CERT_NONE


def server(tls):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    args = [BIN, "--listen", f"127.0.0.1:{port}", "--log-level", "warn",
            "--max-connections", "4096"]
    if tls:
        args += ["--tls-cert", CERT, "--tls-key", KEY]
    p = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close(); break
        except OSError:
            time.sleep(0.05)
    return p, port


def connect(port, tls):
    s = socket.create_connection(("127.0.0.1", port))
    return CTX.wrap_socket(s, server_hostname="localhost") if tls else s


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ


def idle_bytes(tls):
    p, port = server(tls)
    socks = []
    def upgrade(i):
        s = connect(port, tls)
        s.sendall((f"GET /ws/u{i} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert b" 101 " in head, head
        socks.append(s)
    for i in range(50):  # the allocator's first arenas
        upgrade(i)
    time.sleep(0.3); before = rss_kib(p.pid)
    for i in range(50, 50 + IDLE):
        upgrade(i)
    time.sleep(0.5); after = rss_kib(p.pid)
    p.kill(); p.wait()
    return (after - before) * 1024 / IDLE


def handshake_us(tls):
    p, port = server(tls)
    start = cpu_s(p.pid)
    for _ in range(HANDSHAKES):
        s = connect(port, tls)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        while s.recv(4096):
            pass
        s.close()
    used = cpu_s(p.pid) - start
    p.kill(); p.wait()
    return used / HANDSHAKES * 1e6


try:
    plain, tls = idle_bytes(False), idle_bytes(True)
    plain_us, tls_us = handshake_us(False), handshake_us(True)
finally:
    shutil.rmtree(tmp, ignore_errors=True)
print(f"RSS per idle /ws connection ({IDLE}, session included): plain {plain:.0f} B, "
      f"TLS {tls:.0f} B (+{tls - plain:.0f} B)")
print(f"server CPU per connection with GET /health ({HANDSHAKES}, clock ticks of "
      f"{1000 // HZ} ms): plain {plain_us:.0f} us, TLS 1.3 full handshake {tls_us:.0f} us")
