"""``POST /tokenize`` and ``POST /detokenize`` with vLLM's request and response shapes.

``/tokenize`` takes a ``prompt`` (BOS added as for a completion unless ``add_special_tokens`` is false) or chat
``messages`` (rendered by the model's template, as a chat completion would be) and answers
``{"count", "max_model_len", "tokens", "token_strs"}``; ``/detokenize`` takes ``{"tokens": [...]}`` and
answers ``{"prompt": text}``; ``GET /tokenizer_info`` gives the special tokens and the chat template (what
lm-eval's ``tokenizer_backend=remote`` reads before it tokenizes through ``/tokenize``). They only touch the
tokenizer, never the engine thread.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from frugallm.errors import InvalidRequestError
from frugallm.serve.protocol import DetokenizeRequest, TokenizeRequest, json_error
from frugallm.tokenizer.tokenizer import Tokenizer


class TokenizeRoutes:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, served_model_name: str) -> None:
        self.tokenizer, self.vocab_size, self.max_len = tokenizer, vocab_size, max_model_len
        self.model = served_model_name
        self.router = APIRouter()
        self.router.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        self.router.add_api_route("/detokenize", self.detokenize, methods=["POST"])
        self.router.add_api_route("/tokenizer_info", self.tokenizer_info, methods=["GET"])

    def _wrong_model(self, name: str | None) -> Any:
        if name is not None and name != self.model:
            return json_error(404, f"The model {name!r} does not exist; available: {self.model}", "model",
                              "model_not_found")
        return None

    async def tokenize(self, req: TokenizeRequest) -> Any:
        if (bad := self._wrong_model(req.model)) is not None:
            return bad
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("send exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            # A model's template is untrusted and may run up to its time limit: render it off the event loop.
            text = await run_in_threadpool(self.tokenizer.apply_chat_template, req.conversation(),
                                           req.add_generation_prompt)
            special = bool(req.add_special_tokens)
        else:
            text = req.prompt or ""
            special = req.add_special_tokens is not False
        # A 2 MB prompt takes a while to encode: off the event loop, which keeps answering meanwhile.
        ids, strs = await run_in_threadpool(self._encode, text, special, req.return_token_strs)
        return {"count": len(ids), "max_model_len": self.max_len, "tokens": ids, "token_strs": strs}

    def _encode(self, text: str, special: bool, with_strs: bool) -> tuple[list[int], list[str] | None]:
        ids = self.tokenizer.encode(text, add_special_tokens=special) if text else []
        return ids, [self.tokenizer.id_to_token(i) or "" for i in ids] if with_strs else None

    async def detokenize(self, req: DetokenizeRequest) -> Any:
        if (bad := self._wrong_model(req.model)) is not None:
            return bad
        bad_ids = [i for i in req.tokens if i >= self.vocab_size]
        if bad_ids:
            raise InvalidRequestError(f"token ids out of range [0, {self.vocab_size}): {bad_ids[:5]}", "tokens")
        return {"prompt": await run_in_threadpool(self.tokenizer.decode, req.tokens, skip_special_tokens=False)}

    async def tokenizer_info(self) -> dict[str, Any]:
        tok = self.tokenizer

        def name(i: int | None) -> str | None:
            return tok.id_to_token(i) if i is not None else None

        return {"tokenizer_class": "frugallm", "bos_token": name(tok.bos_id),
                "eos_token": name(min(tok.eos_ids)) if tok.eos_ids else None, "pad_token": None,
                "add_bos_token": bool(tok.add_bos), "chat_template": tok.chat_template,
                "model_max_length": self.max_len}
