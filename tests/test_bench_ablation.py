"""`jobs/benchmark.py ablation`: the recipe against one change of it, same seeds, per-metric differences with paired
intervals. Training and evaluation are the quality benchmark's own functions (tests/test_benchmark.py runs them
at toy size); here they are replaced by recorders that write what jobs/evaluate.py writes, so that what the
ablation adds — which runs it trains under which names and overrides, which evaluations it reuses, and how it
compares the two sides over seeds — is checked exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from recfound.bench import ablation, quality
from recfound.eval.config import EvalConfig
from recfound.eval.runner import PER_QUERY, PREDICTIONS, RESULTS

REFS = ["positive", "negative"] * 10
U2I = {"quality": 0.2, "quality-seed1": 0.4, "quality-no-logq": 0.5, "quality-no-logq-seed1": 0.5}
"""Each run's U2I value on every one of its 20 test queries."""


def _write_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """What jobs/evaluate.py leaves in ``cfg.out`` for model ``ckpt/<run>``: results, per-query values, answers."""
    run = Path(cfg.model).name
    folder = Path(cfg.out)
    (folder / PREDICTIONS).mkdir(parents=True, exist_ok=True)
    answers = REFS if "no-logq" in run else ["positive"] * 20  # the variant reads the evidence
    rows = [
        {"task": "sentiment_analysis", "id": i, "reference": r, "prediction": a}
        for i, (r, a) in enumerate(zip(REFS, answers))
    ]
    (folder / PREDICTIONS / "recfound.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / PER_QUERY).write_text(json.dumps({"recfound": {"u2i": {"pool.mrr@20": [U2I[run]] * 20}}}))
    f1 = 1.0 if "no-logq" in run else 1 / 3
    variant, seed1 = "no-logq" in run, run.endswith("seed1")
    convergence = {  # what eval/convergence.summarize reads from the run's metrics.jsonl
        "target": 0.8,
        "window": 5,
        "tasks": {
            "u2i": {"rows": 80 if variant else 100 + 20 * seed1, "step": 12 if variant else 10},
            "sentiment_analysis": {"rows": 40 if variant else 20, "step": 30 if variant else None},
        },
        "balance": {"converged": 2 if variant else 1, "total": 2, "last": 30 if variant else 10},
    }
    results = {
        "config": cfg.model_dump(mode="json"),
        "systems": {"recfound": {"u2i": {"pool.mrr@20": U2I[run]}, "sentiment_analysis": {"macro_f1": f1}}},
        "convergence": convergence,
    }
    (folder / RESULTS).write_text(json.dumps(results))
    return results


def test_the_variant_is_compared_with_the_recipe_seed_by_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[tuple[str, int, list[str]]] = []
    evaluated: list[str] = []

    def train(config: str, data: str, storage: Path, name: str, seed: int, overrides: list[str]) -> str:
        assert storage == tmp_path / "train"
        trained.append((name, seed, overrides))
        return f"ckpt/{name}"

    monkeypatch.setattr(ablation, "train_recipe", train)
    monkeypatch.setattr(ablation, "trained_tasks", lambda final, data, split: ["u2i", "sentiment_analysis"])
    monkeypatch.setattr(
        quality, "evaluate", lambda cfg: evaluated.append(Path(cfg.model).name) or _write_evaluation(cfg)
    )
    bench = ablation.AblationBench(
        data=str(tmp_path / "data"),
        out=str(tmp_path),
        variant=["loss.logq_tasks=[]"],
        name="no-logq",
        train=["max_steps=128"],
        seeds=[0, 1],
    )
    # The quality benchmark already evaluated the recipe's first seed, with every baseline: reused, not re-run.
    first = EvalConfig(
        model="ckpt/quality",
        data=bench.data,
        out=str(tmp_path / "eval"),
        split="test",
        max_rows_per_task=50,
        max_new_tokens=48,
        tasks=["u2i", "sentiment_analysis"],
        baselines="all",
    )
    _write_evaluation(first)

    report = ablation.run(bench)

    assert trained == [
        ("quality", 0, ["max_steps=128"]),
        ("quality-no-logq", 0, ["max_steps=128", "loss.logq_tasks=[]"]),
        ("quality-seed1", 1, ["max_steps=128"]),
        ("quality-no-logq-seed1", 1, ["max_steps=128", "loss.logq_tasks=[]"]),
    ]
    assert evaluated == ["quality-no-logq", "quality-seed1", "quality-no-logq-seed1"]
    assert sorted(p.name for p in tmp_path.glob("eval*")) == [
        "eval",
        "eval-no-logq",
        "eval-no-logq-seed1",
        "eval-seed1",
    ]
    rows = {r["metric"]: r for r in report.figures["rows"]}
    u2i = rows["pool.mrr@20"]  # recipe 0.2 / 0.4 (mean 0.3, sd 0.1), variant 0.5 / 0.5: +0.2 on every query
    assert (u2i["recipe"], u2i["recipe_sd"], u2i["no-logq"]) == pytest.approx((0.3, 0.1, 0.5))
    assert u2i["difference"] == pytest.approx(0.2) and u2i["interval"] == pytest.approx((0.2, 0.2)) and u2i["settled"]
    f1 = rows["macro_f1"]  # answers re-scored per resample: reading the evidence beats always "positive"
    assert f1["difference"] == pytest.approx(2 / 3) and f1["settled"] and f1["interval"][0] > 0
    assert report.figures["settled_better"] == 2 and report.figures["worse"] == 0
    table = report.render()
    assert "| 0.3 ± 0.1 " in table and "| better " in table and "better (n.s.)" not in table
    # Beside the metrics, what each side trained: rows per task (mean over seeds), steps to the target per seed.
    training = report.tables[1]
    assert training.headers == ["task", "rows recipe", "rows no-logq", "step recipe", "step no-logq"]
    assert training.rows == [
        ["u2i", "110", "80", "10 / 10", "12 / 12"],
        ["sentiment_analysis", "20", "40", "- / -", "30 / 30"],
        ["(tasks reaching it, by step)", "", "", "1/2 by 10 / 1/2 by 10", "2/2 by 30 / 2/2 by 30"],
    ]
    assert report.figures["convergence"]["no-logq"][1]["tasks"]["u2i"]["step"] == 12


def test_the_command_line_takes_the_change_as_variant_keys(benchmark: ModuleType) -> None:
    command, bench, out = benchmark.parse(
        [
            "ablation",
            "data=d",
            "out=o",
            "name=no-logq",
            "variant.loss.logq_tasks=[]",
            "variant.loss.temperature=0.1",
            "train.max_steps=8",
        ]
    )
    assert command == "ablation" and out == "o/ablation.json"
    assert bench.variant == ["loss.logq_tasks=[]", "loss.temperature=0.1"] and bench.train == ["max_steps=8"]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["data=d"], "variant"),
        (["data=d", "variant.optim.lr=1e-3", "name=recipe"], "name"),
        (["data=d", "variant.optim.lr=1e-3", "name=a/b"], "name"),
        (["data=d", "variant.los.logq_tasks=[]"], "los: unknown key"),  # before any training, not after the first
        (["data=d", "variant.optim.lr=1e-3", "train.max_step=3"], "max_step: unknown key"),
        # keys the benchmark sets per run: overriding them would make every seed (or both arms) one run
        (["data=d", "variant.seed=1"], "seed: set by the benchmark"),
        (["data=d", "variant.optim.lr=1e-3", "train.name=x"], "name: set by the benchmark"),
        (["data=d", "variant.storage_path=/x"], "storage_path: set by the benchmark"),
        (["data=d", "variant.optim.lr=1e-3", "train.data=/x"], "data: set by the benchmark"),
    ],
)
def test_an_ablation_without_a_change_or_with_a_bad_key_or_name_is_refused(
    benchmark: ModuleType, argv: list[str], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        benchmark.parse(["ablation", *argv])
