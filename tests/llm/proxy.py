"""A recording TCP relay on 127.0.0.1, between straycat and the llama server.

Every connection it accepts is relayed byte for byte to the upstream; what the client sent
is written to DIR/NNN.req, what the upstream sent back to DIR/NNN.resp, and one JSON line
per connection to DIR/log.jsonl when it ends: {"n", "opened", "req_first", "req_last",
"resp_first", "resp_last", "closed", "req_bytes", "resp_bytes"} (times in seconds since the
epoch: the first and last byte each way), and "resp_reads": [[time, offset], ...]
for every read from the upstream (when the bytes from that offset of NNN.resp came). The checks read
those files to see the requests straycat made (their history), when each ran (did two
overlap?) and the raw event stream the server sent.

Usage: proxy.py --upstream-port U --dir DIR [--listen-port P]
(P 0, the default: a free port; prints "ready PORT" once listening)
"""

import argparse
import json
import os
import socket
import threading
import time


def pump(src, dst, out, stamp, first_key, last_key, reads=None):
    total = 0
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            now = time.time()
            stamp.setdefault(first_key, now)
            stamp[last_key] = now
            if reads is not None:
                reads.append([round(now, 6), total])
            out.write(data)
            out.flush()
            total += len(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        # Pass the end on: half-close, so the other side sees EOF as it would directly.
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return total


def serve(client, n, args, lock):
    rec = {"n": n, "opened": time.time()}
    try:
        upstream = socket.create_connection(("127.0.0.1", args.upstream_port), timeout=10)
    except OSError as e:
        rec["error"] = str(e)
        client.close()
        write_log(args.dir, rec, lock)
        return
    upstream.settimeout(None)
    base = os.path.join(args.dir, f"{n:03d}")
    with open(base + ".req", "wb") as req, open(base + ".resp", "wb") as resp:
        sizes = {}
        t = threading.Thread(
            target=lambda: sizes.__setitem__(
                "req", pump(client, upstream, req, rec, "req_first", "req_last")
            ),
            daemon=True,
        )
        t.start()
        rec["resp_reads"] = []
        sizes["resp"] = pump(upstream, client, resp, rec, "resp_first", "resp_last", rec["resp_reads"])
        t.join(timeout=5)
    rec["closed"] = time.time()
    rec["req_bytes"] = sizes.get("req")
    rec["resp_bytes"] = sizes.get("resp")
    for s in (client, upstream):
        try:
            s.close()
        except OSError:
            pass
    write_log(args.dir, rec, lock)


def write_log(d, rec, lock):
    with lock, open(os.path.join(d, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.listen_port))
    srv.listen(64)
    print(f"ready {srv.getsockname()[1]}", flush=True)
    lock = threading.Lock()
    n = 0
    while True:
        client, _ = srv.accept()
        n += 1
        threading.Thread(target=serve, args=(client, n, args, lock), daemon=True).start()


if __name__ == "__main__":
    main()
