"""Smoke runs of jobs/benchmark.py: every subcommand at a minimal size runs and writes its ratios to JSON.

Nothing here asserts a timing (the figures are for the README's Performance section). One local Ray serves the
train, data and serve subcommands, and each Ray Data run streams a single task: pipelines cost start-up time on
2 cores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import ray

pytestmark = pytest.mark.slow

JOB = Path(__file__).resolve().parents[1] / "jobs" / "benchmark.py"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _run(benchmark: ModuleType, out: Path, *argv: str) -> dict[str, Any]:
    assert benchmark.main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _assert_report(report: dict[str, Any], ratios: set[str]) -> None:
    assert ratios <= set(report["ratios"]), sorted(report["ratios"])
    assert all(math.isfinite(v) and v > 0 for k, v in report["ratios"].items() if k in ratios), report["ratios"]
    assert {"cpu", "cores", "torch", "ray", "transformers", "date"} <= set(report["machine"])
    assert report["config"] and report["targets"] and all(t["met"] is not None for t in report["targets"])


def test_help_lists_every_option(benchmark: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    for command, flag in (
        ("adapter", "--backbone"),
        ("train", "--steps"),
        ("data", "--users"),
        ("serve", "--concurrency"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main([command, "--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out


@pytest.mark.parametrize("form", [["seeds=[0,1]"], ["seeds=0,1"], ["--seeds", "0", "1"], ["seeds=0", "seeds=1"]])
def test_list_options_take_every_command_line_form(benchmark: ModuleType, form: list[str]) -> None:
    """A list key written as YAML (``[0,1]``, the form train overrides take), comma-joined or repeated."""
    command, bench, _ = benchmark.parse(["quality", "data=d", "out=o", *form])
    assert command == "quality" and bench.seeds == [0, 1]


def test_adapter(benchmark: ModuleType, tmp_path: Path) -> None:
    report = _run(
        benchmark,
        tmp_path / "adapter.json",
        "adapter",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--rounds",
        "2",
        "--warmup",
        "1",
    )
    _assert_report(
        report,
        {
            "tmole_vs_lora_train",
            "tmole_vs_frozen_train",
            "lora_vs_frozen_train",
            "tmole_vs_lora_peak_memory",
            "folded_vs_expert_sum_infer",
            "folded_vs_lora_infer",
            "expert_sum_vs_lora_infer",
        },
    )
    assert report["figures"]["trainable_params"]["frozen"] == 0


def test_train(benchmark: ModuleType, local_ray: None, synthetic_dataset: Path, tmp_path: Path) -> None:
    report = _run(
        benchmark,
        tmp_path / "train.json",
        "train",
        "--steps",
        "3",
        "--skip",
        "1",
        "--storage",
        str(tmp_path / "runs"),
        "--overrides",
        f"data={synthetic_dataset}",
        "tasks=[sentiment_analysis]",
        "batch.embedding=0",
        "batch.generative=2",
    )
    _assert_report(report, {"trainer_vs_plain_step", "trainer_vs_plain_wall", "trainer_vs_plain_time_per_token"})
    assert {"s2sched_share", "data_wait_share", "flop_share"} <= set(report["figures"])


def test_data(benchmark: ModuleType, local_ray: None, tmp_path: Path) -> None:
    report = _run(
        benchmark,
        tmp_path / "data.json",
        "data",
        "--users",
        "30",
        "--items",
        "20",
        "--queries",
        "10",
        "--rounds",
        "1",
        "--train-steps",
        "2",
        "--skip",
        "0",
        "--out-dir",
        str(tmp_path / "data"),
        "--overrides",
        "tasks=[u2i]",
        "batch.embedding=4",
        "batch.generative=0",
        "--scaling",
        "2000",
        "500",
        "1000",
        "--scaling-shards",
        "2",
        "--nodes-reviews",
        "500",
    )
    ratios = {"ray_data_vs_train", "build_vs_train", "build_peak_pss_largest_vs_middle", "build_two_nodes_vs_one"}
    _assert_report(report, ratios)
    scaling = report["figures"]["scaling"]
    assert [b["reviews"] for b in scaling] == [500, 1000, 2000]
    assert all(b["rows"] > 0 and b["seconds"] > 0 and b["peak_rss"] >= b["peak_pss"] > 0 for b in scaling)
    assert any(t["title"].startswith("Build scaling") and len(t["rows"]) == 3 for t in report["tables"])
    # the same dump joined to a one-node, then a two-node cluster: the same rows either way
    nodes = report["figures"]["nodes"]
    assert [b["rows"] for b in nodes] == [scaling[0]["rows"]] * 2 and all(b["seconds"] > 0 for b in nodes)
    assert any(t["title"].startswith("One vs two local nodes") and len(t["rows"]) == 2 for t in report["tables"])


def test_serve(benchmark: ModuleType, local_ray: None, tmp_path: Path) -> None:
    report = _run(
        benchmark,
        tmp_path / "serve.json",
        "serve",
        "--concurrency",
        "1",
        "2",
        "--requests",
        "4",
        "--completion-requests",
        "2",
        "--max-tokens",
        "2",
        "--rounds",
        "1",
        "--breakdown-rounds",
        "2",
        "--users",
        "30",
        "--items",
        "20",
        "--out-dir",
        str(tmp_path / "serve"),
    )
    levels = {f"{e}_serve_vs_direct_c{c}" for e in ("embeddings", "completions") for c in (1, 2)}
    _assert_report(report | {"targets": [t for t in report["targets"] if t["key"].endswith("c1")]}, levels)
    assert "embeddings_added_p50_ms_c1" in report["figures"]
    first = report["figures"]["first_token_p50_ms"]
    assert set(first) == {"engine stream, in process", "HTTP stream: true"} and all(ms > 0 for ms in first.values())
    assert report["ratios"]["stream_first_token_vs_bound"] > 0


def test_quality_verdicts_compare_each_model_with_each_baseline() -> None:
    from recfound.bench.verdicts import verdicts

    systems = {
        "recfound": {
            "u2i": {"pool.mrr@20": 0.5, "full.ndcg@10": 0.1},
            "q2i": {"pool.mrr@20": 0.2},
            "sentiment_analysis": {"macro_f1": 0.4},
            "user_profile": {"rouge_l": 0.2},
        },
        "merged": {"u2i": {"pool.mrr@20": 0.3}},
        "popularity": {"u2i": {"pool.mrr@20": 0.4, "full.ndcg@10": 0.2}},
        "bm25": {"q2i": {"pool.mrr@20": 0.3}, "u2i": {"pool.mrr@20": 0.5}},
        "item_cf": {"q2i": {"pool.mrr@20": 0.0}},  # item-CF is no Q2I baseline: never compared there
        "majority": {"sentiment_analysis": {"macro_f1": 0.1}},
        "backbone": {"sentiment_analysis": {"macro_f1": 0.5}, "user_profile": {"rouge_l": 0.1}},
    }
    rows = {
        (r["task"], r["metric"], r["baseline"]): (r["recfound_wins"], r["merged_wins"])
        for r in verdicts(systems, ["recfound", "merged"])
    }
    assert rows == {
        ("u2i", "pool.mrr@20", "popularity"): (True, False),
        ("u2i", "pool.mrr@20", "bm25"): (False, False),  # a tie is no win
        ("u2i", "full.ndcg@10", "popularity"): (False, None),  # merged has no value there
        ("q2i", "pool.mrr@20", "bm25"): (False, None),
        ("sentiment_analysis", "macro_f1", "majority"): (True, None),
        ("sentiment_analysis", "macro_f1", "backbone"): (False, None),
        ("user_profile", "rouge_l", "backbone"): (True, None),
    }


def test_quality_verdicts_rank_candidate_lists_against_the_retrieval_baselines_too() -> None:
    from recfound.bench.verdicts import verdicts

    systems = {
        "recfound": {"candidate_ranking": {"binary_f1": 0.6, "list.ndcg@10": 0.5}},
        "popularity": {"candidate_ranking": {"list.ndcg@10": 0.4}},
        "item_cf": {"candidate_ranking": {"list.ndcg@10": 0.7}},
        "majority": {"candidate_ranking": {"binary_f1": 0.667}},
        "backbone": {"candidate_ranking": {"binary_f1": 0.3, "list.ndcg@10": 0.3}},
    }
    rows = {(r["metric"], r["baseline"]): r["recfound_wins"] for r in verdicts(systems, ["recfound"])}
    assert rows == {
        ("binary_f1", "majority"): False,
        ("binary_f1", "backbone"): True,
        ("list.ndcg@10", "backbone"): True,
        ("list.ndcg@10", "popularity"): True,
        ("list.ndcg@10", "item_cf"): False,
    }


def test_quality_verdicts_average_seeds_and_carry_paired_intervals(tmp_path: Path) -> None:
    """Two seeds' evaluations (per-query values and answers, as jobs/evaluate.py writes them) against baselines:
    a model's figure is its seeds' mean, its interval comes from the paired per-query differences (or, for a corpus
    metric, from re-scoring resampled answers), and a difference the queries do not support is not settled."""
    from recfound.bench.verdicts import MAJORITY, Evidence, add_majority, mean_over_seeds, verdict_cell, verdicts
    from recfound.eval.runner import PER_QUERY, PREDICTIONS

    labels = ["positive", "negative"] * 10
    for seed, (u2i, answers) in enumerate([([0.6] * 20, labels), ([0.4] * 20, ["positive"] * 20)]):
        folder = tmp_path / f"eval{seed}"
        (folder / PREDICTIONS).mkdir(parents=True)
        per_query = {"recfound": {"u2i": {"pool.mrr@20": u2i[:-1] + [None]}}}
        if seed == 0:  # baselines are evaluated once
            per_query |= {"popularity": {"u2i": {"pool.mrr@20": [0.3] * 19 + [None]}}}
            per_query |= {"minilm": {"u2i": {"pool.mrr@20": [0.0, 1.0] * 10}}}
        (folder / PER_QUERY).write_text(json.dumps(per_query))
        rows = [
            {"task": "sentiment_analysis", "id": i, "reference": r, "prediction": a}
            for i, (r, a) in enumerate(zip(labels, answers))
        ]
        (folder / PREDICTIONS / "recfound.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evidence = Evidence()
    evidence.add_evaluation(tmp_path / "eval0")
    evidence.add_evaluation(tmp_path / "eval1")
    scores = [
        {"u2i": {"pool.mrr@20": 0.6}, "sentiment_analysis": {"macro_f1": 1.0}},
        {"u2i": {"pool.mrr@20": 0.4}, "sentiment_analysis": {"macro_f1": 1 / 3}},
    ]
    mean, spread = mean_over_seeds(scores)
    assert mean["u2i"]["pool.mrr@20"] == pytest.approx(0.5) and spread["u2i"]["pool.mrr@20"] == pytest.approx(0.1)
    systems = {"recfound": mean, "popularity": {"u2i": {"pool.mrr@20": 0.3}}, "minilm": {"u2i": {"pool.mrr@20": 0.5}}}
    add_majority(systems, evidence, {"sentiment_analysis": "positive"})
    assert systems[MAJORITY]["sentiment_analysis"]["macro_f1"] == pytest.approx(1 / 3)
    rows = {(r["baseline"], r["metric"]): r for r in verdicts(systems, ["recfound"], evidence)}
    popularity = rows["popularity", "pool.mrr@20"]
    assert popularity["recfound_wins"] and popularity["recfound_settled"]
    assert popularity["recfound_interval"] == pytest.approx((0.2, 0.2))  # per query: mean of seeds 0.5 vs 0.3
    minilm = rows["minilm", "pool.mrr@20"]  # 0.5 on average too, but query by query a coin flip
    assert minilm["recfound_wins"] is False and minilm["recfound_settled"] is False
    majority = rows[MAJORITY, "macro_f1"]  # seed 0 reads the evidence, seed 1 answers the majority
    assert majority["recfound_wins"] and majority["recfound_settled"] and 0 < majority["recfound_interval"][0]
    assert verdict_cell(True, True) == "win" and verdict_cell(False, False) == "LOSE (n.s.)"


def test_quality_refuses_a_mistyped_recipe_key_before_training(benchmark: ModuleType) -> None:
    with pytest.raises(ValueError, match="max_step: unknown key"):
        benchmark.parse(["quality", "data=d", "train.max_step=3"])


def test_quality_reuses_a_finished_evaluation_only_when_its_settings_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-run with one more seed must not pay for the evaluations it already has; a changed setting, another
    model, a baseline it did not run, or an evaluation torn before its last file is run again."""
    from recfound.bench import quality
    from recfound.eval.config import EvalConfig
    from recfound.eval.runner import PER_QUERY, RESULTS

    runs: list[EvalConfig] = []
    monkeypatch.setattr(quality, "evaluate", lambda cfg: runs.append(cfg) or {"config": "fresh"})
    cfg = EvalConfig(model=str(tmp_path / "ckpt"), data=str(tmp_path / "data"), out=str(tmp_path / "eval"))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / RESULTS).write_text(json.dumps({"config": cfg.model_dump(mode="json"), "systems": {}}))
    assert quality.evaluate_once(cfg)["config"] == "fresh" and len(runs) == 1  # torn: no per_query.json
    (tmp_path / "eval" / PER_QUERY).write_text("{}")
    assert quality.evaluate_once(cfg)["systems"] == {} and len(runs) == 1  # finished, same settings: reused
    assert quality.evaluate_once(cfg.model_copy(update={"max_rows_per_task": 7}))["config"] == "fresh"
    assert quality.evaluate_once(cfg.model_copy(update={"model": str(tmp_path / "other")}))["config"] == "fresh"
    assert len(runs) == 3
    # Baselines aside: one that ran more of them serves one asking for fewer (an ablation reads the model's own
    # figures), never the other way round.
    assert quality.evaluate_once(cfg.model_copy(update={"baselines": ["bm25"]}))["systems"] == {} and len(runs) == 3
    assert quality.evaluate_once(cfg.model_copy(update={"baselines": ["minilm"]}))["config"] == "fresh"
    assert len(runs) == 4


