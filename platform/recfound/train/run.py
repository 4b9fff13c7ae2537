"""The training job's driver: check everything that can be checked, then start Ray and run the TorchTrainer.

Every check that needs no cluster (dataset, tasks, batch sizes, storage) runs before ``ray.init`` so a bad run
fails in seconds with a message, not after a cluster has been scheduled.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import posixpath
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from recfound.allocator import allocator_env_vars
from recfound.artifacts import TENSORBOARD_DIR
from recfound.io import exists, read_json
from recfound.ray_start import RAY_CONSOLE_LEVEL, start_ray
from recfound.tasks import DATASET_MANIFEST, Mode, mode_of
from recfound.train.config import TrainConfig
from recfound.train.console import worker_env_vars
from recfound.train.popularity import ItemPrior
from recfound.train.streams import small_tasks

if TYPE_CHECKING:
    from ray.train import ScalingConfig

NAMESPACE = "recfound"
LOCAL_RAY_TRAIN = {
    # How often Ray Train's controller polls its workers (default 2 s): a run's end, and a failure, is noticed up to
    # that late. Measured on the Magazine slice (tiny, 2 workers, 2 cores): the job ends 4 s sooner at 0.5 s.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # The preemption watcher (one more actor process, started with the workers) reports spot nodes going away; a
    # local instance has no other node to lose. Without it the job ends another 1.5 s sooner.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
"""Ray Train settings of a local instance's runs (a cluster keeps Ray's defaults); a variable the user set wins."""


class RunError(RuntimeError):
    """A run that cannot start or did not finish; the message says why."""


@dataclass(frozen=True)
class Plan:
    """What the validated config resolves to: the dataset, the tasks and their sizes, where the run lives."""

    data: str
    tasks: list[str]
    rows: dict[str, int]
    name: str
    storage_path: str
    resume: bool


def _dataset(cfg: TrainConfig) -> str:
    if cfg.data:
        return cfg.data
    from recfound.data.builder import BuildConfig, build

    out = BuildConfig().out
    if not exists(f"{out}/{DATASET_MANIFEST}"):
        print(f"no data= given: building the synthetic default dataset into {out}", flush=True)
        build(BuildConfig())
    return out


def _storage(path: str) -> str:
    """Absolute local path or URL; proven writable now rather than at the first checkpoint."""
    fs, root = url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        path = root = str(Path(root).resolve())
    probe = f"{root}/.recfound-write-probe-{uuid.uuid4().hex}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except OSError as err:
        raise RunError(f"storage_path {path} cannot be written: {err}") from err
    return path


def plan(cfg: TrainConfig) -> Plan:
    if cfg.zero_stage and importlib.util.find_spec("deepspeed") is None:
        raise RunError(
            f"zero_stage={cfg.zero_stage} needs DeepSpeed: pip install --no-build-isolation 'recfound[zero]'"
        )
    data = _dataset(cfg)
    if isinstance(url_to_fs(data)[0], LocalFileSystem):
        data = str(Path(data).resolve())  # workers need not share the driver's working directory
    if not exists(f"{data}/{DATASET_MANIFEST}"):
        raise RunError(f"data={data}: no {DATASET_MANIFEST}; build it with jobs/build_dataset.py")
    built = read_json(f"{data}/{DATASET_MANIFEST}")["tasks"]
    tasks = cfg.tasks or list(built)
    for task in tasks:
        mode_of(task)
        if task not in built:
            raise RunError(f"task {task} has no data in {data} (built: {', '.join(built)})")
        if built[task]["train"] < cfg.num_workers:
            raise RunError(
                f"task {task} has {built[task]['train']} train rows, fewer than num_workers={cfg.num_workers}"
            )
    rows = {t: built[t]["train"] for t in tasks}
    for mode, size in ((Mode.EMBEDDING, cfg.batch.embedding), (Mode.GENERATIVE, cfg.batch.generative)):
        available = sum(n for t, n in rows.items() if mode_of(t) is mode)
        if size and not available:
            article = "an" if mode is Mode.EMBEDDING else "a"
            raise RunError(
                f"batch.{mode.value}={size} but none of the tasks {tasks} is {article} {mode.value} task with train "
                f"rows; set batch.{mode.value}=0 to train without one"
            )
        if available and size * cfg.num_workers > available:
            raise RunError(
                f"batch.{mode.value}={size} per worker x {cfg.num_workers} workers cannot be met by "
                f"{available} {mode.value} train rows; lower the batch or the worker count"
            )
    storage = _storage(cfg.storage_path)
    name = cfg.name or datetime.now().strftime("recfound-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
    fs, root = url_to_fs(storage)
    return Plan(data, tasks, rows, name, storage, resume=fs.exists(f"{root}/{name}"))


def _init_ray(cfg: TrainConfig) -> None:
    """Start or join Ray with a quiet console (train/console.py), then say once where Ray's own logs are."""
    import ray

    if ray.is_initialized():
        return
    # A local Ray gets enough logical CPUs for the workers plus one for Ray Data's tokenisation tasks, and the
    # dashboard (where available): Ray Train's placement-group cleaner polls the state API it serves, and without it
    # logs a warning every few seconds (start-up time measured the same with and without).
    needed = int(cfg.num_workers * cfg.cpus_per_worker) + 1
    local = {key: value for key, value in LOCAL_RAY_TRAIN.items() if key not in os.environ}
    context = start_ray(
        env_vars=worker_env_vars() | allocator_env_vars(),
        local_env_vars=local,
        num_cpus=max(os.cpu_count() or 1, needed),
        echo=True,
    )
    dashboard = f", dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
    print(f"ray: logs in {context.address_info['session_dir']}/logs{dashboard}", flush=True)


