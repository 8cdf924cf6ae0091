"""What the lean request paths of more than one store share (``s3_lean``, ``azure_lean``): the
text of a simple XML element, and the body of an error answer."""

from __future__ import annotations

import re

import aiohttp

_ENTITY = re.compile(r"&(?:#x([0-9a-fA-F]+)|#(\d+)|(amp|lt|gt|quot|apos));")

_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def unescape(text: str) -> str:
    """XML character and entity references (the five named ones, decimal, hex) to characters."""
    if "&" not in text:
        return text
    return _ENTITY.sub(lambda m: chr(int(m[1], 16)) if m[1] else chr(int(m[2])) if m[2] else _NAMED[m[3]], text)


def tag_text(body: str, tag: str) -> str | None:
    start = body.find(f"<{tag}>")
    if start < 0:
        return None
    start += len(tag) + 2
    return unescape(body[start : body.index("<", start)])


async def error_body(resp: aiohttp.ClientResponse) -> bytes:
    """The first 64 KiB of an error answer's body (where S3 and Azure name the error), or nothing
    when it cannot be read; the response is closed either way (its connection is not reused)."""
    try:
        return await resp.content.read(1 << 16)
    except (aiohttp.ClientError, TimeoutError):
        return b""
    finally:
        resp.close()