def test_quality(benchmark: ModuleType, local_ray: None, synthetic_dataset: Path, tmp_path: Path) -> None:
    """The whole quality pipeline at toy size: train, merge, evaluate, verdicts (key=value arguments, as issued)."""
    out = tmp_path / "quality"
    assert (
        benchmark.main(
            [
                "quality",
                f"data={synthetic_dataset}",
                f"out={out}",
                f"config={JOB.parents[1] / 'configs' / 'tiny.yaml'}",
                "train.max_steps=2",
                "train.checkpoint_every=1",
                "train.num_workers=1",
                "train.tasks=[u2i,q2i,sentiment_analysis]",
                "max_rows_per_task=2",
                "max_new_tokens=2",
            ]
        )
        == 0
    )
    report = json.loads((out / "quality.json").read_text())
    verdicts = report["figures"]["verdicts"]
    compared = {(v["task"], v["baseline"]) for v in verdicts}
    assert {
        ("u2i", "popularity"),
        ("u2i", "minilm"),
        ("q2i", "bm25"),
        ("sentiment_analysis", "majority"),
        ("sentiment_analysis", "backbone"),
    } <= compared
    assert all(isinstance(v["recfound_wins"], bool) and "merged" in v for v in verdicts)
    u2i = next(v for v in verdicts if (v["task"], v["metric"], v["baseline"]) == ("u2i", "pool.mrr@20", "popularity"))
    low, high = u2i["recfound_interval"]  # from the evaluation's per-query values
    assert low <= u2i["recfound"] - u2i["baseline_value"] <= high and isinstance(u2i["recfound_settled"], bool)
    assert report["figures"]["comparisons"] == len(verdicts) and (out / "merged" / "adapter").is_dir()
    # With vs without Model Merge: the merged model against the final checkpoint it came from, paired per query.
    paired = {(r["task"], r["metric"]): r for r in report["figures"]["merged_vs_final"]["rows"]}
    row = paired["u2i", "pool.mrr@20"]
    assert (row["recfound"], row["merged"]) == pytest.approx((u2i["recfound"], u2i["merged"]))  # the verdicts' means
    assert row["difference"] == pytest.approx(u2i["merged"] - u2i["recfound"])
    assert row["interval"][0] <= row["difference"] <= row["interval"][1] and isinstance(row["settled"], bool)
    assert ("sentiment_analysis", "macro_f1") in paired
    assert any(t["title"].startswith("The merged model vs the final checkpoint") for t in report["tables"])


