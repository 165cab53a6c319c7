"""Helpers for the hostile-input and fault suite, and the registry behind its doc.

* :func:`hostile` registers a test as checking one hostile input or fault. The
  table in ``docs/hostile-inputs.md`` is *generated* from this registry
  (``python tests/hostile_helpers.py --write``) and
  ``test_hostile_peers.py::test_hostile_inputs_doc_is_generated_from_the_tests``
  fails when the two differ, or when a test of the suite is not registered: the
  doc cannot drift from the tests.
* :class:`RawPeer` speaks the protocol by hand over a raw Trio socket: it drives
  :class:`~conduit.protocol.ClientHandshake` itself, then seals whatever frames a
  test crafts (bad lengths, unknown kinds, data beyond the window) with the real
  session keys, so hostile input reaches the server's frame parser *behind* the
  AEAD.
* Resource probes: open descriptors, Trio tasks, memory (tracemalloc / RSS).

Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import msgpack
import trio

from conduit.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    ClientHandshake,
    Frame,
    FrameKind,
    FrameReader,
    FrameWriter,
    decode_body,
    encode_frame,
)
from conduit.protocol.frames import MAGIC, PROTOCOL_VERSION
from conduit.protocol.messages import Call, Result
from conduit.protocol.records import LENGTH

LOOPBACK = "127.0.0.1"
HEADER = struct.Struct("!2sBBBxII")

F = TypeVar("F", bound=Callable[..., Any])

# --------------------------------------------------------------------------- registry

TESTS_DIR = Path(__file__).resolve().parent
DOC_PATH = TESTS_DIR.parent / "docs" / "hostile-inputs.md"
#: The test modules whose every test must be registered (and so documented).
SUITE_MODULES = (
    "test_hostile_peers",
    "test_faults",
    "test_load",
    "test_fuzz_properties",
    "test_resource_limits",
    "test_disk_abuse",
    "test_account_storage",
)
BEGIN = "<!-- BEGIN GENERATED TABLE: python tests/hostile_helpers.py --write -->"
END = "<!-- END GENERATED TABLE -->"


@attrs.frozen
class Case:
    """One hostile input or fault, what conduit does about it, and the test that checks it."""

    case_id: str
    area: str
    attack: str
    behaviour: str
    test: str
    #: The library bug this case found (since fixed; the test keeps it from returning).
    found: str = ""


CASES: dict[str, Case] = {}


def hostile(
    case_id: str, *, area: str, attack: str, behaviour: str, found: str = ""
) -> Callable[[F], F]:
    """Register the decorated test as the check for one hostile input or fault."""

    def decorator(function: F) -> F:
        module = function.__module__.rsplit(".", 1)[-1]
        test = f"tests/{module}.py::{function.__name__}"
        if case_id in CASES and CASES[case_id].test != test:
            raise ValueError(f"hostile case {case_id!r} registered twice")
        CASES[case_id] = Case(case_id, area, attack, behaviour, test, found)
        registered = getattr(function, "hostile_cases", ())
        function.hostile_cases = (*registered, case_id)  # type: ignore[attr-defined]
        return function

    return decorator


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_table(cases: Iterable[Case] | None = None) -> str:
    """The markdown table of every registered case, grouped by area, in a stable order.

    "behaviour" is what the test asserts, which is what conduit does (the suite
    passes). Where a case once found a library bug, "today" names it, as fixed.
    """
    rows = sorted(CASES.values() if cases is None else cases, key=lambda c: (c.area, c.case_id))
    lines = [
        "| id | area | hostile input or fault | behaviour (asserted) | today | checked by |",
        "|----|------|------------------------|----------------------|-------|------------|",
    ]
    for case in rows:
        today = f"as asserted; found and fixed: {case.found}" if case.found else "as asserted"
        lines.append(
            f"| `{case.case_id}` | {_cell(case.area)} | {_cell(case.attack)} | "
            f"{_cell(case.behaviour)} | {_cell(today)} | `{case.test}` |"
        )
    return "\n".join(lines) + "\n"


def load_suite() -> None:
    """Import every suite module so that their registrations run."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    for name in SUITE_MODULES:
        __import__(name)


def generated_block(doc: str) -> str:
    """The text between the markers of ``doc``."""
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    return doc[start:end].strip("\n") + "\n"


def write_doc() -> None:
    """Replace the generated table in ``docs/hostile-inputs.md``."""
    doc = DOC_PATH.read_text(encoding="utf-8")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC_PATH.write_text(f"{head}{BEGIN}\n{render_table()}{END}{tail}", encoding="utf-8")