def item_prior(plan: Plan, cfg: TrainConfig) -> ItemPrior | None:
    """The embedding tasks' positive counts (every trained one draws the in-batch negatives) when the loss corrects
    some task for them (``loss.logq_tasks``)."""
    if not cfg.loss.logq_tasks:
        return None
    return ItemPrior.from_dataset(plan.data, [t for t in plan.tasks if mode_of(t) is Mode.EMBEDDING])


def _datasets(plan: Plan, cfg: TrainConfig) -> dict:
    """Tokenised training datasets, one per task of the plan (``read_parquet`` + ``map_batches(tokenize)``)."""
    from recfound.data.task_datasets import task_datasets
    from recfound.train.batches import tokenize

    backbone = cfg.model.backbone.model_dump()
    return {
        task: ds.map_batches(tokenize, batch_size=64, fn_kwargs={"backbone": backbone, "task": task})
        for task, ds in task_datasets(plan.data, "train", plan.tasks).items()
    }


def scaling_config(cfg: TrainConfig) -> ScalingConfig:
    """Worker count (a (min, max) range for elastic DDP), per-worker resources and placement across nodes."""
    from ray.train import ScalingConfig

    workers = cfg.num_workers if cfg.min_workers is None else (cfg.min_workers, cfg.num_workers)
    return ScalingConfig(
        num_workers=workers,
        use_gpu=cfg.use_gpu,
        placement_strategy=cfg.placement_strategy.value,
        resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker},
    )


def run(cfg: TrainConfig) -> str:
    """Train; return the final checkpoint's path (the job prints it as its last line)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from recfound.train.halt import clear_halt, halt_url, read_halt
    from recfound.train.s2sched import S2Sched, get_or_create_scheduler
    from recfound.train.worker import WorkerArgs, train_worker

    p = plan(cfg)
    print(
        f"{'resuming' if p.resume else 'starting'} run {p.name} in {p.storage_path} on tasks {', '.join(p.tasks)}",
        flush=True,
    )
    _init_ray(cfg)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    # A fixed row order makes "skip the rows this epoch already consumed" exact on resume (same worker count).
    data_context.execution_options.preserve_order = True
    scheduler_name = f"s2sched-{p.name}"
    # The driver holds the handle for the whole fit: a named actor without handles is garbage collected.
    scheduler = get_or_create_scheduler(scheduler_name, NAMESPACE, p.tasks, p.rows, cfg.scheduler)
    halt = halt_url(p.storage_path, p.name)
    clear_halt(halt)
    # Small tasks are read by the workers themselves (train/streams.py): no Ray Data execution for them.
    small = small_tasks(p.rows, cfg.batch.small_task_rows)
    datasets = _datasets(dataclasses.replace(p, tasks=[t for t in p.tasks if t not in small]), cfg)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "args": WorkerArgs(
                cfg=cfg,
                tasks=p.tasks,
                data=p.data,
                scheduler=scheduler_name,
                namespace=NAMESPACE,
                # A fresh scheduler's state, computed here: asking the actor would wait for its process to start.
                scheduler_initial=S2Sched(p.tasks, p.rows, cfg.scheduler).state_dict(),
                halt=halt,
                tensorboard=posixpath.join(p.storage_path.rstrip("/"), p.name, TENSORBOARD_DIR),
                prior=item_prior(p, cfg),
                small_tasks=small,
            )
        },
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=p.name,
            storage_path=p.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=LoggingConfig(log_level=RAY_CONSOLE_LEVEL),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    halted = read_halt(halt)
    ray.kill(scheduler)
    if result.error is not None:
        raise RunError(f"run {p.name} failed: {result.error}")
    if halted:
        kept = result.checkpoint.path if result.checkpoint else "none yet"
        raise RunError(f"run {p.name} stopped: {halted}; the last good checkpoint is kept: {kept}")
    if result.checkpoint is None:
        raise RunError(f"run {p.name} finished without a checkpoint")
    return result.checkpoint.path
