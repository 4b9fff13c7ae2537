"""Compare mode: several evaluated or trained runs side by side in one report (e.g. S2Sched vs uniform
scheduling), their recfound systems named by directory and their training convergence compared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recfound.artifacts import read_metrics
from recfound.eval.config import EvalConfig, EvalError
from recfound.eval.convergence import find_history, summarize
from recfound.eval.report import write_report
from recfound.eval.runner import MODEL, RESULTS, json_ready


def _label(path: Path, taken: set[str]) -> str:
    """A run's name in the report: its directory name, with the parent's when that is ambiguous."""
    label = path.resolve().name
    if label in taken or label.startswith("checkpoint_"):
        label = f"{path.resolve().parent.name}/{label}"
    return label


def _merge_systems(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each run's recfound under the run's label; a baseline once under its own name when every run that has it
    agrees (same data and split), otherwise once per run as ``<label>:<baseline>``."""
    merged: dict[str, Any] = {label: res["systems"][MODEL] for label, res in runs.items() if MODEL in res["systems"]}
    names = dict.fromkeys(name for res in runs.values() for name in res["systems"] if name != MODEL)
    for name in names:
        values = {label: res["systems"][name] for label, res in runs.items() if name in res["systems"]}
        first = next(iter(values.values()))
        if all(v == first for v in values.values()):
            merged[name] = first
        else:
            merged |= {f"{label}:{name}": v for label, v in values.items()}
    return merged


def compare(cfg: EvalConfig) -> dict[str, Any]:
    """One report over several runs: evaluation results side by side and their training convergence."""
    runs: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict]] = {}
    for entry in cfg.compare:
        path = Path(entry)
        label = _label(path, set(runs))
        if (path / RESULTS).is_file():
            res = json.loads((path / RESULTS).read_text())
            history = Path(res["history"]) if res.get("history") else None
        elif path.exists():
            res, history = {"systems": {}}, find_history(path)
            if history is None:
                raise EvalError(f"compare: {entry} holds neither {RESULTS} nor a training run's metrics.jsonl")
        else:
            raise EvalError(f"compare: {entry}: no such directory")
        if history is not None and history.is_file():
            histories[label] = read_metrics(history)
            res["convergence"] = summarize(histories[label], cfg.convergence_target, cfg.convergence_window)
        runs[label] = res
    results = {
        "systems": _merge_systems(runs),
        "runs": {label: {k: res.get(k) for k in ("model", "data", "split", "seed")} for label, res in runs.items()},
        "convergence": {label: res["convergence"] for label, res in runs.items() if "convergence" in res},
    }
    results = json_ready(results)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(results, indent=2))
    write_report(results, out, histories, compare=True)
    return results
