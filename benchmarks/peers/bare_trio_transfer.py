"""The raw-socket reference's work and wire on plain Trio: the floor of a Trio engine.

``raw_reference.py`` does the transfer's work in one blocking loop per side.
This peer does exactly the same work over exactly the same wire (its
``REQUEST``, records, nonces, key and answers) on Trio, the way a Trio
program keeps disk and CPU-heavy calls off the event loop, and nothing else:
no framing of its own, no multiplexing, no credit, no fairness between streams.

* sender: a task hands each 1 MiB record to a worker thread
  (``trio.to_thread.run_sync``) that reads it from the file, hashes it and
  seals it; another task sends the sealed records (``send_all``), so reading
  the next record overlaps sending this one (one record queued between them);
* receiver: a task receives each record into a buffer (``recv_into``); another
  hands it to a worker thread that opens it, hashes it and writes it; then
  ``fsync`` and publish (``rename``) in a worker thread, as the reference does.

Three record buffers per side bound the memory (one being filled, one
queued, one being sent or written). Against ``raw_reference.py`` in the same
run it shows what the event loop, its worker-thread hops and its task
switches cost a transfer; against conduit, what conduit's protocol costs on
top of them. It is not the reference's structure exactly: it reads one record
ahead and uses two threads per side (the loop and a worker) where the
reference uses one, and opens records into one reused buffer where the
reference allocates each. On a machine whose cores both peers already fill
(the 2-vCPU benchmark machine), what it loses is its extra CPU; with spare
cores its read-ahead could let it pass the reference.

Usage: ``python bare_trio_transfer.py server --spec '{"storage": DIR}'`` /
``python bare_trio_transfer.py client --port N --spec JSON`` (the ``transfer``
kind of ``_transferlib``; records are always sealed, 1 MiB).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Callable
from typing import Any

import _peerlib
import _transferlib
from raw_reference import (
    CLIENT_TO_SERVER,
    DEFAULT_RECORD,
    DOWNLOAD,
    KEY,
    LENGTH,
    REQUEST,
    SERVER_TO_CLIENT,
    SIZE,
    TAG,
    UPLOAD,
)

#: Record buffers per side: one being filled, one queued, one being sent or written.
BUFFERS = 3


class Records:
    """One direction of a connection: sealed records out or in, nonces in order."""

    def __init__(self, stream: Any, direction: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.stream = stream
        self.direction = direction
        self.counter = 0
        self.aead = AESGCM(KEY)

    def next_nonce(self) -> bytes:
        """The next record's nonce (taken in wire order, on the event loop)."""
        nonce = self.direction + self.counter.to_bytes(8, "big")
        self.counter += 1
        return nonce

    async def send(self, plaintext: bytes) -> None:
        """Seal and send one short record inline (answers, sizes, digests)."""
        prefix = LENGTH.pack(len(plaintext) + TAG)
        await self.stream.send_all(prefix + self.aead.encrypt(self.next_nonce(), plaintext, prefix))

    async def receive_into(self, buffer: bytearray) -> tuple[bytes, bytes, memoryview]:
        """Receive one record's ciphertext into ``buffer``: (nonce, prefix, ciphertext view)."""
        prefix = bytes(await self.receive_exactly(bytearray(LENGTH.size)))
        (size,) = LENGTH.unpack(prefix)
        if size > DEFAULT_RECORD + TAG:
            raise ValueError(f"record of {size} bytes is too large")
        if len(buffer) < size:
            buffer.extend(bytes(size - len(buffer)))
        body = await self.receive_exactly(buffer, size)
        return self.next_nonce(), prefix, body

    async def receive(self) -> bytes:
        """Receive and open one short record inline."""
        nonce, prefix, body = await self.receive_into(bytearray(0))
        plaintext: bytes = self.aead.decrypt(nonce, bytes(body), prefix)
        return plaintext

    async def receive_exactly(self, buffer: bytearray, size: int | None = None) -> memoryview:
        """Fill ``buffer`` (its first ``size`` bytes) from the socket; a view of them."""
        size = len(buffer) if size is None else size
        view = memoryview(buffer)[:size]
        received = 0
        while received < size:
            count = await self.stream.socket.recv_into(view[received:], size - received)
            if not count:
                raise ConnectionError("peer closed the connection mid-record")
            received += count
        return view


