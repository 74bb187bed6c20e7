"""A TCP forwarder on 127.0.0.1 for the tests, the fakes and the benchmarks: what the fake
Vast.ai API serves as an instance's SSH proxy, and what launch_overhead.py counts bytes through."""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    """127.0.0.1:port -> 127.0.0.1:upstream; `sent` counts the bytes clients send upstream."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.sent = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:  # nothing listens upstream (yet, or any more): refuse this one
                client.close()
                continue
            upstream.settimeout(None)  # the timeout was for connecting; an idle SSH session is fine
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if counted:
                    with self.lock:
                        self.sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
