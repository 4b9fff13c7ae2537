"""A training run is checked before Ray starts: dataset, task names, batch sizes, storage, configs."""

from pathlib import Path

import pytest

from recfound.allocator import ray_jemalloc
from recfound.config import ConfigError, load_config
from recfound.train.config import TrainConfig
from recfound.train.run import RunError, plan, scaling_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "smollm2.yaml", "paper.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(TrainConfig, str(CONFIGS / name))
    assert cfg.max_steps > 0


def _cfg(data: Path, tmp: Path, **over: object) -> TrainConfig:
    base = load_config(TrainConfig, str(CONFIGS / "tiny.yaml"), [f"data={data}", f"storage_path={tmp / 'runs'}"])
    return base.model_copy(update=over)


def test_plan_resolves_tasks_rows_and_a_fresh_name(synthetic_dataset: Path, tmp_path: Path) -> None:
    p = plan(_cfg(synthetic_dataset, tmp_path))
    assert {"u2i", "q2i", "i2i", "sentiment_analysis"} <= set(p.tasks)
    assert all(p.rows[t] > 0 for t in p.tasks)
    assert p.name.startswith("recfound-") and not p.resume
    assert plan(_cfg(synthetic_dataset, tmp_path)).name != p.name


def test_unknown_or_missing_task_is_rejected(synthetic_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'u2x'"):
        plan(_cfg(synthetic_dataset, tmp_path, tasks=["u2x"]))
    with pytest.raises(RunError, match="answer_generation has no data"):
        plan(_cfg(synthetic_dataset, tmp_path, tasks=["u2i", "answer_generation"]))


def test_batch_that_cannot_be_met_is_rejected(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(synthetic_dataset, tmp_path)
    cfg.batch.embedding = 10**6
    with pytest.raises(RunError, match="batch.embedding=1000000 .* cannot be met"):
        plan(cfg)


def test_a_batch_for_a_mode_no_task_has_names_the_key_that_turns_it_off(
    synthetic_dataset: Path, tmp_path: Path
) -> None:
    """A recipe's embedding batch with a generative-only task list (e.g. quality.yaml with tasks=[...]) is refused
    before Ray starts, and the error says how to run it."""
    with pytest.raises(
        RunError, match=r"none of the tasks \['sentiment_analysis'\] is an embedding task.*batch.embedding=0"
    ):
        plan(_cfg(synthetic_dataset, tmp_path, tasks=["sentiment_analysis"]))


def test_unwritable_storage_and_missing_dataset(synthetic_dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunError, match="cannot be written"):
        plan(_cfg(synthetic_dataset, tmp_path).model_copy(update={"storage_path": str(blocker / "sub")}))
    with pytest.raises(RunError, match="no manifest.json"):
        plan(_cfg(tmp_path, tmp_path))


def test_scaling_config_places_workers_with_their_resources() -> None:
    cfg = load_config(
        TrainConfig,
        str(CONFIGS / "tiny.yaml"),
        [
            "num_workers=4",
            "min_workers=2",
            "cpus_per_worker=2",
            "placement_strategy=SPREAD",
            "resources_per_worker={trainer_node: 1}",
        ],
    )
    scaling = scaling_config(cfg)
    assert scaling.num_workers == (2, 4) and scaling.placement_strategy == "SPREAD"
    assert scaling.resources_per_worker == {"CPU": 2.0, "trainer_node": 1.0}
    with pytest.raises(ConfigError, match="set CPUs with cpus_per_worker"):
        load_config(TrainConfig, str(CONFIGS / "tiny.yaml"), ["resources_per_worker={CPU: 4}"])


def test_the_driver_checks_a_config_without_importing_the_model_code() -> None:
    """What a driver imports to check a config, plan a run and name the workers' function loads neither peft nor
    transformers' model classes (about 3 s of start-up on 2 cores); the workers import them."""
    import subprocess
    import sys

    probe = (
        "import sys; import recfound.train.config, recfound.train.run, recfound.train.worker; "
        "print(sorted(m for m in ('peft', 'transformers.modeling_utils', 'recfound.model.grm') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_local_ray_gets_quicker_ray_train_settings_and_a_cluster_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local instance's runs poll their workers every 0.5 s and start no preemption watcher (the job ends ~5 s
    sooner); a variable the user set wins, and a cluster (RAY_ADDRESS) keeps Ray's defaults. Both preload Ray's
    jemalloc in the workers (recfound/allocator.py)."""
    import types

    import ray

    from recfound.train import run as run_module
    from recfound.train.run import LOCAL_RAY_TRAIN

    inits: list[dict] = []
    context = types.SimpleNamespace(dashboard_url=None, address_info={"session_dir": "/tmp/none"})
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: inits.append(kwargs) or context)
    cfg = load_config(TrainConfig, str(CONFIGS / "tiny.yaml"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    run_module._init_ray(cfg)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    run_module._init_ray(cfg)
    local, cluster = (init["runtime_env"].get("env_vars", {}) for init in inits)
    assert local["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == LOCAL_RAY_TRAIN["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in local  # the user's 3 s is what Ray reads
    assert not set(LOCAL_RAY_TRAIN) & set(cluster)
    assert local["LD_PRELOAD"] == cluster["LD_PRELOAD"] == str(ray_jemalloc())  # every worker on jemalloc
