"""The RPC hot path's shortcuts behave exactly as the general paths they skip.

* Records of every size open the same way: small ones (a call, a result) from
  a copy of their bytes, middle-sized ones through a view, large ones into a
  mapped buffer. The same tampering (ciphertext, length prefix, a replayed or
  reordered record, a length beyond the limit) is refused the same way by each.
* ``SocketIO.receive`` waits for readability first after a read that drained
  the socket; whatever arrives (before or after it is called, in one piece or
  several, or the end of the stream) is still returned, a closed socket is
  still a closed stream, and cancellation still works.
* The writer sends small records with one non-blocking write: what the socket
  does not take still goes out, in order.
"""

from __future__ import annotations

import socket

import pytest
import trio

from conduit._socket_io import SocketIO
from conduit.errors import IntegrityError, RemoteProtocolError
from conduit.protocol.records import MAPPED_MIN, RecordOpener, RecordSealer

KEY = bytes(range(32))
LIMIT = 2 << 20

#: One size per way of opening a record: copied, viewed, mapped.
SIZES = [100, 16 * 1024, MAPPED_MIN + 1000]


def _records(count: int, size: int) -> list[bytes]:
    sealer = RecordSealer(KEY, LIMIT)
    return [bytes(sealer.seal(bytes([index]) * size)) for index in range(count)]


def _open_all(data: list[bytes | bytearray], *, split: int | None = None) -> list[bytes]:
    opener = RecordOpener(KEY, LIMIT)
    opened = []
    for chunk in data:
        pieces = [chunk] if split is None else [chunk[:split], chunk[split:]]
        for piece in pieces:
            opener.feed(piece)
            while (record := opener.next_record()) is not None:
                opened.append(bytes(record))
    return opened


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("split", [None, 3, 9])
def test_every_size_opens_whole_or_split(size: int, split: int | None) -> None:
    """Whole chunks (bytes, opened in place) and split ones (buffered) alike."""
    assert _open_all(list(_records(3, size)), split=split) == [bytes([i]) * size for i in range(3)]


def _flip(record: bytes, index: int) -> bytes:
    altered = bytearray(record)
    altered[index] ^= 0x01
    return bytes(altered)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("split", [None, 5])
@pytest.mark.parametrize(
    "tamper",
    ["ciphertext", "tag", "replay", "reorder", "truncated-length"],
)
def test_every_size_refuses_the_same_tampering(size: int, split: int | None, tamper: str) -> None:
    first, second = _records(2, size)
    if tamper == "ciphertext":
        stream = [_flip(first, 10)]
    elif tamper == "tag":
        stream = [_flip(first, len(first) - 1)]
    elif tamper == "replay":
        stream = [first, first]
    elif tamper == "reorder":
        stream = [second]
    else:
        # A smaller length prefix: the AEAD's associated data no longer matches.
        shorter = (int.from_bytes(first[:4], "big") - 1).to_bytes(4, "big")
        stream = [shorter + first[4:]]
    with pytest.raises(IntegrityError, match="failed authentication"):
        _open_all(stream, split=split)


@pytest.mark.parametrize("sealed_size", [LIMIT + 17, 15])
def test_a_length_outside_the_limits_is_refused_before_buffering(sealed_size: int) -> None:
    opener = RecordOpener(KEY, LIMIT)
    opener.feed(sealed_size.to_bytes(4, "big") + b"x" * 32)
    with pytest.raises(RemoteProtocolError, match="outside the limit"):
        opener.next_record()


def _socket_io_pair() -> tuple[SocketIO, trio.SocketStream, trio.SocketStream]:
    left, right = socket.socketpair()
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(right))
    io = SocketIO.of(ours)
    assert io is not None
    return io, ours, peer


async def test_a_drained_socket_still_returns_what_arrives_later_and_meanwhile() -> None:
    io, ours, peer = _socket_io_pair()
    with trio.fail_after(10):
        await peer.send_all(b"first")
        assert await io.receive(1024) == b"first"  # short: drained
        assert io._drained
        # Already there when receive is called: readable at once.
        await peer.send_all(b"meanwhile")
        assert await io.receive(1024) == b"meanwhile"
        # Arrives while receive waits.
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.sleep(0.01)
                await peer.send_all(b"later")

            nursery.start_soon(later)
            assert await io.receive(1024) == b"later"
        # A read that fills the request: the next one tries to read at once.
        await peer.send_all(b"x" * 10)
        assert await io.receive(4) == b"xxxx"
        assert not io._drained
        assert await io.receive(1024) == b"x" * 6
        await peer.aclose()
        assert await io.receive(1024) == b""  # end of stream
    await ours.aclose()


async def test_a_drained_socket_can_be_cancelled_and_closed() -> None:
    io, ours, peer = _socket_io_pair()
    with trio.fail_after(10):
        await peer.send_all(b"one")
        assert await io.receive(1024) == b"one"
        with trio.move_on_after(0.01) as scope:
            await io.receive(1024)
        assert scope.cancelled_caught
        # Nothing was lost by the cancellation.
        await peer.send_all(b"two")
        assert await io.receive(1024) == b"two"
        await ours.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await io.receive(1024)
    await peer.aclose()
