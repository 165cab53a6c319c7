"""Is that a TLS server? Asked only after a plain connection was hung up on unanswered.

A TLS server that receives conduit's plain HELLO just closes the connection
(it sends no record the client could recognise), so the client cannot tell it
from any other hang-up. The CLI then tries a TLS handshake, without checking
the certificate and without sending anything else, to tell the user which
option they forgot.
"""

from __future__ import annotations

import ssl

import trio

#: Seconds the probe may take; it only decides which message to print.
PROBE_TIMEOUT = 3.0


async def speaks_tls(host: str, port: int) -> bool:
    """Whether ``host:port`` completes a TLS handshake (certificate not checked)."""
    context = ssl.create_default_context()
    # Only the protocol is in question, not who the server is: nothing is sent.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context)
            try:
                await stream.do_handshake()
            finally:
                await trio.aclose_forcefully(stream)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True
    return False
