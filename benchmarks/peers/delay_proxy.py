"""A long link on loopback: a TCP proxy that delays each direction (for ``long_link``).

Each chunk read from one side is written to the other ``rtt/2`` later, in
order, with no waiting in between (a delay line, not stop-and-wait), so the
proxy adds latency without capping throughput by itself. ``--rate`` caps each
direction (MB/s) as a link's narrowest point would, and what waits to leave
queues, as in a router's buffer, up to ``--queue`` bytes per direction; beyond
that the proxy stops reading, and TCP holds the sender back. The kernel has
no netem here, and a proxy is what any machine has.

Usage: ``python delay_proxy.py --target PORT --rtt-ms 80 [--rate 100] [--queue BYTES]``;
prints ``PORT n`` (where it listens on 127.0.0.1) and serves until SIGTERM.
Standard library only; one thread per direction per connection.
"""

from __future__ import annotations

import argparse
import collections
import signal
import socket
import sys
import threading
import time

CHUNK = 64 * 1024


class Direction:
    """One way of one proxied connection: read, hold for the delay, write."""

    def __init__(
        self, source: socket.socket, sink: socket.socket, delay: float, rate: float, queue: int
    ) -> None:
        self.source, self.sink = source, sink
        self.delay, self.rate, self.queue_limit = delay, rate, queue
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.changed = threading.Condition()
        self.departs = 0.0  # when the last queued byte leaves the narrowest point

    def read(self) -> None:
        """Take what the source sends, stamped with when it may be written."""
        try:
            while True:
                with self.changed:
                    while self.queued >= self.queue_limit:
                        self.changed.wait()
                data = self.source.recv(CHUNK)
                now = time.monotonic()
                if self.rate:
                    self.departs = max(now, self.departs) + len(data) / self.rate
                else:
                    self.departs = now
                with self.changed:
                    self.queue.append((self.departs + self.delay, data))
                    self.queued += len(data)
                    self.changed.notify_all()
                if not data:  # end of stream, passed on in its turn
                    return
        except OSError:
            with self.changed:
                self.queue.append((0.0, b""))
                self.changed.notify_all()

    def write(self) -> None:
        """Write each chunk once its time has come; pass the end of stream on."""
        try:
            while True:
                with self.changed:
                    while not self.queue:
                        self.changed.wait()
                    due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    self.sink.shutdown(socket.SHUT_WR)
                    return
                self.sink.sendall(data)
                with self.changed:
                    self.queue.popleft()
                    self.queued -= len(data)
                    self.changed.notify_all()
        except OSError:
            return


def proxy(client: socket.socket, target: int, delay: float, rate: float, queue: int) -> None:
    """Carry one connection both ways until both ends have closed."""
    try:
        server = socket.create_connection(("127.0.0.1", target))
    except OSError:
        client.close()
        return
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threads = []
    for source, sink in ((client, server), (server, client)):
        way = Direction(source, sink, delay, rate, queue)
        threads += [threading.Thread(target=way.read), threading.Thread(target=way.write)]
    for thread in threads:
        thread.daemon = True
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    server.close()


def main() -> None:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--rtt-ms", type=float, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="MB/s each way (0: no cap)")
    parser.add_argument("--queue", type=int, default=32 * 1024 * 1024, help="bytes each way")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(
            target=proxy,
            args=(client, args.target, args.rtt_ms / 2000, args.rate * 1e6, args.queue),
            daemon=True,
        ).start()


if __name__ == "__main__":
    main()
