"""The model under evaluation: where it lives on disk, how it loads offline, and how it scores and generates.

A model path may be a training checkpoint, a training run directory (its latest checkpoint), a merged artifact
(``jobs/merge.py``) or a bare adapter directory. Whatever it is, the GRM enters the embedding protocols as a
``Baseline`` (fit on the catalogue, one ``Scorer`` per task split), so it is ranked by exactly the code that ranks
the baselines; it also generates for the generative tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recfound.artifacts import ADAPTER_DIR, MANIFEST, METRICS, read_trainer_state
from recfound.eval.closed import content_free
from recfound.eval.convergence import latest_checkpoint
from recfound.eval.protocols import DenseScorer, Scorer
from recfound.merge.exported import ExportedEmbedder
from recfound.model.backbone import BackboneConfig
from recfound.model.formats import Side, encode_embedding
from recfound.model.grm import GRM
from recfound.model.tmole import TMoLEConfig, read_adapter_config
from recfound.tasks import EMBEDDING_TASKS
from recfound.train import checkpoint

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model path that cannot be evaluated; the message names the path and what is wrong with it."""


class ModelKind(str, Enum):
    CHECKPOINT = "checkpoint"
    MERGED = "merged"
    ADAPTER = "adapter"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model path: which adapter to load and what the training run left next to it."""

    path: Path
    """The checkpoint, artifact or adapter directory itself (a run directory resolves to its latest checkpoint)."""
    kind: ModelKind
    adapter: Path
    config: TMoLEConfig
    trained_tasks: tuple[str, ...] | None
    """The tasks the checkpoint's run trained (its per-task streams); None for artifacts and bare adapters."""

    @property
    def history(self) -> Path | None:
        """The run's per-step ``metrics.jsonl`` (training checkpoints only)."""
        return self.path / METRICS if self.kind is ModelKind.CHECKPOINT else None


def resolve_model(path: str) -> ModelSource:
    """Find the adapter behind ``path`` and read its config, refusing torn checkpoints and unknown layouts."""
    root = Path(path)
    if not root.exists():
        raise ModelError(f"model={path}: no such file or directory")
    if not (root / ADAPTER_DIR).is_dir() and not (root / "adapter_config.json").is_file():
        latest = latest_checkpoint(root)
        if latest is None:
            raise ModelError(
                f"model={path}: not a training checkpoint, run directory, merged artifact or adapter directory "
                f"(no {ADAPTER_DIR}/, adapter_config.json or checkpoint_* inside)"
            )
        root = latest
    if (root / ADAPTER_DIR).is_dir() and (root / MANIFEST).is_file():
        kind, adapter = ModelKind.MERGED, root / ADAPTER_DIR
    elif (root / ADAPTER_DIR).is_dir():
        try:
            checkpoint.verify(root)
        except checkpoint.CorruptCheckpointError as err:
            raise ModelError(f"model={path}: {err}") from None
        kind, adapter = ModelKind.CHECKPOINT, root / ADAPTER_DIR
    else:
        kind, adapter = ModelKind.ADAPTER, root
    try:
        config = read_adapter_config(str(adapter))
    except (OSError, ValueError) as err:
        raise ModelError(f"model={path}: unreadable adapter config: {err}") from None
    if config.backbone is None:
        raise ModelError(f"model={path}: the adapter does not record its backbone, so it cannot be rebuilt")
    trained = None
    if kind is ModelKind.CHECKPOINT:
        trained = tuple(read_trainer_state(root)["streams"])
    return ModelSource(root, kind, adapter, config, trained)


def _backbone_label(config: TMoLEConfig) -> str:
    backbone = config.backbone or {}
    return backbone.get("name", "?") + (f" ({backbone['path']})" if backbone.get("path") else "")


def load_model(source: ModelSource, fresh: bool = False) -> GRM:
    """The trained GRM, or with ``fresh`` its backbone under a new adapter (B = 0: exactly the backbone).

    jobs/evaluate.py sets HF_HUB_OFFLINE, so a backbone that is not on this machine is a ModelError naming it.
    """
    try:
        if fresh:
            backbone = BackboneConfig.model_validate(source.config.backbone)
            return GRM.build(backbone, source.config)
        return GRM.from_pretrained(str(source.adapter))
    except (OSError, ValueError, ImportError, RuntimeError) as err:
        what = "backbone" if fresh else "model"
        raise ModelError(
            f"model={source.path}: cannot load the {what} offline (backbone {_backbone_label(source.config)}): {err}"
        ) from None


def item_texts(items: pd.DataFrame) -> list[str]:
    """What the GRM embeds per catalogue item: its ``text`` (the item side the rows trained), else its title."""
    return [text or title or "" for text, title in zip(items["text"].fillna(""), items["title"].fillna(""))]


def item_instruction(rows: pd.DataFrame) -> str:
    """The item-side instruction the task's rows were trained with (one per task; the most common if mixed)."""
    counts = rows["pos_instruction"].value_counts()
    if len(counts) > 1:
        log.warning("%d item-side instructions in one task; embedding items with %r", len(counts), counts.index[0])
    return str(counts.index[0])


