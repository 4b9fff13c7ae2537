"""TMoLE against one plain peft LoRA of equal total rank (E·r, same target modules) and the frozen backbone.

Training: decoder forward + backward time and peak memory. Inference: forward time of TMoLE's folded per-task path
(single-task batch, W0 + ΔW(task) cached), its expert sum (mixed-task batch), plain LoRA and the backbone alone.

The timed work is the decoder (every layer the adapters live in) under a fixed random probe loss: the LM head and
the loss are the same for every variant, so leaving them out makes the adapter ratios strict, not diluted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from pydantic import Field
from torch import nn
from torch.profiler import ProfilerActivity, profile

from recfound.bench.common import (
    CONFIG_DIR,
    Better,
    Report,
    Table,
    Target,
    Timing,
    counted_flops,
    device_sync,
    fmt,
    interleaved,
    median,
    paired_ratio,
    top_ops,
    torch_threads,
)
from recfound.config import Config, load_config
from recfound.model.pretrained import load_backbone
from recfound.model.tmole import TMoLEModel
from recfound.tasks import GENERATIVE_TASKS, Mode
from recfound.train.config import TrainConfig
from recfound.train.telemetry import peak_flops

CONFIGS = {"tiny": CONFIG_DIR / "tiny.yaml", "smollm2-135m": CONFIG_DIR / "smollm2.yaml"}
TARGETS = [Target("TMoLE train step / single LoRA (equal total rank)", "tmole_vs_lora_train", 1.3, Better.LOWER)]


class AdapterBench(Config):
    """TMoLE vs a single plain peft LoRA of equal total rank vs the frozen backbone: train step time and peak
    memory; inference time of the folded per-task path, the expert sum and plain LoRA."""

    backbone: Literal["tiny", "smollm2-135m"] = "tiny"
    """Backbone, with the adapter hyper-parameters and batch of its config (configs/tiny.yaml, configs/smollm2.yaml)."""
    batch: int | None = Field(None, ge=1)
    """Sequences per step; default: the config's batch.generative."""
    seq_len: int | None = Field(None, ge=2)
    """Tokens per sequence; default: the backbone's max_generative_len (full-length generative rows)."""
    threads: int = Field(1, ge=1)
    """torch intra-op threads. 1: what a Ray Train worker with cpus_per_worker=1 runs on; on a shared machine a
    multi-threaded region also waits for its slowest (preempted) thread, which blurs the comparison."""
    rounds: int = Field(10, ge=1)
    """Timed rounds; each runs every variant once, interleaved."""
    warmup: int = Field(2, ge=0)
    """Untimed rounds first (allocator, folded-weight cache)."""
    profile: bool = False
    """Also profile three TMoLE and three LoRA train steps with torch.profiler and report their top operators."""


class Variant(str, Enum):
    FROZEN = "frozen"
    """The backbone alone, every weight frozen; gradients still flow through every layer, as any adapter needs."""
    LORA = "lora"
    """One peft LoRA of rank E·r on the same target modules."""
    TMOLE = "tmole"
    """TMoLE with per-sample gates: training, and inference on mixed-task batches (the expert sum)."""
    FOLDED = "tmole_folded"
    """TMoLE inference on a single-task batch: the cached W0 + ΔW(task) replaces base + experts."""


@dataclass
class Subject:
    """A variant's decoder (the transformers base model the adapters were injected into) and its routing."""

    owner: nn.Module
    decoder: nn.Module
    route: Callable[[], AbstractContextManager[None]]


