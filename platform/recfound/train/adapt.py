"""Adapt a merged model to a new task or domain by training ~1 % of the adapter's parameters (jobs/adapt.py).

Every TMoLE expert, router and the backbone stay frozen; what trains is each adapted task's task-table row (the
routers' input: the task picks its own mix of the frozen experts) and, with ``method=prompt``, a few soft-prompt
vectors before its inputs (M6-Rec's prompt tuning), or with ``method=expert`` a private low-rank expert of the task's
own in every adapted linear (about rank / (num_experts * r) of the adapter: 1 % at rank 1 of 6 rank-16 experts).
``method=full`` is the reference they are measured against: every expert and router trains on the task's rows too,
so the model's other tasks change with it. A task the model lacks gets a new row, started at the mean of
its mode's rows (an "average" task the routers know, not a random point); a task it has (an existing task on a new
domain's data) continues from its own row, which the output replaces; the source artifact stays as it was.

Steps are the trainer's ``train_step`` on an in-process ``TorchEngine`` over the same ``JointObjective``. The output
has the merged artifact's layout (adapter/, tokenizer/, manifest.json), so the same loaders, jobs/evaluate.py and
jobs/publish.py take it as they take a merged model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.core import url_to_fs
from pydantic import Field, field_validator

from recfound.artifacts import (
    ADAPTED_KIND,
    ADAPTER_DIR,
    MANIFEST,
    TOKENIZER_DIR,
    check_out,
    hash_tree,
    read_merged,
    staged,
)
from recfound.config import CommaList, Config, InputURL
from recfound.io import exists, sha256
from recfound.model.backbone import BackboneConfig
from recfound.model.grm import GRM
from recfound.model.losses import LossConfig
from recfound.model.tmole import TMoLEConfig, read_adapter_config, read_adapter_weights
from recfound.model.tmole.model import TASK_TABLE_KEY
from recfound.tasks import Mode, mode_of, task_path
from recfound.train.batches import Rows, collate, tokenize_table
from recfound.train.config import TrainConfig
from recfound.train.engine import TorchEngine
from recfound.train.mixing import Sampler
from recfound.train.objective import JointObjective
from recfound.train.optim import OptimConfig
from recfound.train.step import train_step
from recfound.train.streams import MemoryShard, TaskStream
from recfound.train.telemetry import StepCost, clock_text


class AdaptMethod(str, Enum):
    TASK_EMBEDDING = "task_embedding"
    PROMPT = "prompt"
    EXPERT = "expert"
    FULL = "full"

    @property
    def default_lr(self) -> float:
        """A few vectors take a high rate; LoRA weights the recipe's (configs/quality.yaml), a fresh expert twice it."""
        return {AdaptMethod.EXPERT: 1e-3, AdaptMethod.FULL: 5e-4}.get(self, 1e-2)


class AdaptError(ValueError):
    """Input that cannot be adapted; the message names the key, task or path at fault."""