# --------------------------------------------------------------------------- frames


def raw_header(
    kind: int,
    stream_id: int,
    length: int,
    flags: int = 0,
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """A frame header with any field values (unknown kinds, lying lengths, ...)."""
    return HEADER.pack(magic, version, kind, flags, stream_id, length)


def raw_frame(
    kind: int, stream_id: int, payload: bytes, flags: int = 0, *, length: int | None = None
) -> bytes:
    """Header plus payload; ``length`` overrides the header's length field."""
    return raw_header(kind, stream_id, len(payload) if length is None else length, flags) + payload


def body_frame(kind: int, stream_id: int, body: Any, flags: int = 0) -> bytes:
    """A frame whose payload is ``body`` msgpack-encoded as it is (any shape)."""
    return raw_frame(kind, stream_id, msgpack.packb(body, use_bin_type=True), flags)


def nested_msgpack(depth: int, leaf: bytes = b"\xc0") -> bytes:
    """``depth`` nested one-element arrays around ``leaf`` (nil), as msgpack."""
    return b"\x91" * depth + leaf


def call_frame(call_id: int, method: str, **args: Any) -> bytes:
    """A well-formed CALL frame."""
    return encode_frame(FrameKind.CALL, call_id, Call(method, args))


# --------------------------------------------------------------------------- raw peer


class PeerClosed(Exception):
    """The server closed (or reset) the raw connection."""


@attrs.define(eq=False)
class RawPeer:
    """A hand-driven client over a raw socket: real handshake, then arbitrary frames."""

    stream: trio.SocketStream
    reader: FrameReader
    writer: FrameWriter | None = None
    welcome: Any = None
    received: list[Frame] = attrs.field(factory=list)
    next_call_id: int = 1

    @classmethod
    async def open(
        cls, port: int, *, local_address: str | None = None, receive_buffer: int | None = None
    ) -> RawPeer:
        """Just the TCP connection (for clear-text attacks), optionally from 127.0.0.x.

        ``receive_buffer`` fixes the socket's ``SO_RCVBUF`` before it connects:
        the kernel then holds at most about that much the peer does not read
        (loopback autotuning would otherwise let it hold tens of MiB).
        """
        if receive_buffer is None:
            stream = await trio.open_tcp_stream(LOOPBACK, port, local_address=local_address)
            return cls(stream, FrameReader())
        sock = trio.socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            if local_address is not None:
                await sock.bind((local_address, 0))
            await sock.connect((LOOPBACK, port))
        except BaseException:
            sock.close()
            raise
        return cls(trio.SocketStream(sock), FrameReader())

    @classmethod
    async def authenticated(
        cls,
        port: int,
        password: str,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        receive_window: int = 4 * 1024 * 1024,
        local_address: str | None = None,
        receive_buffer: int | None = None,
    ) -> RawPeer:
        """Connect and run the real password handshake by hand; return after WELCOME.

        A wrong password raises :class:`~conduit.AuthenticationError` like a client would.
        """
        peer = await cls.open(port, local_address=local_address, receive_buffer=receive_buffer)
        try:
            await peer._authenticate(password, max_frame_size, receive_window)
        except BaseException:
            await peer.aclose()
            raise
        return peer

    async def _authenticate(self, password: str, max_frame_size: int, receive_window: int) -> None:
        peer = self
        handshake = ClientHandshake(
            password, name="raw-peer", max_frame_size=max_frame_size, receive_window=receive_window
        )
        with trio.fail_after(10):
            await peer.stream.send_all(handshake.start())
            while handshake.keys is None:
                reply = handshake.receive(await peer.next_frame())
                if reply:
                    await peer.stream.send_all(reply)
            keys = handshake.keys
            peer.reader.start_decryption(keys.receive_key, max_frame_size)
            peer.writer = FrameWriter()
            peer.writer.start_encryption(keys.send_key, keys.peer_max_frame_size)
            frame = await peer.next_frame()
            assert frame.kind is FrameKind.WELCOME, frame
            peer.welcome = decode_body(frame)

    async def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket (clear text, or a hand-made record)."""
        await self.stream.send_all(data)

    def seal(self, *frames: bytes) -> bytes:
        """Seal already-encoded frames into records (frames may be hostile)."""
        assert self.writer is not None, "not authenticated"
        return b"".join(self.writer.write_frames([(frame,) for frame in frames]))

    async def send_sealed(self, *frames: bytes) -> None:
        """Seal frames and send them; the server may close on us, which is fine."""
        await self.stream.send_all(self.seal(*frames))

    async def next_frame(self) -> Frame:
        """The next frame from the server; raises :class:`PeerClosed` on EOF/reset."""
        while (frame := self.reader.next_frame()) is None:
            try:
                data = await self.stream.receive_some(256 * 1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerClosed(str(exc)) from exc
            if not data:
                raise PeerClosed("EOF")
            self.reader.feed(data)
        self.received.append(frame)
        return frame

    async def call(self, method: str, *, timeout: float = 10, **args: Any) -> Result:
        """A real RPC over the raw peer; PINGs and CREDITs on the way are skipped."""
        call_id = self.next_call_id
        self.next_call_id += 1
        await self.send_sealed(call_frame(call_id, method, **args))
        with trio.fail_after(timeout):
            while True:
                frame = await self.next_frame()
                if frame.kind is FrameKind.RESULT and frame.stream_id == call_id:
                    return decode_body(frame, Result)

    async def expect_closed(self, *, timeout: float = 10) -> list[Frame]:
        """Read (and decrypt) until the server closes; return what it sent meanwhile.

        Fails the test with ``trio.TooSlowError`` if the server keeps the
        connection open for ``timeout`` seconds.
        """
        frames: list[Frame] = []
        with trio.fail_after(timeout):
            for _ in range(1_000_000):
                try:
                    frames.append(await self.next_frame())
                except PeerClosed:
                    return frames
        raise AssertionError("the server kept sending")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def handshake_reply(data: bytes) -> list[FrameKind | str]:
    """What a server sent during a handshake, from raw bytes: clear frames by
    kind, and each sealed record (a length, then ciphertext) as ``"record"``
    (a shared-password server sends its WELCOME sealed with its hello)."""
    parts: list[FrameKind | str] = []
    offset = 0
    while offset + HEADER.size <= len(data):
        if data[offset : offset + 2] == MAGIC:
            _magic, _version, kind, _flags, _stream, length = HEADER.unpack_from(data, offset)
            parts.append(FrameKind(kind))
            offset += HEADER.size + length
        else:
            (length,) = LENGTH.unpack_from(data, offset)
            parts.append("record")
            offset += LENGTH.size + length
    return parts


async def read_until_closed(stream: trio.SocketStream, *, timeout: float = 10) -> bytes:
    """Everything the server sends on a raw socket until EOF or reset."""
    received = bytearray()
    with trio.fail_after(timeout):
        for _ in range(1_000_000):
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            if not data:
                break
            received += data
    return bytes(received)


# --------------------------------------------------------------------------- resources


def trio_task_count() -> int:
    """Every task of the current Trio run: a walk from the root task through nurseries."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def trio_task_names() -> list[str]:
    """Names of every task of the current run (for a readable leak message)."""
    names: list[str] = []
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        names.append(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return sorted(names)


def rss_bytes() -> int:
    """Resident set size of this process, from /proc."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def settle(predicate: Callable[[], bool], *, timeout: float = 10.0) -> bool:
    """Wait (bounded) until ``predicate()``; return whether it became true."""
    with trio.move_on_after(timeout):
        for _ in range(100_000):
            if predicate():
                return True
            await trio.sleep(0.02)
    return predicate()


def log_text(records: Iterable[logging.LogRecord]) -> str:
    """The messages of conduit's log records, one per line."""
    return "\n".join(r.getMessage() for r in records if r.name.startswith("conduit"))


@contextlib.contextmanager
def conduit_debug_logs() -> Any:
    """Let conduit's debug records through to pytest's ``caplog`` for the block."""
    logger = logging.getLogger("conduit")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(old)


def main(argv: list[str]) -> int:
    """``--write`` rewrites the doc's table; without it the table goes to stdout."""
    # Run as a script this file is __main__; the tests register into the module
    # they import, so work with that one.
    sys.path.insert(0, str(TESTS_DIR))
    import hostile_helpers as registry

    registry.load_suite()
    if argv[1:] == ["--write"]:
        registry.write_doc()
        print(f"wrote {len(registry.CASES)} cases to {registry.DOC_PATH}")
        return 0
    sys.stdout.write(registry.render_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))


__all__ = [
    "CASES",
    "DOC_PATH",
    "LOOPBACK",
    "Case",
    "PeerClosed",
    "RawPeer",
    "body_frame",
    "call_frame",
    "hostile",
    "log_text",
    "nested_msgpack",
    "raw_frame",
    "raw_header",
    "read_until_closed",
    "render_table",
    "rss_bytes",
    "settle",
    "trio_task_count",
]


# --------------------------------------------------------------------------- oracles
# Shared by tests/test_fuzz_properties.py and the atheris harnesses under fuzz/.


class AmplificationError(AssertionError):
    """A decoded body holds far more data than its payload carried (an allocation bomb)."""


#: A decoded str may legitimately be longer than its msgpack (``str(None)`` is four
#: characters from one byte); anything beyond this factor is an amplification.
STR_AMPLIFICATION = 8


def check_amplification(body: Any, payload_size: int) -> None:
    """Fail if a bytes field of ``body`` is longer than the payload, or a str far longer."""
    if not attrs.has(type(body)):
        return
    for field in attrs.fields(type(body)):
        value = getattr(body, field.name)
        if isinstance(value, bytes | bytearray | memoryview) and len(value) > payload_size:
            raise AmplificationError(
                f"{type(body).__name__}.{field.name} decoded to {len(value)} bytes "
                f"from a {payload_size}-byte payload"
            )
        if isinstance(value, str) and len(value) > STR_AMPLIFICATION * payload_size + 64:
            raise AmplificationError(
                f"{type(body).__name__}.{field.name} decoded to {len(value)} characters "
                f"from a {payload_size}-byte payload"
            )


def decode_checked(frame: Frame) -> Any:
    """``decode_body`` under the suite's oracle.

    Returns the body, or None when it was refused with a ``ProtocolError``. Any
    other exception propagates (a finding), and so does :class:`AmplificationError`.
    """
    from conduit.errors import ProtocolError

    try:
        body = decode_body(frame)
    except ProtocolError:
        return None
    check_amplification(body, len(frame.payload))
    return body


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakRSS:
    """Peak resident memory of this process while a block runs (Linux).

    Resets the kernel's high-water mark (``/proc/self/clear_refs``, value 5) on
    entry and reads ``VmHWM`` on exit, so a short spike is caught even when it
    is freed again before the block ends. ``growth`` is the peak minus the
    resident size at entry.
    """

    def __init__(self) -> None:
        self.start = 0
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = _status_kib("VmHWM") * 1024

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


MiB = 1024 * 1024


# --------------------------------------------------------------------------- good traffic


@attrs.define(eq=False)
class GoodTraffic:
    """An honest client doing RPCs and verified uploads in a loop while a test attacks.

    Every round: one ``echo`` RPC (checked), one upload of ``source`` under a new
    name (checked: success and the published bytes' SHA-256). Any failure is
    recorded in :attr:`errors`. Bounded: at most ``max_rounds`` rounds.
    """

    client: Any
    transfer: Any
    source: Path
    checksum: str
    storage: Path
    errors: list[str] = attrs.field(factory=list)
    rounds: int = 0
    max_rounds: int = 10_000
    stop: trio.Event = attrs.field(factory=trio.Event)
    finished: trio.Event = attrs.field(factory=trio.Event)

    async def run(self) -> None:
        import hashlib

        def sha256_of(path: Path) -> str:
            return hashlib.sha256(path.read_bytes()).hexdigest()

        try:
            for index in range(self.max_rounds):
                if self.stop.is_set():
                    break
                try:
                    with trio.fail_after(30):
                        echoed = await self.client.call("echo", value=[index, "good"])
                        if echoed != [index, "good"]:
                            self.errors.append(f"echo {index} returned {echoed!r}")
                        result = await self.transfer.send_to_server(
                            self.client, self.source, remote_name=f"good/{index}.bin"
                        )
                    if not result.get("success"):
                        self.errors.append(f"upload {index} failed: {result}")
                    else:
                        published = self.storage / result["path"]
                        digest = await trio.to_thread.run_sync(sha256_of, published)
                        if digest != self.checksum or result["checksum"] != self.checksum:
                            self.errors.append(f"upload {index} published other bytes")
                except Exception as exc:  # recorded, the test fails on it
                    self.errors.append(f"round {index}: {type(exc).__name__}: {exc}")
                self.rounds += 1
        finally:
            self.finished.set()

    async def finish(self, *, extra_rounds: int = 1, timeout: float = 60) -> None:
        """Let ``extra_rounds`` more rounds complete (after the attack), then stop."""
        target = self.rounds + extra_rounds
        with trio.fail_after(timeout):
            while self.rounds < target and not self.finished.is_set():  # noqa: ASYNC110
                await trio.sleep(0.01)
            self.stop.set()
            await self.finished.wait()