def test_exit(benchmark: ModuleType, synthetic_dataset: Path, tmp_path: Path) -> None:
    """Early exit on a tiny saved GRM (2 layers: exit 1 is half depth), key=value arguments as issued: throughput
    ratio and pool metric per layer, the half-depth target checked (the tiny model's figure means nothing)."""
    import torch

    from recfound.model.backbone import BackboneConfig
    from recfound.model.grm import GRM

    torch.manual_seed(0)
    GRM.build(BackboneConfig(max_query_len=128, max_passage_len=96)).save_pretrained(str(tmp_path / "adapter"))
    report = _run(
        benchmark,
        tmp_path / "exit.json",
        "exit",
        f"model={tmp_path / 'adapter'}",
        f"data={synthetic_dataset}",
        "rows=8",
        "texts=8",
        "rounds=2",
        "batch_size=8",
    )
    _assert_report(report, {"exit1_vs_full", "exit_half_vs_full"})
    figures = report["figures"]
    assert figures["depth"] == 2 and figures["layers"] == [1, 2]
    tasks = set(figures["headline"]["2"])
    assert tasks == {"u2i", "q2i", "i2i"} and set(figures["metric_loss_half"]) == tasks
    assert all(0 <= v <= 1 for layer in figures["headline"].values() for v in layer.values())
    assert all(v == 0 for v in figures["metric_loss"]["2"].values())  # full depth against itself
    assert len(report["tables"][0]["rows"]) == 2
    with pytest.raises(ValueError, match="layers=3: the backbone has 2 decoder layers"):
        benchmark.main(["exit", f"model={tmp_path / 'adapter'}", f"data={synthetic_dataset}", "layers=1,3"])