class AdaptConfig(Config):
    """Which merged model to adapt to which tasks of which dataset, and how long to train."""

    model: InputURL
    """Merged artifact directory (jobs/merge.py out, or an earlier jobs/adapt.py out): manifest.json, adapter/."""
    data: InputURL
    """Built dataset directory (jobs/build_dataset.py out) with tasks/<task>/train.parquet and valid.parquet."""
    tasks: CommaList[str]
    """Tasks to adapt (comma-separated). One the model lacks gets a new task-table row; one it has continues from
    its own row on this data, and the output's row replaces it."""
    out: str
    """Output directory; replaced if it holds an earlier adaptation, refused if it holds anything else."""
    method: AdaptMethod = AdaptMethod.TASK_EMBEDDING
    """task_embedding: train each task's task-table row only (task_dim parameters per task). prompt: also
    prompt_tokens soft-prompt vectors per task in front of its inputs (hidden size each): more capacity, and the
    task can no longer be exported as a folded plain model. expert: the row and a private LoRA expert of rank
    expert_rank in every adapted linear (about 1 % of the adapter at rank 1; it folds and exports like the others).
    full: the reference, every expert and router trains too (the whole adapter; the other tasks change)."""
    prompt_tokens: int = Field(4, ge=1)
    """method=prompt: soft-prompt vectors per adapted task."""
    expert_rank: int = Field(1, ge=1)
    """method=expert: rank of each adapted task's private expert; parameters grow linearly with it."""
    steps: int = Field(100, ge=1)
    """Optimizer steps (AdamW, 3 % warmup, linear decay to 0 at the last step)."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; empty: 1e-2 for task_embedding and prompt (a few vectors move), 1e-3 for expert (a fresh
    LoRA), 5e-4 for full (the quality recipe's rate for trained experts)."""
    embedding_batch: int = Field(16, ge=1)
    """Embedding queries per step, split evenly over the adapted embedding tasks (in-batch negatives come from it)."""
    generative_batch: int = Field(8, ge=1)
    """Generative sequences per step, split evenly over the adapted generative tasks."""
    rows: int | None = Field(None, ge=1)
    """Few-shot: train on a seeded sample of this many train rows per task; empty: all of them."""
    valid_rows: int = Field(64, ge=1)
    """Valid rows per task whose loss is measured before and after (recorded in the manifest)."""
    seed: int = 0
    """Seeds the soft-prompt init, the row sample, the shuffling and dropout: same inputs and seed, same artifact."""
    log_every: int = Field(10, ge=1)
    """Print a progress line (step, mean task loss, tokens/s, time left) to stderr every this many steps."""

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"expected one or more distinct task names, got {tasks}")
        for task in tasks:
            mode_of(task)  # raises naming the known tasks
        return tasks


@dataclasses.dataclass
class Trainable:
    """The model to train and exactly what in it trains."""

    grm: GRM
    params: list[torch.nn.Parameter]
    count: int  # task_dim per adapted task, plus what the method adds (prompts, private experts, every expert)


def adapt(cfg: AdaptConfig) -> Path:
    """Train the adapted tasks' rows (and prompts) and write the artifact to ``cfg.out``; every input is checked
    before the first step."""
    source, out = Path(cfg.model), Path(cfg.out)
    config = _read_source(source)
    check_out(out, source, ADAPTED_KIND, AdaptError)
    train = {t: _read_rows(cfg.data, t, "train", cfg.rows, cfg.seed) for t in cfg.tasks}
    valid = {t: _read_rows(cfg.data, t, "valid", cfg.valid_rows, None) for t in cfg.tasks}
    base = read_adapter_weights(str(source / ADAPTER_DIR))
    model = trainable_model(config, base, cfg)
    grm = model.grm
    backbone = grm.backbone.model_dump()
    train_rows = {t: tokenize_table(rows, backbone, t) for t, rows in train.items()}
    valid_rows = {t: tokenize_table(rows, backbone, t) for t, rows in valid.items()}
    objective = JointObjective(grm, LossConfig())  # the trainer's default InfoNCE temperature and weights
    before = _valid_losses(objective, valid_rows, cfg)
    lr = cfg.lr or cfg.method.default_lr
    history = _train(objective, model.params, train_rows, cfg, lr)
    after = _valid_losses(objective, valid_rows, cfg)
    adapter_parameters = sum(t.numel() for t in base.values())
    report = {
        "kind": ADAPTED_KIND,
        "method": cfg.method.value,
        "adapted_tasks": cfg.tasks,
        "tasks": grm.tuner.adapter_config.tasks,
        "trained_parameters": model.count,
        "adapter_parameters": adapter_parameters,
        "trained_share": model.count / adapter_parameters,
        "train_rows": {t: len(rows) for t, rows in train.items()},
        "valid_loss": {t: {"before": before[t], "after": after[t]} for t in cfg.tasks},
        "train_loss": history,
        "changed_tasks": grm.tuner.adapter_config.tasks if cfg.method is AdaptMethod.FULL else cfg.tasks,
        "parameters": cfg.model_dump(mode="json", exclude={"model", "data", "out", "tasks", "method", "log_every"})
        | {"lr": lr},
        "source": {"model": str(source.resolve()), "manifest_sha256": sha256(str(source / MANIFEST)), "data": cfg.data},
    }
    _write(grm, out, report)
    return out


