"""Sans-IO RESP2/RESP3: frame boundaries, parsed frames, requests and reply matching.

::

    upstream bytes --Scanner.scan--> end offset of each complete reply frame (no copy)
                   --Framer-------> (start, end) stream offsets of each frame
                   --Reader-------> raw frame bytes --parse()--> Frame --encode()--> bytes
    client bytes   --RequestParser--> Command(name, args, argc) for each command
    Commands + reply frames --Conversation--> which command each reply answers

One module per step, each depending only on the ones above it::

    framing.py   type bytes, limits, ProtocolError, Scanner, Framer
    frames.py    Frame, parse, parse_one, encode, Reader
    requests.py  Command, RequestParser, RequestError, split_inline
    matching.py  Conversation, Reply

Nothing here touches a socket. Every RESP3 type is framed: ``$ ! =`` bulk strings,
``+ - : _ , # (`` one-line types, ``* % ~ >`` aggregates, ``|`` attributes (framed together
with the value they annotate) and streamed strings (``$?`` + ``;n`` chunks) and aggregates
(``*?`` ... ``.``). Import from here: the names below are the package's interface.
"""

from .frames import Frame, Reader, bulk, encode, integer, parse, parse_one
from .framing import (
    ARRAY,
    ATTRIBUTE,
    BIGNUM,
    BOOLEAN,
    BULK,
    BULK_ERROR,
    CHUNK,
    DOUBLE,
    END,
    ERROR,
    INTEGER,
    MAP,
    MAX_BULK,
    MAX_INLINE,
    MAX_LINE,
    NULL,
    PUSH,
    SET,
    SIMPLE,
    VERBATIM,
    Bytes,
    Framer,
    ProtocolError,
    Scanner,
)
from .matching import CAPTURE_FOR, PLAIN, WATCHED, Conversation, Reply
from .requests import Command, RequestError, RequestParser, split_inline

__all__ = [
    "ARRAY", "ATTRIBUTE", "BIGNUM", "BOOLEAN", "BULK", "BULK_ERROR", "CAPTURE_FOR", "CHUNK",
    "DOUBLE", "END", "ERROR", "INTEGER", "MAP", "MAX_BULK", "MAX_INLINE", "MAX_LINE", "NULL",
    "PLAIN", "PUSH", "SET", "SIMPLE", "VERBATIM", "WATCHED", "Bytes", "Command",
    "Conversation", "Frame", "Framer", "ProtocolError", "Reader", "Reply", "RequestError",
    "RequestParser", "Scanner", "bulk", "encode", "integer", "parse", "parse_one",
    "split_inline",
]
