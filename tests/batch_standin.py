"""A stand-in for vLLM's OpenAI API (and the media server's /health), for the batch tool's tests.

A real aiohttp server on 127.0.0.1 in a thread of the test process: /health,
/v1/models, /v1/chat/completions and /v1/completions answer as vLLM does
(the usage block included), and every request that reaches a generating
route is recorded, so a test counts exactly what was sent. Faults, set by the
test: a delay per request, statuses to answer before the real answer (per
prompt text), dropped connections, and the whole server going away and
coming back on the same port (a supervisor restarting vLLM).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from typing import Any

import requests
from aiohttp import web
from lifecycle_helpers import free_port

MODEL = "qwen3-vl-fp8"


def prompt_of(body: dict[str, Any]) -> str:
    """The text of a request: a completion's prompt, or the text parts of a chat's messages."""
    if "prompt" in body:
        return str(body["prompt"])
    texts = []
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p.get("text", "") for p in content if p.get("type") == "text"]
    return " ".join(texts)


class StandIn:
    def __init__(self, port: int | None = None, *, api_key: str = "") -> None:
        self.port = port or free_port()
        self.api_key = api_key
        self.delay = 0.0
        self.received: list[dict[str, Any]] = []  # every body that reached a generating route
        self.answered: Counter[str] = Counter()  # prompt -> 200 answers
        # prompt -> what its first requests get: a status, "drop" (the connection closed) or "slow"
        # (the answer after slow_s seconds)
        self.faults: dict[str, list[int | str]] = {}
        self.slow_s = 5.0
        self.health_status = 200
        self.in_flight = 0
        self.peak = 0  # the most requests in flight at once
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.start()

    @staticmethod
    def answers(base: str) -> bool:
        """BASE's /health answers 200 (a stand-in, or a router in front of stand-ins)."""
        try:
            return requests.get(f"{base}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        return app

    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def start(self) -> None:
        async def up() -> web.AppRunner:
            runner = web.AppRunner(self._app(), shutdown_timeout=0.1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
            return runner

        self._runner = self._call(up())

    def stop(self) -> None:
        """The server goes away (connections refused) until start()."""
        if self._runner is not None:
            self._call(self._runner.cleanup())
            self._runner = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=self.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        prompt = prompt_of(body)
        planned = self.faults.get(prompt)
        if planned:
            fault = planned.pop(0)
            if fault == "drop":
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            if fault == "slow":
                self.in_flight += 1
                try:
                    await asyncio.sleep(self.slow_s)
                finally:
                    self.in_flight -= 1
                return web.json_response({"error": {"message": "too late"}}, status=500)
            return web.json_response(
                {"error": {"message": f"planned {fault}", "code": fault}}, status=int(fault)
            )
        if body.get("model") != MODEL:
            return web.json_response({"error": {"message": f"no model {body.get('model')}"}}, status=404)
        if self.delay:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
        self.answered[prompt] += 1
        n = len(self.received)
        usage = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
        if request.path.endswith("/chat/completions"):
            choice = {"index": 0, "message": {"role": "assistant", "content": f"echo {prompt}"}}
            out = {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": MODEL}
        else:
            choice = {"index": 0, "text": f"echo {prompt}"}
            out = {"id": f"cmpl-{n}", "object": "text_completion", "model": MODEL}
        out.update({"choices": [choice], "usage": usage})
        return web.Response(text=json.dumps(out), content_type="application/json")


__all__ = ["MODEL", "StandIn", "free_port", "prompt_of"]
