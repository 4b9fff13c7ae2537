"""Model Merge of a run's checkpoints into one self-contained, checksummed artifact.

Layout of the output directory:
  adapter/          the merged TMoLE adapter (safetensors + adapter_config.json, which records the backbone)
  tokenizer/        the backbone's tokenizer, so serving needs nothing from the training run
  tasks/<task>/     optional: plain transformers models with that task's routed experts folded in
  manifest.json     SHA-256 of every file, the source checkpoints, method and parameters; written last
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from recfound.artifacts import ADAPTER_DIR, MANIFEST, TOKENIZER_DIR, hash_tree, read_trainer_state
from recfound.config import CommaList, Config
from recfound.merge.methods import MergeMethod, merge
from recfound.model.backbone import BackboneConfig
from recfound.model.grm import GRM
from recfound.model.tmole import TMoLEConfig
from recfound.model.tmole.model import read_adapter_config, read_adapter_weights
from recfound.train import checkpoint


class MergeConfig(Config):
    """Which checkpoints to merge, how, and where the artifact goes."""

    checkpoints: CommaList[str]
    """Checkpoint directories of one run (comma-separated on the command line), e.g. where different tasks peak."""
    method: MergeMethod = MergeMethod.TIES
    """ties: task vectors against the initial adapter, trimmed, sign-elected, disjoint mean (the paper's
    default; keeps each checkpoint's strongest changes). linear: weighted average. slerp: two checkpoints."""
    out: str = "runs/merged"
    """Output directory of the merged artifact (replaced if it exists)."""
    density: float = Field(0.8, gt=0, le=1)
    """ties: share of each task vector's largest entries kept; lower drops more interference and more signal."""
    scale: float = Field(1.0, gt=0)
    """ties: multiplier of the merged task vector added to the initial adapter."""
    t: float = Field(0.6, ge=0, le=1)
    """slerp: interpolation position between the first (0) and second (1) checkpoint (paper: 0.6)."""
    weights: CommaList[float] | None = None
    """linear: one weight per checkpoint (normalised); empty means equal weights."""
    export_tasks: CommaList[str] = []
    """Also write plain transformers models with these tasks' experts folded in (tasks/<task>/)."""

    @model_validator(mode="after")
    def _arity(self) -> MergeConfig:
        if not self.checkpoints:
            raise ValueError("checkpoints: at least one checkpoint is needed")
        if self.method is MergeMethod.SLERP and len(self.checkpoints) != 2:
            raise ValueError(f"method=slerp merges exactly two checkpoints, got {len(self.checkpoints)}")
        if self.weights is not None and len(self.weights) != len(self.checkpoints):
            raise ValueError(f"weights: {len(self.weights)} given for {len(self.checkpoints)} checkpoints")
        return self


def _initial_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """θ0, the adapter as training initialised it: rebuilt from the run's recorded seed (init is seeded)."""
    seed = read_trainer_state(ckpt)["seed"]
    torch.manual_seed(seed)
    return _fresh(read_adapter_config(str(ckpt / ADAPTER_DIR))).tuner.trainable_state_dict()


def _fresh(config: TMoLEConfig) -> GRM:
    if config.backbone is None:
        raise ValueError("the adapter config does not record its backbone")
    return GRM.build(BackboneConfig.model_validate(config.backbone), config)


def merge_checkpoints(cfg: MergeConfig) -> Path:
    roots = [Path(c) for c in cfg.checkpoints]
    for root in roots:
        checkpoint.verify(root)
    configs = [read_adapter_config(str(r / ADAPTER_DIR)) for r in roots]
    if any(c.to_json() != configs[0].to_json() for c in configs[1:]):
        raise ValueError("checkpoints come from different adapter configs; merge only checkpoints of one run")
    states = [read_adapter_weights(str(r / ADAPTER_DIR)) for r in roots]
    params: dict[str, Any] = {}
    if cfg.method is MergeMethod.TIES:
        params = {"base": _initial_state(roots[0]), "density": cfg.density, "scale": cfg.scale}
    elif cfg.method is MergeMethod.SLERP:
        params = {"t": cfg.t}
    elif cfg.weights is not None:
        params = {"weights": cfg.weights}
    merged = merge(cfg.method, states, **params)

    grm = _fresh(configs[0])
    grm.tuner.load_trainable_state_dict(merged, source="merged state")
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    grm.save_pretrained(str(out / ADAPTER_DIR))
    grm.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    for task in cfg.export_tasks:
        grm.merge_task(task).save_pretrained(str(out / "tasks" / task))
        grm.tokenizer.save_pretrained(str(out / "tasks" / task))
    files = hash_tree(out)
    manifest = {
        "files": files,
        "sources": [str(r.resolve()) for r in roots],
        "method": cfg.method.value,
        "parameters": {
            k: v for k, v in cfg.model_dump(mode="json").items() if k in ("density", "scale", "t", "weights")
        },
        "tasks": configs[0].tasks,
        "created": datetime.now(timezone.utc).isoformat(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out