def _subjects(cfg: TrainConfig, batch: int, device: torch.device) -> dict[Variant, Subject]:
    """One fresh backbone per variant (the tiny one is seeded, so all start from the same weights). TMoLE rows
    cycle through the generative tasks (per-sample gates); its folded variant gives every row the same task."""
    backbone, adapter = cfg.model.backbone, cfg.model.adapter
    frozen, _ = load_backbone(backbone)
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()  # backward through every layer, with no weight to update
    lora_model, _ = load_backbone(backbone)
    lora = get_peft_model(
        lora_model,
        LoraConfig(
            r=adapter.num_experts * adapter.r,
            lora_alpha=adapter.alpha * adapter.num_experts,
            lora_dropout=adapter.dropout,
            target_modules=adapter.target_modules,
        ),
    )
    tmole_model, _ = load_backbone(backbone)
    tmole = TMoLEModel(tmole_model, adapter.build(backbone))
    mixed = torch.tensor([tmole.task_id(t) for t in itertools.islice(itertools.cycle(GENERATIVE_TASKS), batch)])
    task_ids = {Variant.TMOLE: mixed.to(device), Variant.FOLDED: torch.full_like(mixed, int(mixed[0])).to(device)}
    out = {
        Variant.FROZEN: Subject(frozen, frozen.base_model, nullcontext),
        Variant.LORA: Subject(lora, lora.get_base_model().base_model, nullcontext),
        Variant.TMOLE: Subject(
            tmole, tmole.model.base_model, lambda: tmole.route(task_ids[Variant.TMOLE], Mode.GENERATIVE)
        ),
        Variant.FOLDED: Subject(
            tmole, tmole.model.base_model, lambda: tmole.route(task_ids[Variant.FOLDED], Mode.GENERATIVE)
        ),
    }
    for subject in out.values():
        subject.owner.to(device)
    return out


