"""atheris harness: the handshake state machines fed arbitrary frame sequences.

Input layout: ``mode, frames...``. The frame bytes are parsed as clear-text
frames (``FrameReader``, 4 KiB handshake limit) and delivered to a handshake in
one of four states:

* 0 -- a fresh ``ServerHandshake`` (waiting for CLIENT_HELLO);
* 1 -- a ``ServerHandshake`` that accepted a real CLIENT_HELLO (waiting for
  CLIENT_CONFIRM);
* 2 -- a ``ClientHandshake`` after ``start()`` (waiting for SERVER_HELLO);
* 3 -- a ``ClientHandshake`` that accepted a real SERVER_HELLO (waiting for
  SERVER_CONFIRM).

Only ``ConduitError`` subclasses may escape; a failed handshake must end in the
FAILED state; no fuzzed input may complete a handshake; every decoded body must
pass the amplification oracle. SPAKE2 is pure Python, so states 1 and 3 are
prepared once and deep-copied per input.

Run: ``python fuzz/fuzz_handshake.py -runs=150000 fuzz/corpus/handshake``.
"""

from __future__ import annotations

import copy
import sys

import _common
import atheris

with atheris.instrument_imports():
    from conduit.errors import ConduitError, ProtocolError
    from conduit.protocol import (
        ClientHandshake,
        Frame,
        FrameReader,
        HandshakeState,
        ServerHandshake,
    )

from hostile_helpers import check_amplification

PASSWORD = "fuzz password"
LIMITS = {"max_frame_size": 1 << 20, "receive_window": 4 << 20}


def _first_frame(data: bytes):  # type: ignore[no-untyped-def]
    reader = FrameReader()
    reader.feed(data)
    return reader.next_frame()


def _prepare():  # type: ignore[no-untyped-def]
    client = ClientHandshake(PASSWORD, name="fuzz-client", **LIMITS)
    server = ServerHandshake(PASSWORD, name="fuzz-server", **LIMITS)
    fresh_client = copy.deepcopy(client)
    fresh_client.start()
    reply = server.receive(_first_frame(client.start()))
    client.receive(_first_frame(reply))
    return server, fresh_client, client


SERVER_WAITING_CONFIRM, CLIENT_WAITING_HELLO, CLIENT_WAITING_CONFIRM = _prepare()


def _machine(mode: int):  # type: ignore[no-untyped-def]
    if mode == 0:
        return ServerHandshake(PASSWORD, name="fuzz-server", **LIMITS)
    if mode == 1:
        return copy.deepcopy(SERVER_WAITING_CONFIRM)
    if mode == 2:
        return copy.deepcopy(CLIENT_WAITING_HELLO)
    return copy.deepcopy(CLIENT_WAITING_CONFIRM)


def _frames(data: bytes) -> list[Frame]:
    """The whole frames at the start of ``data`` (the reader's own errors end the list)."""
    reader = FrameReader()
    reader.feed(data)
    frames: list[Frame] = []
    try:
        while len(frames) < 8 and (frame := reader.next_frame()) is not None:
            frames.append(frame)
    except ProtocolError:
        pass
    return frames


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode = data[0] % 4
    machine = _machine(mode)
    try:
        for frame in _frames(data[1:]):
            machine.receive(frame)
            if isinstance(machine, ServerHandshake) and machine.error is not None:
                assert machine.state is HandshakeState.FAILED
                break
    except ConduitError:
        assert machine.state is HandshakeState.FAILED, "error without the FAILED state"
        return
    assert machine.keys is None, "a fuzzed input completed the handshake"
    # The hello a side accepted must not have been inflated in decoding.
    hello = getattr(machine, "_client_hello", None) or getattr(machine, "_server_hello", None)
    if hello is not None and mode in (0, 2):
        check_amplification(hello, 4096)


def main() -> None:
    # Instrument everything loaded (cattrs, attrs, spake2 too), not only conduit:
    # the fuzzer learns the structure that cattrs checks.
    atheris.instrument_all()
    atheris.Setup(sys.argv, _common.guarded(TestOneInput))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
