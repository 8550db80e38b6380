#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz targets to fuzz/seeds/<target>/ (the record and
journal seeds come from the journal's encoder: `cargo run --example fuzz_seeds --features
fuzzing`). Real requests, frames, streams and responses, with the leading bytes each
target reads as its settings (see src/fuzzing.rs)."""
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def upgrade(path, extra=""):
    return (f"GET {path} HTTP/1.1\r\nHost: kiosk.local:8080\r\nUpgrade: websocket\r\n"
            f"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: http://kiosk.local:8080\r\n{extra}\r\n")


def client_frame(opcode, payload, fin=True, mask=b"\x37\xfa\x21\x3d"):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


REQUESTS = {
    "ws_default": upgrade("/ws"),
    "ws_user_since": upgrade("/ws/al%40ice?since=42&token=s3cret"),
    "echo": upgrade("/echo"),
    "health": "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "page": "GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html,application/xhtml+xml\r\n\r\n",
    "status": "GET / HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n",
    "metrics": "GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n",
    "history": "GET /memory/conversation_history/ HTTP/1.1\r\nuser_id: bob\r\naccess_token: s3cret\r\n\r\n",
    "forget": "DELETE /memory/conversation_history HTTP/1.1\r\nuser_id: bob\r\n\r\n",
    "message": "POST /message?token=s3cret HTTP/1.1\r\nuser_id: bob\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"text\":\"hi!\"}\n",
    "chunked": "POST /message HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "old_version": upgrade("/ws").replace("Version: 13", "Version: 8"),
}
for name, req in REQUESTS.items():
    write("http_head", name, req)
    # handshake: byte 0 splits, byte 1 is the body bound / 8; a first frame behind the head.
    write("handshake", name, bytes([len(name) * 7 % 256, 8]) + req.encode() + client_frame(1, b'{"text":"hi"}'))

FRAMES = [
    client_frame(1, b'{"text":"hello","id":"c-1"}'),
    client_frame(9, b""),
    client_frame(1, "h\u00e9llo \U0001f408".encode()),
    client_frame(1, b'{"text":"par', fin=False) + client_frame(0, b't"}'),
    client_frame(2, b"\x00\x01\x02"),
    client_frame(10, b"pong"),
    client_frame(1, b"x" * 200),
    client_frame(8, struct.pack(">H", 1000) + b"bye"),
]
ops = bytearray()
for i, frame in enumerate(FRAMES):
    for at in range(0, len(frame), 32):
        piece = frame[at:at + 32]
        ops.append(((len(piece) - 1) << 3) | (i % 4))
        ops += piece
    ops.append((3 << 3) | 4)   # a reply of 21 bytes
    ops.append((8 << 3) | 5)   # room for 128 more, flush
write("ws", "chat", bytes([0]) + bytes(ops))
behind = client_frame(1, b'{"text":"a"}')
write("ws", "behind_head", bytes([len(behind)]) + behind + bytes([(31 << 3) | 5, (1 << 3) | 7]))
write("ws", "bad_utf8", bytes([0]) + bytes([(11 << 3)]) + client_frame(1, b"\xc3\x28ok\xff\xfe")[:12] + bytes([6, 5 | (4 << 3)]))
write("ws", "too_big", bytes([0]) + bytes([(7 << 3)]) + client_frame(2, b"")[:2].replace(b"\x80", b"\xff") + struct.pack(">Q", 1 << 20)[:6])

MESSAGES = {
    "plain": '{"text":"hi"}',
    "id_plugin": '{"text":"hi","id":"c-17","plugin":{"a":[1,2.5,null,true]}}',
    "image": '{"image":"data:image/png;base64,AAAA"}',
    "audio_text": '{"text":"what is it","audio":"https://x/a.wav"}',
    "escapes": '{"text":"\\u00e9\\n\\"q\\" \\ud83d\\ude3a \\u0000 \\u2028"}',
    "not_object": '[1,"text"]',
}
for name, m in MESSAGES.items():
    write("client_message", name, m)

OPENAI = ("data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n: keep-alive\n\n"
          "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n"
          "data: {\"choices\":[{\"delta\":{\"content\":\"h\u00e9llo \U0001f408\"}}]}\n\n"
          "data: [DONE]\n\n")
ANTHROPIC = ("event: message_start\ndata: {\"type\":\"message_start\"}\n\n"
             "event: ping\ndata: {\"type\": \"ping\"}\n\nid: 7\nretry: 1000\ndata: a\ndata: b\n\n")
for name, stream in {"openai": OPENAI, "anthropic": ANTHROPIC,
                     "crlf": OPENAI.replace("\n", "\r\n"), "cr": ANTHROPIC.replace("\n", "\r"),
                     "bom": "\ufeff" + OPENAI}.items():
    write("sse", name, bytes([len(name) * 13 % 256, 200]) + stream.encode())


def chunked(body, size=7):
    out = b""
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out += (b"%x;n=v\r\n" if i % 3 else b"%X\r\n") % len(piece) + piece + b"\r\n"
    return out + b"0\r\nX-Trailer: 1\r\n\r\n"


RESPONSES = {
    "openai_chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                      b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n" + chunked(OPENAI.encode()),
    "length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"ok\":\"yes\"}\n",
    "close": b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + OPENAI.encode(),
    "interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
               b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2, 2\r\n\r\nno",
    "no_content": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    "error_json": b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunked(b'{"error":{"message":"Rate limit reached","type":"requests"}}'),
}
for name, resp in RESPONSES.items():
    write("http1", name, bytes([len(name) * 29 % 256, 0xff]) + resp)

CAT = {
    "token": '{"type":"chat_token","content":"Hel"}',
    "notification": '{"type":"notification","content":{"step":1}}',
    "chat_18": '{"type":"chat","user_id":"alice","who":"AI","text":"Hello!","content":"Hello!","why":{"input":"hi"}}',
    "chat_old": '{"type":"chat","content":"Hello!","reply_to":"c-1"}',
    "error": '{"type":"error","name":"AgentError","description":"the LLM is down"}',
    "other": '{"type":"chat","reply_to":"c-2","text":"not ours"}',
    "long": '{"type":"error","description":"' + "\u00e9" * 300 + '"}',
}
for name, f in CAT.items():
    write("cat_frame", name, f)

OUTPUT = {
    "plain": "Hello, world!\n",
    "lines": "line one\nline two\n\n",
    "utf8": "h\u00e9llo \U0001f408 \u4e2d\u6587\n",
    "bad": b"ok \xc3\x28\n",
    "cut": "\U0001f408".encode()[:3],
}
for name, out in OUTPUT.items():
    data = out if isinstance(out, bytes) else out.encode()
    write("process_output", name, bytes([len(name) * 31 % 256, 200]) + data)
