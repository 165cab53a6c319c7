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
    RPCTimeoutError,
)
from .protocol import HEADER_SIZE, Frame, FrameKind, FrameReader, FrameWriter, OutFrame, SessionKeys
from .protocol.codec import decode_body, encode_frame
from .protocol.messages import Call, Cancel, Credit, Goodbye, Message, Ping, Pong, Reset, Result

log = logging.getLogger("conduit.connection")

RECEIVE_SIZE = 256 * 1024
_MESSAGE_QUEUE = 64


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


class Dispatcher(Protocol):
    """What a connection hands incoming calls and messages to."""

    async def handle_call(self, connection: Connection, method: str, args: dict[str, Any]) -> Any:
        """Run the RPC ``method`` and return its (unstructured) result."""

    async def handle_message(self, connection: Connection, event: str, data: Any) -> None:
        """Deliver a one-way message."""


@attrs.define
class _PendingCall:
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Result | None = None
    error: BaseException | None = None


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
        self._pending_calls: dict[int, _PendingCall] = {}
        self._running_calls: dict[int, trio.CancelScope] = {}
        # Stream ids are allocated by the receiving side: odd by clients, even
        # by servers, so the two never collide.
        self._stream_ids = itertools.count(1 if is_client else 2, 2)
        self._last_stream_id = 0
        self._incoming: dict[int, IncomingStream] = {}
        self._outgoing: dict[int, OutgoingStream] = {}
        self._messages_in, self._messages_out = trio.open_memory_channel[Message](_MESSAGE_QUEUE)
        self._nursery: trio.Nursery | None = None
        self._ping_ids = itertools.count(1)
        now = trio.current_time()
        self._last_received = now
        self._last_activity = now
        self.close_reason: str | None = None
        self.closed = trio.Event()
        self._started = trio.Event()

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
                if self.settings.heartbeat_interval > 0:
                    nursery.start_soon(self._heartbeat_task)
                if self.settings.idle_timeout is not None:
                    nursery.start_soon(self._idle_task, self.settings.idle_timeout)
                self._started.set()
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
        for pending in self._pending_calls.values():
            pending.error = ConnectionClosed(reason)
            pending.done.set()
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
                await self._dispatcher.handle_message(self, message.event, message.data)
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
            scope = self._running_calls.get(frame.stream_id)
            if scope is not None:
                scope.cancel()
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

    def _is_our_closed_stream(self, stream_id: int) -> bool:
        ours = (stream_id % 2 == 1) == self.is_client
        return ours and 0 < stream_id <= self._last_stream_id

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

    def _on_result(self, frame: Frame) -> None:
        result: Result = decode_body(frame)
        pending = self._pending_calls.get(frame.stream_id)
        if pending is not None:  # else: we gave up on it already
            pending.result = result
            pending.done.set()

    def _on_call(self, frame: Frame) -> None:
        call: Call = decode_body(frame)
        call_id = frame.stream_id
        if call_id in self._running_calls:
            raise RemoteProtocolError(f"call id {call_id} is already in use")
        if len(self._running_calls) >= self.settings.max_concurrent_calls:
            self._send_result(
                call_id,
                Result(
                    False,
                    error=f"too many concurrent calls (limit {self.settings.max_concurrent_calls})",
                    code="overloaded",
                ),
            )
            return
        scope = trio.CancelScope()
        self._running_calls[call_id] = scope
        self.spawn(self._run_call, call_id, call, scope)

    async def _run_call(self, call_id: int, call: Call, scope: trio.CancelScope) -> None:
        result: Result | None = None
        try:
            with scope:
                try:
                    value = await self._dispatcher.handle_call(self, call.method, call.args)
                    result = Result(True, value)
                except RPCError as exc:
                    result = Result(False, error=exc.message, code=exc.code)
                except ConnectionClosed:
                    return
                except Exception as exc:
                    log.exception("%s: RPC handler %r failed", self.label, call.method)
                    result = Result(
                        False, error=f"{type(exc).__name__}: {exc}", code="handler_error"
                    )
        finally:
            del self._running_calls[call_id]
        if result is not None and not scope.cancelled_caught:
            self._send_result(call_id, result)

    def _send_result(self, call_id: int, result: Result) -> None:
        try:
            self._send_control(FrameKind.RESULT, call_id, result)
        except LocalProtocolError as exc:
            refusal = Result(
                False, error=f"the handler's result cannot be sent: {exc}", code="bad_result"
            )
            with contextlib.suppress(ConnectionClosed):
                self._send_control(FrameKind.RESULT, call_id, refusal)
        except ConnectionClosed:
            pass

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
        pending = _PendingCall()
        frame = self._encode(FrameKind.CALL, call_id, Call(method, args))
        self._pending_calls[call_id] = pending
        self._last_activity = trio.current_time()
        try:
            self._outbox.put_control((frame,))
            with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
                await pending.done.wait()
        finally:
            del self._pending_calls[call_id]
            if not pending.done.is_set() and self.is_open:
                # Timed out or cancelled: tell the peer to stop working on it.
                self._send_control(FrameKind.CANCEL, call_id, Cancel())
        if scope.cancelled_caught:
            raise RPCTimeoutError(f"call to {method!r} timed out after {timeout:g}s")
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        result = pending.result
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
        if stream_id in self._outgoing:
            raise LocalProtocolError(f"stream {stream_id} is already being sent")
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


__all__ = ["Connection", "ConnectionSettings", "Dispatcher", "OutFrame"]
