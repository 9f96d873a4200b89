"""One run: obtain the teacher → train the student → compress → measure → write results.json.

``run(cfg)`` tells the story; each step hands the part it calls the config node it needs and
gets back what the part decided. Everything that can be checked without training (values,
models, layer paths, the method's output, the compression) is checked first, in ``prepare``,
so bad input fails with one line and leaves nothing behind. The config is never edited.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillab import build, job, loggers, results, slots, stacked, training
from distillab.conf import resolved
from distillab.config import ConfigError, validate
from distillab.data import adapter
from distillab.distill import cotraining, transfer
from distillab.distill.methods import base as method_contract
from distillab.measure import MeasureSettings
from distillab.settings import Count, Seed
from distillab.settings import build as settings_of
from distillab.steps import assembly, compression, export, fit, resume
from distillab.steps.teacher import assistant, cache, ensemble, outputs
from distillab.steps.teacher import training as teacher_training
from distillab.steps.teacher.ensemble import EnsembleSettings

log = logging.getLogger(__name__)

# Lightning's start-up banner ("GPU available: …", tips) is noise in a sweep's logs
for _name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# metrics are logged once per epoch, and in-memory batches need no worker processes
warnings.filterwarnings("ignore", message=r".*(does not have many workers|smaller than the logging interval).*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The run's own keys; ``teachers``, ``teacher_assistant``: ``conf/model`` options (ensemble, assistant)."""

    seed: Seed
    num_threads: Count | None
    rerun: bool
    teachers: list[str] | None
    teacher_assistant: str | None


@dataclasses.dataclass
class Parts:
    """What a run is made of, all built (and so checked) before any training."""

    settings: RunSettings
    data: Any  # any LightningDataModule
    info: adapter.DataInfo
    student: nn.Module
    teacher: nn.Module  # untrained: the cache or training fills it
    teacher_nodes: list[DictConfig]  # the teacher's node, or one per member of an ensemble
    method: nn.Module
    names: dict[str, str]  # the run's choice per group: distill, compress, teacher, student
    out: Path
    peers: list[nn.Module] = dataclasses.field(default_factory=list)  # a co-training cohort, student first
    assistant: tuple[DictConfig, nn.Module] | None = None  # a teacher assistant's node and model


# -- the run ------------------------------------------------------------------------------------------
def run(cfg: DictConfig, raise_on_failure: bool | None = None) -> dict[str, Any]:
    """Run one experiment and return its results (also written to results.json).

    A bad configuration raises ``ConfigError`` before anything is written. A later failure (NaN loss,
    a crash) is recorded as ``status: failed`` with a one-line error, then re-raised for a single run
    and swallowed in a sweep. A sweep job with a complete result returns it (``resume.start``).
    """
    raise_on_failure = not job.is_multirun() if raise_on_failure is None else raise_on_failure
    start, out = time.perf_counter(), Path(cfg.paths.output_dir)
    try:
        validate(cfg)
        settings = run_settings(cfg)
        slots.configure_job(cfg.trainer, settings.num_threads)  # threads and GPU slot in a parallel sweep
        handoff, key = stacked.handoff(out), results.config_hash(cfg)  # a stacked group's member: resumed there
        done = None if handoff else resume.start(out, key, settings.rerun, cfg.get("logger"), job.is_multirun())
        if done is not None:
            return done
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        # before any model is built: the student's initial weights depend on the seed only
        pl.seed_everything(settings.seed, workers=True, verbose=False)
        record = execute(cfg, handoff.parts if handoff else prepare(cfg, settings), start)
    except Exception as error:  # noqa: BLE001 - every failure is recorded, then re-raised or logged
        # bad input of a single run leaves nothing behind; in a sweep the report lists it
        if raise_on_failure and isinstance(error, ConfigError):
            raise
        record = results.failure(error, job.overrides(), cfg.get("seed"))
        if job.is_rank_zero():
            results.write(out, record)
        if raise_on_failure:
            raise
        log.error("run failed: %s", record["error"])
    return record


def run_settings(cfg: DictConfig) -> RunSettings:
    return _settings(
        RunSettings, {key: cfg[key] for key in ("seed", "num_threads", "rerun", "teachers", "teacher_assistant")}
    )


