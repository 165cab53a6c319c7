"""atheris harness: ``FrameReader`` after the handshake, i.e. behind the AEAD.

Valid records are sealed around fuzzed plaintexts with a real key, so the frame
parser that only authenticated bytes reach is fuzzed too (a fuzzer could never
forge a tag). Input layout: ``mode, limit, step, flip_lo, flip_hi, rest...``
(plain bytes); ``rest`` is split into plaintexts at every ``FE FE``, each sealed
into its own record. Modes (``mode % 3``):

* 0 -- one or more fuzzed plaintexts, each sealed into a valid record; the
  records are fed in fuzzed chunk sizes, every frame's body decoded;
* 1 -- the same, then one fuzzed byte of the sealed stream flipped (must end in
  ``IntegrityError`` or ``RemoteProtocolError``, never anything else);
* 2 -- raw fuzzed bytes fed to a decrypting reader (record length prefixes of
  any value).

Run: ``python fuzz/fuzz_sealed.py -runs=250000 fuzz/corpus/sealed``.
"""

from __future__ import annotations

import sys

import _common
import atheris

with atheris.instrument_imports():
    from conduit.errors import IntegrityError, ProtocolError
    from conduit.protocol import FrameKind, FrameReader
    from conduit.protocol.frames import HEADER_SIZE
    from conduit.protocol.records import RecordSealer

from hostile_helpers import decode_checked

KEY = bytes(range(32))
LIMITS = [16 * 1024, 1 << 20]
SEPARATOR = b"\xfe\xfe"


def drain(reader: FrameReader, limit: int) -> None:
    while (frame := reader.next_frame()) is not None:
        assert len(frame.payload) <= limit, "payload over the limit"
        if frame.kind is not FrameKind.DATA:
            decode_checked(frame)


def TestOneInput(data: bytes) -> None:
    if len(data) < 5:
        return
    mode, limit_byte, step_byte, flip_lo, flip_hi = data[:5]
    rest = data[5:]
    mode %= 3
    limit = LIMITS[limit_byte % len(LIMITS)]
    step = (step_byte + 1) * 16
    reader = FrameReader()
    reader.start_decryption(KEY, limit)
    if mode == 2:
        wire = rest
    else:
        sealer = RecordSealer(KEY, limit + HEADER_SIZE)
        # Plaintexts are separated by 0xFE 0xFE: several records per input.
        wire = b"".join(bytes(sealer.seal(part)) for part in rest.split(SEPARATOR)[:8])
        if mode == 1 and wire:
            flip = flip_lo | flip_hi << 8
            mutable = bytearray(wire)
            mutable[flip % len(mutable)] ^= 1 + flip_hi % 255
            wire = bytes(mutable)
    fed = 0
    try:
        for start in range(0, len(wire), step):
            chunk = wire[start : start + step]
            reader.feed(chunk)
            fed += len(chunk)
            drain(reader, limit)
            opener = reader._opener
            assert opener is not None and opener.buffered <= fed, "buffered more than was fed"
    except (ProtocolError, IntegrityError):
        pass


def main() -> None:
    # Instrument everything loaded (cattrs, attrs, spake2 too), not only conduit:
    # the fuzzer learns the structure that cattrs checks.
    atheris.instrument_all()
    atheris.Setup(sys.argv, _common.guarded(TestOneInput))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
