"""POST /tokenize and /detokenize (vLLM's shapes)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from herd.server.errors import bad_request
from herd.server.protocol import DetokenizeRequest, TokenizeRequest, check_messages
from herd.server.routes.common import parse_body, state_of

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    st = state_of(request)
    req = await parse_body(request, TokenizeRequest, max_items={"messages": st.max_prompt_tokens})
    st.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of `prompt` and `messages`", param="prompt")
    if req.messages is not None:
        messages = check_messages(req.messages, allow_images=st.accepts_images)
        ids = (await st.encode_chat(
            messages,
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            chat_template_kwargs=req.chat_template_kwargs,
        )).prompt_ids  # with images laid out, as the model will see them
    else:
        ids = await st.encode_text(req.prompt, add_special_tokens=req.add_special_tokens)
    body = {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = [st.token_text.text(t) for t in ids]
    return JSONResponse(body)


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    st = state_of(request)
    req = await parse_body(request, DetokenizeRequest)
    st.check_model(req.model)
    vocab = st.engine.config.text.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise bad_request(f"token ids must be in [0, {vocab})", param="tokens")
    text = await asyncio.to_thread(st.tokenizer.decode, req.tokens, skip_special_tokens=False)
    return JSONResponse({"prompt": text})
