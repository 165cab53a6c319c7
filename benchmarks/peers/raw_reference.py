"""Raw-socket file transfer doing the same work as conduit, and nothing else: the reference.

The simplest competent implementation a person would write: blocking sockets,
one thread per side (the client's main thread; one server thread per
connection, ``socketserver.ThreadingTCPServer``), and two plain loops:

* sender: ``read -> sha256.update -> seal -> sendall``;
* receiver: ``recv -> open -> sha256.update -> write``, ``fsync`` at the end,
  then publish (``rename`` of a partial file) and answer with its digest.

Same chunking as conduit: the file is read in 64 KiB chunks. Records: with
``"record": 1048576`` (the default) a record carries 16 chunks read in one
``readinto`` (1 MiB, one seal, one ``sendall``), which is exactly the record
size conduit's writer seals (frames coalesced up to 1 MiB) and the block size
its sender reads and hashes in one go; with ``"record": 65536`` every chunk is
its own record (16 times more seals, syscalls and Python iterations per MiB).
The same AEAD as conduit: AES-256-GCM from ``cryptography``, 12-byte nonce =
4-byte direction + 8-byte big-endian counter, the 4-byte length prefix as
associated data. ``"aead": false`` sends the same records unsealed, to show
what encryption costs. There is no handshake (a fixed key from the password):
the reference measures data transfer only.

Wire, per request on one connection (any number of requests, in sequence)::

    request  = op (u8: 1 upload, 2 download) || size (u64) || name length (u16) || name
    record   = length (u32) || AES-256-GCM(plaintext) with tag, or the plaintext
    upload   : client sends ``size`` bytes in records; server answers one record
               with the 32-byte SHA-256 of what it wrote and fsynced
    download : server sends one record with the size (u64), then the data
               records, then one record with the 32-byte SHA-256

Usage: ``python raw_reference.py server --spec '{"storage": DIR}'`` /
``python raw_reference.py client --port N --spec JSON`` (see ``_transferlib``;
``"aead"`` and ``"record"`` in the client spec choose the variant).
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import socketserver
import struct
import threading
from typing import Any

import _peerlib
import _transferlib

CHUNK = 64 * 1024
DEFAULT_RECORD = 1024 * 1024
REQUEST = struct.Struct("!BQH")
LENGTH = struct.Struct("!I")
SIZE = struct.Struct("!Q")
TAG = 16
UPLOAD, DOWNLOAD = 1, 2
FLAG_PLAIN = 0x80  # set in the op byte: this request's records are not sealed
KEY = hashlib.sha256(_peerlib.PASSWORD.encode()).digest()
CLIENT_TO_SERVER, SERVER_TO_CLIENT = b"c2s\x00", b"s2c\x00"


class Channel:
    """One direction of a connection: records in or out, sealed or not."""

    def __init__(self, sock: socket.socket, direction: bytes, aead: bool) -> None:
        self.sock = sock
        self.direction = direction
        self.counter = 0
        self.aead: Any = None
        if aead:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self.aead = AESGCM(KEY)
        # Grown on demand to the largest record seen: 4 KiB files need no 1 MiB buffers.
        self.buffer = bytearray(0)
        self.sealed = bytearray(0)

    def _nonce(self) -> bytes:
        nonce = self.direction + self.counter.to_bytes(8, "big")
        self.counter += 1
        return nonce

    def send(self, plaintext: bytes | bytearray | memoryview) -> None:
        """Seal (or not) one record and send it."""
        size = len(plaintext) + (TAG if self.aead is not None else 0)
        prefix = LENGTH.pack(size)
        if self.aead is None:
            self.sock.sendall(prefix)
            self.sock.sendall(plaintext)
            return
        # Seal straight behind the length prefix: one buffer, one sendall, no copy.
        if len(self.sealed) < LENGTH.size + size:
            self.sealed = bytearray(LENGTH.size + size)
        record = memoryview(self.sealed)[: LENGTH.size + size]
        record[: LENGTH.size] = prefix
        self.aead.encrypt_into(self._nonce(), plaintext, prefix, record[LENGTH.size :])
        self.sock.sendall(record)

    def receive(self) -> bytes | memoryview:
        """Receive and open one record (the returned view is valid until the next call)."""
        prefix = bytes(self._exactly(LENGTH.size))
        (size,) = LENGTH.unpack(prefix)
        if size > DEFAULT_RECORD + TAG:
            raise ValueError(f"record of {size} bytes is too large")
        body = self._exactly(size)
        if self.aead is None:
            return body
        plaintext: bytes = self.aead.decrypt(self._nonce(), body, prefix)
        return plaintext

    def _exactly(self, size: int) -> memoryview:
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        view = memoryview(self.buffer)[:size]
        received = 0
        while received < size:
            count = self.sock.recv_into(view[received:], size - received)
            if not count:
                raise ConnectionError("peer closed the connection mid-record")
            received += count
        return view


def send_file(channel: Channel, file: io.FileIO, size: int, record: int) -> bytes:
    """The sender's loop: read -> hash -> seal -> send. Returns the SHA-256."""
    hasher = hashlib.sha256()
    block = bytearray(min(record, size))
    view = memoryview(block)
    sent = 0
    while sent < size:
        count = file.readinto(view[: min(record, size - sent)]) or 0
        if not count:
            raise OSError(f"file shrank while being sent ({sent} of {size})")
        hasher.update(view[:count])
        channel.send(view[:count])
        sent += count
    return hasher.digest()


def receive_file(channel: Channel, path: str, size: int) -> bytes:
    """The receiver's loop: recv -> open -> hash -> write; fsync; publish. Returns the SHA-256."""
    hasher = hashlib.sha256()
    partial = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial")
    with io.FileIO(partial, "w") as file:
        received = 0
        while received < size:
            data = channel.receive()
            hasher.update(data)
            file.write(data)
            received += len(data)
        os.fsync(file.fileno())
    os.rename(partial, path)
    return hasher.digest()


