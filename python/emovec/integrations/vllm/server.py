"""The side endpoint of the vLLM plugin: ``GET /emovec/readings/{id}`` on the OpenAI-compatible server.

Why a side endpoint rather than an extra field in the response: the readings are computed in the worker process
and vLLM's response objects have no field to carry them, so adding one would mean patching vLLM's serving code
(and every client's parser); the endpoint asks the workers through ``collective_rpc``, the route vLLM's endpoint
plugins are meant to use, and any HTTP client can read it. ``{id}`` is the response's ``id`` (``chatcmpl-...``,
``cmpl-...``) or the request's ``emovec_id``. The readings are dropped once fetched (``?keep=true`` keeps them).

vLLM loads endpoint plugins only when named: start the server with ``VLLM_PLUGINS=emovec,emovec-readings``.
"""

from __future__ import annotations

from typing import Any


class ReadingsEndpoint:
    """The ``vllm.endpoint_plugins`` entry point (vLLM's EndpointPlugin protocol)."""

    name = "emovec-readings"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine = None

    def attach_router(self, app) -> None:
        from fastapi import HTTPException

        plugin = self

        @app.get("/emovec/readings/{key}")
        async def emovec_readings(key: str, keep: bool = False) -> dict[str, Any]:
            if plugin.engine is None:
                raise HTTPException(status_code=503, detail="this server has no engine to read from")
            parts = await plugin.engine.collective_rpc("emovec_readings", args=([key], not keep))
            merged: dict[str, Any] = {}
            for part in parts:
                merged.update(part or {})
            if not merged:
                raise HTTPException(status_code=404, detail=f"no emovec readings for {key!r}: the request did not ask "
                                    "for monitoring (vllm_xargs emovec_monitor), or they were fetched already")
            errors = {k: v["error"] for k, v in merged.items() if "error" in v}
            if errors and len(errors) == len(merged):
                raise HTTPException(status_code=400, detail="; ".join(errors.values()))
            return {"id": key, "readings": merged}

    async def init_state(self, engine_client, state, args) -> None:
        self.engine = engine_client
