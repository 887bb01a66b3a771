"""The side endpoint of the vLLM plugin: ``GET /emovec/readings/{id}`` on the OpenAI-compatible server.

Why a side endpoint rather than an extra field in the response: the readings are computed in the worker process
and vLLM's response objects have no field to carry them, so adding one would mean patching vLLM's serving code
(and every client's parser); the endpoint asks the workers through ``collective_rpc``, the route vLLM's endpoint
plugins are meant to use, and any HTTP client can read it. ``{id}`` is the response's ``id`` (``chatcmpl-...``,
``cmpl-...``) or the request's ``emovec_id``; it also finds the requests vLLM made from it (``ID-<n>``, one per
prompt of a completions request; ``<i>_ID``, the n > 1 samples) and nothing else. The readings are dropped once
fetched (``?keep=true`` keeps them). With ``--api-key`` the endpoint asks for the key, as /v1 does.

vLLM loads endpoint plugins only when named: start the server with ``VLLM_PLUGINS=emovec,emovec-readings``.
"""


import hashlib
import secrets
from typing import Any


class ReadingsEndpoint:
    """The ``vllm.endpoint_plugins`` entry point (vLLM's EndpointPlugin protocol)."""

    name = "emovec-readings"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine = None
        self.tokens: list[bytes] = []

    def authorised(self, header: str | None) -> bool:
        """The same check vLLM applies to /v1 when it runs with --api-key (or VLLM_API_KEY): readings are as
        private as the replies they describe."""
        if not self.tokens:
            return True
        scheme, _, token = (header or "").partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        return scheme.lower() == "bearer" and any(secrets.compare_digest(digest, t) for t in self.tokens)

    def attach_router(self, app) -> None:
        from fastapi import HTTPException, Request

        plugin = self

        @app.get("/emovec/readings/{key}")
        async def emovec_readings(key: str, request: Request, keep: bool = False) -> dict[str, Any]:
            if not plugin.authorised(request.headers.get("Authorization")):
                raise HTTPException(status_code=401, detail="Unauthorized: send the server's API key as a Bearer token")
            if plugin.engine is None:
                raise HTTPException(status_code=503, detail="this server has no engine to read from")
            parts = await plugin.engine.collective_rpc("emovec_readings", args=([key], not keep))
            from emovec.integrations.vllm import _merged, json_ready

            merged = {k: json_ready(v) for k, v in _merged(parts).items()}
            if not merged:
                raise HTTPException(status_code=404, detail=f"no emovec readings for {key!r}: the request did not ask "
                                    "for monitoring (vllm_xargs emovec_monitor), or they were fetched already")
            errors = {k: v["error"] for k, v in merged.items() if "error" in v}
            if errors and len(errors) == len(merged):
                raise HTTPException(status_code=400, detail="; ".join(errors.values()))
            return {"id": key, "readings": merged}

    async def init_state(self, engine_client, state, args) -> None:
        import os

        self.engine = engine_client
        keys = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
        self.tokens = [hashlib.sha256(k.encode()).digest() for k in keys]
