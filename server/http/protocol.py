"""The wire format: pydantic models of every request and response body the HTTP API speaks.

OpenAI-compatible completions, chat completions and models, the native per-task routes, and the error
body (the admin routes' bodies are `server.http.admin_protocol`'s). Requests forbid unknown fields and
reject parameters the server does not implement with a message naming them, so nothing a client asks for
is silently ignored. Every text field must be valid Unicode
(JSON's escapes can spell a lone surrogate, which no tokenizer can encode). The `mhr` extension field
carries per-request skill mixing.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine.requests import MAX_LOGPROBS

MAX_STOP = 4
MAX_BATCH_INPUTS = 64  # engine requests one HTTP request may make: prompts x choices
MAX_LOGIT_BIAS = 300   # tokens one request may bias, as OpenAI allows
MAX_MESSAGES = 1024    # messages of one chat request


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode: it holds a lone surrogate (U+{ord(text[e.start]):04X}) at "
                         f"character {e.start}; send text that encodes as UTF-8") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----- errors -----------------------------------------------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


# ----- the mhr extension ------------------------------------------------------------------------------

class SkillMix(Strict):
    """Serve a mixture instead of one task: interpolate tasks, or set per-head skill weights directly.

    mix: task name -> weight (>= 0, not all zero); the tasks' routing weights are averaged with these
    weights (routed tasks only). skills: per-head skill weights [h][K] (>= 0, every head non-zero),
    normalised per head and used for every module.
    """

    mix: dict[Text, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    skills: list[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]]] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> SkillMix:
        if (self.mix is None) == (self.skills is None):
            raise ValueError("give exactly one of 'mix' (task -> weight) or 'skills' (per-head skill weights)")
        if self.mix is not None:
            if not self.mix or len(self.mix) > 16:
                raise ValueError("'mix' needs 1 to 16 tasks")
            if sum(self.mix.values()) <= 0:
                raise ValueError("'mix' weights are all zero")
        if self.skills is not None and (not self.skills or any(sum(head) <= 0 for head in self.skills)):
            raise ValueError("'skills' needs one non-empty row of weights per head, none all zero")
        return self


class AdapterInfo(BaseModel):
    """Which adapter served a response: the task, the zero-shot adapter, or a per-request mixture."""

    adapter: str


# ----- sampling shared by every generation request ----------------------------------------------------

class Sampling(Strict):
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: Text | list[Text] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, lt=2**63)
    mhr: SkillMix | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOP} non-empty stop strings")
        return stops

    def sampling_fields(self) -> dict[str, Any]:
        """The engine's `SamplingParams` fields this request sets (the seed aside: it varies by choice)."""
        return dict(temperature=self.temperature, top_p=self.top_p, stop=tuple(self.stop))


def _unsupported(value: Any, default: Any, name: str, why: str) -> None:
    if value is not None and value != default:
        raise ValueError(f"'{name}' is not supported: {why}")


class OpenAISampling(Sampling):
    n: int | None = Field(1, ge=1, le=MAX_BATCH_INPUTS)   # choices per prompt, each its own engine request
    presence_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    user: Text | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> OpenAISampling:
        if self.logit_bias and (len(self.logit_bias) > MAX_LOGIT_BIAS or
                                any(not k.isdigit() for k in self.logit_bias)):
            raise ValueError(f"'logit_bias' maps at most {MAX_LOGIT_BIAS} token ids (as strings of digits) to "
                             "biases in [-100, 100]")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' needs 'stream': true")
        return self


    def sampling_fields(self) -> dict[str, Any]:
        return super().sampling_fields() | dict(
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items())))


class StreamOptions(Strict):
    include_usage: bool = False


# ----- /v1/completions --------------------------------------------------------------------------------

class CompletionRequest(OpenAISampling):
    """logprobs: each token's log-probability and this many likeliest alternatives; echo: the prompt comes
    back before the completion (with its tokens' log-probabilities when `logprobs` is set; max_tokens 0 scores
    a prompt without generating)."""

    model: Text = Field(min_length=1, max_length=256)
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: Text | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        _unsupported(self.best_of, 1, "best_of", "one candidate per request")
        _unsupported(self.suffix, None, "suffix", "insertion is not implemented")
        prompts = self.prompts()
        if not prompts or len(prompts) * (self.n or 1) > MAX_BATCH_INPUTS:
            raise ValueError(f"'prompt' needs 1 to {MAX_BATCH_INPUTS} prompts, times 'n' (choices per prompt)")
        if any(p == "" or p == [] for p in prompts):
            raise ValueError("'prompt' must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one text or token list, or a list of them."""
        one = isinstance(self.prompt, str) or bool(self.prompt) and isinstance(self.prompt[0], int)
        return [self.prompt] if one else list(self.prompt)


class CompletionLogprobs(BaseModel):
    """Per token of `text`: its text, log-probability (None for a prompt's first token), likeliest
    alternatives (token text -> log-probability) and character offset in `text`."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    mhr: AdapterInfo


# ----- /v1/chat/completions ---------------------------------------------------------------------------

class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[TextPart]
    name: Text | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAISampling):
    model: Text = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        _unsupported(self.tools, [], "tools", "tool calling is not implemented")
        _unsupported(self.tool_choice, "none", "tool_choice", "tool calling is not implemented")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("'response_format' is not supported: only plain text responses")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give 'max_completion_tokens' or 'max_tokens', not both")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]   # the token's text as UTF-8


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    mhr: AdapterInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    mhr: AdapterInfo


# ----- /v1/models -------------------------------------------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mhr-serve"
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- native routes ----------------------------------------------------------------------------------

class GenerateRequest(Sampling):
    """POST /v1/tasks/{task}/generate: one input or a batch of inputs for one task."""

    inputs: Text | list[Text]
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0, le=2, allow_inf_nan=False)
    stream: bool = False

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        inputs = self.inputs if isinstance(self.inputs, list) else [self.inputs]
        if not inputs or len(inputs) > MAX_BATCH_INPUTS or any(not i for i in inputs):
            raise ValueError(f"'inputs' needs 1 to {MAX_BATCH_INPUTS} non-empty strings")
        if self.stream and isinstance(self.inputs, list) and len(self.inputs) > 1:
            raise ValueError("'stream' works with a single input")
        return self


class GeneratedText(BaseModel):
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    task: str
    adapter: str
    outputs: list[GeneratedText]


class TaskInfo(BaseModel):
    name: str
    kind: Literal["routed", "dense"]
    rank: int
    metadata: dict[str, Any] = {}
    routing: list[list[float]] | None = None   # routed tasks: per-head skill weights averaged over modules


class TaskList(BaseModel):
    tasks: list[TaskInfo]
    zero_shot: str | None                      # the id serving unknown tasks, None when fallback is off


OpenAISampling.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
