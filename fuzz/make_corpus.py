"""Write seed inputs for the harnesses: valid encodings of every frame kind.

``python fuzz/make_corpus.py`` fills ``fuzz/corpus/{decoder,sealed,handshake}``
(creating them). Seeds only help the fuzzer start from valid structure; the
harnesses work from an empty corpus too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import _common  # noqa: F401  (paths)
from msgpack import packb

from conduit.protocol import ClientHandshake, FrameKind, converter, encode_frame
from conduit.protocol.codec import data_header
from conduit.protocol.messages import (
    BODY_TYPES,
    AuthFailed,
    Call,
    Cancel,
    ClientHello,
    Confirm,
    Credit,
    Goodbye,
    Message,
    Ping,
    Pong,
    Reset,
    Result,
    ServerHello,
    Welcome,
)

HERE = Path(__file__).resolve().parent

BODIES = [
    (FrameKind.CLIENT_HELLO, ClientHello(1, "c", b"A" + b"\x01" * 32, 1 << 20, 4 << 20)),
    (FrameKind.SERVER_HELLO, ServerHello(1, "s", b"B" + b"\x02" * 32, 1 << 20, 4 << 20)),
    (FrameKind.CLIENT_CONFIRM, Confirm(b"m" * 32)),
    (FrameKind.SERVER_CONFIRM, Confirm(b"n" * 32)),
    (FrameKind.AUTH_FAILED, AuthFailed("wrong_password", "no", 1.0)),
    (FrameKind.WELCOME, Welcome("id", "srv", 15.0)),
    (FrameKind.CALL, Call("file_list", {"a": [1, {"b": b"x"}]})),
    (FrameKind.RESULT, Result(True, {"x": 1})),
    (FrameKind.CANCEL, Cancel()),
    (FrameKind.MESSAGE, Message("chat", "hi")),
    (FrameKind.CREDIT, Credit(65536)),
    (FrameKind.RESET, Reset("aborted", "why")),
    (FrameKind.PING, Ping(1)),
    (FrameKind.PONG, Pong(1)),
    (FrameKind.GOODBYE, Goodbye("bye")),
]


def _write(directory: Path, data: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)


def main() -> None:
    frames = [encode_frame(kind, 1, body) for kind, body in BODIES]
    frames.append(data_header(1, 5) + b"hello")
    for index, frame in enumerate(frames):
        kind = BODIES[index][0] if index < len(BODIES) else FrameKind.DATA
        # decoder: mode 0 = a stream (limit 4096, chunks of 17); mode 1 = kind + payload.
        _write(HERE / "corpus" / "decoder", b"\x00\x01\x10" + frame)
        kind_index = list(FrameKind).index(kind)
        _write(HERE / "corpus" / "decoder", b"\x01" + bytes([kind_index, 0]) + frame[14:])
        if kind in BODY_TYPES:
            # structure-aware mode: the body's own values, as a msgpack list.
            values = list(converter.unstructure(BODIES[index][1]).values())
            body_index = [k for k in FrameKind if k in BODY_TYPES].index(kind)
            _write(HERE / "corpus" / "decoder", b"\x02" + bytes([body_index, 0]) + packb(values))
        # sealed: mode 0, limit 1 MiB, 4 KiB chunks; two records.
        _write(HERE / "corpus" / "sealed", b"\x00\x01\xff\x00\x00" + frame + b"\xfe\xfe" + frame)
    hello = ClientHandshake("x", name="c", max_frame_size=1 << 20, receive_window=4 << 20)
    for mode in range(4):
        _write(HERE / "corpus" / "handshake", bytes([mode]) + hello.start())
        hello = ClientHandshake("x", name="c", max_frame_size=1 << 20, receive_window=4 << 20)
        for kind, body in BODIES[:5]:
            _write(HERE / "corpus" / "handshake", bytes([mode]) + encode_frame(kind, 0, body))
    print("seeds written under", HERE / "corpus")


if __name__ == "__main__":
    main()
