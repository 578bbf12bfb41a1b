"""An OpenAI-compatible images API for the benchmark, in a process of its own: every
`POST /v1/images/generations` is answered with the same image (as `b64_json`) after a delay.
`GET /held` answers how many requests it is holding now.

    python bench/fake_image_api.py PORT DELAY_SECONDS IMAGE_FILE

The answer is built once, so that the fake spends as little as it can of the CPU it shares.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import uvicorn
from starlette.types import Receive, Scope, Send


def main() -> None:
    port, delay, image = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3]).read_bytes()
    body = json.dumps({"created": 0, "data": [{"b64_json": base64.b64encode(image).decode()}]}).encode()
    held = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal held
        assert scope["type"] == "http"
        if scope["method"] != "POST":
            await answer(send, str(held).encode())
            return
        while (await receive()).get("more_body"):
            pass
        held += 1
        try:
            await asyncio.sleep(delay)
        finally:
            held -= 1
        await answer(send, body)

    async def answer(send: Send, content: bytes) -> None:
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": content})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", backlog=4096)


if __name__ == "__main__":
    main()
