"""``copy: sockmap``: the kernel forwards the bytes; Python sets up, tears down, catches up.

::

    client --(sk_skb verdict: redirect)--> upstream      no wake-up of this process
    client <--(sk_skb verdict: redirect)-- upstream      per request, either way

Both sockets of a connection go into a BPF ``SOCKHASH`` with a small
``sk_skb`` verdict program attached. When bytes arrive on one socket the
kernel runs the program, which finds the socket's pair by cookie and
redirects the chunk to the other socket's send path: no wake-up of this
process and no copy into it (docs/hot-loop.md has the figures).

It needs ``CAP_BPF`` and ``CAP_NET_ADMIN`` (root, or a container given both).
The program is assembled here and loaded with raw ``bpf(2)`` calls through
ctypes: no compiler, no libbpf. Where the kernel refuses, the listener uses
``copy: auto``, logged once.

The kernel's redirect has no backpressure of its own (measured with
bench/sockmap_ab.py: a stalled server let one client push 1.7 GB into the
kernel in a second). So each direction carries a *credit* that the program
spends. The chunk that overdraws it is *passed* instead -- it stays with its
socket, charged to the socket's receive buffer -- and so is every chunk
after it: the receive buffer fills, TCP's window closes, the sender stops.
Passed bytes wake this process. Once every redirected byte is in the
destination's TCP stream, Python copies the passed bytes over (one scratch
buffer, ordinary backpressure) and posts how many it has taken; the program
goes back to redirecting on the first chunk that finds all passed bytes
taken, so nothing can overtake what Python still holds. The verdict is never
detached: detaching races the kernel's receive path, which drops a chunk it
finds without a program (seen on 6.18).

A FIN arrives as an empty chunk; the program passes it, so EOF reaches this
process in order after the data, and the FIN is passed on only once all
redirected bytes have reached the destination (an empty chunk redirected
makes the kernel's send worker set EPIPE on the destination, also seen on
6.18). The drain check reads the destination's ``tcpi_bytes_acked`` plus its
send queue (``SIOCOUTQ``) against the bytes the program redirected.

Sockets sit in one epoll set per loop (the loop watches it as one
descriptor): they wake this process only for EOF, errors and passed bytes,
so the extra hop is off the path that matters, and an idle connection holds
no loop watchers.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import platform
import select
import socket
import struct
import sys
import weakref
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("cacheport.sockmap")

CREDIT = 4 << 20  # bytes the kernel redirects per direction before this process looks
MAX_PAIRS = 32768  # connections per process the maps hold; beyond it, new ones use copy: auto
SCRATCH = 256 << 10  # copies passed bytes while a direction catches up
DRAIN_FIRST = 0.0002  # seconds before the first look at a draining direction...
DRAIN_MAX = 0.05  # ...doubling up to this

_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}
_SO_COOKIE = 57
_SIOCOUTQ = 0x5411
_TCP_INFO_LEN = 128  # up to and including tcpi_bytes_acked
_TCP_ESTABLISHED, _TCP_CLOSE_WAIT = 1, 8
_LINGER_RST = struct.pack("ii", 1, 0)
# A pair's map entry: peer cookie, credit left, bytes redirected, bytes passed, paused.
_PAIR = struct.Struct("<QqQQQ")
_U64 = struct.Struct("<Q")
_FD = struct.Struct("<I")
_IN = getattr(select, "EPOLLIN", 0x001)
_OUT = getattr(select, "EPOLLOUT", 0x004)
_RDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
_ERR = getattr(select, "EPOLLERR", 0x008)
_ERR_HUP = _ERR | getattr(select, "EPOLLHUP", 0x010)

# bpf(2) commands, map, program and attach types (include/uapi/linux/bpf.h).
_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE, _PROG_LOAD, _PROG_ATTACH = 0, 1, 2, 3, 5, 8
_MAP_HASH, _MAP_SOCKHASH = 1, 18
_PROG_SK_SKB = 14
_ATTACH_SK_SKB_VERDICT = 38
_NO_PREALLOC = 1
_HELPER_LOOKUP, _HELPER_SOCKET_COOKIE, _HELPER_SK_REDIRECT_HASH = 1, 46, 72
_SK_PASS = 1


class Refused(OSError):
    """The kernel would not make the maps or load the program (privilege, support)."""


class NotPaired(OSError):
    """The kernel would not take this connection, and nothing of it was touched."""


_libc: ctypes.CDLL | None = None


def _bpf(cmd: int, attr: bytearray) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    ret = int(_libc.syscall(nr, cmd, buf, len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _assemble(items: list[bytes | str | tuple[str, int, int, int, str]]) -> bytes:
    """Instructions, ``"label"`` strings, and jumps: ``("j", code, dst, imm, label)``
    compares a register with a constant, ``("jr", code, dst, src, label)`` with a register."""
    where: dict[str, int] = {}
    at = 0
    for item in items:
        if isinstance(item, str):
            where[item] = at
        elif isinstance(item, tuple):
            at += 1
        else:
            at += len(item) // 8
    out = []
    at = 0
    for item in items:
        if isinstance(item, str):
            continue
        if isinstance(item, tuple):
            kind, code, dst, arg, label = item
            off = where[label] - at - 1
            out.append(_insn(code, dst, arg, off, 0) if kind == "jr" else
                       _insn(code, dst, 0, off, arg))
            at += 1
        else:
            out.append(item)
            at += len(item) // 8
    return b"".join(out)


def _ld_map(dst: int, fd: int) -> bytes:
    return _insn(0x18, dst, 1, 0, fd) + _insn(0)  # ld_imm64 with BPF_PSEUDO_MAP_FD


def verdict_program(pairs_fd: int, taken_fd: int, socks_fd: int) -> bytes:
    """The sk_skb verdict. In C::

        if (!skb->len) return SK_PASS;                    /* a bare FIN: stays in order */
        pair = lookup(&pairs, cookie(skb)); if (!pair) return SK_PASS;
        if (pair->paused) {
            taken = lookup(&taken, cookie(skb));
            if (!taken || *taken != pair->passed) goto pass;  /* Python still behind */
            pair->paused = 0; pair->credit = CREDIT; *taken = -1;  /* matches no count */
        }
        pair->credit -= skb->len;
        if (pair->credit < 0) { pair->paused = 1; goto pass; }
        pair->redirected += skb->len;
        return sk_redirect_hash(skb, &socks, &pair->peer, 0);
    pass:
        pair->passed += skb->len; return SK_PASS;
    """
    jeq, jne, jslt = 0x15, 0x5D, 0xC5  # jeq imm, jne reg, jslt imm
    return _assemble([
        _insn(0xBF, 6, 1),  # r6 = skb
        _insn(0x61, 8, 6, 0),  # r8 = skb->len
        ("j", jeq, 8, 0, "pass_bare"),
        _insn(0x85, imm=_HELPER_SOCKET_COOKIE),
        _insn(0x7B, 10, 0, -8),  # fp[-8] = cookie
        _ld_map(1, pairs_fd), _insn(0xBF, 2, 10), _insn(0x07, 2, imm=-8),
        _insn(0x85, imm=_HELPER_LOOKUP),
        ("j", jeq, 0, 0, "pass_bare"),
        _insn(0xBF, 7, 0),  # r7 = pair
        _insn(0x79, 1, 7, 32),  # r1 = pair->paused
        ("j", jeq, 1, 0, "spend"),
        _ld_map(1, taken_fd), _insn(0xBF, 2, 10), _insn(0x07, 2, imm=-8),
        _insn(0x85, imm=_HELPER_LOOKUP),  # r0 = taken or NULL
        ("j", jeq, 0, 0, "pass"),
        _insn(0x79, 1, 0, 0),  # r1 = *taken
        _insn(0x79, 2, 7, 24),  # r2 = pair->passed
        ("jr", jne, 1, 2, "pass"),
        _insn(0x7A, 7, 0, 32, 0),  # pair->paused = 0
        _insn(0xB7, 1, imm=CREDIT), _insn(0x7B, 7, 1, 8),  # pair->credit = CREDIT
        _insn(0x7A, 0, 0, 0, -1),  # *taken = -1: matches no count
        "spend",
        _insn(0x79, 1, 7, 8), _insn(0x1F, 1, 8), _insn(0x7B, 7, 1, 8),  # credit -= len
        ("j", jslt, 1, 0, "pause"),
        _insn(0x79, 1, 7, 16), _insn(0x0F, 1, 8), _insn(0x7B, 7, 1, 16),  # redirected += len
        _insn(0x79, 1, 7, 0), _insn(0x7B, 10, 1, -16),  # fp[-16] = peer
        _insn(0xBF, 1, 6), _ld_map(2, socks_fd), _insn(0xBF, 3, 10), _insn(0x07, 3, imm=-16),
        _insn(0xB7, 4, imm=0),
        _insn(0x85, imm=_HELPER_SK_REDIRECT_HASH),
        _insn(0x95),
        "pause",
        _insn(0x7A, 7, 0, 32, 1),  # pair->paused = 1
        "pass",
        _insn(0x79, 1, 7, 24), _insn(0x0F, 1, 8), _insn(0x7B, 7, 1, 24),  # passed += len
        "pass_bare",
        _insn(0xB7, 0, imm=_SK_PASS),
        _insn(0x95),
    ])


def _map_create(kind: int, key: int, value: int, entries: int, flags: int, name: bytes) -> int:
    attr = bytearray(72)
    struct.pack_into("<IIIII", attr, 0, kind, key, value, entries, flags)
    attr[28:28 + len(name)] = name[:15]
    return _bpf(_MAP_CREATE, attr)


def _prog_load(code: bytes) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    logbuf = ctypes.create_string_buffer(16384)
    attr = bytearray(128)
    struct.pack_into("<IIQQIIQ", attr, 0, _PROG_SK_SKB, len(code) // 8, ctypes.addressof(insns),
                     ctypes.addressof(license_), 1, len(logbuf), ctypes.addressof(logbuf))
    attr[48:48 + 11] = b"cacheport_v"
    try:
        return _bpf(_PROG_LOAD, attr)
    except OSError as exc:
        verifier = logbuf.value.decode(errors="replace").strip().splitlines()
        detail = f" (verifier: {verifier[-1]})" if verifier and exc.errno == errno.EINVAL else ""
        raise OSError(exc.errno, f"{exc.strerror}{detail}") from None


def _elem(cmd: int, map_fd: int, key: bytes, value: bytes | None = None, flags: int = 0) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value)) if value is not None else None
    attr = bytearray(32)
    struct.pack_into("<IIQQQ", attr, 0, map_fd, 0, ctypes.addressof(k),
                     ctypes.addressof(v) if v is not None else 0, flags)
    _bpf(cmd, attr)


def cookie(sock: socket.socket) -> int:
    """The kernel's 64-bit id for a socket (never reused while the system is up)."""
    value: int = _U64.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8))[0]
    return value


