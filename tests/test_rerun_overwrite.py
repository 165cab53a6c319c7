"""Re-runs under ``overwrite=True``: only the name itself counts as "already there".

A receiver that overwrites publishes a file under its own name, never under a
collision variant (``a (1).txt``), so a variant holding the same bytes says
nothing about the name: a new version of ``a.txt`` that happens to equal
``a (1).txt`` (a copy a browser once made, say) must still replace ``a.txt``,
on uploads (small, batched, streamed) and downloads alike.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from conduit import FileTransferHandler
from conftest import ClientFactory, ServerFactory
from transfer_helpers import MiB, storage_server

#: One file that travels inside a call, one that is streamed.
SIZES = {"small": 1000, "streamed": 3 * MiB}


@pytest.mark.parametrize("kind", sorted(SIZES))
async def test_an_upload_replaces_the_name_even_when_a_variant_holds_its_bytes(
    kind: str, server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    size = SIZES[kind]
    with trio.fail_after(30):
        storage = tmp_path / "server"
        storage.mkdir()
        new = os.urandom(size)
        (storage / "a.txt").write_bytes(os.urandom(size))  # the old version
        (storage / "a (1).txt").write_bytes(new)  # a copy of the new one, elsewhere
        _, server = await storage_server(server_factory, storage, overwrite=True)
        client = await client_factory(server)
        source = tmp_path / "a.txt"
        source.write_bytes(new)

        result = await FileTransferHandler().send_to_server(client, source)

        assert result["success"] is True, result
        assert result.get("skipped") is not True, result
        assert result["path"] == "a.txt"
        assert (storage / "a.txt").read_bytes() == new
        # The same file again is a re-run: skipped, under its own name.
        again = await FileTransferHandler().send_to_server(client, source)
        assert again["skipped"] is True and again["path"] == "a.txt", again


async def test_a_batch_replaces_the_names_even_when_variants_hold_their_bytes(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        storage = tmp_path / "server"
        storage.mkdir()
        new = {f"f{index}.txt": os.urandom(100 + index) for index in range(3)}
        for name, data in new.items():
            (storage / name).write_bytes(os.urandom(len(data)))
            (storage / name.replace(".txt", " (1).txt")).write_bytes(data)
        _, server = await storage_server(server_factory, storage, overwrite=True)
        client = await client_factory(server)
        files = [
            {"name": name, "data": data, "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in new.items()
        ]

        answer = await client.call("file_upload_batch", files=files)

        assert [r.get("skipped") for r in answer["results"]] == [None] * 3, answer
        assert [r["path"] for r in answer["results"]] == list(new)
        for name, data in new.items():
            assert (storage / name).read_bytes() == data


async def test_a_download_replaces_the_name_even_when_a_variant_holds_its_bytes(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        storage, local_dir = tmp_path / "server", tmp_path / "downloads"
        storage.mkdir()
        local_dir.mkdir()
        new = os.urandom(5000)
        (storage / "a.txt").write_bytes(new)
        (local_dir / "a.txt").write_bytes(os.urandom(len(new)))  # the old version
        (local_dir / "a (1).txt").write_bytes(new)
        _, server = await storage_server(server_factory, storage)
        client = await client_factory(server)

        receiver = FileTransferHandler(overwrite=True)
        result = await receiver.receive_from_server(client, "a.txt", local_dir)

        assert result["success"] is True, result
        assert result.get("skipped") is not True, result
        assert (local_dir / "a.txt").read_bytes() == new
        again = await receiver.receive_from_server(client, "a.txt", local_dir)
        assert again["skipped"] is True, again
        assert Path(again["path"]) == local_dir / "a.txt"
