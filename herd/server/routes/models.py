"""GET /v1/models and /v1/models/{id}: OpenAI's list shape, or the bare array the together 2.x SDK reads."""

from __future__ import annotations

import re

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from herd.server.errors import model_not_found
from herd.server.routes.common import state_of
from herd.server.state import ServerState

router = APIRouter()

_TOGETHER_2 = re.compile(r"Together/Python 2\.")


def model_entry(st: ServerState, name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": st.created,
        "owned_by": "herd",
        "root": str(st.engine.model_dir),
        "parent": None,
        # Together's extras
        "type": "chat",
        "display_name": name,
        "context_length": st.max_model_len,
        "pricing": {"input": st.options.price_input, "output": st.options.price_output, "hourly": 0, "base": 0,
                    "finetune": 0},
        # vLLM's
        "max_model_len": st.max_model_len,
    }


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    st = state_of(request)
    data = [model_entry(st, name) for name in st.model_names]
    if _TOGETHER_2.search(request.headers.get("user-agent", "")):
        return JSONResponse(data)
    return JSONResponse({"object": "list", "data": data, "has_more": False})


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    st = state_of(request)
    if model_id not in st.model_names:
        raise model_not_found(model_id)
    return JSONResponse(model_entry(st, model_id))
