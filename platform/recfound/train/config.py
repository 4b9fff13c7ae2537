"""The training run's typed config: what `jobs/train.py` accepts, validated before Ray starts."""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import Field, create_model, model_validator

from recfound.config import CommaList, Config
from recfound.model.backbone import BackboneConfig, backbone_depth
from recfound.model.losses import LossConfig
from recfound.model.tmole.hyperparameters import HYPERPARAMETERS, TMoLEHyperparameters
from recfound.train.optim import OptimConfig
from recfound.train.s2sched import LossSource, SchedulerConfig

if TYPE_CHECKING:
    from recfound.model.tmole import TMoLEConfig


class PlacementStrategy(str, Enum):
    """Ray placement-group strategies for the worker group."""

    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class _Adapter(Config):
    """TMoLE's hyper-parameters (paper: 6 experts, r 16, alpha 64, dropout 0.1, 512-d task embedding)."""

    @model_validator(mode="after")
    def _valid(self) -> _Adapter:
        TMoLEHyperparameters(**self.model_dump())  # TMoLE checks its own fields: one set of rules
        return self

    def build(self, backbone: BackboneConfig) -> TMoLEConfig:
        from recfound.model.tmole import TMoLEConfig  # peft: on the workers, not in a driver checking its config

        return TMoLEConfig(**self.model_dump(), backbone=backbone.model_dump())


