"""LoRA adapters over HTTP, as vLLM serves them: ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``
(behind the API key like every route) and the adapters' cards in ``/v1/models`` (``parent``: the base model).

A request selects an adapter by its ``model`` field (``openai.py``). Loading reads and checks the folder off the
event loop; a bad folder (not PEFT, shapes or target modules of another model, an unsupported variant, a rank
above ``--max-lora-rank``) or a name already in use is a 400 naming it, an unknown name to unload a 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from frugallm.engine.llm_engine import LLMEngine
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.serve.protocol import json_error


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # accepted for vLLM clients; the name identifies the adapter


class LoraRoutes:
    """Load / unload routes and model cards for the adapters of ``engine`` (served as ``base_name``)."""

    def __init__(self, engine: LLMEngine, base_name: str, created: int) -> None:
        self.engine, self.base_name, self.created = engine, base_name, created
        self.router = APIRouter()
        self.router.add_api_route("/v1/load_lora_adapter", self.load, methods=["POST"])
        self.router.add_api_route("/v1/unload_lora_adapter", self.unload, methods=["POST"])

    def cards(self) -> list[dict[str, Any]]:
        lora = self.engine.lora
        if lora is None:
            return []
        return [self._card(lora.get(n)) for n in lora.names() if n != self.base_name]

    def card(self, name: str) -> dict[str, Any] | None:
        lora = self.engine.lora
        if lora is None or name == self.base_name:
            return None
        try:
            return self._card(lora.get(name))
        except InvalidRequestError:
            return None

    def _card(self, req: Any) -> dict[str, Any]:
        return {"id": req.name, "object": "model", "created": self.created, "owned_by": "frugallm",
                "root": str(req.path), "parent": self.base_name, "max_model_len": self.engine.max_model_len}

    def _slots(self) -> Any:
        if self.engine.lora is None:
            raise FrugalError("this server has no LoRA slots: start it with --lora NAME=PATH or --max-loras N")
        return self.engine.lora

    async def load(self, req: LoadLoraAdapterRequest) -> Any:
        lora = self._slots()
        if req.lora_name == self.base_name:
            return json_error(400, f"LoRA adapter name {req.lora_name!r} is the base model's", "lora_name")
        await run_in_threadpool(lora.add, req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload(self, req: UnloadLoraAdapterRequest) -> Any:
        lora = self._slots()
        try:
            lora.remove(req.lora_name)
        except InvalidRequestError as e:
            return json_error(404, str(e), "lora_name", "not_found")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
