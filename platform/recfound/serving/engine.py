"""The small interface serving needs from a model, and how a published version names the code that loads it.

Serving reaches a model only through an engine: a version's ``version.json`` names an engine factory
(``"module:callable"``, called with the version directory), so the same app serves the GRM, a test double or a
future backend, and a version always loads with the engine it was indexed with. The one model module imported
here is ``model.formats`` (numpy only), for ``Side``: the budget and truncation of each retrieval side.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from recfound.artifacts import ADAPTER_DIR
from recfound.model.formats import Side
from recfound.serving.registry import read_version

ENGINE_KEY = "engine"
"""Where the merge job puts the merged TMoLE adapter inside its artifact (see recfound.merge.artifact)."""


@runtime_checkable
class Engine(Protocol):
    """What the Serve deployment and the index builder call; implementations need not be thread-safe."""

    version: str
    """The registry version this engine was loaded from (``version.json``)."""
    context_length: int
    """Most tokens one input may take: instruction + text for embeddings, prompt + completion for generation."""
    tasks: tuple[str, ...]
    """The tasks the model was trained on (``/v1/rank`` picks its generative scorer from them)."""

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token count of each text, as the engine tokenises it (used to refuse over-long inputs)."""
        ...

    def embed(self, task: str, texts: list[str], instruction: str, side: Side) -> np.ndarray:
        """(n, d) float32, L2-normalised embeddings of ``texts`` under ``instruction``, routed as ``task``."""
        ...

    def generate(self, task: str, prompts: list[str], max_tokens: int, temperature: float) -> list[str]:
        """One completion per prompt (the response only), routed as ``task``; temperature 0 is greedy."""
        ...

    def stream(
        self, task: str, prompt: str, max_tokens: int, temperature: float, cancelled: threading.Event
    ) -> Iterator[str]:
        """The completion of one prompt in pieces as they are decoded (they concatenate to what ``generate`` would
        return); decoding stops soon after ``cancelled`` is set (a client that went away)."""
        ...

    def choice_scores(self, task: str, prompts: list[str], choices: list[str]) -> np.ndarray:
        """(prompts, choices) float32: how likely the model finds each choice as the prompt's whole answer (higher
        is likelier; GRM: mean log-likelihood per token). ``guided_choice`` and ``/v1/rank`` rank by it."""
        ...


def import_factory(path: str) -> object:
    """``"package.module:attr"`` -> the attribute; the error says which part was not found."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"engine factory {path!r}: expected 'package.module:callable'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"engine factory {path!r}: module {module_name} has no attribute {attr!r}") from None


def load_engine(version_dir: str) -> Engine:
    """Build the engine a (verified, local) version directory names in ``version.json``."""
    path = read_version(version_dir).get(ENGINE_KEY)
    if not isinstance(path, str):
        raise ValueError(f"{version_dir}: version.json names no {ENGINE_KEY!r} factory")
    factory = import_factory(path)
    if not callable(factory):
        raise ValueError(f"engine factory {path!r} is not callable")
    engine = factory(version_dir)
    if not isinstance(engine, Engine):
        raise TypeError(f"engine factory {path!r} returned {type(engine).__name__}, which is not an Engine")
    return engine


class GRMEngine:
    """The RecFound GRM (TMoLE adapter + its recorded backbone) as an Engine; the default factory of a version.

    Loads ``adapter/`` of the merge job's artifact; the backbone is the one the adapter config records (an
    ``hf`` backbone path must exist on the serving node). Runs on the GPU when one is visible.
    """

    def __init__(self, version_dir: str):
        # transformers loads only in replicas that serve a GRM, not in the fake-engine tests.
        from recfound.model.formats import encode_embedding
        from recfound.model.grm import GRM

        self._encode = encode_embedding
        self.version = str(read_version(version_dir)["version"])
        self.model = GRM.from_pretrained(f"{version_dir}/{ADAPTER_DIR}").eval()
        self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.context_length = self.model.backbone.max_generative_len
        self.tasks = tuple(self.model.tuner.adapter_config.tasks)
        self._budget = {Side.QUERY: self.model.backbone.max_query_len, Side.ITEM: self.model.backbone.max_passage_len}

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.model.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def embed(self, task: str, texts: list[str], instruction: str, side: Side) -> np.ndarray:
        """Truncated to the side's training budget, as in training (``encode_embedding`` keeps the instruction)."""
        batch = self._encode(
            self.model.tokenizer, [instruction] * len(texts), texts, self._budget[side], keep_end=side.keeps_end(task)
        )
        with torch.inference_mode():
            vectors = self.model.embed(batch, self.model.task_ids([task] * len(texts)))
        return vectors.float().cpu().numpy()

    def generate(self, task: str, prompts: list[str], max_tokens: int, temperature: float) -> list[str]:
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        return self.model.generate(prompts, task, max_new_tokens=max_tokens, **sampling)

    def stream(
        self, task: str, prompt: str, max_tokens: int, temperature: float, cancelled: threading.Event
    ) -> Iterator[str]:
        """``generate`` on a worker thread with transformers' text streamer (whole words, as decoded) and a stopping
        criterion watching ``cancelled``; an error there ends the stream and is raised here."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def decode() -> None:
            try:
                sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
                self.model.generate(
                    [prompt],
                    task,
                    max_new_tokens=max_tokens,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
                    **sampling,
                )
            except BaseException as err:  # handed to the consumer, which would otherwise wait for ever
                failure.append(err)
                streamer.end()

        worker = threading.Thread(target=decode, name="recfound-stream", daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            cancelled.set()
            worker.join()
        if failure:
            raise failure[0]

    def choice_scores(self, task: str, prompts: list[str], choices: list[str]) -> np.ndarray:
        return self.model.choice_scores(prompts, choices, task).float().numpy()


class ExportEngine:
    """An embedding export (jobs/export.py: one task folded into plain weights, fp32 or int8, PyTorch or ONNX) as an
    Engine: the compact deployment. It serves its one task's embeddings, /v1/recommend and embedding /v1/rank;
    every other model name answers 404 (the replica checks ``tasks``)."""

    def __init__(self, version_dir: str):
        from recfound.artifacts import check_files, read_manifest
        from recfound.merge.exported import ExportedEmbedder, ExportError, load_export

        self.version = str(read_version(version_dir)["version"])
        # The export's own files against its manifest; the registry adds version.json and index/ beside them.
        check_files(Path(version_dir), read_manifest(Path(version_dir), ExportError).get("files"), ExportError, True)
        exported = load_export(version_dir, verify=False)
        if not isinstance(exported, ExportedEmbedder):
            raise ValueError(
                f"{version_dir}: a generative export ({exported.task}); the Serve app serves embedding "
                "exports (publish the merged model for generation)"
            )
        self._embedder, self.tasks = exported, (exported.task,)
        self.context_length = int(exported.budgets["generative"])

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self._embedder.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def embed(self, task: str, texts: list[str], instruction: str, side: Side) -> np.ndarray:
        return self._embedder.embed(texts, instruction, side)

    def generate(self, task: str, prompts: list[str], max_tokens: int, temperature: float) -> list[str]:
        raise NotImplementedError("an embedding export does not generate")

    def stream(
        self, task: str, prompt: str, max_tokens: int, temperature: float, cancelled: threading.Event
    ) -> Iterator[str]:
        raise NotImplementedError("an embedding export does not generate")

    def choice_scores(self, task: str, prompts: list[str], choices: list[str]) -> np.ndarray:
        raise NotImplementedError("an embedding export does not generate")


class _Cancelled:
    """A transformers stopping criterion: stop every sequence once ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
