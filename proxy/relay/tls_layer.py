"""TLS for the buffered relay, run by the relay itself over a plain transport.

::

    socket --ciphertext--> [plain transport] --> TlsLayer --plaintext--> Side (get_buffer /
                                                 | SSLObject  |          buffer_updated)
    socket <--ciphertext-- [plain transport] <-- +  MemoryBIOs  <--write-- TlsTransport

asyncio's own TLS (``ssl=`` on a transport) keeps its records where a relay cannot
reach them: once the socket fails, ``connection_lost`` arrives and what that layer
had read, and what is still in the kernel, dies with it. Here the ``ssl.SSLObject``
and its two ``MemoryBIO``\\ s belong to the relay, so when a side fails ``drain()``
still decrypts every record it had received -- those already in the incoming BIO,
then the socket's final receive queue through a duplicate descriptor -- and the
relay delivers them before it passes the reset on (docs/hot-loop.md, "When a side
fails"). Plaintext is decrypted straight into the relay's scratch buffer, one chunk at
a time while the Side reads; a paused Side pauses the socket, so a direction holds at
most one read of ciphertext. Ciphertext goes to the plain transport at once, so its
write buffer and the kernel's send queue (SIOCOUTQ) account for every byte unsent.

Half-close: a peer's close_notify or FIN is the Side's EOF once every record before
it is delivered; ``write_eof`` sends close_notify and then a FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from typing import Any, cast

_READ = 1 << 16  # ciphertext read per recv() while draining a failed socket


def _read_into(sslobj: ssl.SSLObject, buf: memoryview) -> int:
    """Decrypt into ``buf`` (typeshed types ``read`` as returning bytes; given a
    buffer it returns a count)."""
    return cast(int, sslobj.read(len(buf), buf))


class HandshakeError(ConnectionError):
    """The peer went away before the handshake completed."""


class TlsLayer(asyncio.BufferedProtocol):
    """One TLS connection: the plain transport's protocol, the app's transport's engine."""

    def __init__(self, app: asyncio.BufferedProtocol, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: str | None = None) -> None:
        self.app = app
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                       server_hostname=server_hostname)
        self.raw: asyncio.Transport | None = None
        self.transport = TlsTransport(self)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready = False  # handshake done: the app has its transport
        self.paused = False  # the app paused reading
        self.eof = False  # the app was told of the peer's EOF
        self.sent_eof = False
        self.error: Exception | None = None  # a TLS failure that ended the connection
        self.drain_sock: socket.socket | None = None  # a failed socket's duplicate
        self.drain_claimed = False  # the relay drains it (and ends the drain)
        self._buf = memoryview(bytearray(0))  # where the raw transport put ciphertext

    # -- the plain transport's callbacks --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        if not self.sslobj.server_side:
            self._handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        self._buf = cast(memoryview, self.app.get_buffer(sizehint))
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        self.incoming.write(self._buf[:nbytes])
        if not self.ready:
            self._handshake()
            return
        self._pump()

    def eof_received(self) -> bool:
        self.incoming.write_eof()
        if not self.ready:
            self._handshake()
        else:
            self._pump()
        return True  # this layer closes the transport when the app says so

    def pause_writing(self) -> None:
        if self.ready:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.ready:
            self.app.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready:
            if not self.handshake.done():
                self.handshake.set_exception(
                    exc or HandshakeError("connection closed during the TLS handshake"))
            return
        exc = exc or self.error
        if exc is not None and self.raw is not None:
            # The loop closes the socket right after this returns: keep a duplicate so
            # ``drain`` can still read its final receive queue.
            sock = self.raw.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    dup = socket.socket(fileno=os.dup(sock.fileno()))
                    dup.setblocking(False)
                    self.drain_sock = dup
        try:
            self.app.connection_lost(exc)
        finally:
            if not self.drain_claimed:
                self.end_drain()

    # -- handshake, decrypt, encrypt -------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # the alert that says why, as asyncio sends it
            if not self.handshake.done():
                self.handshake.set_exception(exc)
            if self.raw is not None:
                self.raw.abort()
            return
        self._flush()  # the last flight (and TLS 1.3 session tickets)
        self.ready = True
        self.app.connection_made(self.transport)
        if not self.handshake.done():
            self.handshake.set_result(None)
        self._pump()  # what the peer sent right after its Finished

    def _pump(self) -> None:
        """Decrypt what the incoming BIO holds into the app, while the app reads."""
        app, sslobj, incoming = self.app, self.sslobj, self.incoming
        # Read only while there is something to read: a read that finds nothing raises,
        # which costs more than the checks (a small request is one record).
        while (not self.paused and not self.eof and self.error is None
               and (incoming.pending or sslobj.pending() or incoming.eof)):
            buf = cast(memoryview, app.get_buffer(-1))
            try:
                n = _read_into(sslobj, buf)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                n = 0
            except ssl.SSLError as exc:
                self._fail(exc)
                return
            if n == 0:
                self._app_eof()
                break
            app.buffer_updated(n)
        if self.outgoing.pending:
            self._flush()  # a key update or an alert the reads produced

    def _app_eof(self) -> None:
        self.eof = True
        if not self.app.eof_received() and self.raw is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        """Bad records: the connection is over; the relay sees a failed side."""
        self.error = exc
        if self.raw is not None:
            self.raw.abort()

    def _flush(self) -> None:
        if self.outgoing.pending and self.raw is not None and not self.raw.is_closing():
            self.raw.write(self.outgoing.read())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.raw is None or self.raw.is_closing() or self.sent_eof:
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    def set_reading(self, on: bool) -> None:
        if self.paused != on:
            return
        self.paused = not on
        if self.raw is None:
            return
        if on:
            self._pump()  # what was decrypted-but-undelivered comes first
            if not self.paused and not self.raw.is_closing():
                self.raw.resume_reading()
        elif not self.raw.is_closing():
            self.raw.pause_reading()

    def shutdown(self) -> None:
        """Send close_notify (once); the peer may still send, we may not."""
        if self.sent_eof or self.raw is None or self.raw.is_closing():
            return
        self.sent_eof = True
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.sslobj.unwrap()  # writes close_notify; wants the peer's, which may come
        self._flush()

    # -- after a failure ---------------------------------------------------------------

    def claim_drain(self) -> TlsLayer:
        """The relay will drain this failed side (``drain_into``) and end it."""
        self.drain_claimed = True
        return self

    def drain_into(self, buf: memoryview) -> int:
        """After a failure: the next plaintext the peer sent before it, into ``buf``;
        0 once the records received (in the BIO, then in the socket) are all read."""
        while True:
            try:
                n = _read_into(self.sslobj, buf)
            except ssl.SSLWantReadError:
                sock = self.drain_sock
                if sock is None:
                    return 0
                try:
                    data = sock.recv(_READ)
                except OSError:  # the reset itself, after the last byte
                    data = b""
                if data:
                    self.incoming.write(data)
                else:
                    self.end_drain()
                    self.incoming.write_eof()
                continue
            except ssl.SSLError:  # close_notify, a truncated record, garbage
                self.end_drain()
                return 0
            if n == 0:
                self.end_drain()
            return n

    def end_drain(self) -> None:
        if self.drain_sock is not None:
            self.drain_sock.close()
            self.drain_sock = None


