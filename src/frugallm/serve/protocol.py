"""OpenAI-compatible request models (pydantic) and the error body.

Types are strict (``"max_tokens": "5"`` is an error, as with OpenAI), and ranges are part of the schema so the
OpenAPI document describes what is accepted. A field this server does not implement is a 400 naming it, never
silently ignored (one sent as ``null`` asks for nothing and passes). Non-OpenAI extensions follow vLLM's names:
``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens``,
``skip_special_tokens``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

from frugallm.errors import InvalidRequestError
from frugallm.sampling import SamplingParams


def _utf8(s: str) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``) that no UTF-8 tokenizer or response can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode at character {e.start}: lone surrogate {s[e.start]!r}; "
                         "send valid UTF-8 text") from None
    return s


Text = Annotated[StrictStr, AfterValidator(_utf8)]  # every string a request carries
Float = StrictFloat | StrictInt
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
StopList = Annotated[list[Text], Field(max_length=16)]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable"}


def json_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-style error response: ``{"error": {"message", "type", "param", "code"}}``."""
    etype = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, etype, param, code), status_code=status)


class _Base(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(str(k) for k, v in data.items() if k not in known and v is not None)
            if unknown:
                names = ", ".join(repr(k) for k in unknown)
                raise PydanticCustomError(
                    "unsupported_field", f"unsupported field{'s' if len(unknown) > 1 else ''} {names} (this server "
                    f"does not implement {'them' if len(unknown) > 1 else 'it'}; remove or set to null)")
        return data


class StreamOptions(_Base):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Base):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: Text | None = None
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Base):
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_text(self) -> str | None:
        """The JSON schema the output must match, or None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise InvalidRequestError("response_format json_schema needs json_schema.schema", "response_format")
        return json.dumps(self.json_schema.schema_)


class _SamplingFields(_Base):
    model: Text | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # 0 only with echo (prompt logprobs alone)
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0, le=10)] | None = None
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: Text | StopList | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    logit_bias: Annotated[dict[Text, Annotated[Float, Field(ge=-100, le=100)]], Field(max_length=1024)] | None = None
    response_format: ResponseFormat | None = None
    user: Text | None = None

    def unsupported(self) -> None:
        """Raise :class:`InvalidRequestError` for combinations this server does not implement."""
        if self.max_tokens == 0 and not getattr(self, "echo", False):
            raise InvalidRequestError("max_tokens must be at least 1 (0 only with echo)", "max_tokens")

    def token_bias(self) -> dict[int, float]:
        out = {}
        for k, v in (self.logit_bias or {}).items():
            if not (k.strip().isascii() and k.strip().isdigit()):  # "²".isdigit(), but int("²") fails
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {k!r}", "logit_bias")
            out[int(k)] = float(v)
        return out

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
                        ) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=max(self.top_k or 0, 0),
            min_p=float(self.min_p or 0.0),
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
            repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            min_tokens=self.min_tokens,
            logit_bias=self.token_bias(),
            json_schema=self.response_format.schema_text() if self.response_format else None,
        )


Prompt = Text | Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenId], Field(
    min_length=1)] | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: text, token ids, or a list of either (one request each)."""

    prompt: Prompt
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    best_of: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    suffix: Text | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported")
        if self.echo and self.logprobs is not None and self.n > 1:
            raise InvalidRequestError("echo with logprobs needs n == 1 (prompt log-probabilities are per prompt)", "n")
        if self.echo and self.logprobs is not None and self.stream:
            raise InvalidRequestError("echo with logprobs cannot stream; send stream=false", "stream")
        if self.max_tokens == 0 and self.stream:
            raise InvalidRequestError("max_tokens=0 (echo only) cannot stream; send stream=false", "stream")

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens=0``: the prompt (and its logprobs) only, as vLLM answers it."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Base):
    type: Literal["text"]
    text: Text


class FunctionCall(_Base):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCallMessage(_Base):
    """An assistant message's earlier call (``messages[i].tool_calls[j]``)."""

    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallMessage] | None = None  # assistant messages
    tool_call_id: Text | None = None  # tool messages

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' convention): ``content`` a string, a call's
        ``arguments`` a dict when it is a JSON object (templates write it with ``tojson``)."""
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            m["name"] = self.name
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args: Any = json.loads(c.function.arguments)
                except ValueError:
                    args = c.function.arguments
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                             "arguments": args}})
            m["tool_calls"] = calls
        return m


class FunctionDef(_Base):
    name: Annotated[Text, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolDef(_Base):
    """``tools[i]``: ``{"type": "function", "function": {"name", "description", "parameters"}}``."""

    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Base):
    name: Text


class NamedToolChoice(_Base):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools and self.tool_choice.function.name not in [
                t.function.name for t in self.tools]:
            raise InvalidRequestError(f"tool_choice names the function {self.tool_choice.function.name!r}, which is "
                                      f"not in tools ({', '.join(t.function.name for t in self.tools)})",
                                      "tool_choice")
        if self.forced_tools() is not None and self.response_format is not None and \
                self.response_format.type != "text":
            raise InvalidRequestError("response_format cannot be combined with tool_choice 'required' or a named "
                                      "function (both constrain the output)", "response_format")

    def active_tools(self) -> list[dict[str, Any]] | None:
        """The tools the template renders and the answer may call (none with ``tool_choice="none"``)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def forced_tools(self) -> list[str] | None:
        """Names of the tools the answer must call (``required``: any; a named function: that one), or None."""
        if not self.tools:
            return None
        if self.tool_choice == "required":
            return [t.function.name for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            return [self.tool_choice.function.name]
        return None

    def conversation(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]


class TokenizeRequest(_Base):
    """``POST /tokenize`` (vLLM): a ``prompt``, or chat ``messages`` rendered with the model's template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool | None = None  # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    def conversation(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages or []]


class DetokenizeRequest(_Base):
    """``POST /detokenize`` (vLLM)."""

    model: Text | None = None
    tokens: list[TokenId]
