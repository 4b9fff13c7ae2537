"""Request wire formats: OpenAI-compatible embeddings, completions and chat requests, /v1/recommend and /v1/rank,
and the model names that choose the task.

Model names choose the task (``recfound-q2i`` embeds queries, ``recfound-item_profile`` generates item
profiles), so unmodified OpenAI clients reach every task. OpenAI request fields serving does not use are
ignored, as OpenAI-compatible servers do; /v1/recommend is ours, so it is strict about unknown keys and types.
Each request checks itself against the ``Limits`` (serving/limits.py) before it costs model time; the answers'
formats are serving/responses.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recfound.serving.errors import ApiError
from recfound.serving.limits import Limits, check_chars, check_count, configured_limits
from recfound.tasks import EMBEDDING_TASKS, GENERATIVE_TASKS

MODEL_PREFIX = "recfound-"
GENERIC_MODEL = "recfound-gen"
GENERIC_TASK = "answer_generation"
"""Task behind ``recfound-gen``: free-form answers, the most general of the generative tasks."""
QUERY_PARAM = {"u2i": "history", "q2i": "query", "i2i": "item_id"}
"""The /v1/recommend field that carries each task's query side."""
EncodingFormat = Literal["float", "base64"]


def embedding_task(model: str) -> str:
    """The embedding task ``model`` names; any other name is OpenAI's 404 model_not_found, listing the valid ones."""
    task = model.removeprefix(MODEL_PREFIX)
    if not model.startswith(MODEL_PREFIX) or task not in EMBEDDING_TASKS:
        names = ", ".join(MODEL_PREFIX + t for t in EMBEDDING_TASKS)
        raise ApiError(404, f"model {model!r} does not embed; embedding models: {names}", "model", "model_not_found")
    return task


def generative_task(model: str) -> str:
    """The generative task ``model`` names (``recfound-gen``: free-form answers); any other name is OpenAI's 404."""
    if model == GENERIC_MODEL:
        return GENERIC_TASK
    task = model.removeprefix(MODEL_PREFIX)
    if not model.startswith(MODEL_PREFIX) or task not in GENERATIVE_TASKS:
        raise ApiError(
            404,
            f"model {model!r} does not generate; use {GENERIC_MODEL} or {MODEL_PREFIX}<task> with a task of "
            f"{', '.join(GENERATIVE_TASKS)}",
            "model",
            "model_not_found",
        )
    return task


EMBEDDING_MODELS = [MODEL_PREFIX + t for t in EMBEDDING_TASKS]
GENERATIVE_MODELS = [GENERIC_MODEL] + [MODEL_PREFIX + t for t in GENERATIVE_TASKS]


def model_names() -> list[str]:
    """Every model name a client may send: what /v1/models lists."""
    return EMBEDDING_MODELS + GENERATIVE_MODELS


def _model_field(names: list[str]) -> Any:
    """``model``, its names published as the OpenAPI schema's enum (clients and fuzzers see what is valid) but
    checked by the route, so an unknown name answers OpenAI's 404 model_not_found rather than a 400."""
    return Field(json_schema_extra={"enum": names})


Cap = Callable[[Limits], int]


class _Counted(BaseModel):
    """A request whose list fields (``COUNTS``: field -> (noun, its cap)) are refused by their length before their
    elements are validated: bounded work however long the list a client sends."""

    COUNTS: ClassVar[dict[str, tuple[str, Cap]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _counts_within_limits(cls, data: Any) -> Any:
        if isinstance(data, dict):
            limits = configured_limits()
            for field, (noun, cap) in cls.COUNTS.items():
                check_count(data.get(field), cap(limits), field, noun)
        return data


class _OpenAIRequest(_Counted):
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_OpenAIRequest):
    COUNTS = {"input": ("inputs", lambda limits: limits.max_inputs)}

    model: str = _model_field(EMBEDDING_MODELS)
    input: str | list[str]
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None

    def texts(self, limits: Limits) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts:
            raise ApiError(400, "input is empty: send a string or a non-empty list of strings", "input", "empty_input")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ApiError(400, f"input[{i}] is an empty string", "input", "empty_input")
        check_chars(texts, limits, "input")
        return texts


class _GenerationRequest(_OpenAIRequest):
    COUNTS = {
        "stop": ("stop strings", lambda limits: limits.max_stops),
        "guided_choice": ("guided choices", lambda limits: limits.max_inputs),
    }

    model: str = _model_field(GENERATIVE_MODELS)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    """Default 0 (greedy), the decoding the paper evaluates with."""
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    guided_choice: list[str] | None = None
    """vLLM's extension (``extra_body``): the completion is exactly one of these strings, the one the model finds
    most likely (per-token log-likelihood); for the classification tasks' closed answer sets."""

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def checked_max_tokens(self, limits: Limits, default: int = 16) -> int:
        """The completion budget (OpenAI's default 16 when unset), refused above the configured cap."""
        if self.n != 1:
            raise ApiError(400, "only n=1 is supported", "n", "unsupported_value")
        wanted = self.requested_tokens() or default
        if wanted > limits.max_tokens:
            raise ApiError(400, f"max_tokens={wanted}; at most {limits.max_tokens}", "max_tokens", "invalid_value")
        return wanted

    def choices(self, limits: Limits) -> list[str] | None:
        """``guided_choice`` checked: non-empty, distinct, non-blank strings (at most ``max_inputs``: ``COUNTS``)."""
        if self.guided_choice is None:
            return None
        choices = self.guided_choice
        if not choices:
            raise ApiError(
                400,
                f"guided_choice has {len(choices)} choices; send 1 to {limits.max_inputs}",
                "guided_choice",
                "invalid_value",
            )
        if any(not c.strip() for c in choices) or len(set(choices)) < len(choices):
            raise ApiError(400, "guided_choice must be distinct, non-empty strings", "guided_choice", "invalid_value")
        check_chars(choices, limits, "guided_choice")
        return choices

    def stops(self, limits: Limits) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]
        check_chars(stops, limits, "stop")
        return stops


