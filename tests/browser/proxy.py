"""A TCP proxy between the browser and straycat that a test can cut.

It records the request line and headers of every connection (the page, each WebSocket
upgrade, fetches), can drop every open connection at once while it keeps accepting new ones,
and can refuse WebSocket upgrades (close the connection on reading one) for as long as a test
wants, while plain HTTP still passes, so that the page itself can be reloaded meanwhile. Threads, not
asyncio: a handful of connections, and a test drives it from the outside.
"""

import socket
import threading
import time

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT_S = 10


class Request:
    """One connection's request head, as the proxy saw it."""

    def __init__(self, at, head):
        self.at = at
        lines = head.decode("latin-1").split("\r\n")
        self.line = lines[0]
        parts = self.line.split(" ")
        self.method = parts[0]
        self.target = parts[1] if len(parts) > 1 else ""
        self.path = self.target.split("?", 1)[0]
        self.headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                self.headers[name.strip().lower()] = value.strip()

    def __repr__(self):
        return f"Request({self.at:.3f}, {self.line!r})"


class Proxy:
    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.requests = []
        self.refused = 0
        self._refusing = False
        self._open = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    # --- what tests call

    def drop_all(self):
        """Closes every connection in flight; new ones are still accepted."""
        with self.lock:
            socks, self._open = self._open, set()
        for s in socks:
            _close(s)

    def refuse(self, on=True):
        """While on, every WebSocket upgrade is closed unanswered (and counted in `refused`,
        not in `requests`)."""
        with self.lock:
            self._refusing = on

    def upgrades(self):
        """The WebSocket upgrade requests seen so far, oldest first."""
        with self.lock:
            return [r for r in self.requests if r.headers.get("upgrade", "").lower() == "websocket"]

    def seen(self, method, path):
        with self.lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    def close(self):
        self._closed = True
        _close(self.listener)
        self.drop_all()

    # --- the proxy itself

    def _accept_loop(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        with self.lock:
            self._open.add(client)
        head = _read_head(client)
        if head is None:
            return self._forget(client)
        request = Request(time.monotonic(), head[: head.index(b"\r\n\r\n")])
        with self.lock:
            refused = self._refusing and request.headers.get("upgrade", "").lower() == "websocket"
            if refused:
                self.refused += 1
            else:
                self.requests.append(request)
        if refused:
            return self._forget(client)
        try:
            upstream = socket.create_connection(self.target, timeout=HEAD_TIMEOUT_S)
            upstream.settimeout(None)
        except OSError:
            return self._forget(client)
        with self.lock:
            if client not in self._open:  # dropped while we connected
                _close(upstream)
                return
            self._open.add(upstream)
        upstream.sendall(head)
        other = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        other.start()
        _pump(client, upstream)
        other.join()
        self._forget(client)
        self._forget(upstream)

    def _forget(self, s):
        with self.lock:
            self._open.discard(s)
        _close(s)


def _read_head(s):
    """The bytes up to and including the end of the request head (and whatever came with it)."""
    s.settimeout(HEAD_TIMEOUT_S)
    data = b""
    try:
        while b"\r\n\r\n" not in data and len(data) < HEAD_LIMIT:
            chunk = s.recv(4096)
            if not chunk:
                return None
            data += chunk
    except OSError:
        return None
    s.settimeout(None)
    return data if b"\r\n\r\n" in data else None


def _pump(src, dst):
    try:
        while True:
            chunk = src.recv(65536)
            if not chunk:
                # A clean end of one direction (the server's `Connection: close`): pass it
                # on and let the other direction finish.
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(chunk)
    except OSError:
        # A reset or a drop_all: the whole connection is gone.
        _close(src)
        _close(dst)


def _close(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