def _forward(subject: Subject, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with subject.route():
        return subject.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def _train_step(subject: Subject, ids: torch.Tensor, mask: torch.Tensor, probe: torch.Tensor) -> None:
    """Forward + backward under a fixed random probe (a dense gradient like a real loss's, the same for all)."""
    subject.owner.zero_grad(set_to_none=True)
    (_forward(subject, ids, mask).float() * probe).sum().backward()


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes torch allocates during ``step`` above what was live before it (activations kept for backward,
    gradients, temporaries). GPU: the CUDA allocator's peak counter. CPU: the profiler's record of every
    allocation and free, summed in time order; RSS would also count the allocator's cached pages and Python."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def _batch(vocab: int, batch: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    return ids.to(device), torch.ones_like(ids)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def run(bench: AdapterBench) -> Report:
    cfg = load_config(TrainConfig, str(CONFIGS[bench.backbone]))
    batch = bench.batch or cfg.batch.generative
    seq_len = bench.seq_len or cfg.model.backbone.max_generative_len
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    subjects = _subjects(cfg, batch, device)
    vocab = subjects[Variant.FROZEN].owner.get_input_embeddings().num_embeddings
    ids, mask = _batch(vocab, batch, seq_len, device)
    hidden = subjects[Variant.FROZEN].owner.config.hidden_size
    dtype = subjects[Variant.FROZEN].owner.dtype  # the FLOP share's peak is measured in the backbone's dtype
    probe = torch.randn(batch, seq_len, hidden, generator=torch.Generator().manual_seed(1)).to(device)
    train = [Variant.FROZEN, Variant.LORA, Variant.TMOLE]

    def train_case(v: Variant) -> Callable[[], None]:
        return lambda: _train_step(subjects[v], ids, mask, probe)

    def infer_case(v: Variant) -> Callable[[], None]:
        return lambda: _forward(subjects[v], ids, mask)

    sync = lambda: device_sync(device)  # noqa: E731
    with torch_threads(bench.threads):
        for subject in subjects.values():
            subject.owner.train()
        train_times = interleaved({v.value: train_case(v) for v in train}, bench.rounds, bench.warmup, sync)
        peak = {v.value: peak_bytes(train_case(v), device) for v in train}
        profiled = (Variant.TMOLE, Variant.LORA) if bench.profile else ()
        profiles = {v.value: top_ops(lambda v=v: [train_case(v)() for _ in range(3)]) for v in profiled}
        for subject in subjects.values():
            subject.owner.eval()
        with torch.no_grad():
            infer_times = interleaved({v.value: infer_case(v) for v in Variant}, bench.rounds, bench.warmup, sync)
        flops = {v.value: counted_flops(train_case(v)) for v in train}
        peak_flop_s, peak_label = peak_flops(device, dtype)

    t, i = train_times.wall, infer_times.wall
    ratios = {
        "tmole_vs_lora_train": paired_ratio(t["tmole"], t["lora"]),
        "tmole_vs_frozen_train": paired_ratio(t["tmole"], t["frozen"]),
        "lora_vs_frozen_train": paired_ratio(t["lora"], t["frozen"]),
        "tmole_vs_lora_train_cpu": paired_ratio(train_times.cpu["tmole"], train_times.cpu["lora"]),
        "tmole_vs_lora_peak_memory": peak["tmole"] / peak["lora"],
        "tmole_vs_frozen_peak_memory": peak["tmole"] / peak["frozen"],
        "folded_vs_expert_sum_infer": paired_ratio(i["tmole_folded"], i["tmole"]),
        "folded_vs_lora_infer": paired_ratio(i["tmole_folded"], i["lora"]),
        "expert_sum_vs_lora_infer": paired_ratio(i["tmole"], i["lora"]),
        "folded_vs_frozen_infer": paired_ratio(i["tmole_folded"], i["frozen"]),
        "folded_vs_lora_infer_cpu": paired_ratio(infer_times.cpu["tmole_folded"], infer_times.cpu["lora"]),
    }
    trainable = {v.value: _trainable(subjects[v].owner) for v in train}
    share = {k: flops[k] / median(t[k]) / peak_flop_s for k in flops}
    figures = {
        "batch": batch,
        "seq_len": seq_len,
        "device": device.type,
        "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation events",
        "trainable_params": trainable,
        "train_ms": {k: median(v) * 1e3 for k, v in t.items()},
        "infer_ms": {k: median(v) * 1e3 for k, v in i.items()},
        "train_peak_mb": {k: v / 2**20 for k, v in peak.items()},
        f"train_{peak_label}": share,
        "peak_flop_s": peak_flop_s,
        "train_flops": flops,
        "train_seconds": asdict(train_times),
        "infer_seconds": asdict(infer_times),
        "profile": profiles,
    }
    report = Report(
        "adapter", bench.model_dump(mode="json") | {"train_config": cfg.model.model_dump(mode="json")}, ratios, figures
    )
    report.tables = _tables(figures, train_times, infer_times)
    report.notes = [
        f"batch {batch} x {seq_len} tokens on {device.type}, {bench.threads} torch thread(s); decoder "
        "forward+backward under a fixed probe loss (LM head and loss left out: identical for all variants). "
        f"Ratios are medians of per-round ratios over {bench.rounds} interleaved rounds. "
        f"Peak memory: {figures['memory_method']}, above the weights. "
        f"{peak_label}: FLOPs counted by torch.utils.flop_counter (attention included) per median step, over the "
        f"{'measured fp32 GEMM peak' if peak_label == 'flop_share' else 'datasheet peak'} "
        f"({peak_flop_s / 1e9:,.0f} GFLOP/s)."
    ]
    report.check(TARGETS)
    return report


def _tables(figures: dict, train: Timing, infer: Timing) -> list[Table]:
    def vs(timing: Timing, a: str, b: str) -> str:
        return (
            f"{fmt(paired_ratio(timing.wall[a], timing.wall[b]))}x / {fmt(paired_ratio(timing.cpu[a], timing.cpu[b]))}x"
        )

    label = "mfu" if "train_mfu" in figures else "flop_share"
    train_rows = [
        [
            v,
            fmt(figures["trainable_params"][v]),
            fmt(figures["train_ms"][v]),
            vs(train, v, "lora"),
            vs(train, v, "frozen"),
            fmt(figures["train_peak_mb"][v]),
            fmt(figures["train_peak_mb"][v] / figures["train_peak_mb"]["lora"]) + "x",
            f"{figures[f'train_{label}'][v]:.1%}",
        ]
        for v in train.wall
    ]
    infer_rows = [
        [v, fmt(figures["infer_ms"][v]), vs(infer, v, "lora"), vs(infer, v, "tmole"), vs(infer, v, "frozen")]
        for v in infer.wall
    ]
    tables = [
        Table(
            "Training step (decoder forward + backward); ratios wall / CPU time",
            ["variant", "trainable params", "median wall ms", "vs LoRA", "vs frozen", "peak MB", "peak vs LoRA", label],
            train_rows,
        ),
        Table(
            "Inference forward (eval, no grad); ratios wall / CPU time",
            ["variant", "median wall ms", "vs LoRA", "vs expert sum", "vs frozen"],
            infer_rows,
        ),
    ]
    for variant, ops in figures["profile"].items():
        rows = [[o["op"], fmt(o["self_ms"]), f"{o['share']:.1%}", str(o["calls"])] for o in ops]
        tables.append(
            Table(
                f"Top operators, three {variant} train steps (self CPU time)", ["op", "self ms", "share", "calls"], rows
            )
        )
    return tables