async def send_file(records: Records, path: str, size: int) -> bytes:
    """Read, hash and seal each record in a worker thread; send them from another task."""
    import trio

    hasher = hashlib.sha256()
    pool = [bytearray(LENGTH.size + min(DEFAULT_RECORD, size) + TAG) for _ in range(BUFFERS)]
    # One plaintext buffer: the worker calls run one at a time, and each seals it before it returns.
    block = bytearray(min(DEFAULT_RECORD, size))
    # Closed below, after both tasks.
    file = await trio.to_thread.run_sync(functools.partial(io.FileIO, path, "r"))

    def read_hash_seal(buffer: bytearray, count: int, nonce: bytes) -> memoryview:
        plaintext = memoryview(block)[:count]
        got = file.readinto(plaintext)
        if got != count:
            raise OSError(f"file shrank while being sent ({got} of {count})")
        hasher.update(plaintext)
        prefix = LENGTH.pack(count + TAG)
        record = memoryview(buffer)[: LENGTH.size + count + TAG]
        record[: LENGTH.size] = prefix
        records.aead.encrypt_into(nonce, plaintext, prefix, record[LENGTH.size :])
        return record

    send_queue, sent_queue = trio.open_memory_channel[memoryview](1)

    async def produce() -> None:
        async with send_queue:
            done = 0
            index = 0
            while done < size:
                count = min(DEFAULT_RECORD, size - done)
                record = await trio.to_thread.run_sync(
                    read_hash_seal, pool[index % BUFFERS], count, records.next_nonce()
                )
                await send_queue.send(record)
                done += count
                index += 1

    async def transmit() -> None:
        async with sent_queue:
            async for record in sent_queue:
                await records.stream.send_all(record)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(transmit)
    finally:
        file.close()
    return hasher.digest()


async def receive_file(records: Records, path: str, size: int) -> bytes:
    """Receive each record on the loop; open, hash and write it in a worker thread; publish."""
    import trio

    hasher = hashlib.sha256()
    pool = [bytearray(min(DEFAULT_RECORD, size) + TAG) for _ in range(BUFFERS)]
    plaintext = bytearray(min(DEFAULT_RECORD, size))
    partial = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = await trio.to_thread.run_sync(os.open, partial, flags, 0o644)

    def open_hash_write(nonce: bytes, prefix: bytes, body: memoryview) -> int:
        count = len(body) - TAG
        out = memoryview(plaintext)[:count]
        records.aead.decrypt_into(nonce, body, prefix, out)
        hasher.update(out)
        written = 0
        while written < count:
            written += os.write(fd, out[written:])
        return count

    arrived_queue, write_queue = trio.open_memory_channel[tuple[bytes, bytes, memoryview]](1)

    async def take_in() -> None:
        async with arrived_queue:
            done = 0
            index = 0
            while done < size:
                nonce, prefix, body = await records.receive_into(pool[index % BUFFERS])
                await arrived_queue.send((nonce, prefix, body))
                done += len(body) - TAG
                index += 1

    async def write_out() -> None:
        async with write_queue:
            async for nonce, prefix, body in write_queue:
                await trio.to_thread.run_sync(open_hash_write, nonce, prefix, body)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take_in)
            nursery.start_soon(write_out)
        await trio.to_thread.run_sync(os.fsync, fd)
    finally:
        os.close(fd)
    await trio.to_thread.run_sync(os.rename, partial, path)
    return hasher.digest()


async def _request_of(incoming: Records) -> tuple[int, int, str] | None:
    """One request header, or None when the client hung up between requests."""
    first = await incoming.stream.receive_some(1)
    if not first:
        return None
    rest = await incoming.receive_exactly(bytearray(REQUEST.size - 1))
    op, size, name_length = REQUEST.unpack(first + bytes(rest))
    name = await incoming.receive_exactly(bytearray(name_length))
    return op, size, bytes(name).decode()