def _train(
    objective: JointObjective, params: list[torch.nn.Parameter], rows: dict[str, Rows], cfg: AdaptConfig, lr: float
) -> list[float]:
    """``cfg.steps`` of the trainer's own ``train_step`` at peak rate ``lr``, each mode's batch split evenly over
    its adapted tasks; returns each step's mean task loss."""
    run = TrainConfig(max_steps=cfg.steps, optim=OptimConfig(lr=lr), seed=cfg.seed)
    engine, cost = TorchEngine(objective, params, run), StepCost.of(objective.grm.tuner.model)
    streams = {t: TaskStream(MemoryShard(r), seed=cfg.seed, shuffle_window=len(r["task"])) for t, r in rows.items()}
    sizes = {Mode.EMBEDDING: cfg.embedding_batch, Mode.GENERATIVE: cfg.generative_batch}
    samplers = {mode: Sampler([t for t in cfg.tasks if mode_of(t) is mode], n) for mode, n in sizes.items()}
    even, history = dict.fromkeys(cfg.tasks, 1.0), []
    objective.train()
    start, tokens = time.perf_counter(), 0
    for step in range(1, cfg.steps + 1):
        counts = {mode: s.counts(even) for mode, s in samplers.items()}
        done = train_step(
            engine,
            streams,
            counts,
            grad_accum=1,
            cost=cost,
            seed=cfg.seed,
            rank=0,
            step=step,
            device=objective.grm.device,
        )
        if done.non_finite:
            raise AdaptError(f"step {step}: the loss of {done.non_finite} is {done.losses[done.non_finite]}")
        history.append(round(sum(done.losses.values()) / len(done.losses), 6))
        tokens += done.tokens
        if step % cfg.log_every == 0 or step == cfg.steps:
            _progress(step, cfg.steps, history[-1], tokens, time.perf_counter() - start)
    return history


def _progress(step: int, steps: int, loss: float, tokens: int, seconds: float) -> None:
    """One stderr line: a few hundred SmolLM2 steps on a CPU take tens of minutes, too long to run silent."""
    left = clock_text(seconds / step * (steps - step))
    print(
        f"adapt step {step}/{steps}  loss {loss:.4f}  {tokens / seconds:,.0f} tokens/s  {left} left",
        file=sys.stderr,
        flush=True,
    )


def _read_source(root: Path) -> TMoLEConfig:
    """The merged artifact's adapter config, once its manifest verifies every file it lists."""
    read_merged(root, AdaptError)
    config = read_adapter_config(str(root / ADAPTER_DIR))
    if config.backbone is None:
        raise AdaptError(f"model={root}: the adapter config does not record its backbone")
    return config


def _read_rows(data: str, task: str, split: str, limit: int | None, seed: int | None) -> pa.Table:
    """A task split's rows: the first ``limit`` (seed None) or a seeded sample of ``limit``; all when no limit."""
    url = f"{data.rstrip('/')}/{task_path(task, split)}"
    if not exists(url):
        raise AdaptError(
            f"data={data}: no {split} split of task {task} ({task_path(task, split)}); build the "
            f"dataset with that task (jobs/build_dataset.py tasks=...)"
        )
    fs, path = url_to_fs(url)
    table = pq.read_table(path, filesystem=fs)
    if not table.num_rows:
        raise AdaptError(f"data={data}: the {split} split of task {task} has no rows")
    if limit is None or limit >= table.num_rows:
        return table
    if seed is None:
        return table.slice(0, limit)
    return table.take(np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False)))


