"""One run: obtain the teacher → train the student → compress → measure → write results.json.

``run(cfg)`` tells the story. Preparing a run reads the config once into a typed plan
(``steps.plan``); each step hands the part it calls the values or the config node it needs and
gets back what the part decided; only the config hash and the loggers see the whole config.
Everything that can be checked without training (values, models, layer paths, the method's
output, the compression) is checked first, in ``prepare``, so bad input fails with one line and
leaves nothing behind. The config is never edited.
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

from distillab import build, job, loggers, results, slots, training
from distillab.config import ConfigError, validate
from distillab.data import adapter
from distillab.distill import transfer
from distillab.distill.methods import base as method_contract
from distillab.steps import assembly, compression, export, fit, peers, plan, resume
from distillab.steps.handoff import Handoff
from distillab.steps.teacher import assistant, cache, ensemble, outputs
from distillab.steps.teacher import training as teacher_training
from distillab.steps.teacher.assistant import KEY

log = logging.getLogger(__name__)

# Lightning's start-up banner ("GPU available: …", tips) is noise in a sweep's logs
for _name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# metrics are logged once per epoch, and in-memory batches need no worker processes
warnings.filterwarnings("ignore", message=r".*(does not have many workers|smaller than the logging interval).*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@dataclasses.dataclass
class Parts:
    """What a run is made of, all built (and so checked) before any training."""

    plan: plan.Plan
    data: Any  # any LightningDataModule
    info: adapter.DataInfo
    student: nn.Module
    teacher: nn.Module  # untrained: the cache or training fills it
    teacher_nodes: list[DictConfig]  # the teacher's node, or one per member of an ensemble
    method: nn.Module
    names: dict[str, str]  # the run's choice per group: distill, compress, teacher, student
    out: Path
    peers: list[nn.Module] = dataclasses.field(default_factory=list)  # a co-training cohort, student first
    assistant: tuple[assistant.Assistant, nn.Module] | None = None  # a teacher assistant and its model


# -- the run ------------------------------------------------------------------------------------------
def run(cfg: DictConfig, raise_on_failure: bool | None = None, handoff: Handoff | None = None) -> dict[str, Any]:
    """Run one experiment and return its results (also written to results.json). ``handoff``: the
    job's built parts and trained student, from a launcher that trained it with its group.

    A bad configuration raises ``ConfigError`` before anything is written. A later failure (NaN loss,
    a crash) is recorded as ``status: failed`` with a one-line error, then re-raised for a single run
    and swallowed in a sweep. A sweep job with a complete result returns it (``resume.start``).
    """
    raise_on_failure = not job.is_multirun() if raise_on_failure is None else raise_on_failure
    start, out = time.perf_counter(), Path(cfg.paths.output_dir)
    try:
        validate(cfg)
        settings = plan.run_settings(cfg)
        slots.configure_job(cfg.trainer, settings.num_threads)  # threads and GPU slot in a parallel sweep
        key = results.config_hash(cfg)  # a stacked group's member was resumed by its group
        done = None if handoff else resume.start(out, key, settings.rerun, cfg.get("logger"), job.is_multirun())
        if done is not None:
            return done
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        # before any model is built: the student's initial weights depend on the seed only
        pl.seed_everything(settings.seed, workers=True, verbose=False)
        record = execute(cfg, handoff.parts if handoff else prepare(cfg, settings), start, handoff)
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


def prepare(cfg: DictConfig, settings: plan.RunSettings | None = None, data: Any = None) -> Parts:
    """Build the data (unless given, already built), the models and the method; try each on one batch."""
    the = plan.make(cfg, settings)
    data = build.part("data", cfg.data) if data is None else data
    info = adapter.prepare(data, the.run.seed)
    log.info("data %s", info.description)
    teacher_training.check_data(data, cfg.teacher.recipe)
    student, method = build.model("student", cfg.student, info), build.part("distill", cfg.distill)
    names = {group: plan.name(group, cfg[group]) for group in ("distill", "compress", "teacher", "student")}
    option, dirs, file = plan.assistant_option(cfg.teacher_assistant), job.config_dirs(), cfg.teacher.ckpt_path
    clashes = {"teachers": cfg.teachers, "teacher.ckpt_path": file, "student.init": the.student.init}
    peers.check(method, names["distill"], clashes | {KEY: option}, the.teaching.outputs.cache, the.target)
    make = lambda role: build.model(role, cfg[role], info)  # noqa: E731 - the other peers, fresh
    cohort = peers.build(method, student, make) if method_contract.cotrains(method) else []
    helper = None
    if option is not None:
        node = assistant.check(cfg[KEY], option, method, names["distill"], cfg.teachers, the.target, dirs)
        helper = assistant.Assistant(node, option, cfg.data, cfg.distill, file)
    members = the.run.teachers or []
    feature = names["distill"] if method_contract.is_feature_method(method) else None
    init_from_teacher = the.student.init is not None and the.target != "teacher"
    ensemble.check(members, the.ensemble, feature, file, the.target == "teacher", init_from_teacher, dirs)
    nodes = ensemble.member_nodes(members, cfg.teacher, dirs) if members else [cfg.teacher]
    if members:
        models = [build.teacher(node, info) for node in nodes]
        teacher: nn.Module = ensemble.build(models, members, the.ensemble, method_contract.temperature(method))
    else:
        teacher = build.teacher(cfg.teacher, info)
        if file:  # a file that is not this teacher's state_dict fails now
            cache.load_checkpoint_file(copy.deepcopy(teacher), file)
    example = adapter.example(data)
    pair = (helper, build.teacher(helper.node, info)) if helper is not None else None
    source = pair[1] if pair else teacher  # whom the student learns from: the assistant when there is one
    if method_contract.is_feature_method(method):
        # layers are resolved and regressors built from one batch now: a wrong path fails first
        size = adapter.train_size(data) if method_contract.needs_index(method) else None
        method.bind(student, source if method_contract.needs_teacher(method) else None, example, train_size=size)
    method_contract.check_method(method, student, source, example)
    outputs.decide(the.teaching.outputs, data, method)
    if init_from_teacher:
        transfer.check(student, source, (names["student"], names["teacher"]))
    if the.target is not None:
        model = student if the.target == "student" else teacher
        compression.dry_run(cfg.compress, names["compress"], model, data, info.input_shape)
    out = Path(cfg.paths.output_dir)
    return Parts(the, data, info, student, teacher, nodes, method, names, out, cohort, pair)


def execute(cfg: DictConfig, parts: Parts, start: float, handoff: Handoff | None = None) -> dict[str, Any]:
    """Obtain the teacher, train the student, compress, measure, write results.json."""
    the, fitting = parts.plan, _fitting(cfg, parts)
    together = method_contract.cotrains(parts.method)
    teacher = None if together else (handoff and handoff.teacher) or obtain_teacher(cfg, parts, fitting)
    helper = None
    if parts.assistant is not None:
        helper = assistant.obtain(*parts.assistant, parts.data, teacher, fitting, the.teaching, cfg.paths.cache_dir)
    timing = {"teacher": sum(t.seconds for t in (teacher, helper) if t), "student": 0.0, "compress": 0.0}
    models = assembly.Models(teacher, student_arch=parts.names["student"], assistant=helper)
    run_loggers, init = [], None
    # compressing the teacher is a baseline without a student: "a smaller teacher" vs "a student"
    if the.target != "teacher":
        fitted, init, cotrained = fit.student(parts, helper or teacher, fitting, the.student, handoff)
        roles = method_contract.peer_roles(parts.method)
        models = dataclasses.replace(
            models,
            teacher=cotrained or teacher,
            student=parts.student,
            best_epoch=fitted.best_epoch,
            outputs=fitted.mode,
            peers=[(parts.names[role], peer) for role, peer in zip(roles, parts.peers)],
        )
        run_loggers = fitted.loggers
        timing["teacher"] += fitted.table_seconds
        timing["student"] = fitted.seconds
    if not job.is_rank_zero():
        # a rank of a job launched once per device (torchrun, srun) has done its share, the
        # distributed fit; compression, measurement and results.json are rank 0's
        log.info("rank %d: training done; rank 0 compresses, measures and writes results", job.rank())
        return {"status": "ok", "rank": job.rank()}
    how = dataclasses.asdict(the.measure)
    if the.target is not None:
        tick = time.perf_counter()
        model = models.student if models.student is not None else models.teacher.model
        models = dataclasses.replace(models, compressed=compress(cfg, parts, model, fitting))
        timing["compress"] = time.perf_counter() - tick
    method = parts.names["distill"] if models.student is not None else "none"
    names = {"dataset": parts.info.name, "method": method, "compress": parts.names["compress"]}
    header = assembly.header(results.hashes(cfg), job.overrides(), the.run.seed, parts.data, names)
    record = assembly.assemble(header, models, parts.data, parts.info, how, Path(cfg.paths.root_dir))
    if "student" in record:
        # regressors and embeddings of feature methods train with the student but are not deployed
        record["student"]["extra_params"] = sum(p.numel() for p in parts.method.parameters())
        if init is not None:
            record["student"]["init"] = init
    exported = export.run(
        cfg.get("export"), models.student, models.compressed, parts.data, parts.info.input_shape, how, parts.out
    )
    record |= exported
    timing["total"] = time.perf_counter() - start
    record["timing_s"] = {key: round(value, 3) for key, value in timing.items()}
    if handoff is not None:  # a stacked job: its group's fields and its share of the group's fit
        handoff.complete(record)
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
    obtain_member = lambda model, node, name: obtain(model, node, f"teacher-{name}")  # noqa: E731
    return ensemble.obtain(parts.teacher, parts.teacher_nodes, parts.plan.ensemble, obtain_member)


def compress(cfg: DictConfig, parts: Parts, model: nn.Module, fitting: training.Fitting) -> compression.CompressedRun:
    """Step 6: compress ``model``, fine-tuning with the run's method, optimizer and trainer."""
    role, how = parts.plan.target, dataclasses.asdict(parts.plan.measure)
    method = lambda: method_contract.for_finetuning(build.part("distill", cfg.distill))  # noqa: E731
    finetuning = compression.Finetuning(method, cfg.optim, fitting)
    name, shape = parts.names["compress"], parts.info.input_shape
    return compression.run(
        cfg.compress, name, role, parts.names[role], model, parts.data, shape, finetuning, parts.out, how
    )


# -- building blocks ----------------------------------------------------------------------------------
def _fitting(cfg: DictConfig, parts: Parts) -> training.Fitting:
    return training.Fitting(cfg.trainer, cfg.get("callbacks"), parts.out, lambda role: _loggers(cfg, role))


def _loggers(cfg: DictConfig, role: str) -> list:
    """The run's loggers for one role (teacher, student), each recording the resolved config."""
    group = loggers.sweep_group(job.sweep_dir()) if job.is_multirun() else None
    return loggers.build(cfg.get("logger"), role, OmegaConf.to_container(cfg, resolve=True), group)