class TlsTransport(asyncio.Transport):
    """What the app (a relay Side) writes plaintext to; the plain transport does the I/O."""

    def __init__(self, layer: TlsLayer) -> None:
        super().__init__()
        self._layer = layer

    @property
    def layer(self) -> TlsLayer:
        return self._layer

    def _raw(self) -> asyncio.Transport:
        raw = self._layer.raw
        assert raw is not None
        return raw

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._layer.sslobj
        if name == "peercert":
            return self._layer.sslobj.getpeercert()
        return self._raw().get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._layer.write(data)

    def get_write_buffer_size(self) -> int:
        return self._raw().get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw().set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._raw().is_closing()

    def is_reading(self) -> bool:
        return not self._layer.paused

    def pause_reading(self) -> None:
        self._layer.set_reading(False)

    def resume_reading(self) -> None:
        self._layer.set_reading(True)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """close_notify, then a FIN after the last pending byte: TLS's half-close."""
        self._layer.shutdown()
        raw = self._raw()
        if not raw.is_closing():
            raw.write_eof()

    def close(self) -> None:
        self._layer.shutdown()
        self._raw().close()

    def abort(self) -> None:
        self._raw().abort()


async def wrap(loop: asyncio.AbstractEventLoop, app: asyncio.BufferedProtocol,
               sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
               server_hostname: str | None = None, handshake_timeout: float) -> TlsLayer:
    """Run the handshake on ``sock`` within ``handshake_timeout``; the app gets ``connection_made``
    with a ``TlsTransport`` once it completes. Raises ``ssl.SSLError``, ``OSError``
    (``HandshakeError`` included) or ``TimeoutError``; the socket is closed then."""
    layer = TlsLayer(app, context, server_side=server_side, server_hostname=server_hostname)
    try:
        async with asyncio.timeout(handshake_timeout):
            if server_side:
                await loop.connect_accepted_socket(lambda: layer, sock)
            else:
                await loop.create_connection(lambda: layer, sock=sock)
            await layer.handshake
    except BaseException:
        if layer.raw is not None:
            layer.raw.abort()
        raise
    return layer
