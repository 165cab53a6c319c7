"""SFTP over SSH (asyncssh) as a file-transfer benchmark peer.

The server generates an Ed25519 host key and an Ed25519 client key at start
(into ``spec["keys"]``), accepts only that client key, and serves SFTP chrooted
to ``spec["storage"]``. The client trusts only that host key, authenticates
with the client key, and uses ``SFTPClient.put`` / ``SFTPClient.get`` with
asyncssh's defaults (block size and parallel requests negotiated with the
server), except the cipher, pinned to ``aes256-gcm@openssh.com`` (the AEAD
conduit uses) and compression off. SFTP does not hash the file and asyncssh's
``put``/``get`` do not fsync: reported as such.

Runs in any interpreter with asyncssh (this one after ``pip install -e
.[bench]``, else ``benchmarks/.venvs/asyncssh``); standard library otherwise.

Usage: ``python sftp_peer.py server --spec '{"storage": DIR, "keys": DIR}'`` /
``python sftp_peer.py client --port N --spec JSON``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import _peerlib
import _transferlib

USERNAME = "bench"
CIPHER = "aes256-gcm@openssh.com"


def _options() -> dict[str, Any]:
    return {"encryption_algs": [CIPHER], "compression_algs": ["none"]}


async def serve(spec: dict[str, Any]) -> None:
    """Serve SFTP chrooted to ``spec["storage"]`` until SIGTERM."""
    import asyncssh

    keys = spec["keys"]
    os.makedirs(keys, exist_ok=True)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key.write_public_key(os.path.join(keys, "host.pub"))
    client_key.write_private_key(os.path.join(keys, "client"))
    storage = spec["storage"]

    def sftp_factory(channel: Any) -> Any:
        return asyncssh.SFTPServer(channel, chroot=storage)

    acceptor = await asyncssh.listen(
        _peerlib.HOST,
        0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(
            client_key.export_public_key().decode()
        ),
        sftp_factory=sftp_factory,
        allow_scp=False,
        **_options(),
    )
    _peerlib.announce_port(acceptor.get_port())
    await _peerlib.asyncio_until_terminated()
    acceptor.close()
    await acceptor.wait_closed()


def _read_keys(keys: str) -> tuple[Any, Any]:
    """The server's public key and the client's private key, read once: reading
    and parsing them is no part of a handshake (conduit's timed connects
    likewise leave out the client's one-time password stretch)."""
    import asyncssh

    return (
        asyncssh.read_public_key(os.path.join(keys, "host.pub")),
        asyncssh.read_private_key(os.path.join(keys, "client")),
    )


def _connect(port: int, host_key: Any, client_key: Any) -> Any:
    import asyncssh

    return asyncssh.connect(
        _peerlib.HOST,
        port,
        username=USERNAME,
        client_keys=[client_key],
        known_hosts=([host_key], [], []),
        agent_path=None,
        **_options(),
    )


async def client(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Upload/download (``ops``) on one connection, then time ``connects`` handshakes."""
    import asyncssh

    runtime = _peerlib.runtime_info("asyncssh", asyncssh)
    runtime["version"] = asyncssh.__version__
    result: dict[str, Any] = {"runtime": runtime, "ops": []}
    host_key, client_key = _read_keys(spec["keys"])
    async with _connect(port, host_key, client_key) as connection:
        runtime["cipher"] = str(connection.get_extra_info("send_cipher"))
        async with connection.start_sftp_client() as sftp:
            for op in spec["ops"]:
                with _transferlib.OpTimer(spec.get("server_pid"), spec.get("prime")) as timer:
                    if op["op"] == "upload":
                        await sftp.put(op["path"], op["name"])
                        outcome = {"path": op["name"], "size": _transferlib.file_size(op["path"])}
                    else:
                        target = os.path.join(op["dir"], op["name"])
                        await sftp.get(op["name"], target)
                        outcome = {"path": target, "size": _transferlib.file_size(target)}
                result["ops"].append(
                    {
                        "op": op["op"],
                        "result": {"success": True, **outcome},
                        **timer.figures(outcome["size"]),
                    }
                )

    async def connect_once() -> int:
        started = time.perf_counter_ns()
        connection = await _connect(port, host_key, client_key)
        elapsed = time.perf_counter_ns() - started
        connection.close()
        await connection.wait_closed()
        return elapsed

    if spec.get("connects"):
        result["handshake"] = await _peerlib.time_handshakes(
            connect_once, spec.get("handshake_warmup", 2), spec["connects"]
        )
    return result


def main() -> None:
    """Entry point (see the module docstring)."""
    args = _peerlib.parse_args()
    spec = _peerlib.parse_spec(args.spec)
    if args.role == "server":
        asyncio.run(serve(spec))
        return
    result = asyncio.run(client(args.port, spec))
    _peerlib.emit_result(result)


if __name__ == "__main__":
    main()
