"""jobs/evaluate.py end to end on the synthetic dataset with a tiny saved GRM (no Ray): results, report, compare,
convergence of a checkpoint, and a clear error for each bad input."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recfound.data.templates import ITEM_INSTRUCTIONS
from recfound.eval.baselines.common import resolve_query_items
from recfound.eval.metrics import GENERATIVE_METRICS
from recfound.eval.report import headline
from recfound.eval.systems import GRMSystem, resolve_model
from recfound.model.backbone import BackboneConfig
from recfound.model.formats import encode_embedding
from recfound.model.grm import GRM
from recfound.model.tmole import TMoLEConfig
from recfound.tasks import EMBEDDING_TASKS, GENERATIVE_TASKS
from recfound.train import checkpoint

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("popularity", "bm25", "item_cf", "backbone")
FAST = ["max_rows_per_task=3", "max_new_tokens=3"]
HISTORY = [{"step": s, "losses": {"u2i": 4.0 - s, "q2i": 3.0}, "weights": {"u2i": 0.5, "q2i": 0.5}} for s in (1, 2, 3)]


def _load_job():
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JOB = _load_job()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: tiny matmuls run faster without intra-op threads
    yield
    torch.set_num_threads(threads)


def tiny_grm(**adapter) -> GRM:
    """A tiny GRM whose adapter is perturbed (B != 0), so it differs from its backbone."""
    torch.manual_seed(0)
    backbone = BackboneConfig(max_query_len=128, max_passage_len=96, max_generative_len=192)
    grm = GRM.build(backbone, TMoLEConfig(r=4, alpha=8, task_dim=16, **adapter))
    with torch.no_grad():
        for p in grm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return grm.eval()


def save_checkpoint(root: Path, grm: GRM, trained: list[str]) -> Path:
    """A training checkpoint (the engine's optimizer state left out), manifest last."""
    root.mkdir(parents=True, exist_ok=True)
    checkpoint.save(
        root, grm, {"step": 3, "seed": 0, "streams": {t: {} for t in trained}}, {"weights_history": []}, HISTORY
    )
    return root


def run_job(*args: str) -> int:
    return JOB.main([str(a) for a in args])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("adapter")
    tiny_grm().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def evaluated(synthetic_dataset: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    assert (
        run_job(
            f"model={adapter}", f"data={synthetic_dataset}", f"out={out}", f"baselines={','.join(BASELINES)}", *FAST
        )
        == 0
    )
    return out


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_results_name_every_system_and_score_every_embedding_task_by_both_protocols(evaluated: Path) -> None:
    systems = results(evaluated)["systems"]
    assert set(systems) == {"recfound", *BASELINES}
    for name in ("recfound", "backbone", "popularity", "bm25", "item_cf"):
        for task in EMBEDDING_TASKS:
            if name == "item_cf" and task == "q2i":
                assert task not in systems[name]  # item-CF needs an item to start from
                continue
            metrics = systems[name][task]
            assert headline(task) in metrics, (name, task)
            assert {"full.recall@10", "full.recall@50", "full.ndcg@10", "full.mrr"} <= set(metrics)
            assert all(0.0 <= v <= 1.0 for v in metrics.values()), (name, task, metrics)
    # the perturbed adapter is not the backbone (3 u2i queries alone may rank the same under both tiny models)
    assert {t: systems["recfound"][t] for t in EMBEDDING_TASKS} != {t: systems["backbone"][t] for t in EMBEDDING_TASKS}


def test_per_query_values_are_written_beside_the_means_they_average_to(evaluated: Path) -> None:
    """per_query.json holds every embedding and list metric per query (null where undefined) in row order: the
    quality benchmark's paired intervals resample them, so their means must be results.json's figures."""
    res, per_query = results(evaluated), json.loads((evaluated / "per_query.json").read_text())
    assert set(per_query) == set(res["systems"])
    for name, tasks in per_query.items():
        for task, metrics in tasks.items():
            for metric, values in metrics.items():
                defined = [v for v in values if v is not None]
                assert len(values) in (res["queries"].get(task), res["lists"].get(task)), (name, task, metric)
                assert sum(defined) / len(defined) == pytest.approx(res["systems"][name][task][metric])
    assert set(per_query["bm25"]["candidate_ranking"]) == {"list.auc", "list.ndcg@10"}
    assert "full.mrr" in per_query["recfound"]["u2i"] and "binary_f1" not in per_query["recfound"]["candidate_ranking"]


def test_generative_tasks_are_decoded_and_scored_for_the_grm_systems_only(evaluated: Path, synthetic_dataset: Path):
    res = results(evaluated)
    built = json.loads((synthetic_dataset / "manifest.json").read_text())["tasks"]
    generative = [t for t in GENERATIVE_TASKS if built.get(t, {}).get("test")]
    for name in ("recfound", "backbone"):
        assert set(res["systems"][name]) == set(EMBEDDING_TASKS) | set(generative)
        assert all(0.0 <= res["systems"][name][t][headline(t)] <= 1.0 for t in generative)
        lines = (evaluated / "predictions" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == sum(min(3, built[t]["test"]) for t in generative)
    # a baseline never decodes: its one generative-task entry is candidate_ranking's lists
    assert set(res["systems"]["bm25"]) & set(generative) == {"candidate_ranking"}
    assert set(res["systems"]["bm25"]["candidate_ranking"]) == {"list.auc", "list.ndcg@10"}
    assert {res["queries"][t] for t in generative} <= {1, 2, 3}


def test_candidate_lists_are_ranked_by_the_grms_and_every_u2i_baseline(evaluated: Path) -> None:
    res = results(evaluated)
    assert res["lists"] == {"candidate_ranking": 3}  # max_rows_per_task lists
    for name in ("recfound", "backbone", "popularity", "bm25", "item_cf"):
        metrics = res["systems"][name]["candidate_ranking"]
        assert 0 <= metrics["list.auc"] <= 1 and 0 <= metrics["list.ndcg@10"] <= 1, (name, metrics)
    for name in ("recfound", "backbone"):  # the GRMs rank by P(yes) as well (this tiny adapter's embeddings tie)
        metrics = res["systems"][name]["candidate_ranking"]
        assert 0 <= metrics["list_generative.auc"] <= 1 and 0 < metrics["list_generative.ndcg@10"] <= 1, metrics
    assert "binary_f1" in res["systems"]["recfound"]["candidate_ranking"]  # the yes/no rows, decoded as well
    assert res["systems"]["recfound"]["candidate_ranking"] != res["systems"]["backbone"]["candidate_ranking"]
    report = (evaluated / "report.md").read_text()
    lists = report.split("### Candidate lists")[1].split("###")[0]
    assert all(f"| {name} |" in lists for name in ("recfound", "backbone", "popularity", "bm25", "item_cf"))
    assert "Candidate lists ranked per task: candidate_ranking 3." in report
    assert (evaluated / "lists.png").read_bytes()[:4] == b"\x89PNG"


def test_report_and_plots_are_written(evaluated: Path) -> None:
    report = (evaluated / "report.md").read_text()
    assert "### Embedding, paper protocol" in report and "### Average rank" in report
    assert all(f"| {name} |" in report for name in ("recfound", *BASELINES))
    for png in ("pool.png", "full.png", "generative.png"):
        assert (evaluated / png).read_bytes()[:4] == b"\x89PNG"


def test_grm_system_embeds_items_with_the_item_instruction_and_queries_with_their_own(synthetic_dataset: Path) -> None:
    grm = tiny_grm()
    items = pd.read_parquet(synthetic_dataset / "items.parquet")
    rows = pd.read_parquet(synthetic_dataset / "tasks" / "q2i" / "test.parquet").head(3)
    system = GRMSystem("recfound", grm, batch_size=2)
    system.fit(items, pd.DataFrame())
    scorer = system.scorer("q2i", rows)
    task = grm.task_ids(["q2i"])
    with torch.inference_mode():
        item = grm.embed(encode_embedding(grm.tokenizer, [ITEM_INSTRUCTIONS["q2i"]], [items["text"][5]], 96), task)
        query_side = [rows["query_instruction"][1]], [rows["query"][1]]
        query = grm.embed(encode_embedding(grm.tokenizer, *query_side, 128), task)
    np.testing.assert_allclose(scorer.items[5], item[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(scorer.queries[1], query[0].numpy(), atol=1e-5)


def test_compare_merges_results_dirs_and_training_runs(evaluated: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "s2sched", tmp_path / "uniform"
    shutil.copytree(evaluated, first)
    other = results(evaluated)
    other["systems"]["recfound"]["u2i"]["pool.mrr@20"] = 0.99
    other["systems"]["bm25"]["u2i"]["full.mrr"] = 0.5  # as if bm25 ran on other data: kept apart per run
    second.mkdir()
    (second / "results.json").write_text(json.dumps(other))
    run = tmp_path / "size_proportional"
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    (run / "checkpoint_2026-01-01_00-00-00.000000" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in HISTORY)
    )
    out = tmp_path / "cmp"
    assert run_job("--compare", first, second, run, f"out={out}", "convergence_window=1") == 0
    merged = results(out)
    systems = merged["systems"]
    assert {"s2sched", "uniform", "popularity", "item_cf", "backbone", "s2sched:bm25", "uniform:bm25"} == set(systems)
    assert systems["uniform"]["u2i"]["pool.mrr@20"] == 0.99 != systems["s2sched"]["u2i"]["pool.mrr@20"]
    assert merged["convergence"]["size_proportional"]["tasks"]["u2i"]["step"] == 2  # 3 -> 2.4: loss 2 at step 2
    report = (out / "report.md").read_text()
    assert "| s2sched |" in report and "Steps to target per task" in report
    assert (out / "convergence.png").is_file() and (out / "size_proportional" / "losses.png").is_file()


def test_a_checkpoint_reports_its_convergence_and_must_have_trained_the_tasks(
    synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint_2026-01-01_00-00-00.000000", tiny_grm(), ["u2i"])
    assert run_job(f"model={ckpt}", f"data={synthetic_dataset}", f"out={tmp_path / 'a'}") == 1
    assert "never trained q2i, i2i" in capsys.readouterr().err
    out = tmp_path / "b"  # the run directory resolves to its latest checkpoint
    assert (
        run_job(
            f"model={tmp_path / 'run'}",
            f"data={synthetic_dataset}",
            f"out={out}",
            "tasks=u2i",
            "baselines=none",
            "protocols=pool",
            "convergence_window=1",
        )
        == 0
    )
    res = results(out)
    assert set(res["systems"]) == {"recfound"} and set(res["systems"]["recfound"]["u2i"]) == {"pool.mrr@20"}
    assert res["model_kind"] == "checkpoint"
    assert {t: c["step"] for t, c in res["convergence"]["tasks"].items()} == {"u2i": 2, "q2i": None}
    assert (out / "losses.png").is_file() and (out / "weights.png").is_file()
    assert "## Training convergence" in (out / "report.md").read_text()


def _without_test_rows(dataset: Path, out: Path) -> Path:
    shutil.copytree(dataset, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tasks"] = {t: c | {"test": 0} for t, c in manifest["tasks"].items()}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _unloadable(adapter: Path, out: Path) -> Path:
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["backbone"] |= {"name": "hf", "path": "/nonexistent/Mistral-7B-Instruct-v0.3"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tasks_missing", "adapter has no task i2i"),
        ("no_test_rows", "split=test of"),
        ("task_without_rows", "tasks: answer_generation has no test rows"),
        ("offline", "cannot load the model offline (backbone hf (/nonexistent/Mistral-7B-Instruct-v0.3))"),
        ("no_model", "no such file or directory"),
        ("torn_checkpoint", "never completed"),
        ("no_dataset", "no manifest.json"),
    ],
)
def test_bad_inputs_fail_with_a_message_naming_the_problem(
    case: str, message: str, adapter: Path, synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model, data, extra = adapter, synthetic_dataset, []
    if case == "tasks_missing":
        model = tmp_path / "two_tasks"
        tiny_grm(tasks=["u2i", "q2i", "sentiment_analysis"]).save_pretrained(str(model))
    elif case == "no_test_rows":
        data = _without_test_rows(synthetic_dataset, tmp_path / "data")
    elif case == "task_without_rows":
        extra = ["tasks=u2i,answer_generation"]
    elif case == "offline":
        model = _unloadable(adapter, tmp_path / "offline")
    elif case == "no_model":
        model = tmp_path / "missing"
    elif case == "torn_checkpoint":
        model = tmp_path / "torn"
        shutil.copytree(adapter, model / "adapter")
    elif case == "no_dataset":
        data = tmp_path
    assert run_job(f"model={model}", f"data={data}", f"out={tmp_path / 'out'}", "baselines=none", *FAST, *extra) == 1
    assert message in capsys.readouterr().err


def test_help_documents_every_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_job("--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for key in (
        "model",
        "data",
        "out",
        "split",
        "tasks",
        "baselines",
        "protocols",
        "max_rows_per_task",
        "max_new_tokens",
        "seed",
        "compare",
        "convergence_target",
    ):
        assert f"  {key} (" in text, key


def test_i2i_rows_name_their_anchor_item_and_item_cf_uses_it(synthetic_dataset: Path) -> None:
    items = pd.read_parquet(synthetic_dataset / "items.parquet")
    rows = pd.read_parquet(synthetic_dataset / "tasks" / "i2i" / "test.parquet")
    text = dict(zip(items["item_id"], items["text"]))
    assert (rows["query"] == rows["query_item"].map(text)).all()
    assert (pd.read_parquet(synthetic_dataset / "tasks" / "u2i" / "test.parquet")["query_item"] == "").all()
    garbled = rows.assign(query="no item has this text")
    assert resolve_query_items(garbled, items) == rows["query_item"].tolist()


def test_generative_metrics_read_the_builders_response_formats(synthetic_dataset: Path) -> None:
    for task, metrics in GENERATIVE_METRICS.items():
        path = synthetic_dataset / "tasks" / task / "test.parquet"
        if path.is_file():
            refs = pd.read_parquet(path)["response"].tolist()
            assert [metric(refs, refs) for metric in metrics] == pytest.approx([1.0] * len(metrics)), task
    # a sentiment no reference has is still a class: its false positive counts
    (sentiment,) = GENERATIVE_METRICS["sentiment_analysis"]
    assert sentiment(["positive", "very negative"], ["positive"] * 2) == pytest.approx(1 / 3)
    (option,) = GENERATIVE_METRICS["sequential_recommendation"]
    assert option(["C: the kettle", "(b)"], ["C", "B"]) == 1.0


def test_resolve_model_reads_a_merged_artifact(adapter: Path, tmp_path: Path) -> None:
    shutil.copytree(adapter, tmp_path / "adapter")
    (tmp_path / "manifest.json").write_text("{}")
    source = resolve_model(str(tmp_path))
    assert source.kind.value == "merged" and source.history is None and source.trained_tasks is None
