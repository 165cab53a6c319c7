"""The Trio engine of one authenticated connection.

One nursery per connection owns:

* the **receive task**: socket -> :class:`~conduit.protocol.FrameReader` ->
  dispatch. It never blocks on a consumer: data goes into credit-bounded stream
  inboxes, calls start their own tasks, results wake their callers. Only one-way
  messages go through a bounded memory channel, whose backpressure is the point:
  they are delivered in order to one message task.
* the **send task**: :class:`~conduit._outbox.Outbox` -> sealed records ->
  socket, control frames before data, many frames per record.
* the **heartbeat task**: pings on a Trio timer and the idle/peer-silence checks.
* one task per incoming call, so a slow handler never delays the others and a
  handler may call back into its peer.

When any of them fails, :meth:`Connection.abort` cancels the nursery with a
reason; nothing outlives :meth:`Connection.run`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from ._calls import CallWorkers, PendingCalls
from ._outbox import Outbox, OutboxClosed
from ._streams import IncomingStream, OutgoingStream, StreamReset
from .errors import (
    ConduitError,
    ConnectionClosed,
    IntegrityError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RPCError,
)
from .protocol import HEADER_SIZE, Frame, FrameKind, FrameReader, FrameWriter, SessionKeys
from .protocol.codec import decode_body, encode_frame
from .protocol.messages import Call, Cancel, Credit, Goodbye, Message, Ping, Pong, Reset, Result

log = logging.getLogger("conduit.connection")

# Large reads: one receive per sealed record at full speed (measured ~9% less
# receiver CPU per GiB than 256 KiB reads), and idle connections allocate nothing.
RECEIVE_SIZE = 1024 * 1024
_MAX_EARLY_RESETS = 1024
_MESSAGE_QUEUE = 64
# Well above any burst of replies (a result may be up to max_frame_size), so
# only a peer that keeps sending without ever reading meets it.
_CONTROL_BACKLOG = 8 * 1024 * 1024


@attrs.frozen
class ConnectionSettings:
    """Per-connection limits and timers, taken from a descriptor."""

    max_frame_size: int
    receive_window: int
    heartbeat_interval: float
    heartbeat_timeout: float
    idle_timeout: float | None
    max_concurrent_calls: int
    send_buffer: int = 4 * 1024 * 1024


def settings_from(descriptor: Any) -> ConnectionSettings:
    """The per-connection settings a Server- or ClientDescriptor asks for."""
    return ConnectionSettings(
        max_frame_size=descriptor.max_frame_size,
        receive_window=descriptor.receive_window,
        heartbeat_interval=descriptor.heartbeat_interval,
        heartbeat_timeout=descriptor.heartbeat_timeout,
        idle_timeout=descriptor.idle_timeout,
        max_concurrent_calls=descriptor.max_concurrent_calls,
    )


class Dispatcher(Protocol):
    """What a connection hands incoming calls and messages to.

    Bound to the connection's peer when the connection is built (see
    ``conduit._rpc.PeerDispatcher``), so it needs no connection argument.
    """

    async def handle_call(self, method: str, args: dict[str, Any]) -> Any:
        """Run the RPC ``method`` and return its (unstructured) result."""

    async def handle_message(self, event: str, data: Any) -> None:
        """Deliver a one-way message."""


class Connection:
    """An authenticated, encrypted link, after the handshake.

    Create it with the reader/writer the handshake used (they hold the keys and
    any bytes already buffered), then ``await run()`` in a nursery.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        reader: FrameReader,
        writer: FrameWriter,
        keys: SessionKeys,
        *,
        is_client: bool,
        settings: ConnectionSettings,
        dispatcher: Dispatcher,
        label: str,
    ) -> None:
        self.stream = stream
        self.keys = keys
        self.settings = settings
        self.label = label
        self.is_client = is_client
        self._reader = reader
        self._writer = writer
        self._dispatcher = dispatcher
        self._outbox = Outbox(settings.send_buffer)
        self._call_ids = itertools.count(1)
        self._pending = PendingCalls(self._send_cancel)
        self._workers = CallWorkers(
            settings.max_concurrent_calls,
            self._handle_call,
            self._send_result,
            self._queue_result,
            self.spawn,
            label,
        )
        # Stream ids are allocated by the receiving side: odd by clients, even
        # by servers, so the two never collide.
        self._stream_ids = itertools.count(1 if is_client else 2, 2)
        self._last_stream_id = 0
        self._incoming: dict[int, IncomingStream] = {}
        self._outgoing: dict[int, OutgoingStream] = {}
        self._early_resets: dict[int, StreamReset] = {}
        self._messages_in, self._messages_out = trio.open_memory_channel[Message](_MESSAGE_QUEUE)
        self._nursery: trio.Nursery | None = None
        self._direct_sending = False
        self._direct_done = trio.lowlevel.ParkingLot()
        self._ping_ids = itertools.count(1)
        now = trio.current_time()
        self._last_received = now
        self._last_activity = now
        self.close_reason: str | None = None
        self.closed = trio.Event()

    # ------------------------------------------------------------------ lifetime

    @property
    def is_open(self) -> bool:
        """Whether the connection can still carry traffic."""
        return self.close_reason is None

    async def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Serve the connection until it closes. Never raises for network failures."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_task)
                nursery.start_soon(self._send_task)
                nursery.start_soon(self._message_task)
                nursery.start_soon(self._pending.run_timer)
                if self.settings.heartbeat_interval > 0:
                    nursery.start_soon(self._heartbeat_task)
                if self.settings.idle_timeout is not None:
                    nursery.start_soon(self._idle_task, self.settings.idle_timeout)
                if on_started is not None:
                    on_started()
        finally:
            self._shutdown(self.close_reason or "connection closed")
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
            self.closed.set()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a task that lives no longer than this connection."""
        if self._nursery is None or not self.is_open:
            raise ConnectionClosed(self.close_reason or "connection is not running")
        self._nursery.start_soon(fn, *args)

    def abort(self, reason: str) -> None:
        """Close at once: cancel every task of this connection."""
        if self.close_reason is None:
            self.close_reason = reason
            log.debug("%s: closing: %s", self.label, reason)
        self._outbox.close(self.close_reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def close(self, reason: str = "closed by this side", grace: float = 2.0) -> None:
        """Say goodbye, let queued frames go out, then close. Waits until closed."""
        if self.is_open and self._nursery is not None:
            try:
                self._outbox.put_control((encode_frame(FrameKind.GOODBYE, 0, Goodbye(reason)),))
                self._outbox.finish_after_drain()
            except ConnectionClosed:
                pass
            if self.close_reason is None:
                self.close_reason = reason
            with trio.move_on_after(grace):
                await self.closed.wait()
        self.abort(reason)
        if self._nursery is not None:
            await self.closed.wait()

    def _shutdown(self, reason: str) -> None:
        self._outbox.close(reason)
        self._pending.fail_all(reason)
        for incoming in self._incoming.values():
            incoming.fail(ConnectionClosed(reason))
        for outgoing in self._outgoing.values():
            outgoing.fail(ConnectionClosed(reason))
        self._incoming.clear()
        self._outgoing.clear()

    # ------------------------------------------------------------------ tasks

    async def _receive_task(self) -> None:
        reader = self._reader
        try:
            await self._drain_reader()
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    self.abort(self.close_reason or "peer closed the connection")
                    return
                self._last_received = trio.current_time()
                reader.feed(data)
                await self._drain_reader()
                # A peer that sends PINGs (or calls) but never reads would make us
                # queue answers forever: stop reading until they have gone out.
                await self._outbox.wait_control_below(_CONTROL_BACKLOG)
        except IntegrityError as exc:
            self.abort(exc.reason)
        except ConnectionClosed:
            pass  # we are closing; a reply had nowhere to go
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(self.close_reason or f"connection lost: {exc or type(exc).__name__}")

    async def _drain_reader(self) -> None:
        while (frame := self._reader.next_frame()) is not None:
            if frame.kind is FrameKind.MESSAGE:
                self._last_activity = self._last_received
                await self._messages_in.send(decode_body(frame))
            else:
                self._dispatch(frame)

    async def _send_task(self) -> None:
        writer = self._writer
        budget = max(self._writer.record_limit, 256 * 1024)
        try:
            while True:
                frames = await self._outbox.take(budget)
                while self._direct_sending:
                    await self._direct_done.park()
                for record in writer.write_frames(frames):
                    await self.stream.send_all(record)
        except OutboxClosed:
            self.abort(self.close_reason or "closed")
        except ConnectionClosed:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(self.close_reason or f"connection lost: {exc or type(exc).__name__}")
        except Exception as exc:  # a bug here must end this connection, not the server
            log.exception("%s: writer failed", self.label)
            self.abort(f"internal error in the writer: {exc}")

    async def _message_task(self) -> None:
        async for message in self._messages_out:
            try:
                await self._dispatcher.handle_message(message.event, message.data)
            except Exception:
                log.exception("%s: handler for message %r failed", self.label, message.event)

    async def _heartbeat_task(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._heartbeat_loop()

    async def _heartbeat_loop(self) -> None:
        settings = self.settings
        while True:
            await trio.sleep(settings.heartbeat_interval)
            now = trio.current_time()
            silent = now - self._last_received
            if silent > settings.heartbeat_timeout:
                self.abort(f"peer silent for {silent:.1f}s (heartbeat timeout)")
                return
            if (
                settings.idle_timeout is not None
                and now - self._last_activity > settings.idle_timeout
            ):
                await self.close(f"idle for more than {settings.idle_timeout:g}s")
                return
            self._send_control(FrameKind.PING, 0, Ping(next(self._ping_ids)))

    async def _idle_task(self, idle_timeout: float) -> None:
        # Sleep until the moment the connection would become idle; activity in
        # the meantime moves that moment, so check again when we wake.
        while True:
            deadline = self._last_activity + idle_timeout
            if trio.current_time() >= deadline:
                await self.close(f"idle for more than {idle_timeout:g}s")
                return
            await trio.sleep_until(deadline)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.kind
        if kind is FrameKind.DATA:
            self._last_activity = self._last_received
            self._on_data(frame)
        elif kind is FrameKind.CREDIT:
            self._on_credit(frame)
        elif kind is FrameKind.CALL:
            self._last_activity = self._last_received
            self._on_call(frame)
        elif kind is FrameKind.RESULT:
            self._on_result(frame)
        elif kind is FrameKind.CANCEL:
            decode_body(frame)
            self._workers.cancel(frame.stream_id)
        elif kind is FrameKind.RESET:
            self._on_reset(frame)
        elif kind is FrameKind.PING:
            ping: Ping = decode_body(frame)
            self._send_control(FrameKind.PONG, 0, Pong(ping.nonce))
        elif kind is FrameKind.PONG:
            decode_body(frame)
        elif kind is FrameKind.GOODBYE:
            goodbye: Goodbye = decode_body(frame)
            self.abort(f"peer closed the connection: {goodbye.reason}")
        else:
            raise RemoteProtocolError(f"{kind.name} frame is not allowed after the handshake")

    def _on_data(self, frame: Frame) -> None:
        stream = self._incoming.get(frame.stream_id)
        if stream is None:
            if self._is_our_closed_stream(frame.stream_id):
                return  # in flight when we closed it; harmless
            raise RemoteProtocolError(f"data for stream {frame.stream_id}, which was never opened")
        stream.deliver(frame.payload, frame.flags)

    def _is_our_stream_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.is_client

    def _is_our_closed_stream(self, stream_id: int) -> bool:
        return self._is_our_stream_id(stream_id) and 0 < stream_id <= self._last_stream_id

    def _on_credit(self, frame: Frame) -> None:
        credit: Credit = decode_body(frame)
        if not 0 < credit.increment <= 1 << 31:
            raise RemoteProtocolError(f"invalid credit increment {credit.increment}")
        stream = self._outgoing.get(frame.stream_id)
        if stream is not None:
            stream.grant(credit.increment)

    def _on_reset(self, frame: Frame) -> None:
        reset: Reset = decode_body(frame)
        error = StreamReset(f"peer aborted the stream: {reset.reason}", code=reset.code)
        incoming = self._incoming.pop(frame.stream_id, None)
        if incoming is not None:
            incoming.fail(error)
        outgoing = self._outgoing.pop(frame.stream_id, None)
        if outgoing is not None:
            outgoing.fail(error)
        elif incoming is None and not self._is_our_stream_id(frame.stream_id):
            # The peer gave up on a stream we have not started sending on yet
            # (e.g. its request timed out while we prepared): remember, so we
            # never start. Bounded: the oldest entries go first.
            self._early_resets[frame.stream_id] = error
            while len(self._early_resets) > _MAX_EARLY_RESETS:
                del self._early_resets[next(iter(self._early_resets))]

    def _on_result(self, frame: Frame) -> None:
        self._pending.resolve(frame.stream_id, decode_body(frame))

    def _on_call(self, frame: Frame) -> None:
        self._workers.submit(frame.stream_id, decode_body(frame))

    async def _handle_call(self, method: str, args: dict[str, Any]) -> Any:
        return await self._dispatcher.handle_call(method, args)

    def _send_cancel(self, call_id: int) -> None:
        if self.is_open:
            with contextlib.suppress(ConnectionClosed):
                self._send_control(FrameKind.CANCEL, call_id, Cancel())

    def _queue_result(self, call_id: int, result: Result) -> None:
        with contextlib.suppress(ConnectionClosed):
            self._send_control(FrameKind.RESULT, call_id, result)

    async def _send_result(self, call_id: int, result: Result) -> None:
        try:
            frame = self._encode(FrameKind.RESULT, call_id, result)
        except LocalProtocolError as exc:
            refusal = Result(
                False, error=f"the handler's result cannot be sent: {exc}", code="bad_result"
            )
            frame = self._encode(FrameKind.RESULT, call_id, refusal)
        with contextlib.suppress(ConnectionClosed):
            await self._send_soon(frame)

    async def _send_soon(self, frame: bytes) -> None:
        """Send a control frame: directly when the writer is idle, else through it.

        Going direct saves waking the writer task, a full scheduler pass, on
        every call and every reply. The send is shielded because a record cut
        in half by a cancellation would corrupt the stream; a writer that is
        idle means the socket has room, so it completes at once in practice.
        """
        if not (self._outbox.writer_idle and not self._direct_sending and self.is_open):
            self._outbox.put_control((frame,))
            return
        self._direct_sending = True
        try:
            (record,) = self._writer.write_frames([(frame,)])
            with trio.CancelScope(shield=True):
                await self.stream.send_all(record)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(self.close_reason or f"connection lost: {exc or type(exc).__name__}")
            raise ConnectionClosed(self.close_reason or "connection lost") from exc
        finally:
            self._direct_sending = False
            self._direct_done.unpark_all()

    def _send_control(self, kind: FrameKind, stream_id: int, body: Any) -> None:
        self._outbox.put_control((self._encode(kind, stream_id, body),))

    def _encode(self, kind: FrameKind, stream_id: int, body: Any) -> bytes:
        """Encode a control frame, refusing one the peer would not accept.

        Checked here, where the caller can be told, rather than in the writer
        task, where an oversized frame could only kill the connection.
        """
        frame = encode_frame(kind, stream_id, body)
        limit = self.keys.peer_max_frame_size
        if len(frame) - HEADER_SIZE > limit:
            raise LocalProtocolError(
                f"{kind.name} of {len(frame) - HEADER_SIZE} bytes exceeds the peer's "
                f"max_frame_size ({limit}); send large data as a file or stream"
            )
        return frame

    # ------------------------------------------------------------------ API

    async def call(self, method: str, args: dict[str, Any], timeout: float | None) -> Any:
        """Call ``method`` on the peer and return its value; raise RPCError on failure."""
        if not self.is_open:
            raise ConnectionClosed(self.close_reason or "connection closed")
        call_id = next(self._call_ids)
        frame = self._encode(FrameKind.CALL, call_id, Call(method, args))
        self._last_activity = trio.current_time()
        result = await self._pending.wait(call_id, method, timeout, lambda: self._send_soon(frame))
        if not result.ok:
            raise RPCError(result.error or "remote call failed", result.code or "error")
        return result.value

    async def send_message(self, event: str, data: Any) -> None:
        """Send a one-way message."""
        frame = self._encode(FrameKind.MESSAGE, 0, Message(event, data))
        self._last_activity = trio.current_time()
        self._outbox.put_control((frame,))
        await trio.lowlevel.checkpoint()

    def open_incoming_stream(self) -> IncomingStream:
        """Allocate a stream id that the peer may send data on."""
        if not self.is_open:
            raise ConnectionClosed(self.close_reason or "connection closed")
        stream_id = next(self._stream_ids)
        self._last_stream_id = stream_id
        stream = IncomingStream(stream_id, self.settings.receive_window, self._grant_credit)
        self._incoming[stream_id] = stream
        return stream

    def open_outgoing_stream(self, stream_id: int) -> OutgoingStream:
        """Start sending on a stream id the peer allocated for us."""
        if not self.is_open:
            raise ConnectionClosed(self.close_reason or "connection closed")
        if not 0 < stream_id < 2**32:
            raise RPCError(f"invalid stream id {stream_id}", "invalid_arguments")
        if stream_id in self._outgoing:
            raise LocalProtocolError(f"stream {stream_id} is already being sent")
        early_reset = self._early_resets.pop(stream_id, None)
        if early_reset is not None:
            raise early_reset
        stream = OutgoingStream(
            stream_id,
            self.keys.peer_receive_window,
            self.keys.peer_max_frame_size,
            self._outbox.put_data,
        )
        self._outgoing[stream_id] = stream
        return stream

    def close_stream(
        self, stream: IncomingStream | OutgoingStream, *, reset: tuple[str, str] | None = None
    ) -> None:
        """Forget a stream; with ``reset=(code, reason)`` tell the peer to abort it."""
        if isinstance(stream, IncomingStream):
            self._incoming.pop(stream.stream_id, None)
        else:
            self._outgoing.pop(stream.stream_id, None)
        if reset is not None and self.is_open:
            code, reason = reset
            with contextlib.suppress(ConduitError):
                self._send_control(FrameKind.RESET, stream.stream_id, Reset(code, reason))

    def _grant_credit(self, stream_id: int, amount: int) -> None:
        if self.is_open and stream_id in self._incoming:
            with contextlib.suppress(ConnectionClosed):
                self._send_control(FrameKind.CREDIT, stream_id, Credit(amount))


__all__ = ["Connection", "ConnectionSettings", "Dispatcher", "settings_from"]
