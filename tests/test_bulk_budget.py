"""``benchmarks.bulk_budget``'s GIL test tells a call that holds the GIL from one that does not.

It counts how often another thread ran during the call (not how long the call
took), so its answer for a call holding the GIL is exactly zero at any load.
"""

from __future__ import annotations

import time

from benchmarks import bulk_budget


def test_a_call_holding_the_gil_lets_no_other_thread_run() -> None:
    block = bytes(16 * 1024 * 1024)
    copy = bytearray(len(block))
    share = bulk_budget._beside_call(lambda: copy.__setitem__(slice(None), block), repeat=3)
    assert share == 0.0


def test_a_call_releasing_the_gil_lets_another_thread_run() -> None:
    # time.sleep gives the GIL up for its whole length, as hashlib's update
    # of a large buffer does.
    share = bulk_budget._beside_call(lambda: time.sleep(0.02), repeat=3)
    assert share > 0.0


def test_the_table_names_every_shared_step() -> None:
    figures = bulk_budget.gil_steps(repeat=1)
    assert set(figures) == {
        "SHA-256 update of 16 MiB (hashlib)",
        "AES-256-GCM encrypt_into of 16 MiB (cryptography)",
        "AES-256-GCM decrypt_into of 16 MiB (cryptography)",
        "copy of 16 MiB (memcpy; holds the GIL)",
    }
    assert figures["copy of 16 MiB (memcpy; holds the GIL)"] == 0.0
