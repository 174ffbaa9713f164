"""A lean HTTP/1.1 client for one streamed POST, over asyncio streams.

The serving benchmark charges the router for every millisecond between sending a
request and reading its first chunk. A general-purpose client (aiohttp) adds ~2.5 ms
of its own parsing per request on this machine, which is the client's cost, not the
router's; this one does only what a streamed completion needs: send the JSON body,
read the status and headers, undo chunked transfer encoding, split lines.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator
from urllib.parse import urlparse


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        self.status = status
        self.body = body


async def post_lines(url: str, payload: dict[str, Any]) -> AsyncIterator[bytes]:
    """POST `payload` as JSON to `url` and yield the response body line by line (each
    line without its newline) as it arrives. Raises HttpError for a status other than 200."""
    parts = urlparse(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    try:
        body = json.dumps(payload).encode()
        head = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        chunks = _chunks(reader) if headers.get("transfer-encoding") == "chunked" else _until_eof(reader)
        if status != 200:
            raise HttpError(status, b"".join([c async for c in chunks]))
        pending = b""
        async for chunk in chunks:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r")
        if pending:
            yield pending
    finally:
        writer.close()


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk


async def _until_eof(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while chunk := await reader.read(65536):
        yield chunk
