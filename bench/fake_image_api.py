"""An OpenAI-compatible images API for the benchmark, in a process of its own: every
`POST /v1/images/generations` is answered with the same image (as `b64_json`) after a delay.

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
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        if scope["method"] != "POST":  # how the benchmark sees that the fake is up
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(delay)
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", backlog=4096)


if __name__ == "__main__":
    main()