def _read_request(sock: socket.socket) -> tuple[int, bool, int, str] | None:
    header = b""
    while len(header) < REQUEST.size:
        more = sock.recv(REQUEST.size - len(header))
        if not more:
            if header:
                raise ConnectionError("peer closed the connection mid-request")
            return None
        header += more
    op, size, name_length = REQUEST.unpack(header)
    name = b""
    while len(name) < name_length:
        more = sock.recv(name_length - len(name))
        if not more:
            raise ConnectionError("peer closed the connection mid-request")
        name += more
    return op & ~FLAG_PLAIN, not op & FLAG_PLAIN, size, name.decode()


class _Handler(socketserver.BaseRequestHandler):
    """One thread per connection: serve requests until the client hangs up."""

    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        storage = self.server.storage
        channels: dict[bool, tuple[Channel, Channel]] = {}
        while (request := _read_request(sock)) is not None:
            op, aead, size, name = request
            if aead not in channels:  # nonce counters run on across requests
                channels[aead] = (
                    Channel(sock, CLIENT_TO_SERVER, aead),
                    Channel(sock, SERVER_TO_CLIENT, aead),
                )
            incoming, outgoing = channels[aead]
            path = os.path.join(storage, os.path.basename(name))
            if op == UPLOAD:
                digest = receive_file(incoming, path, size)
                outgoing.send(digest)
            elif op == DOWNLOAD:
                with io.FileIO(path, "r") as file:
                    total = os.fstat(file.fileno()).st_size
                    outgoing.send(SIZE.pack(total))
                    outgoing.send(send_file(outgoing, file, total, size or DEFAULT_RECORD))
            else:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    storage = "."


def serve(spec: dict[str, Any]) -> None:
    """Serve uploads and downloads into ``spec["storage"]`` until SIGTERM."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = _Server((_peerlib.HOST, 0), _Handler)
    server.storage = spec["storage"]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _peerlib.announce_port(server.server_address[1])
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------- client


class RawClient:
    """One connection to the reference server; requests in sequence."""

    def __init__(self, port: int, *, aead: bool, record: int) -> None:
        self.sock = socket.create_connection((_peerlib.HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.aead = aead
        self.record = record
        self.outgoing = Channel(self.sock, CLIENT_TO_SERVER, aead)
        self.incoming = Channel(self.sock, SERVER_TO_CLIENT, aead)

    def _request(self, op: int, size: int, name: str) -> tuple[Channel, Channel]:
        encoded = name.encode()
        flag = 0 if self.aead else FLAG_PLAIN
        self.sock.sendall(REQUEST.pack(op | flag, size, len(encoded)) + encoded)
        return self.outgoing, self.incoming

    def upload(self, path: str, name: str) -> dict[str, Any]:
        """Send ``path``; the server's digest must match ours."""
        with io.FileIO(path, "r") as file:
            size = os.fstat(file.fileno()).st_size
            outgoing, incoming = self._request(UPLOAD, size, name)
            digest = send_file(outgoing, file, size, self.record)
        answer = bytes(incoming.receive())
        if answer != digest:
            raise RuntimeError("server digest differs from ours")
        return {"success": True, "path": os.path.basename(name), "size": size}

    def download(self, name: str, directory: str) -> dict[str, Any]:
        """Fetch ``name`` into ``directory``; our digest must match the server's."""
        outgoing, incoming = self._request(DOWNLOAD, self.record, name)
        del outgoing
        (size,) = SIZE.unpack(incoming.receive())
        path = os.path.join(directory, os.path.basename(name))
        digest = receive_file(incoming, path, size)
        if bytes(incoming.receive()) != digest:
            raise RuntimeError("server digest differs from ours")
        return {"success": True, "path": path, "size": size}

    def close(self) -> None:
        """Hang up."""
        self.sock.close()


def client(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec (``transfer`` or ``smallfiles``); return the measurements."""
    aead = bool(spec.get("aead", True))
    record = int(spec.get("record", DEFAULT_RECORD))
    runtime = _peerlib.runtime_info("raw-reference")
    runtime.update(aead=aead, record=record)
    result: dict[str, Any] = {"runtime": runtime, "ops": []}
    raw = RawClient(port, aead=aead, record=record)
    try:
        if spec["kind"] == "transfer":
            for op in spec["ops"]:
                with _transferlib.OpTimer(spec.get("server_pid"), spec.get("prime")) as timer:
                    if op["op"] == "upload":
                        outcome = raw.upload(op["path"], op["name"])
                    else:
                        outcome = raw.download(op["name"], op["dir"])
                result["ops"].append(
                    {"op": op["op"], "result": outcome, **timer.figures(outcome["size"])}
                )
        elif spec["kind"] == "smallfiles":
            steps = _transferlib.SmallFileSteps(spec)
            steps.ready()
            while (part := steps.next_slice()) is not None:
                with _transferlib.OpTimer(steps.server_pid) as timer:
                    for name in part["names"]:
                        raw.upload(os.path.join(part["dir"], name), name)
                steps.finished(len(part["names"]), timer)
            result["smallfiles"] = steps.result(1)
        else:
            raise ValueError(f"unknown kind {spec['kind']!r}")
    finally:
        raw.close()
    return result


def main() -> None:
    """Entry point (see the module docstring)."""
    args = _peerlib.parse_args()
    spec = _peerlib.parse_spec(args.spec)
    if args.role == "server":
        serve(spec)
        return
    with _peerlib.maybe_profiled("raw-client"):
        result = client(args.port, spec)
    _peerlib.emit_result(result)


if __name__ == "__main__":
    main()
