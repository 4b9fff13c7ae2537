"""What rank 0 says about a run: one line per step, TensorBoard events, and loss/weight plots at the end.

Throughput is reported as tokens/s and as a share of a peak: on CPU the peak is this machine's own measured
GEMM rate (datasheets mean nothing for a shared VM); on GPU it is the datasheet bf16 dense peak (MFU).
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

# Rank 0's progress line. In a Ray Train worker the root logger writes it once to the worker's stderr, which
# the driver echoes, and to Ray Train's application log file (a print would be echoed twice: stdout and stderr).
log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; the first match wins.
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def measured_gemm_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 8
) -> float:
    """FLOP/s of a square matmul in the run's compute dtype here, best of ``repeats``: the CPU reference for the
    FLOP share (a CPU with native bf16 multiplies bf16 about 4x as fast as float32, so each dtype its own peak)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(peak FLOP/s, label): datasheet MFU on a known GPU, otherwise the measured GEMM peak in ``dtype``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in DATASHEET_BF16.items():
            if fragment in name:
                return peak, "mfu"
    return measured_gemm_peak(device, dtype), "flop_share"


INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # Llama, Mistral, Qwen2 and SmolLM2 names


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one training forward + backward from its batch shapes, counting only the work the step does (the
    PaLM accounting: 2 FLOPs per multiply-add, a backward pass twice its forward), so the FLOP share stays honest
    for adapter training: frozen weights get no weight gradients, backward stops at the lowest adapted layer,
    attention costs 4 x width x T per token and layer forward (QK^T and AV over the padded length T), and only
    generation runs the LM head. Activation recomputation (gradient checkpointing) is not useful work, as in MFU."""

    layer_params: int
    """Frozen matrix weights of one decoder layer (mean over layers)."""
    layers: int
    backward_layers: int
    """Decoder layers from the lowest adapted one up: the only ones backward runs through."""
    input_params: int
    """Frozen weights of the lowest adapted layer's input projections (q, k, v): its input needs no gradient."""
    width: int
    head_params: int
    """LM head weights: generation's logits, and their backward."""
    adapter_params: int
    """Trainable weights: forward, activation gradient and weight gradient (6 FLOPs per weight and token)."""

    @classmethod
    def of(cls, decoder: torch.nn.Module) -> StepCost:
        """Read from a transformers causal LM whose adapter weights are the parameters that require grad."""
        layers = list(decoder.base_model.layers)
        adapted = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
        frozen = sum(p.numel() for layer in layers for p in layer.parameters() if not p.requires_grad and p.dim() == 2)
        inputs = (
            [
                p
                for name, p in layers[adapted[0]].named_parameters()
                if not p.requires_grad and p.dim() == 2 and any(f"{proj}." in name for proj in INPUT_PROJECTIONS)
            ]
            if adapted
            else []
        )
        return cls(
            layer_params=frozen // max(1, len(layers)),
            layers=len(layers),
            backward_layers=len(layers) - adapted[0] if adapted else 0,
            input_params=sum(p.numel() for p in inputs),
            width=decoder.config.hidden_size,
            head_params=decoder.get_output_embeddings().weight.numel(),
            adapter_params=sum(p.numel() for p in decoder.parameters() if p.requires_grad),
        )

    def flops(self, rows: int, length: int, generative: bool) -> float:
        """FLOPs of forward + backward over a (rows, length) padded batch."""
        backward = self.layer_params * self.backward_layers - self.input_params if self.backward_layers else 0
        dense = 2 * (self.layer_params * self.layers + backward) + 6 * self.adapter_params
        attention = 4 * self.width * length * (self.layers + 2 * self.backward_layers)
        head = 4 * self.head_params if generative else 0
        return float(rows * length * (dense + attention + head))

    def batches(self, emb: dict | None, gen: dict | None) -> float:
        """FLOPs of one micro-batch of the joint objective: queries and passages embed, ``gen`` generates."""
        shapes = ([(emb["q_mask"].shape, False), (emb["p_mask"].shape, False)] if emb else []) + (
            [(gen["mask"].shape, True)] if gen else []
        )
        return sum(self.flops(math.prod(shape[:-1]), shape[-1], generative) for shape, generative in shapes)