def trainable_model(config: TMoLEConfig, base: dict[str, torch.Tensor], cfg: AdaptConfig) -> Trainable:
    """The source model with the adapted tasks' rows (and prompts or private experts) added; what the method does
    not train is frozen."""
    new = [t for t in cfg.tasks if t not in config.tasks]
    prompts, experts = dict(config.soft_prompts), dict(config.task_experts)  # earlier ones keep their size
    if cfg.method is AdaptMethod.PROMPT:
        prompts |= {t: cfg.prompt_tokens for t in cfg.tasks if t not in prompts}
    if cfg.method is AdaptMethod.EXPERT:
        experts |= {t: cfg.expert_rank for t in cfg.tasks if t not in experts}
    extended = dataclasses.replace(config, tasks=[*config.tasks, *new], soft_prompts=prompts, task_experts=experts)
    torch.manual_seed(cfg.seed)  # the soft prompts' and private experts' initial draw
    assert extended.backbone is not None  # _read_source checked it
    grm = GRM.build(BackboneConfig.model_validate(extended.backbone), extended)
    fresh = grm.tuner.trainable_state_dict()
    table = base[TASK_TABLE_KEY]
    state = {k: v for k, v in fresh.items() if k not in base} | base  # new prompts and experts start fresh
    state[TASK_TABLE_KEY] = torch.cat([table, *(_start_row(table, config.tasks, t)[None] for t in new)])
    grm.tuner.load_trainable_state_dict(state, source=f"{cfg.model}/{ADAPTER_DIR}")
    grm.requires_grad_(False)
    weight = grm.tuner.task_table.weight.requires_grad_(True)
    keep = torch.zeros(len(extended.tasks), 1)
    keep[[extended.tasks.index(t) for t in cfg.tasks]] = 1.0
    weight.register_hook(lambda grad: grad * keep.to(grad))  # the other tasks' rows never move
    params = [weight]
    if cfg.method is AdaptMethod.PROMPT:
        params += [grm.tuner.soft_prompts[t] for t in cfg.tasks]
    if cfg.method is AdaptMethod.EXPERT:
        params += [p for t in cfg.tasks for p in grm.tuner.task_expert_parameters(t)]
    if cfg.method is AdaptMethod.FULL:
        params += grm.tuner.expert_parameters()
    for p in params[1:]:
        p.requires_grad_(True)
    count = len(cfg.tasks) * extended.task_dim + sum(p.numel() for p in params[1:])
    return Trainable(grm, params, count)


def _start_row(table: torch.Tensor, tasks: list[str], new: str) -> torch.Tensor:
    """A new task's first row: the mean of the rows of its mode (of all rows when the model has none of them)."""
    same = torch.tensor([mode_of(t) is mode_of(new) for t in tasks])
    return table[same].mean(0) if bool(same.any()) else table.mean(0)


@torch.no_grad()
def _valid_losses(objective: JointObjective, rows: dict[str, Rows], cfg: AdaptConfig) -> dict[str, float]:
    """Each task's objective on its valid rows in fixed batches of the training size, dropout off: comparable
    before and after (a contrastive loss depends on the batch, so the batches stay the same)."""
    objective.eval()
    losses = {}
    for task, block in rows.items():
        mode = mode_of(task)
        size = cfg.embedding_batch if mode is Mode.EMBEDDING else cfg.generative_batch
        total = count = 0.0
        for start in range(0, len(block["task"]), size):
            batch = collate([{k: v[start : start + size] for k, v in block.items()}], mode)
            _, stats = objective(batch, None) if mode is Mode.EMBEDDING else objective(None, batch)
            total, count = total + float(stats[task][0]), count + float(stats[task][1])
        losses[task] = round(total / max(count, 1.0), 6)
    objective.train()
    return losses


def _write(grm: GRM, out: Path, report: dict[str, Any]) -> None:
    """Write into a stage beside ``out``, the manifest last, then move it into place: never a half artifact."""
    with staged(out) as stage:
        grm.save_pretrained(str(stage / ADAPTER_DIR))
        grm.tokenizer.save_pretrained(str(stage / TOKENIZER_DIR))
        manifest = {**report, "files": hash_tree(stage), "created": datetime.now(timezone.utc).isoformat()}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
