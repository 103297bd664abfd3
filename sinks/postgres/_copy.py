"""Binary COPY payloads encoded in one tight loop and sent in large chunks.

Why not psycopg's ``await copy.write_row(row)``: it costs an awaited call and two Python frames per
row, which on a 10-column table is a fifth of the whole COPY. Here each row goes through psycopg's own
C encoder (``format_row_binary``, the function ``write_row`` calls) into one buffer, and the buffer is
sent every `FLUSH_AT` bytes, so the server parses one chunk while Python encodes the next. The
benchmark's plain-COPY baseline uses this same writer, so the comparison measures the upsert, not
the encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from psycopg import AsyncCopy
from psycopg._copy_base import format_row_binary  # the C encoder psycopg's write_row uses

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
"""Binary COPY header: signature, flags, header-extension length."""
TRAILER = b"\xff\xff"
FLUSH_AT = 256 * 1024


class BinaryRows:
    """Write rows into an open binary ``COPY ... FROM STDIN`` whose types were set with `set_types`.

    The loop that feeds it stays flat, with no Python call of ours per row::

        encode, transformer, buffer = rows.encode, rows.transformer, rows.buffer
        for values in ...:
            encode(values, transformer, buffer)
            if len(buffer) >= FLUSH_AT:
                await rows.drain()
                buffer = rows.buffer
        await rows.finish()

    ``encode`` raises what psycopg's dumpers raise (TypeError, psycopg.DataError) for a value that does
    not fit its column.
    """

    __slots__ = ("_copy", "buffer", "transformer")

    encode: Callable[[Sequence[Any], Any, bytearray], None] = staticmethod(format_row_binary)

    def __init__(self, copy: AsyncCopy) -> None:
        self._copy = copy
        self.transformer = copy.formatter.transformer
        self.buffer = bytearray(SIGNATURE)

    async def drain(self) -> None:
        buffer, self.buffer = self.buffer, bytearray()
        await self._copy.write(buffer)

    async def finish(self) -> None:
        self.buffer += TRAILER
        await self.drain()