def test_export(benchmark: ModuleType, synthetic_dataset: Path, tmp_path: Path) -> None:
    """int8 (PyTorch and ONNX) vs fp32 exports of a tiny merged model on u2i: every variant exported, loaded and
    ranked by the pool protocol; fp32 against itself is the identity, int8 stays close (the speed means nothing)."""
    pytest.importorskip("onnxruntime")
    from test_export import make_merged

    from recfound.model.backbone import BackboneConfig

    backbone = BackboneConfig(name="tiny", max_query_len=128, max_passage_len=96, max_generative_len=64)
    merged = make_merged(tmp_path, backbone, ["u2i", "q2i", "sentiment_analysis"])
    argv = ["export", f"model={merged}", f"data={synthetic_dataset}", "tasks=u2i", "rows=8", "texts=8", "rounds=2"]
    report = _run(benchmark, tmp_path / "export.json", *argv)
    _assert_report(report, {"int8_vs_fp32", "int8_all_vs_fp32", "int8_onnx_vs_fp32", "u2i_int8_onnx_vs_fp32"})
    assert all(k.isidentifier() for k in report["ratios"]), report["ratios"]
    figures = report["figures"]
    cosine, loss = figures["cosine_to_fp32"]["u2i"], figures["relative_metric_loss"]["u2i"]
    assert cosine["fp32"] == pytest.approx(1.0, abs=1e-5) and loss["fp32"] == 0
    assert 0.9 < cosine["int8"] < 1 and 0.9 < cosine["int8-all"] < 1 and 0.9 < cosine["int8-onnx"] <= 1
    assert all(0 <= v <= 1 for v in figures["headline"]["u2i"].values()) and figures["queries"] == {"u2i": 8}
    assert len(report["tables"][0]["rows"]) == 4
    intervals = figures["relative_metric_loss_interval"]["u2i"]  # of each variant's loss; none for fp32 itself
    assert set(intervals) == {"int8", "int8-all", "int8-onnx"}
    assert all(low <= loss[v] <= high for v, (low, high) in intervals.items()), (intervals, loss)
    # both int8 deployments judged on speed, loss and the loss's upper bound; int8-all (a diagnosis) is not
    judged = {t["key"] for t in report["targets"]}
    assert judged == {
        f"{v}_{k}" for v in ("int8", "int8_onnx") for k in ("vs_fp32", "metric_loss", "metric_loss_upper")
    }
    assert figures["int8_onnx_metric_loss_upper"] == intervals["int8-onnx"][1]
    with pytest.raises(ValueError, match="tasks: i2i cannot be scored"):
        benchmark.main(["export", f"model={merged}", f"data={synthetic_dataset}", "tasks=i2i"])


