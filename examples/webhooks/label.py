"""A trigger's webhook that writes a label back through the existing PATCH (docs/enrichment.md).

On every ``enriched`` event it checks the signature, reads the item's system metadata, and
sets the user metadata ``shape`` to ``portrait``, ``landscape`` or ``square`` (from the
displayed dimensions, upright per EXIF) with ``PATCH /api/v1/datasets/{ds}/items/{key}``.

    BUCKETSYNC_HOOK_SECRET=... BUCKETSYNC_API=http://127.0.0.1:9810 python label.py  # listens on :8088

and in bucketsync.toml:

    [[datasets.photos.triggers]]
    name = "label"
    on = ["enriched"]
    include = ["*.jpg", "*.png"]
    url = "http://127.0.0.1:8088/hook"
    secret_file = "/etc/bucketsync/hook-secret"

Only aiohttp is needed (bucketsync already depends on it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import urllib.parse
from typing import Any

from aiohttp import ClientSession, web


def shape(system: dict[str, Any]) -> str | None:
    w, h = system.get("display_width"), system.get("display_height")
    if not isinstance(w, int) or not isinstance(h, int):
        return None  # not an image
    return "square" if w == h else "portrait" if h > w else "landscape"


def make_app(secret: str, api: str, token: str | None = None) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Bucketsync-Signature", ""), expected):
            return web.Response(status=401, text="bad signature")
        event = await request.json()
        item = event["item"]
        label = shape(item.get("system") or {})
        if event["event"] != "enriched" or label is None:
            return web.Response(status=204)
        key = urllib.parse.quote(item["key"], safe="")  # one path segment: '/' as %2F
        url = f"{api}/api/v1/datasets/{event['dataset']}/items/{key}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            ClientSession() as http,
            http.patch(url, json={"metadata": {"shape": label}}, headers=headers) as resp,
        ):
            # A failure answers 502: bucketsync retries the delivery with backoff.
            return web.Response(status=204 if resp.status == 200 else 502)

    app = web.Application()
    app.router.add_post("/hook", hook)
    return app


if __name__ == "__main__":
    web.run_app(
        make_app(
            os.environ["BUCKETSYNC_HOOK_SECRET"], os.environ["BUCKETSYNC_API"], os.environ.get("BUCKETSYNC_TOKEN")
        ),
        host="127.0.0.1",
        port=8088,
    )