class CompletionRequest(_GenerationRequest):
    COUNTS = _GenerationRequest.COUNTS | {"prompt": ("prompts", lambda limits: limits.max_inputs)}

    prompt: str | list[str]

    def prompts(self, limits: Limits) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or not all(p.strip() for p in prompts):
            raise ApiError(400, "prompt is empty", "prompt", "empty_input")
        check_chars(prompts, limits, "prompt")
        return prompts


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_GenerationRequest):
    COUNTS = _GenerationRequest.COUNTS | {"messages": ("messages", lambda limits: limits.max_messages)}

    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt(self, limits: Limits) -> str:
        """System/developer messages then the user turn, as one prompt: the model was trained single-turn."""
        check_chars([m.text() for m in self.messages], limits, "messages")
        if not self.messages or self.messages[-1].role != "user":
            raise ApiError(400, "messages must end with a user message", "messages", "invalid_value")
        if any(m.role == "assistant" for m in self.messages):
            raise ApiError(
                400,
                "multi-turn chat is not supported: send system messages and one user message",
                "messages",
                "unsupported_value",
            )
        users = [m for m in self.messages if m.role == "user"]
        if len(users) > 1:
            raise ApiError(400, "only one user message is supported", "messages", "unsupported_value")
        prompt = "\n\n".join(m.text() for m in self.messages if m.text().strip())
        if not users[0].text().strip():
            raise ApiError(400, "the user message is empty", "messages", "empty_input")
        return prompt

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class _ItemQuery(_Counted):
    """The query side of /v1/recommend and /v1/rank: u2i ``history`` (item ids, oldest first); q2i ``query``; i2i
    ``item_id``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    COUNTS = {"history": ("history items", lambda limits: limits.max_history)}

    task: Literal["u2i", "q2i", "i2i"]
    history: list[str] | None = None
    query: str | None = None
    item_id: str | None = None

    def check(self, limits: Limits) -> None:
        needed = QUERY_PARAM[self.task]
        value = getattr(self, needed)
        if not value or (isinstance(value, str) and not value.strip()):
            raise ApiError(400, f"task {self.task} needs a non-empty {needed!r}", needed, "empty_input")
        check_chars([value] if isinstance(value, str) else value, limits, needed)


class RecommendRequest(_ItemQuery):
    k: int = Field(10, ge=1)
    exclude_history: bool = True

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if self.k > limits.max_k:
            raise ApiError(400, f"k={self.k}; at most {limits.max_k}", "k", "invalid_value")


class Scorer(str, Enum):
    """How /v1/rank scores a candidate."""

    EMBEDDING = "embedding"
    """Cosine similarity of the query side's embedding and the candidate's indexed vector (every task)."""
    GENERATIVE = "generative"
    """The generative model's likelihood of the candidate as its answer (serving/rank.py): u2i, "yes" minus "no"
    to candidate_ranking's question about it (a model trained on that task) or its letter among the listed
    candidates of a sequential-recommendation prompt (at most 20); q2i, its title as the query's rewrite."""


class RankRequest(_ItemQuery):
    """Every candidate once, best first."""

    COUNTS = _ItemQuery.COUNTS | {"candidates": ("candidates", lambda limits: limits.max_candidates)}

    candidates: list[str]
    scorer: Scorer = Field(Scorer.EMBEDDING, strict=False)  # strict=False: the JSON string names the member

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if not self.candidates:
            raise ApiError(400, "candidates is empty", "candidates", "empty_input")
        if len(set(self.candidates)) < len(self.candidates):
            raise ApiError(400, "candidates must be distinct item ids", "candidates", "invalid_value")
        if self.scorer is Scorer.GENERATIVE and self.task == "i2i":
            raise ApiError(
                400, "scorer=generative ranks u2i and q2i; use scorer=embedding for i2i", "scorer", "unsupported_value"
            )
