"""What every benchmark shares: interleaved timing, medians, the machine record, tables and the JSON report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from recfound.config import Config

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
PACKAGES = ("torch", "ray", "transformers", "peft", "tokenizers")

Times = dict[str, list[float]]


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Where the figures were taken; the load average says how shared the machine was while they were."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info | {package: _version(package) for package in PACKAGES}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch ops on ``n`` intra-op threads: Ray gives each worker/replica OMP_NUM_THREADS = its CPUs, so an
    in-process reference must use the same count to be like for like."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_sync(device: torch.device) -> None:
    """Wait for queued GPU kernels so a timer stops when the work is done, not when it was launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per case and round on two clocks. Wall time is what a caller waits; process CPU time counts only
    while this process runs, so other tenants of a shared machine inflate it far less (spinning intra-op
    threads still count)."""

    wall: Times
    cpu: Times


def interleaved(
    cases: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1, after: Callable[[], None] = lambda: None
) -> Timing:
    """Every round runs every case once, starting from a different case each round, so load that drifts on a
    shared machine lands on all cases alike; ``after`` runs inside the timer (a device sync). Warm-up rounds
    (allocator, caches, lazy inits) are not recorded."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
            after()
    timing = Timing({name: [] for name in names}, {name: [] for name in names})
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            cases[name]()
            after()
            timing.cpu[name].append(time.process_time() - cpu)
            timing.wall[name].append(time.perf_counter() - wall)
    return timing


def top_ops(step: Callable[[], None], n: int = 8) -> list[dict[str, float | str | int]]:
    """The operators that took most self time while ``step`` ran (torch.profiler): the evidence behind a ratio."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
    return [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count}
        for e in ops
    ]


def counted_flops(step: Callable[[], object]) -> int:
    """FLOPs of ``step`` as torch's FlopCounterMode counts them: matmuls and attention, forward and backward.
    torch registers its SDPA formulas for the GPU kernels only; the CPU flash kernels get the same formulas."""
    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda grad, q, k, v, *_, **__: (
            sdpa_backward_flop_count(grad, q, k, v)
        ),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        step()
    return counter.get_total_flops()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a/b taken in the same round: a load spike inflates both sides of one pair."""
    return median([x / y for x, y in zip(a, b, strict=True)])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples p99 is the slowest one, not a guess)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def fmt(value: float | None, digits: int = 3) -> str:
    """A table cell: 3 significant digits, thousands separated; ``-`` when not measured."""
    if value is None or value != value:
        return "-"
    if abs(value) >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]

    def render(self) -> str:
        widths = [max(len(str(c)) for c in column) for column in zip(self.headers, *self.rows)]
        line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([f"{self.title}", "", line(self.headers), rule, *(line(r) for r in self.rows)])


class Better(str, Enum):
    LOWER = "lower"
    HIGHER = "higher"


@dataclass(frozen=True)
class Target:
    """A figure the issue sets a bound on; reported as met or missed, never used to tune anything."""

    name: str
    key: str
    bound: float
    better: Better

    def check(self, value: float | None) -> dict[str, Any]:
        met = (
            None
            if value is None or value != value
            else (value <= self.bound if self.better is Better.LOWER else value >= self.bound)
        )
        return {
            "target": self.name,
            "key": self.key,
            "value": value,
            "bound": self.bound,
            "better": self.better.value,
            "met": met,
        }


@dataclass
class Report:
    """One benchmark's result: the JSON written to ``--out`` and the tables printed."""

    benchmark: str
    config: dict[str, Any]
    ratios: dict[str, float]
    figures: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine_info)

    def check(self, targets: Sequence[Target]) -> None:
        values = self.ratios | {k: v for k, v in self.figures.items() if isinstance(v, float | int)}
        self.targets = [t.check(values.get(t.key)) for t in targets]
        verdict = {True: "met", False: "MISSED", None: "not measured"}
        rows = [
            [t["target"], fmt(t["value"]), f"{'≤' if t['better'] == 'lower' else '≥'} {t['bound']}", verdict[t["met"]]]
            for t in self.targets
        ]
        if rows:
            self.tables.append(Table("Targets", ["target", "measured", "bound", "verdict"], rows))

    def render(self) -> str:
        head = (
            f"{self.benchmark} benchmark | {self.machine['cpu']} | {self.machine['usable_cores']} cores | "
            f"load {self.machine['load_average']} | torch {self.machine['torch']} | {self.machine['date']}"
        )
        return "\n\n".join([head, *(t.render() for t in self.tables), *self.notes])

    def write(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")
        return out


# --- command line ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, cls: type[Config]) -> None:
    """One ``--flag`` per field of a benchmark's config, documented by the field docstring. Values stay strings
    and pydantic converts them, so the config class is the only place types and defaults are written."""
    for name, spec in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = spec.get_default(call_default_factory=True)
        shown = (
            "required" if spec.is_required() else f"default: {default.value if isinstance(default, Enum) else default}"
        )
        doc = f"{spec.description or ''} ({shown})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": doc}
        args = typing.get_args(spec.annotation)
        if spec.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(spec.annotation) is list:
            kwargs |= {"nargs": "+", "action": "extend"}  # repeated flags add up
        elif typing.get_origin(spec.annotation) is typing.Literal:
            kwargs["choices"] = list(args)
        parser.add_argument(flag, **kwargs)


def config_from(cls: type[Config], namespace: argparse.Namespace) -> Config:
    return cls.model_validate({k: v for k, v in vars(namespace).items() if k in cls.model_fields})
