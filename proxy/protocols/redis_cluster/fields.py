"""Small readers of RESP frames shared by the rewriter and the topology parser."""

from __future__ import annotations

from ..resp import Frame


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def blank(endpoint: str | None) -> bool:
    """An endpoint that names no host: NULL, empty (the node does not know its own address,
    e.g. a lone node without ``cluster-announce-ip``) or ``?`` (hostname preferred, none set).
    """
    return not endpoint or endpoint == "?"


def _port(f: Frame | None) -> int | None:
    if f is None or not isinstance(f.value, bytes):
        return None
    try:
        return int(f.bytes_value or b"")
    except ValueError:
        return None


def _str(f: Frame | None) -> str | None:
    v = None if f is None else f.bytes_value
    return None if v is None else _s(v)


def _fields(f: Frame) -> dict[bytes, Frame]:
    """A RESP3 map or its RESP2 flat-array form as {key: value frame}."""
    out: dict[bytes, Frame] = {}
    for k, v in f.pairs():
        key = k.bytes_value
        if key is not None:
            out[key.lower()] = v
    return out
