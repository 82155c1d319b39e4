"""``POST /v1/completions`` and ``POST /v1/chat/completions`` on one stream-or-collect path.

Both endpoints validate the request once (tokenize, resolve ``max_tokens``, check the context) into
:class:`~frugallm.engine.inputs.EngineRequest` s, hand them to :class:`AsyncLLM`, and shape the engine's
:class:`StepOutput` s with a :class:`~frugallm.serve.choices.ChoiceFormat`: the completion format or the chat
format. :meth:`OpenAIRoutes.respond` does the rest for both: SSE streaming or one JSON body, usage accounting,
and aborting when the client disconnects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.inputs import EngineRequest
from frugallm.engine.llm_engine import StepOutput
from frugallm.errors import InvalidRequestError, TemplateError
from frugallm.serve.choices import ChatFormat, ChoiceFormat, CompletionFormat, Usage
from frugallm.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body, json_error
from frugallm.serve.tool_calls import ToolFormat, tool_specs
from frugallm.serve.tool_formats import format_for

# Chat without max_tokens: OpenAI caps the completion at the model's output limit (4,096 tokens for the GPT-4 Turbo
# generation), vLLM and llama.cpp generate to the end of the context (hundreds of thousands of tokens on long-context
# models, minutes of one sequence's decode). We follow OpenAI: 4,096 at most (less when the context ends sooner).
CHAT_DEFAULT_MAX_TOKENS = 4096


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _until_disconnect(request: Request, agen: AsyncIterator[StepOutput],
                            on_out: Callable[[StepOutput], None]) -> bool:
    """Consume ``agen``; False (and the request aborted) if the client went away first."""

    async def consume() -> None:
        async for out in agen:
            on_out(out)

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                task.result()
                return True
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return False
    except asyncio.CancelledError:
        task.cancel()
        raise


class OpenAIRoutes:
    """The two generation endpoints of one served model."""

    def __init__(self, async_llm: AsyncLLM, served_model_name: str) -> None:
        self.async_llm = async_llm
        self.model = served_model_name
        self.tokenizer = async_llm.engine.tokenizer
        self.max_len = async_llm.engine.max_model_len
        self.router = APIRouter()
        self.router.add_api_route("/v1/completions", self.completions, methods=["POST"])
        self.router.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])

    # -- validation (once) --------------------------------------------------------------------------
    def check_model(self, name: str | None) -> JSONResponse | None:
        lora = self.async_llm.engine.lora
        adapters = [] if lora is None else lora.names()
        if name is not None and name != self.model and name not in adapters:
            available = ", ".join([self.model, *adapters])
            return json_error(404, f"The model {name!r} does not exist; available: {available}", "model",
                              "model_not_found")
        return None

    def resolve_max_tokens(self, requested: int | None, prompt_lens: list[int], default: int | None) -> int:
        longest, max_len = max(prompt_lens), self.max_len
        if longest >= max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, your prompt is {longest} "
                "tokens (at least one token must be generated).")
        if requested is None:
            return min(default, max_len - longest) if default else max_len - longest
        if longest + requested > max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{longest + requested} tokens ({longest} in the prompt, {requested} for the completion). "
                "Please reduce the prompt or max_tokens.")
        return requested

    def prepare(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[Any], default_max: int | None,
                logprobs: int | None, prompt_logprobs: int | None = None,
                overrides: dict[str, Any] | None = None) -> list[EngineRequest]:
        """The request's prompts as validated engine requests (raises :class:`InvalidRequestError`);
        ``overrides``: sampling fields set by the endpoint (a tool-call grammar)."""
        req.unsupported()
        inputs = self.async_llm.inputs
        ids = [inputs.encode(p) for p in prompts]
        requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if requested == 0:
            requested = 1  # echo only: one token is sampled (its logits come with the prompt's) and not returned
        params = req.sampling_params(self.resolve_max_tokens(requested, [len(x) for x in ids], default_max),
                                     logprobs, prompt_logprobs)
        if overrides:
            params = dataclasses.replace(params, **overrides)
        arrival = time.perf_counter()
        out = []
        try:  # a schema the library rejects is a 400 here, before the engine sees it
            matcher = inputs.compile(params)
        except InvalidRequestError as e:
            field = "tools" if overrides and "grammar" in overrides else "response_format"
            raise InvalidRequestError(str(e), field) from None
        for i, (p, x) in enumerate(zip(prompts, ids, strict=True)):
            inputs.check(x, req.n, params)
            m = matcher.copy() if matcher is not None and i else matcher
            out.append(EngineRequest("", p if isinstance(p, str) else None, x, params, req.n, arrival, m))
        return out

    # -- endpoints ----------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request) -> Any:
        if (bad := self.check_model(req.model)) is not None:
            return bad
        prompts = req.prompts()
        self.async_llm.check_capacity(len(prompts) * req.n)  # 429 / 400 before tokenizing 20,000 prompts
        # Tokenizing megabytes takes a while: off the event loop, which keeps answering /health meanwhile.
        reqs = await run_in_threadpool(self.prepare, req, prompts, 16, req.logprobs,
                                       req.logprobs if req.echo else None)
        echo = [self.tokenizer.decode(r.prompt_ids, skip_special_tokens=False) if not isinstance(p, str) else p
                for p, r in zip(prompts, reqs, strict=True)] if req.echo else None
        fmt = CompletionFormat(self.tokenizer, len(reqs) * req.n, req.logprobs, echo, req.n, req.echo_only,
                                [r.prompt_ids for r in reqs])
        return await self.respond(request, req, reqs, fmt, f"cmpl-{uuid.uuid4().hex}")

    async def chat_completions(self, req: ChatCompletionRequest, request: Request) -> Any:
        if (bad := self.check_model(req.model)) is not None:
            return bad
        self.async_llm.check_capacity(req.n)
        # A model's template is untrusted and may run up to its time limit: render it off the event loop.
        prompt, tools, overrides = await run_in_threadpool(self.render_chat, req)
        k = (req.top_logprobs or 0) if req.logprobs else None
        reqs = await run_in_threadpool(self.prepare, req, [prompt], CHAT_DEFAULT_MAX_TOKENS, k, None, overrides)
        fmt = ChatFormat(self.tokenizer, req.n, k, tools)
        return await self.respond(request, req, reqs, fmt, f"chatcmpl-{uuid.uuid4().hex}")

    def render_chat(self, req: ChatCompletionRequest) -> tuple[str, ToolFormat | None, dict[str, Any]]:
        """The prompt, the tool-call format its answer is parsed with (None without tools) and the sampling
        fields tools set: ``tool_choice`` ``required`` / a named function constrain the answer to calls in the
        model's own format; a format that drops special tokens keeps them."""
        conv = req.conversation()
        tools = req.active_tools()
        if tools is None:
            return self.tokenizer.apply_chat_template(conv, add_generation_prompt=True), None, {}
        specs = tool_specs(tools)
        fmt = format_for(self.tokenizer.chat_template, self.tokenizer, frozenset(s.name for s in specs))
        try:
            prompt = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tools=tools)
        except TemplateError as e:
            raise InvalidRequestError(f"tools: the model's chat template cannot render them: {e}", "tools") from None
        if prompt == self.tokenizer.apply_chat_template(conv, add_generation_prompt=True):
            raise InvalidRequestError("tools: the model's chat template does not render tool definitions", "tools")
        overrides: dict[str, Any] = {}
        if fmt.needs_special_tokens:
            overrides["skip_special_tokens"] = False
        forced = req.forced_tools()
        if forced is not None:
            chosen = [s for s in specs if s.name in forced]
            parallel = req.parallel_tool_calls is not False and req.tool_choice == "required"
            overrides["grammar"] = fmt.grammar(chosen, parallel)
        return prompt, fmt, overrides

    async def respond(self, request: Request, req: CompletionRequest | ChatCompletionRequest,
                      reqs: list[EngineRequest], fmt: ChoiceFormat, rid: str) -> Any:
        """Run ``reqs`` and answer as SSE events (``req.stream``) or one JSON body shaped by ``fmt``."""
        now = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.model is not None and req.model != self.model:  # a LoRA adapter (unknown names: a 400 naming it)
            lora = self.async_llm.engine.resolve_lora(req.model)
            reqs = [dataclasses.replace(r, lora=lora) for r in reqs]
        agen = self.async_llm.generate_many(reqs, rid)
        acc = Usage(req.n)

        def body(name: str, choices: list[dict[str, Any]], use: dict[str, Any] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": rid, "object": name, "created": now, "model": req.model or self.model,
                                   "choices": choices}
            if use is not None:
                out["usage"] = use
            return out

        if req.stream:
            def chunk(choices: list[dict[str, Any]], use: dict[str, Any] | None = None) -> str:
                b = body(fmt.chunk_name, choices)
                if include_usage:
                    b["usage"] = use
                return _sse(b)

            async def events() -> AsyncIterator[str]:
                for choice in fmt.opening_chunks():
                    yield chunk([choice])
                try:
                    async for out in agen:
                        acc.add(out)
                        if (choice := fmt.chunk_choice(out)) is not None:
                            yield chunk([choice])
                except InvalidRequestError as e:
                    yield _sse(error_body(str(e)))
                except Exception as e:  # the engine failed mid-stream: tell the client, then end
                    yield _sse(error_body(f"internal error: {e}", "server_error"))
                if include_usage:
                    yield chunk([], acc.body())
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        finish: list[str | None] = [None] * fmt.num_choices

        def on_out(out: StepOutput) -> None:
            acc.add(out, fmt.returns_tokens)
            fmt.collect(out)
            finish[out.index] = out.finish_reason

        if not await _until_disconnect(request, agen, on_out):
            return json_error(499, "client disconnected")
        return body(fmt.object_name, fmt.final_choices(finish), acc.body())