def prepare(cfg: DictConfig, settings: RunSettings | None = None, data: Any = None) -> Parts:
    """Build the data (unless given, already built), the models and the method; try each on one batch."""
    settings = settings or run_settings(cfg)
    data = build.part("data", cfg.data) if data is None else data
    info = adapter.prepare(data, settings.seed)
    log.info("data %s", info.description)
    teacher_training.check_data(data, cfg.teacher.recipe)
    student, method = build.model("student", cfg.student, info), build.part("distill", cfg.distill)
    names = {group: _name(group, cfg[group]) for group in ("distill", "compress", "teacher", "student")}
    cotraining.check(cfg, method, names["distill"])
    make = lambda role: build.model(role, cfg[role], info)  # noqa: E731 - the other peers, fresh
    peers = cotraining.build_peers(method, student, make) if method_contract.cotrains(method) else []
    helper = assistant.check(cfg, method, names["distill"], job.config_dirs())
    target, members, mixing = compress_target(cfg), settings.teachers or [], _settings(EnsembleSettings, cfg.ensemble)
    feature = names["distill"] if method_contract.is_feature_method(method) else None
    init_from_teacher = cfg.student.init is not None and target != "teacher"
    ensemble.check(
        members, mixing, feature, cfg.teacher.ckpt_path, target == "teacher", init_from_teacher, job.config_dirs()
    )
    nodes = ensemble.member_nodes(members, cfg.teacher, job.config_dirs()) if members else [cfg.teacher]
    if members:
        models = [build.teacher(node, info) for node in nodes]
        teacher: nn.Module = ensemble.build(models, members, mixing, method_contract.temperature(method))
    else:
        teacher = build.teacher(cfg.teacher, info)
        if cfg.teacher.ckpt_path:  # a file that is not this teacher's state_dict fails now
            cache.load_checkpoint_file(copy.deepcopy(teacher), cfg.teacher.ckpt_path)
    example = adapter.example(data)
    pair = (helper, build.teacher(helper, info)) if helper is not None else None
    source = pair[1] if pair else teacher  # whom the student learns from: the assistant when there is one
    if method_contract.is_feature_method(method):
        # layers are resolved and regressors built from one batch now: a wrong path fails first
        size = adapter.train_size(data) if method_contract.needs_index(method) else None
        method.bind(student, source if method_contract.needs_teacher(method) else None, example, train_size=size)
    method_contract.check_method(method, student, source, example)
    outputs.decide(_settings(outputs.OutputSettings, cfg.teacher_outputs), data, method)
    if init_from_teacher:
        transfer.check(student, source, (names["student"], names["teacher"]))
    if target is not None:
        model = student if target == "student" else teacher
        compression.dry_run(cfg.compress, names["compress"], model, data, info.input_shape)
    out = Path(cfg.paths.output_dir)
    return Parts(settings, data, info, student, teacher, nodes, method, names, out, peers, pair)


def execute(cfg: DictConfig, parts: Parts, start: float) -> dict[str, Any]:
    """Obtain the teacher, train the student, compress, measure, write results.json."""
    fitting = _fitting(cfg, parts)
    together = method_contract.cotrains(parts.method)
    teacher = None if together else stacked.teacher(parts.out) or obtain_teacher(cfg, parts, fitting)
    helper = None
    if parts.assistant is not None:
        helper = assistant.obtain(cfg, *parts.assistant, parts.data, teacher, fitting)
    timing = {"teacher": sum(t.seconds for t in (teacher, helper) if t), "student": 0.0, "compress": 0.0}
    student, best_epoch, init, run_loggers, mode = None, None, None, [], "none"
    # compressing the teacher is a baseline without a student: "a smaller teacher" vs "a student"
    if compress_target(cfg) != "teacher":
        fitted, init, cotrained = fit.student(cfg, parts, helper or teacher, fitting)
        teacher = cotrained or teacher
        student, best_epoch, run_loggers, mode = parts.student, fitted.best_epoch, fitted.loggers, fitted.mode
        timing["teacher"] += fitted.table_seconds
        timing["student"] = fitted.seconds
    if not job.is_rank_zero():
        # a rank of a job launched once per device (torchrun, srun) has done its share, the
        # distributed fit; compression, measurement and results.json are rank 0's
        log.info("rank %d: training done; rank 0 compresses, measures and writes results", job.rank())
        return {"status": "ok", "rank": job.rank()}
    compressed = None
    if compress_target(cfg) is not None:
        tick = time.perf_counter()
        compressed = compress(cfg, parts, student if student is not None else teacher.model, fitting)
        timing["compress"] = time.perf_counter() - tick
    header = assembly.header(
        cfg,
        job.overrides(),
        parts.settings.seed,
        parts.info.name,
        parts.data,
        parts.names["distill"] if student is not None else "none",
        parts.names["compress"],
    )
    how = dataclasses.asdict(_settings(MeasureSettings, cfg.measure))
    record = assembly.assemble(
        header,
        teacher,
        student,
        parts.names["student"],
        best_epoch,
        compressed,
        parts.data,
        parts.info,
        how,
        mode,
        Path(cfg.paths.root_dir),
        assistant=helper,
        peers=[(parts.names[r], peer) for r, peer in zip(method_contract.peer_roles(parts.method), parts.peers)],
    )
    if "student" in record:
        # regressors and embeddings of feature methods train with the student but are not deployed
        record["student"]["extra_params"] = sum(p.numel() for p in parts.method.parameters())
        if init is not None:
            record["student"]["init"] = init
    record |= export.run(cfg.get("export"), student, compressed, parts.data, parts.info.input_shape, how, parts.out)
    timing["total"] = time.perf_counter() - start
    record["timing_s"] = {key: round(value, 3) for key, value in timing.items()}
    stacked.complete(parts.out, record)  # a stacked job: its group's fields and its share of the group's fit
    path = results.write(parts.out, record)
    log.info("\n%s", results.summary_table(record))
    log.info("results written to %s", path)
    loggers.finish(run_loggers, results.flatten(record))
    return record