def _adapter_section() -> type[_Adapter]:
    """``model.adapter``: TMoLE's hyper-parameter fields, defaults and docs (as peft field help), as a typed section,
    so there is one adapter schema and the YAML, ``--help`` and the saved adapter_config.json agree."""
    hints = typing.get_type_hints(TMoLEHyperparameters)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(TMoLEHyperparameters):
        default = (
            {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
        )
        spec[f.name] = (hints[f.name], Field(**default, description=f.metadata["help"]))
    return create_model("AdapterConfig", __base__=_Adapter, **{name: spec[name] for name in HYPERPARAMETERS})


AdapterConfig = _adapter_section()


class ModelConfig(Config):
    backbone: BackboneConfig = BackboneConfig()
    adapter: AdapterConfig = AdapterConfig()


class BatchConfig(Config):
    """Per-worker, per-micro-batch sample counts; S2Sched splits each across the group's tasks."""

    embedding: int = Field(16, ge=0)
    """Embedding queries per step (each with its positive and hard negatives). Larger gives more in-batch
    negatives (better retrieval) at more memory; the paper uses 256 per GPU with GradCache."""
    generative: int = Field(8, ge=0)
    """Generative sequences per step (paper: 128 per GPU)."""
    grad_cache_chunk: int = Field(0, ge=0)
    """GradCache: embed this many texts at a time and keep only their embeddings, recomputing each chunk in the
    backward, so a big contrastive batch (the paper: 256 queries, chunk 16) fits in memory at the cost of one
    more embedding forward. 0: off (fastest while the batch fits). Gradients are the same either way."""
    shuffle_window: int = Field(2048, ge=0)
    """Rows of a task's stream shuffled together, reshuffled every epoch from (seed, epoch); 0 or 1 keeps the build
    order (one user's or anchor's rows side by side, so they are each other's in-batch negatives). Larger mixes
    more at the memory of that many tokenised rows per task and worker."""
    small_task_rows: int = Field(4096, ge=0)
    """Tasks with at most this many training rows get no Ray Data stream: each worker reads its rows of them (every
    num_workers-th) from the table and tokenises them itself, and keeps them in memory; bigger tasks stream on their
    own, split across the workers. A Ray Data execution costs seconds of start-up however small its task (on
    2 cores, a dozen small tasks held the first step for over a minute), and a small task is replayed from memory
    after its first epoch anyway. 0: every task streams."""

    @model_validator(mode="after")
    def _some_work(self) -> BatchConfig:
        if self.embedding + self.generative == 0:
            raise ValueError("embedding and generative batch sizes cannot both be 0")
        return self


class TrainConfig(Config):
    """A training run: dataset, model, optimisation, task scheduling, checkpoints and cluster shape."""

    data: str | None = None
    """Built dataset directory or URL (jobs/build_dataset.py output). Empty: build the synthetic default into
    runs/data/synthetic first (reused when already built)."""
    storage_path: str = "runs/train"
    """Where checkpoints go: a local/shared directory or a pyarrow/fsspec URL (s3://, gs://)."""
    name: str | None = None
    """Run name under storage_path. Re-using a name resumes that run; empty: a fresh timestamped name."""
    max_steps: int = Field(60, ge=1)
    """Optimizer steps; the LR schedule decays to 0 at this step."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (one process each; one GPU each with use_gpu)."""
    min_workers: int | None = Field(None, ge=1)
    """Elastic DDP: start with as few as this many workers and grow to num_workers as nodes appear."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved per worker (tokenisation and the CPU forward pass use them)."""
    resources_per_worker: dict[str, float] = {}
    """Extra Ray resources each worker reserves besides its CPUs (and GPU), e.g. {accelerator_type:H100: 0.001}
    or a custom node label like {trainer_node: 1}: pins workers to the node types that carry it."""
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    """How workers spread over nodes. PACK: as few nodes as fit (fast all-reduce within a node); SPREAD: one per
    node where possible (survives a node loss with fewer restarts, uses every node's I/O); STRICT_*: fail
    instead of falling back."""
    use_gpu: bool = False
    """One GPU per worker, NCCL, and bf16 when the backbone dtype is auto."""
    zero_stage: int = Field(0, ge=0, le=3)
    """0: DDP (every rank holds the optimizer state). 1-3: DeepSpeed ZeRO (needs the `zero` extra): 1 shards the
    AdamW state, 2 also the gradients, 3 also the weights, frozen backbone included, so a backbone too big for
    one device trains at the cost of gathering weights every forward. TMoLE's trainable part is small: 2 saves
    little over DDP; 3 is for big backbones. ZeRO runs resume with the same num_workers only (no elastic)."""
    tasks: CommaList[str] | None = None
    """Tasks to train (names as in the manifest). Empty: every task the dataset has."""
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    batch: BatchConfig = BatchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    checkpoint_every: int = Field(20, ge=1)
    """Steps between checkpoints: frequent ones lose less work on a failure but cost I/O."""
    keep_checkpoints: int = Field(3, ge=1)
    """Checkpoints kept in storage (the latest is always kept)."""
    max_failures: int = Field(2, ge=0)
    """Worker failures (a killed process or lost node) survived by restarting from the latest checkpoint."""
    log_every: int = Field(5, ge=1)
    """Steps between progress lines and metric reports to Ray Train (TensorBoard and metrics.jsonl get every step)."""
    seed: int = 0
    """Seeds weights of new adapters, dropout and the per-step task draw (shared by all ranks)."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers={self.min_workers} exceeds num_workers={self.num_workers}")
        if {"CPU", "GPU"} & set(self.resources_per_worker):
            raise ValueError(
                "resources_per_worker holds extra resources; set CPUs with cpus_per_worker, GPUs with use_gpu"
            )
        if self.zero_stage and self.min_workers is not None:
            raise ValueError("min_workers (elastic training) needs zero_stage=0: ZeRO partitions are not re-sharded")
        if self.zero_stage == 3 and self.scheduler.source is LossSource.VALID:
            raise ValueError(
                "scheduler.source=valid needs zero_stage < 3: rank 0 alone cannot run the "
                "partitioned model on validation batches"
            )
        depth = backbone_depth(self.model.backbone)
        too_deep = [k for k in self.loss.exit_layers if depth is not None and k >= depth]
        if too_deep:
            raise ValueError(
                f"loss.exit_layers {too_deep}: the {self.model.backbone.name} backbone has {depth} decoder layers; "
                f"an exit must be below {depth} (the last layer already trains)"
            )
        return self