def peak_memory_mb(device: torch.device) -> float:
    """This rank's peak memory so far: allocated GPU memory on CUDA, the process's max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


@dataclass
class StepRecord:
    step: int
    lr: float
    seconds: float
    tokens: int
    samples: int
    flops: float
    losses: dict[str, float]
    weights: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    """Rows each task had in this step, summed over ranks and micro-batches: how much of each task a run saw (a
    task at S2Sched's floor can go steps without a row, which its weight alone does not show)."""


class Telemetry:
    """Formats and keeps rank 0's per-step records; ``history`` is what checkpoints and plots are made from."""

    def __init__(
        self,
        tensorboard: str | None,
        peak: tuple[float, str],
        every: int,
        total: int,
        device: torch.device = torch.device("cpu"),
        clock: Callable[[], float] = time.monotonic,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        (self.peak, self.peak_label), self.every, self.total = peak, every, total
        self.device, self._clock, self.dtype = device, clock, dtype
        self._first: tuple[int, float] | None = None
        self.history: list[dict] = []
        self._writer, self._local, self._remote = None, None, None
        if tensorboard is not None:
            from tensorboardX import SummaryWriter

            self._local, self._remote = event_dirs(tensorboard)
            self._writer = SummaryWriter(str(self._local))

    def log(self, record: StepRecord, world_size: int) -> dict[str, float]:
        tokens_per_s = record.tokens * world_size / record.seconds
        self._raise_measured_peak(record.flops / record.seconds)
        share = record.flops / record.seconds / self.peak  # this rank's work over one device's peak
        memory = peak_memory_mb(self.device)
        row = asdict(record) | {"tokens_per_s": tokens_per_s, self.peak_label: share, "peak_mem_mb": memory}
        self.history.append(row)
        if self._writer is not None:
            for task, loss in record.losses.items():
                self._writer.add_scalar(f"loss/{task}", loss, record.step)
            for task, weight in record.weights.items():
                self._writer.add_scalar(f"weight/{task}", weight, record.step)
            self._writer.add_scalar("throughput/tokens_per_s", tokens_per_s, record.step)
            self._writer.add_scalar(f"throughput/{self.peak_label}", share, record.step)
            self._writer.add_scalar("memory/peak_mb", memory, record.step)
        eta = self.eta_s(record.step, record.seconds)
        if record.step % self.every == 0:
            losses = " ".join(f"{t}={v:.3f}" for t, v in record.losses.items())
            mean = sum(record.losses.values()) / max(1, len(record.losses))
            log.info(
                f"step {record.step}/{self.total} | loss {mean:.3f} | eta {clock_text(eta)} | lr {record.lr:.2e} | "
                f"{record.seconds * 1e3:.0f} ms | {tokens_per_s:,.0f} tok/s | "
                f"{record.samples * world_size / record.seconds:.1f} samples/s | {self.peak_label} {share:.1%} | "
                f"peak mem {memory:,.0f} MB | "
                + "".join(f"{k.replace('_', ' ')} {v:.1%} | " for k, v in record.extra.items())
                + losses
            )
        return {"tokens_per_s": tokens_per_s, self.peak_label: share}

    def _raise_measured_peak(self, achieved: float) -> None:
        """A step faster than the measured GEMM peak means the peak was measured while other work held the cores
        (Ray Data's tokenisation at start-up, another job): measure again, and never report over 100 %."""
        if self.peak_label == "flop_share" and achieved > self.peak:
            self.peak = max(measured_gemm_peak(self.device, self.dtype), achieved)

    def eta_s(self, step: int, seconds: float) -> float:
        """Seconds until step ``total`` at the wall-clock rate since this process's first step, so checkpoints,
        reports and scheduler updates count; the step's own time until a second step gives a rate."""
        now = self._clock()
        if self._first is None:
            self._first = (step, now)
        first_step, first_at = self._first
        per_step = (now - first_at) / (step - first_step) if step > first_step else seconds
        return per_step * (self.total - step)

    def sync(self) -> None:
        """Flush the event files and, for a remote storage path, copy them there (at each checkpoint and the end:
        a run's curves survive its node)."""
        if self._writer is None:
            return
        self._writer.flush()
        if self._remote is not None:
            fs, root = url_to_fs(self._remote)
            for path in self._local.iterdir():
                fs.put_file(str(path), posixpath.join(root, path.name))

    def close(self) -> None:
        self.sync()
        if self._writer is not None:
            self._writer.close()


def event_dirs(url: str) -> tuple[Path, str | None]:
    """Where the writer writes and where its files are copied: a local storage path is written in place; a remote
    one (s3://, gs://, ...) through a local folder of the same run name, copied at each ``sync``."""
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return Path(path), None
    return Path(tempfile.gettempdir()) / "recfound-tb" / posixpath.basename(posixpath.dirname(path)), url


def clock_text(seconds: float) -> str:
    """A duration as H:MM:SS, or M:SS under an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def write_history(history: list[dict], out: Path) -> None:
    out.write_text("\n".join(json.dumps(row) for row in history) + "\n")


def plot_history(history: list[dict], out_dir: Path) -> list[Path]:
    """Per-task loss curves and S2Sched weights over time, as PNGs next to the checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, title, name in (("losses", "per-task loss", "losses.png"), ("weights", "S2Sched weights", "weights.png")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        tasks = sorted({t for row in history for t in row[key]})
        for task in tasks:
            points = [(row["step"], row[key][task]) for row in history if task in row[key]]
            ax.plot(*zip(*points), label=task)
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
