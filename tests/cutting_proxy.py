"""A loopback TCP proxy that cuts the first connection after a given number of bytes.

It runs in its own threads on plain sockets, so the same proxy serves a test
written for ``trio.run`` and one written for ``asyncio.run``. It counts the
bytes it forwards in each direction for every connection, which is how a test
measures what a resumed transfer sent again after the cut.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType
from typing import Literal

import attrs

Direction = Literal["c2s", "s2c"]
_CHUNK = 256 * 1024


@attrs.define(eq=False)
class Leg:
    """One client connection through the proxy and its byte counts."""

    downstream: socket.socket
    upstream: socket.socket
    c2s: int = 0
    s2c: int = 0
    cut: bool = False
    #: Only the client's side was dropped (see :meth:`strand`).
    stranded: bool = False

    def count(self, direction: Direction) -> int:
        """Bytes forwarded in ``direction``."""
        return self.c2s if direction == "c2s" else self.s2c

    def close(self) -> None:
        """Drop both sockets at once, as a broken network would (RST, no FIN).

        A stranded leg keeps its server side open until the proxy stops.
        """
        for sock in (self.downstream,) if self.stranded else (self.downstream, self.upstream):
            _drop(sock)

    def strand(self) -> None:
        """Drop only the client's side: the server keeps a connection that leads nowhere.

        As when a client's network vanishes without a reset reaching the
        server: the client reconnects at once, the server notices only at
        its heartbeat timeout.
        """
        self.stranded = True
        _drop(self.downstream)


def _drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class CuttingProxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:``target_port``; cut the first connection.

    With ``cut_after=(direction, n)``, the first connection (or the one
    numbered ``cut_leg``, from 0) is dropped once ``n`` bytes went through in
    ``direction``; the others are never cut. With ``strand=True`` only its
    client side is (see :meth:`Leg.strand`).
    ``with CuttingProxy(...) as proxy:`` starts and stops it.
    """

    def __init__(
        self,
        target_port: int,
        cut_after: tuple[Direction, int] | None = None,
        *,
        strand: bool = False,
        cut_leg: int = 0,
    ) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.strand = strand
        self.cut_leg = cut_leg
        self.legs: list[Leg] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._threads: list[threading.Thread] = []

    def after_cut(self, direction: Direction) -> int:
        """Bytes forwarded in ``direction`` on the connections opened after the first."""
        with self._lock:
            return sum(leg.count(direction) for leg in self.legs[1:])

    @property
    def was_cut(self) -> bool:
        """Whether the connection to cut (the first, or ``cut_leg``) has been cut."""
        with self._lock:
            return len(self.legs) > self.cut_leg and self.legs[self.cut_leg].cut

    def __enter__(self) -> CuttingProxy:
        self._start(self._accept_loop)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closed = True
        # Wake accept() with a connection, then close everything.
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self._listener.close()
        with self._lock:
            legs = list(self.legs)
        for leg in legs:
            leg.stranded = False
            leg.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _is_closed(self) -> bool:
        # A call, not the attribute: __exit__ sets it from another thread while
        # accept() blocks, so a type checker must not assume it unchanged.
        return self._closed

    def _accept_loop(self) -> None:
        while not self._is_closed():
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            if self._is_closed():
                downstream.close()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                downstream.close()
                continue
            leg = Leg(downstream, upstream)
            with self._lock:
                self.accepted += 1
                chosen = len(self.legs) == self.cut_leg
                self.legs.append(leg)
            cut = self.cut_after if chosen else None
            self._start(self._pump, leg, "c2s", downstream, upstream, cut)
            self._start(self._pump, leg, "s2c", upstream, downstream, cut)

    def _pump(
        self,
        leg: Leg,
        direction: Direction,
        source: socket.socket,
        sink: socket.socket,
        cut: tuple[Direction, int] | None,
    ) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                if cut is not None and cut[0] == direction:
                    room = cut[1] - leg.count(direction)
                    if room <= len(data):
                        sink.sendall(data[: max(room, 0)])
                        with self._lock:
                            setattr(leg, direction, leg.count(direction) + max(room, 0))
                            leg.cut = True
                            leg.stranded = self.strand
                        break
                sink.sendall(data)
                with self._lock:
                    setattr(leg, direction, leg.count(direction) + len(data))
        except OSError:
            pass
        leg.close()