def written(sock: socket.socket) -> tuple[int, int]:
    """(bytes written into this socket's TCP stream, TCP state): acked plus still queued."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    acked = struct.unpack_from("<Q", info, 120)[0]
    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
    return acked + queued, info[0]


class Kernel:
    """One process's maps and verdict program."""

    def __init__(self, pairs: int = MAX_PAIRS) -> None:
        self.fds: list[int] = []
        try:
            self.pairs = self._own(_map_create(_MAP_HASH, 8, _PAIR.size, 2 * pairs,
                                               _NO_PREALLOC, b"cacheport_pairs"))
            self.taken = self._own(_map_create(_MAP_HASH, 8, 8, 2 * pairs, _NO_PREALLOC,
                                               b"cacheport_taken"))
            self.socks = self._own(_map_create(_MAP_SOCKHASH, 8, 4, 2 * pairs, 0,
                                               b"cacheport_socks"))
            prog = self._own(_prog_load(verdict_program(self.pairs, self.taken, self.socks)))
            attr = bytearray(16)
            struct.pack_into("<IIII", attr, 0, self.socks, prog, _ATTACH_SK_SKB_VERDICT, 0)
            _bpf(_PROG_ATTACH, attr)
        except OSError as exc:
            self.close()
            raise Refused(exc.errno, exc.strerror) from None
        self.paired = 0  # connections ever paired (test seam)
        self.live = 0  # pairs in the maps now
        self.caught_up = 0  # times a direction copied passed bytes (test seam)
        self.fell_back = 0  # connections the kernel would not take (test seam)

    def _own(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    @property
    def full(self) -> bool:
        return self.live >= MAX_PAIRS

    def pair(self, a: socket.socket, b: socket.socket) -> tuple[int, int]:
        """Forward between ``a`` and ``b`` in the kernel from now on; their cookies.

        Both sockets must be established (the caller checks; the kernel refuses
        others). Both directions start paused, so a chunk that arrives while only one
        socket is in the SOCKHASH (nowhere to redirect it to) is passed, not dropped;
        Python takes whatever was passed and the first chunk after that switches the
        direction to the kernel. Setting SO_RCVLOWAT runs TCP's data-ready hook, now
        the verdict, on what arrived before the pairing.
        """
        ca, cb = cookie(a), cookie(b)
        inserted = False
        try:
            _elem(_MAP_UPDATE, self.pairs, _U64.pack(ca), _PAIR.pack(cb, CREDIT, 0, 0, 1))
            _elem(_MAP_UPDATE, self.pairs, _U64.pack(cb), _PAIR.pack(ca, CREDIT, 0, 0, 1))
            for sock, c in ((b, cb), (a, ca)):
                _elem(_MAP_UPDATE, self.socks, _U64.pack(c), _FD.pack(sock.fileno()))
                inserted = True
            for sock, c in ((b, cb), (a, ca)):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                self.take(c, 0)
        except OSError as exc:
            self.forget(ca, cb)
            if inserted:
                raise  # bytes may have been passed to a socket's BPF queue: not safe to retry
            raise NotPaired(exc.errno, exc.strerror) from None
        self.paired += 1
        self.live += 1
        return ca, cb

    def take(self, c: int, count: int) -> None:
        """Say Python has taken ``count`` passed bytes from the socket with cookie ``c``."""
        _elem(_MAP_UPDATE, self.taken, _U64.pack(c), _U64.pack(count))

    def counts(self, c: int) -> tuple[int, int]:
        """(bytes redirected, bytes passed) from the socket with cookie ``c``."""
        value = ctypes.create_string_buffer(_PAIR.size)
        key = ctypes.create_string_buffer(_U64.pack(c), 8)
        attr = bytearray(32)
        struct.pack_into("<IIQQ", attr, 0, self.pairs, 0, ctypes.addressof(key),
                         ctypes.addressof(value))
        _bpf(_MAP_LOOKUP, attr)
        fields = _PAIR.unpack(value.raw)
        return fields[2], fields[3]

    def forget(self, *cookies: int) -> None:
        """Drop the map entries (a closed socket leaves the SOCKHASH by itself)."""
        for c in cookies:
            for fd in (self.socks, self.pairs, self.taken):
                try:
                    _elem(_MAP_DELETE, fd, _U64.pack(c))
                except OSError:
                    pass


_kernel: tuple[int, Kernel | None] | None = None  # (pid, kernel): workers make their own


def kernel_for_process() -> Kernel | None:
    """This process's maps and program, made on first use; None (logged once) if refused."""
    global _kernel
    if _kernel is not None and _kernel[0] == os.getpid():
        return _kernel[1]
    kernel: Kernel | None = None
    if not sys.platform.startswith("linux"):
        log.warning("copy: sockmap needs Linux BPF sockmap; using copy: auto instead")
    else:
        try:
            kernel = Kernel()
        except Refused as exc:
            hint = (" -- it needs CAP_BPF and CAP_NET_ADMIN (run as root, or give the "
                    "container both)" if exc.errno in (errno.EPERM, errno.EACCES) else "")
            log.warning("copy: sockmap: the kernel refused the BPF program: %s%s; using "
                        "copy: auto instead (logged once)", exc.strerror, hint)
    _kernel = (os.getpid(), kernel)
    return kernel


class Fallback(Protocol):
    """The relay a connection runs on when the kernel won't take it (``SpliceRelay``)."""

    @property
    def bytes_upstream(self) -> int: ...
    @property
    def bytes_downstream(self) -> int: ...
    @property
    def pending_downstream(self) -> int: ...
    def attach(self, loop: asyncio.AbstractEventLoop, client: socket.socket,
               upstream: socket.socket) -> None: ...
    def start(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class SockmapHub:
    """Per event loop: one epoll set for every sockmap relay's sockets."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        self.ways: dict[int, _KWay] = {}  # socket fd -> the direction that reads it
        self.masks: dict[int, int] = {}  # socket fd -> what the epoll set watches (0: absent)
        self.scratch = memoryview(bytearray(SCRATCH))
        loop.add_reader(self.epoll.fileno(), self.dispatch)
        weakref.finalize(loop, self.epoll.close)

    def register(self, way: _KWay) -> None:
        self.ways[way.src_fd] = way
        self.epoll.register(way.src_fd, _IN | _RDHUP)
        self.masks[way.src_fd] = _IN | _RDHUP

    def rewatch(self, way: _KWay) -> None:
        """Watch ``way``'s source for reading, and for writing if the other way is held.

        A socket watched for nothing leaves the set: epoll would still report
        EPOLLHUP on it, over and over, while a drained FIN waits to go out.
        """
        fd = way.src_fd
        if fd not in self.ways:
            return
        mask = (_IN | _RDHUP if way.reading else 0) | (_OUT if way.other.held else 0)
        old = self.masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            self.epoll.unregister(fd)
        elif not old:
            self.epoll.register(fd, mask)
        else:
            self.epoll.modify(fd, mask)
        self.masks[fd] = mask

    def unregister(self, fd: int) -> None:
        if self.ways.pop(fd, None) is not None and self.masks.pop(fd, 0):
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def dispatch(self) -> None:
        try:
            events = self.epoll.poll(0, 64)
        except OSError:
            return
        ways = self.ways
        for fd, ev in events:
            way = ways.get(fd)
            if way is None or way.relay.closed:
                continue
            if ev & _ERR and not ev & (_IN | _OUT):
                way.relay.abort()
                continue
            if ev & _OUT and way.other.held:
                way.other.flush()
            if ev & (_IN | _RDHUP | _ERR_HUP) and way.reading and not way.relay.closed:
                way.readable()


_HUBS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SockmapHub] = (
    weakref.WeakKeyDictionary())


def hub_for(loop: asyncio.AbstractEventLoop) -> SockmapHub:
    hub = _HUBS.get(loop)
    if hub is None:
        hub = _HUBS[loop] = SockmapHub(loop)
    return hub


class _KWay:
    """One direction, ``src`` -> ``dst``: the kernel redirects; Python takes what it passes."""

    __slots__ = ("base", "cookie", "delay", "dst", "eof", "held", "hub", "other", "py_read",
                 "py_sent", "reading", "relay", "src", "src_fd", "timer", "waiting")

    def __init__(self, relay: SockmapRelay, hub: SockmapHub, src: socket.socket,
                 dst: socket.socket) -> None:
        self.relay = relay
        self.hub = hub
        self.src, self.dst = src, dst
        self.src_fd = src.fileno()
        self.cookie = 0
        self.base = 0  # written(dst) before pairing: the SYN counts in tcpi_bytes_acked
        self.other: _KWay = self
        self.reading = True  # src watched: EOF, errors, passed bytes
        self.eof = False
        self.held = b""  # passed bytes taken from src, not yet sent (waiting or blocked)
        self.waiting = False  # held bytes wait for the kernel's redirected ones to land
        self.py_read = 0  # passed bytes taken from src
        self.py_sent = 0  # of those, written into dst
        self.delay = DRAIN_FIRST
        self.timer: asyncio.TimerHandle | None = None

    def readable(self) -> None:
        """Passed bytes or EOF on src: take them, once the redirected ones have landed."""
        relay = self.relay
        if self.held:
            return
        try:
            n = self.src.recv_into(self.hub.scratch)
        except (BlockingIOError, InterruptedError):
            self._post()
            return
        except OSError:
            relay.abort()
            return
        if n == 0:
            self.eof = True
        else:
            self.py_read += n
            self.held = bytes(self.hub.scratch[:n])
        self.reading = False
        self.hub.rewatch(self)
        self.waiting = True
        self._wait_drained()

    def unlanded(self) -> tuple[int, int]:
        """(bytes redirected or sent here that are not in dst's TCP stream yet, dst's
        TCP state): what the kernel still holds for dst."""
        done, state = written(self.dst)
        return (self.relay.kernel.counts(self.cookie)[0] + self.py_sent
                - (done - self.base)), state

    def _wait_drained(self) -> None:
        """Everything the kernel redirected from src must be in dst's stream first."""
        self.timer = None
        relay = self.relay
        if relay.closed:
            return
        try:
            unlanded, state = self.unlanded()
        except OSError:
            relay.abort()
            return
        if unlanded > 0:
            if state not in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT):
                relay.abort()  # dst can no longer take what the kernel holds for it
                return
            self.timer = self.hub.loop.call_later(self.delay, self._wait_drained)
            self.delay = min(self.delay * 2, DRAIN_MAX)
            return
        self.delay = DRAIN_FIRST
        self.waiting = False
        if self.eof:
            relay.half_close(self)
            return
        self.relay.kernel.caught_up += 1
        self.flush()

    def flush(self) -> None:
        """Send what is held; then read on (more passed bytes, EOF, or caught up)."""
        if self.waiting:
            return
        held, self.held = self.held, b""
        if held:
            try:
                sent = self.dst.send(held)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.relay.abort()
                return
            self.py_sent += sent
            if sent < len(held):
                self.held = held[sent:]
                self.hub.rewatch(self.other)  # dst is other's source: watch it for writing
                return
            self.hub.rewatch(self.other)
        self.reading = True
        self.hub.rewatch(self)
        self.readable()

    def _post(self) -> None:
        """src reads empty with nothing held: let the kernel redirect again."""
        try:
            self.relay.kernel.take(self.cookie, self.py_read)
        except OSError:
            self.relay.abort()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class SockmapRelay:
    """A client connection forwarded in the kernel; same face as ``relay.Relay``."""

    __slots__ = ("__weakref__", "client_sock", "closed", "down", "fallback", "final", "hub",
                 "inner", "kernel", "on_close", "source", "started", "up", "upstream_sock")

    def __init__(self, kernel: Kernel, loop: asyncio.AbstractEventLoop,
                 on_close: Callable[[SockmapRelay], None], source: str = "",
                 *, fallback: Callable[[Callable[[Any], None]], Fallback] | None = None
                 ) -> None:
        self.kernel = kernel
        self.fallback = fallback  # the relay a connection the kernel won't take runs on
        self.inner: Fallback | None = None
        self.hub = hub_for(loop)
        self.on_close = on_close
        self.source = source
        self.closed = False
        self.started = False
        self.client_sock: socket.socket | None = None
        self.upstream_sock: socket.socket | None = None
        self.final = (0, 0)  # byte counts read just before the pair left the maps

    def attach(self, loop: asyncio.AbstractEventLoop, client: socket.socket,
               upstream: socket.socket) -> None:
        """Take ownership of both connected, non-blocking sockets."""
        self.client_sock, self.upstream_sock = client, upstream
        self.up = _KWay(self, self.hub, client, upstream)
        self.down = _KWay(self, self.hub, upstream, client)
        self.up.other, self.down.other = self.down, self.up

    def start(self) -> None:
        """Pair the sockets in the kernel, or hand them to the fallback relay if the
        kernel will not take them (raises OSError if the pairing failed half way)."""
        assert self.client_sock is not None and self.upstream_sock is not None
        up, down = self.up, self.down
        try:
            (up.base, up_state), (down.base, down_state) = written(up.dst), written(down.dst)
            if up_state != _TCP_ESTABLISHED or down_state != _TCP_ESTABLISHED:
                # A FIN came first (say a client that sent its request and shut down):
                # the kernel takes only established sockets.
                raise NotPaired(errno.EOPNOTSUPP, "a socket is no longer established")
            up.cookie, down.cookie = self.kernel.pair(self.client_sock, self.upstream_sock)
        except NotPaired:
            if self.fallback is None:
                raise
            inner = self.inner = self.fallback(self._inner_closed)
            self.kernel.fell_back += 1
            inner.attach(self.hub.loop, self.client_sock, self.upstream_sock)
            inner.start()
            return
        self.started = True
        self.hub.register(up)
        self.hub.register(down)

    def _inner_closed(self, _relay: object) -> None:
        self.closed = True
        self.on_close(self)

    def _counts(self) -> tuple[int, int]:
        if self.inner is not None:
            return self.inner.bytes_upstream, self.inner.bytes_downstream
        if self.closed or not self.started:
            return self.final
        try:
            return (sum(self.kernel.counts(self.up.cookie)),
                    sum(self.kernel.counts(self.down.cookie)))
        except OSError:
            return self.final

    @property
    def bytes_upstream(self) -> int:
        """Client -> upstream bytes so far (redirected or passed)."""
        return self._counts()[0]

    @property
    def bytes_downstream(self) -> int:
        return self._counts()[1]

    @property
    def bytes_total(self) -> int:
        up, down = self._counts()
        return up + down

    @property
    def pending_downstream(self) -> int:
        """Bytes for the client that are not in its socket yet: queued in the kernel
        (redirected, not yet sent on) or held here."""
        if self.inner is not None:
            return self.inner.pending_downstream
        if self.closed or not self.started:
            return 0
        try:
            return max(self.down.unlanded()[0], 0) + len(self.down.held)
        except OSError:
            return 0

    def half_close(self, way: _KWay) -> None:
        """``way`` read EOF and every byte is in dst's stream: pass the FIN on."""
        try:
            way.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
            return
        if self.up.eof and self.down.eof and not (self.up.waiting or self.down.waiting):
            self.close()

    def abort(self) -> None:
        """Tear down both sides at once; both peers get an RST."""
        if self.inner is not None:
            self.inner.abort()
            return
        self._shut(reset=True)

    def close(self) -> None:
        """Close both sides; if bytes are still held or queued in the kernel, reset instead.

        A FIN after a cut stream would look like a complete reply to the peer.
        """
        if self.inner is not None:
            self.inner.close()
            return
        self._shut(reset=self.started and not self.closed and self._holding())

    def _holding(self) -> bool:
        try:
            for way in (self.up, self.down):
                if way.held or way.unlanded()[0] > 0:
                    return True
        except OSError:
            return True
        return False

    def _shut(self, reset: bool) -> None:
        if self.closed:
            return
        if self.started:
            self.final = self._counts()
        self.closed = True
        if self.started:
            for way in (self.up, self.down):
                way.cancel()
                self.hub.unregister(way.src_fd)
            self.kernel.forget(self.up.cookie, self.down.cookie)
            self.kernel.live -= 1
        for sock in (self.client_sock, self.upstream_sock):
            if sock is None:
                continue
            if reset:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            sock.close()
        self.on_close(self)