class EmbeddingSystem:
    """A text embedder as a ``Baseline``: the catalogue embedded once per (task, item instruction), each query with
    its row's own instruction, both truncated to the budgets training used for that side. Subclasses embed one
    batch (``_embed_batch``); batching by similar length, so little compute goes to padding, is shared."""

    tasks: frozenset[str]

    def __init__(self, name: str, batch_size: int) -> None:
        self.name, self.batch_size = name, batch_size
        self._catalogue: dict[tuple[str, str], np.ndarray] = {}

    def fit(self, items: pd.DataFrame, interactions: pd.DataFrame) -> None:
        self.texts = item_texts(items)
        self._catalogue.clear()

    def scorer(self, task: str, rows: pd.DataFrame) -> Scorer:
        key = (task, item_instruction(rows))
        if key not in self._catalogue:
            self._catalogue[key] = self.embed(task, [key[1]] * len(self.texts), self.texts, Side.ITEM)
        queries = self.embed(task, rows["query_instruction"].tolist(), rows["query"].astype(str).tolist(), Side.QUERY)
        return DenseScorer(queries, self._catalogue[key], cosine=False)  # both sides are L2-normalised already

    def embed(self, task: str, instructions: Sequence[str], texts: Sequence[str], side: Side) -> np.ndarray:
        """(n, d) float32 embeddings in input order."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        parts = []
        for start in range(0, len(texts), self.batch_size):
            batch = order[start : start + self.batch_size]
            parts.append(self._embed_batch(task, [instructions[i] for i in batch], [texts[i] for i in batch], side))
        vectors = np.concatenate(parts)
        out = np.empty_like(vectors)
        out[order] = vectors
        return out

    def _embed_batch(self, task: str, instructions: list[str], texts: list[str], side: Side) -> np.ndarray:
        raise NotImplementedError


class ExportedSystem(EmbeddingSystem):
    """An embedding export (jobs/export.py, loaded by ``load_export``) as a ``Baseline`` for its one task."""

    def __init__(self, name: str, exported: ExportedEmbedder, batch_size: int = 16) -> None:
        super().__init__(name, batch_size)
        self.exported, self.tasks = exported, frozenset({exported.task})

    def _embed_batch(self, task: str, instructions: list[str], texts: list[str], side: Side) -> np.ndarray:
        exported = self.exported
        budget = exported.budgets[side.value]
        return exported.run(
            encode_embedding(exported.tokenizer, instructions, texts, budget, keep_end=side.keeps_end(task))
        )


class GRMSystem(EmbeddingSystem):
    """A GRM as a ``Baseline`` (routed as the task on both sides), and the generator of the generative tasks.
    ``exit_layer``: embeddings after the first k decoder layers (``GRM.embed``); generation is unaffected."""

    tasks = frozenset(EMBEDDING_TASKS)

    def __init__(self, name: str, model: GRM, batch_size: int = 16, exit_layer: int | None = None) -> None:
        if exit_layer is not None:
            model.check_exits([exit_layer])
        super().__init__(name, batch_size)
        self.exit_layer = exit_layer
        self.model = model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
        backbone = model.backbone
        self.budget = {Side.QUERY: backbone.max_query_len, Side.ITEM: backbone.max_passage_len}

    @torch.inference_mode()  # no grad + eval mode + one task per batch: the layers use their folded weights
    def _embed_batch(self, task: str, instructions: list[str], texts: list[str], side: Side) -> np.ndarray:
        enc = encode_embedding(
            self.model.tokenizer, instructions, texts, self.budget[side], keep_end=side.keeps_end(task)
        )
        ids = self.model.task_ids([task] * len(texts))
        return self.model.embed(enc, ids, self.exit_layer).float().cpu().numpy()

    @torch.inference_mode()
    def choice_scores(self, task: str, prompts: Sequence[str], choices: Sequence[str]) -> np.ndarray:
        """(prompts, choices) mean log-likelihood per token of each choice as the response (as guided_choice)."""
        return self.model.choice_scores(list(prompts), list(choices), task, self.batch_size).float().numpy()

    def choose(
        self, task: str, prompts: Sequence[str], choices: Sequence[Sequence[str]], calibrate: bool = False
    ) -> list[str]:
        """Per prompt, the likeliest of its own ``choices``; prompts sharing a choice set are scored together. With
        ``calibrate``, each answer's score on the prompt's content-free twin (``closed.content_free``) is
        subtracted first: the answer the input makes likelier than the model's prior for it wins."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, options in enumerate(choices):
            groups.setdefault(tuple(options), []).append(i)
        out = [""] * len(prompts)
        for options, members in groups.items():
            scores = self.choice_scores(task, [prompts[i] for i in members], options)
            if calibrate:
                scores = scores - self._prior(task, [prompts[i] for i in members], options)
            for i, best in zip(members, scores.argmax(axis=1).tolist(), strict=True):
                out[i] = options[best]
        return out

    def _prior(self, task: str, prompts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        """(prompts, options) scores of each prompt's content-free twin; twins repeat (one per instruction
        paraphrase and option list), so each distinct one is scored once."""
        twins = [content_free(p) for p in prompts]
        distinct = list(dict.fromkeys(twins))
        table = self.choice_scores(task, distinct, options)
        row = {twin: i for i, twin in enumerate(distinct)}
        return table[[row[t] for t in twins]]

    def generate(self, task: str, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy responses, batched by similar prompt length (left padding costs compute on every new token)."""
        order = np.argsort([len(p) for p in prompts], kind="stable")
        out = [""] * len(prompts)
        for start in range(0, len(prompts), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, text in zip(batch, self.model.generate([prompts[i] for i in batch], task, max_new_tokens)):
                out[i] = text
        return out
