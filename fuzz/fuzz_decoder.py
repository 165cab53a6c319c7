"""atheris harness: the clear-text frame decoder and every body decoder.

Input layout: ``mode, a, b, rest...`` (plain bytes, so seeds are easy to write):

* ``mode % 3 == 0`` -- ``rest`` is a byte stream fed to ``FrameDecoder`` (limit
  picked by ``a``) in chunks of ``b % 64 + 1`` bytes, every complete frame's body
  decoded;
* ``mode % 3 == 1`` -- ``rest`` is the payload of a frame of kind ``a`` (flags
  ``b & 1``), given straight to ``decode_body``: it reaches msgpack and cattrs
  without the fuzzer having to learn the header first;
* ``mode % 3 == 2`` -- structure-aware: the first msgpack object in ``rest``
  supplies *values*, which are put under the field names of kind ``a``'s body
  class (a list gives them in order, anything else is used for every field), and
  that map is the payload. This is how type confusion in a field (an integer
  where bytes belong, a map where a string belongs) gets reached quickly.

Run: ``python fuzz/fuzz_decoder.py -runs=600000 fuzz/corpus/decoder`` (see fuzz/README.md).
"""

from __future__ import annotations

import sys

import _common
import atheris

with atheris.instrument_imports():
    import attrs
    import msgpack

    from conduit.errors import ProtocolError
    from conduit.protocol import Frame, FrameDecoder, FrameKind
    from conduit.protocol.frames import HEADER_SIZE
    from conduit.protocol.messages import BODY_TYPES

from hostile_helpers import decode_checked

KINDS = list(FrameKind)
BODY_KINDS = [kind for kind in KINDS if kind in BODY_TYPES]
LIMITS = [16, 4096, 1 << 20]


def check_stream(data: bytes, limit: int, step: int) -> None:
    decoder = FrameDecoder(limit)
    fed = 0
    try:
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            decoder.feed(chunk)
            fed += len(chunk)
            while (frame := decoder.next_frame()) is not None:
                assert len(frame.payload) <= limit, "payload over the limit"
                if frame.kind is not FrameKind.DATA:
                    decode_checked(frame)
            assert decoder.buffered <= fed, "buffered more than was fed"
            # Never more than one header plus one frame of the limit waits.
            assert decoder.buffered < HEADER_SIZE + limit + step, "buffered past the limit"
    except ProtocolError:
        pass


def TestOneInput(data: bytes) -> None:
    if len(data) < 3:
        return
    mode, a, b, rest = data[0] % 3, data[1], data[2], data[3:]
    if mode == 0:
        check_stream(rest, LIMITS[a % len(LIMITS)], b % 64 + 1)
    elif mode == 1:
        decode_checked(Frame(KINDS[a % len(KINDS)], 1, b & 1, rest))
    else:
        kind = BODY_KINDS[a % len(BODY_KINDS)]
        payload = structured_payload(kind, rest)
        if payload is not None:
            decode_checked(Frame(kind, 1, 0, payload))


def structured_payload(kind: FrameKind, rest: bytes) -> bytes | None:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=8192)
    unpacker.feed(rest)
    try:
        values = next(unpacker)
    except Exception:  # not even one msgpack object: nothing to structure
        return None
    names = [field.name for field in attrs.fields(BODY_TYPES[kind])]
    if isinstance(values, list):
        body = dict(zip(names, values, strict=False))
    else:
        body = dict.fromkeys(names, values)
    try:
        return msgpack.packb(body, use_bin_type=True)
    except Exception:
        return None


def main() -> None:
    # Instrument everything loaded (cattrs, attrs, spake2 too), not only conduit:
    # the fuzzer learns the structure that cattrs checks.
    atheris.instrument_all()
    atheris.Setup(sys.argv, _common.guarded(TestOneInput))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
