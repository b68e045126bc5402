"""``GET /v1/models`` and ``GET /v1/models/{model}``."""

from __future__ import annotations

from typing import Any

from litestar import Request, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath
from litestar.response.base import ASGIResponse

from llmrouter.errors import ModelNotFoundError
from llmrouter.server.responses import json_response
from llmrouter.server.state import service_of
from llmrouter.types import ModelCard, ModelList

__all__ = ["list_models", "model_handlers", "retrieve_model"]


_LIST_OPENAPI: dict[str, Any] = dict(
    summary="List the models (groups and aliases) this router serves",
    responses={200: ResponseSpec(data_container=ModelList, description="The models")},
    tags=["openai"],
    operation_id="listModels",
)


async def list_models(request: Request[Any, Any, Any]) -> ASGIResponse:
    return json_response(await _models_for(request), {})


async def _models_for(request: Request[Any, Any, Any]) -> ModelList:
    """The models the caller may use: all of them, or those its API key allows."""
    service = service_of(request)
    ctx = await service.new_context(request)  # authenticates, like every /v1 call
    return await service.active_router.list_models(getattr(ctx.principal, "allows_model", None))


_RETRIEVE_OPENAPI: dict[str, Any] = dict(
    summary="Describe one model",
    responses={200: ResponseSpec(data_container=ModelCard, description="The model")},
    tags=["openai"],
    operation_id="retrieveModel",
)


async def retrieve_model(request: Request[Any, Any, Any], model: FromPath[str]) -> ASGIResponse:
    model_id = model.lstrip("/")
    models = await _models_for(request)
    for card in models.data:
        if card.id == model_id:
            return json_response(card, {})
    raise ModelNotFoundError(f"The model '{model_id}' does not exist", param="model")


model_handlers = [
    get("/v1/models", **_LIST_OPENAPI)(list_models),
    get("/models", include_in_schema=False)(list_models),
    get("/v1/models/{model:path}", **_RETRIEVE_OPENAPI)(retrieve_model),
    get("/models/{model:path}", include_in_schema=False)(retrieve_model),
]