def test_configs(benchmark: ModuleType, local_ray: None, synthetic_dataset: Path, tmp_path: Path) -> None:
    """Each config trained a few steps: its row of s/step, tokens/s and peak memory, from the run's telemetry."""
    tiny = str(JOB.parents[1] / "configs" / "tiny.yaml")
    overrides = ["train.tasks=[u2i,sentiment_analysis]", "train.num_workers=1"]
    argv = ["configs", f"configs={tiny}", f"data={synthetic_dataset}", "steps=3", "skip=1", *overrides]
    report = _run(benchmark, tmp_path / "configs.json", *argv, "--storage", str(tmp_path / "runs"))
    row = report["figures"]["configs"][tiny]
    assert row["steps"] == 2 and row["backbone"] == "tiny" and row["workers"] == 1
    assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and 0 < row[row["peak_label"]] and row["peak_mem_mb"] > 0
    assert row["outside_steps_s"] > 0  # Ray Train's start and the checkpoint, at least
    assert [r[0] for r in report["tables"][0]["rows"]] == ["tiny.yaml"]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["steps=3", "skip=3"], "leaves none of the 3 steps"),
        (["train.name=x"], "set by the benchmark"),
        (["train.batch.embeding=4"], "embeding"),
    ],
    ids=["no step measured", "a per-run key", "a mistyped key"],
)
def test_configs_refuses_before_any_run(benchmark: ModuleType, argv: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        benchmark.main(["configs", *argv])


def test_configs_reports_a_run_that_failed_and_goes_on(benchmark: ModuleType, tmp_path: Path) -> None:
    """A config whose run fails on this machine (out of memory, say) is a row saying why, not a lost report."""
    tiny = str(JOB.parents[1] / "configs" / "tiny.yaml")
    argv = ["configs", f"configs={tiny}", f"data={tmp_path}", "steps=3", "skip=1"]  # no dataset there
    report = _run(benchmark, tmp_path / "configs.json", *argv)
    assert "manifest" in report["figures"]["configs"][tiny]["error"]
    assert report["tables"][0]["rows"][0][-1].startswith("failed: data=")