# -- the steps ----------------------------------------------------------------------------------------
def obtain_teacher(cfg: DictConfig, parts: Parts, fitting: training.Fitting | None = None) -> cache.Teacher:
    """The trained teacher, from the cache or trained now; an ensemble member by member."""
    fitting = fitting or _fitting(cfg, parts)

    def obtain(model: nn.Module, node: DictConfig, role: str) -> cache.Teacher:
        data, classes = parts.data, parts.info.num_classes
        return teacher_training.obtain(model, node, data, classes, cfg.data, cfg.paths.cache_dir, fitting, role)

    if not isinstance(parts.teacher, ensemble.Ensemble):
        found = obtain(parts.teacher, cfg.teacher, "teacher")
        found.arch = parts.names["teacher"]
        return found
    return ensemble.obtain(
        parts.teacher,
        parts.teacher_nodes,
        _settings(EnsembleSettings, cfg.ensemble),
        lambda model, node, name: obtain(model, node, f"teacher-{name}"),
    )


def compress(cfg: DictConfig, parts: Parts, model: nn.Module, fitting: training.Fitting) -> compression.CompressedRun:
    """Step 6: compress ``model``, fine-tuning with the run's method, optimizer and trainer."""
    role = str(cfg.compress.target)
    finetuning = compression.Finetuning(
        lambda: method_contract.for_finetuning(build.part("distill", cfg.distill)), cfg.optim, fitting
    )
    return compression.run(
        cfg.compress,
        parts.names["compress"],
        role,
        parts.names[role],
        model,
        parts.data,
        parts.info.input_shape,
        finetuning,
        parts.out,
        dataclasses.asdict(_settings(MeasureSettings, cfg.measure)),
    )


# -- building blocks ----------------------------------------------------------------------------------
def compress_target(cfg: DictConfig) -> str | None:
    """Which model step 6 compresses: ``student``, ``teacher``, or None for ``compress=none``."""
    return None if not (cfg.compress.get("_target_") or cfg.compress.get("steps")) else str(cfg.compress.target)


def _name(group: str, node: DictConfig) -> str:
    """The option chosen for ``group`` (``distill=kd`` → kd); an architecture by its name (``cnn``,
    ``torchvision:resnet18``); outside Hydra, the name of what the node builds."""
    if group in ("teacher", "student"):
        return cache.arch_name(node, job.choice(group))
    if not node.get("_target_") and not node.get("steps"):
        return "none"
    return job.choice(group) or str(node.get("_target_")).rsplit(".")[-1]


def _settings(kind: type, node: Any) -> Any:
    """The settings dataclass ``kind`` from a config node, with its interpolations resolved."""
    return settings_of(kind, resolved(node))


def _fitting(cfg: DictConfig, parts: Parts) -> training.Fitting:
    return training.Fitting(cfg.trainer, cfg.get("callbacks"), parts.out, lambda role: _loggers(cfg, role))


def _loggers(cfg: DictConfig, role: str) -> list:
    """The run's loggers for one role (teacher, student), each recording the resolved config."""
    group = loggers.sweep_group(job.sweep_dir()) if job.is_multirun() else None
    return loggers.build(cfg.get("logger"), role, OmegaConf.to_container(cfg, resolve=True), group)