def _handler(storage: str) -> Callable[[Any], Any]:
    import trio

    async def handle(stream: Any) -> None:
        # A failed request (a missing file, a client gone) ends its connection,
        # not the server, as raw_reference.py's thread per connection does.
        # (except*: a failure inside a transfer's nursery comes in a group.)
        try:
            await _serve_requests(stream, storage)
        except* (OSError, ValueError, trio.BrokenResourceError):
            pass  # the connection ends here; serve_tcp closes it

    return handle


async def _serve_requests(stream: Any, storage: str) -> None:
    """Answer one connection's requests, in sequence, until it hangs up."""
    incoming = Records(stream, CLIENT_TO_SERVER)
    outgoing = Records(stream, SERVER_TO_CLIENT)
    while (request := await _request_of(incoming)) is not None:
        op, size, name = request
        path = os.path.join(storage, os.path.basename(name))
        if op == UPLOAD:
            await outgoing.send(await receive_file(incoming, path, size))
        elif op == DOWNLOAD:
            total = os.stat(path).st_size
            await outgoing.send(SIZE.pack(total))
            await outgoing.send(await send_file(outgoing, path, total))
        else:
            return


async def serve(spec: dict[str, Any]) -> None:
    """Serve uploads and downloads into ``spec["storage"]`` until SIGTERM."""
    import trio

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _handler(spec["storage"]), 0, host=_peerlib.HOST)
        )
        _peerlib.announce_port(listeners[0].socket.getsockname()[1])
        await _peerlib.trio_until_terminated()
        nursery.cancel_scope.cancel()


async def client(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec's transfers (``kind: transfer``) in sequence; return the measurements."""
    import trio

    if spec["kind"] != "transfer":
        raise ValueError(f"unsupported kind {spec['kind']!r}")
    runtime = _peerlib.runtime_info("bare-trio-transfer", trio)
    result: dict[str, Any] = {"runtime": {**runtime, "record": DEFAULT_RECORD}, "ops": []}
    stream = await trio.open_tcp_stream(_peerlib.HOST, port)
    outgoing = Records(stream, CLIENT_TO_SERVER)
    incoming = Records(stream, SERVER_TO_CLIENT)
    try:
        for op in spec["ops"]:
            with _transferlib.OpTimer(spec.get("server_pid"), spec.get("prime")) as timer:
                name = os.path.basename(op["name"])
                if op["op"] == "upload":
                    size = os.stat(op["path"]).st_size
                    await stream.send_all(REQUEST.pack(UPLOAD, size, len(name)) + name.encode())
                    digest = await send_file(outgoing, op["path"], size)
                    if await incoming.receive() != digest:
                        raise RuntimeError("server digest differs from ours")
                    outcome = {"success": True, "path": name, "size": size}
                else:
                    await stream.send_all(REQUEST.pack(DOWNLOAD, 0, len(name)) + name.encode())
                    (size,) = SIZE.unpack(await incoming.receive())
                    path = os.path.join(op["dir"], name)
                    digest = await receive_file(incoming, path, size)
                    if await incoming.receive() != digest:
                        raise RuntimeError("server digest differs from ours")
                    outcome = {"success": True, "path": path, "size": size}
            result["ops"].append({"op": op["op"], "result": outcome, **timer.figures(size)})
    finally:
        await stream.aclose()
    return result


def main() -> None:
    """Entry point (see the module docstring)."""
    import trio

    args = _peerlib.parse_args()
    spec = _peerlib.parse_spec(args.spec)
    if args.role == "server":
        trio.run(serve, spec)
        return
    with _peerlib.maybe_profiled("bare-trio-transfer-client"):
        result = trio.run(client, args.port, spec)
    _peerlib.emit_result(result)


if __name__ == "__main__":
    main()
