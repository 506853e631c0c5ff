"""``GET /health`` (no key) and ``GET /v1/models``, ``/v1/models/{id}``: the base model and each adapter."""

from __future__ import annotations

from fastapi import APIRouter

from runtime.server.keys import Authorized
from runtime.server.responses import ModelCard, ModelList
from runtime.server.state import Server

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    # No key: what orchestrators and redpen's managed servers poll. The port listens only once the model is
    # loaded, so an answer means ready (vLLM's and llama.cpp's /health mean the same); it tells nothing else.
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(server: Server, caller: Authorized) -> ModelList:
    return ModelList(data=[ModelCard(id=name, created=server.created) for name in server.models])


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, server: Server, caller: Authorized) -> ModelCard:
    server.adapter_for(model)
    return ModelCard(id=model, created=server.created)
