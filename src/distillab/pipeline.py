"""One run: data → teacher → student → distillation → compression → measurement → results.json.

``run(cfg)`` reads top to bottom as the steps of a run. Everything that can be checked
without training (config values, model construction) is checked first, so bad input fails
with one line and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn

from distillab import compress, ensemble, loggers, measure, results, resume, slots, teachers
from distillab.config import STUDENT_ROLE_KEYS, ConfigError, validate
from distillab.data.base import InMemoryDataModule
from distillab.distill import teacher_outputs, transfer
from distillab.distill.losses import CrossEntropy
from distillab.distill.module import ClassifierModule, DistillationModule
from distillab.evaluate import agreement, classification_metrics, predict

log = logging.getLogger(__name__)

# Lightning's start-up banner ("GPU available: …", tips) is noise in a sweep's logs
for _name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# metrics are logged once per epoch, and in-memory batches need no worker processes
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@dataclass
class Parts:
    """What a run is made of, all built (and so checked) before any training."""

    data: InMemoryDataModule
    student: nn.Module
    teacher: nn.Module  # untrained: the cache or training fills it
    loss: nn.Module
    out: Path


# -- the run -----------------------------------------------------------------------------------
def run(cfg: DictConfig, raise_on_failure: bool | None = None) -> dict[str, Any]:
    """Run one experiment and return its results (also written to results.json).

    A bad configuration raises ``ConfigError`` before anything is written. A failure later
    (NaN loss, a crash) is recorded as ``status: failed`` with a one-line error; it is then
    re-raised for a single run, and swallowed in a sweep so the other jobs go on. A sweep job
    whose folder already holds its complete result returns that record (``resume.start``).
    """
    if raise_on_failure is None:
        raise_on_failure = not _is_multirun()
    start = time.perf_counter()
    out = Path(cfg.paths.output_dir)
    try:
        validate(cfg)
        slots.configure_job(cfg)  # threads and GPU slot of a job of a parallel (joblib) sweep
        done = resume.start(cfg, out, sweep=_is_multirun())  # a resumed sweep skips finished jobs
        if done is not None:
            return done
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        # before any model is built: the student's initial weights depend on the seed only
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        parts = prepare(cfg)
        record = execute(cfg, parts, start)
    except Exception as error:  # noqa: BLE001 - every failure is recorded, then re-raised or logged
        # bad input of a single run leaves nothing behind; in a sweep the report lists it
        if raise_on_failure and isinstance(error, ConfigError):
            raise
        record = failure(cfg, error)
        if _is_rank_zero():
            results.write(out, record)
        if raise_on_failure:
            raise
        log.error("run failed: %s", record["error"])
    return record


def prepare(cfg: DictConfig) -> Parts:
    data = _build("data", cfg.data)
    data.setup()
    data.shuffle_seed = int(cfg.seed)
    log.info("data %s", data.describe())
    _teacher_augmentation(data, cfg.teacher.recipe.get("augment"))
    _teacher_labels(data, cfg.teacher.recipe.get("labelled_fraction"))
    student = build_model("student", cfg.student, data)
    # the teacher's initial weights depend on its own seed, never on the run's: the cache
    # key leaves the run seed out, so whichever sweep job trains it must get the same teacher
    loss = _build("distill", cfg.distill)
    ensemble.check(cfg, loss)
    members = ensemble.member_configs(cfg)
    if members:
        teacher: nn.Module = ensemble.Ensemble(
            [_new_teacher(member, data) for member in members], ensemble.names(cfg),
            ensemble.weights_of(cfg, len(members)), str(cfg.ensemble.combine), float(loss.temperature))
    else:
        teacher = _new_teacher(cfg, data)
    # feature methods resolve their layers and build their regressors from one batch now, so a
    # wrong layer path or shape fails before any training
    loss.bind(student, teacher if loss.needs_teacher else None, _example(data))
    teacher_outputs.check(cfg, data, loss)
    check_transfer(cfg, student, teacher)
    if compress_target(cfg) is not None:
        check_compression(cfg, data, student if compress_target(cfg) == "student" else teacher)
    return Parts(data, student, teacher, loss, Path(cfg.paths.output_dir))


def _new_teacher(cfg: DictConfig, data: InMemoryDataModule) -> nn.Module:
    """An untrained teacher of ``cfg.teacher``. Its initial weights depend on its own seed, never
    on the run's: the cache key leaves the run seed out, so whichever sweep job trains it must
    get the same teacher."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.teacher.recipe.seed))
        return build_model("teacher", cfg.teacher, data)


def _example(data: InMemoryDataModule) -> Tensor:
    """A few training inputs, to trace feature shapes."""
    return next(iter(data.train_dataloader()))[0][:8]


def check_compression(cfg: DictConfig, data: InMemoryDataModule, model: nn.Module) -> None:
    """Dry-run the compression on a copy of the untrained model, with one calibration batch and
    no fine-tuning, so that a method that cannot apply (a budget larger than the model, a
    layer pruned away, nothing to quantize) fails before any training, not after it."""
    def one_batch() -> list:
        return [next(iter(data.train_dataloader()))]

    context = compress.Context(
        input_shape=tuple(data.input_shape),
        train_batches=one_batch,
        finetune_epochs=int(cfg.compress.finetune_epochs),
        finetune=lambda *args, **kwargs: None,
    )
    with torch.random.fork_rng(devices=[]):
        compress.apply(cfg.compress, copy.deepcopy(model).cpu(), context)


def execute(cfg: DictConfig, parts: Parts, start: float) -> dict[str, Any]:
    data, student, loss, out = parts.data, parts.student, parts.loss, parts.out
    teacher = obtain_teacher(cfg, parts.teacher, data)
    timing = {"teacher": teacher.seconds, "student": 0.0, "compress": 0.0}
    run_loggers: list = []
    best_epoch = None
    init = None
    outputs = teacher_outputs.TeacherOutputs("none", "no student is trained")
    # compressing the teacher is a baseline without a student: "a smaller teacher" vs "a student"
    if compress_target(cfg) != "teacher":
        init = transfer_weights(cfg, student, teacher.model)
        # the teacher's logits of every training sample, once, when they cannot change (see teacher_outputs)
        outputs = teacher_outputs.for_run(cfg, teacher, data, loss)
        timing["teacher"] += outputs.seconds
        # training a teacher (cache miss) consumed random numbers; a hit did not
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        tick = time.perf_counter()
        module = DistillationModule(
            student,
            teacher.model if loss.needs_teacher and outputs.table is None else None,
            loss,
            teacher_table=outputs.table,
            optimizer=instantiate(cfg.optim.optimizer),
            scheduler=_scheduler(cfg.optim),
        )
        run_loggers = loggers.build(cfg, "student", _sweep_group())
        trainer = make_trainer(cfg, run_loggers, out / "checkpoints", cfg.trainer.max_epochs)
        trainer.fit(module, datamodule=data)
        best_epoch = restore_best(module, trainer)
        timing["student"] = time.perf_counter() - tick

    if not _is_rank_zero():
        # a rank of a job launched once per device (torchrun, srun) has done its share, the
        # distributed fit; compression, measurement and results.json are rank 0's
        log.info("rank %d: training done; rank 0 compresses, measures and writes results", _rank())
        return {"status": "ok", "rank": _rank()}
    compressed = None
    if compress_target(cfg) is not None:
        tick = time.perf_counter()
        uncompressed = student if compress_target(cfg) == "student" else teacher.model
        compressed = compress_model(cfg, data, uncompressed, out)
        timing["compress"] = time.perf_counter() - tick

    record = assemble(cfg, data, teacher, student if best_epoch is not None else None, best_epoch, loss.method,
                      compressed, outputs=outputs.mode)
    if "student" in record:
        # regressors and embeddings of feature methods train with the student but are not deployed
        record["student"]["extra_params"] = sum(p.numel() for p in loss.parameters())
        if init is not None:
            record["student"]["init"] = init
    record["timing_s"] = {**{k: round(v, 3) for k, v in timing.items()},
                          "total": round(time.perf_counter() - start, 3)}
    path = results.write(out, record)
    log.info("\n%s", summary_table(record))
    log.info("results written to %s", path)
    loggers.finish(run_loggers, _flatten(record))
    return record


def obtain_teacher(cfg: DictConfig, model: nn.Module, data: InMemoryDataModule) -> teachers.Teacher:
    """The trained teacher, from the cache or trained now; an ensemble member by member."""
    if not isinstance(model, ensemble.Ensemble):
        return teachers.obtain(cfg, model, train=lambda m, staging: train_teacher(cfg, m, data, staging))
    members = []
    for name, member_cfg, member in zip(model.names, ensemble.member_configs(cfg), model.members):
        def train(m: nn.Module, staging: Path, c: DictConfig = member_cfg, role: str = f"teacher-{name}") -> dict:
            return train_teacher(c, m, data, staging, role)

        members.append(teachers.obtain(member_cfg, member, train=train))
        members[-1].arch = teachers.arch_name(member_cfg.teacher)
    cache = "hit" if all(member.cache == "hit" for member in members) else "miss"
    key = ensemble.cache_key([member.key for member in members], cfg, model.temperature)
    log.info("ensemble of %d teachers (%s, combine=%s, weights %s)", len(members), ", ".join(model.names),
             model.combine, [round(float(w), 4) for w in model.weights])
    return teachers.Teacher(model.eval(), key, cache, members[0].path, seconds=sum(m.seconds for m in members),
                            members=members, arch=ensemble.arch_name(model.names))


def check_transfer(cfg: DictConfig, student: nn.Module, teacher: nn.Module) -> None:
    """``student.init=from_teacher`` pairs tensors by the architectures alone, so a student that
    shares no layer with the teacher fails here, on the untrained models, before any training."""
    if cfg.student.get("init") is None or compress_target(cfg) == "teacher":
        return
    if isinstance(teacher, ensemble.Ensemble):
        raise ConfigError("student.init=from_teacher takes the weights of one teacher, not of an ensemble "
                          "(teachers=...): set student.init=null")
    try:
        transfer.plan(student, teacher, _arch_names(cfg))
    except transfer.NoMatchingTensors as error:
        raise ConfigError(f"student.init=from_teacher: {error}") from None


def transfer_weights(cfg: DictConfig, student: nn.Module, teacher: nn.Module) -> dict[str, Any] | None:
    """Step 3b: start the student from the trained teacher's matching tensors
    (``student.init=from_teacher``, see ``distill.transfer``); the ``student.init`` record."""
    if cfg.student.get("init") is None:
        return None
    weight = float(cfg.student.init_weight)
    report = transfer.init_from_teacher(student, teacher, weight, _arch_names(cfg))
    log.info("student.init=from_teacher: %d of %d student tensors from the teacher (init_weight=%g)",
             len(report.copied), len(report.copied) + len(report.kept), weight)
    return report.as_record()


def _arch_names(cfg: DictConfig) -> tuple[str, str]:
    return teachers.arch_name(cfg.student), teachers.arch_name(cfg.teacher)


def compress_target(cfg: DictConfig) -> str | None:
    """Which model step 6 compresses: ``student``, ``teacher``, or None for ``compress=none``."""
    return None if cfg.compress.method == "none" else str(cfg.compress.target)


@dataclass
class CompressedRun:
    result: compress.Compressed
    float_model: nn.Module  # the last floating-point model of the chain (its MACs)
    uncompressed: nn.Module
    artifact: Path


def compress_model(cfg: DictConfig, data: InMemoryDataModule, uncompressed: nn.Module, out: Path) -> CompressedRun:
    """Step 6: apply ``cfg.compress`` to a CPU copy of ``uncompressed``, fine-tuning with the
    run's distillation loss and the uncompressed model as teacher, and save the artifact."""
    uncompressed = copy.deepcopy(uncompressed).cpu().eval()
    epochs = int(cfg.compress.finetune_epochs)

    def finetune(model: nn.Module, n_epochs: int, on_epoch_start: Callable[[int], None] | None = None) -> None:
        finetune_with_teacher(cfg, data, model, uncompressed, n_epochs, on_epoch_start)

    context = compress.Context(
        input_shape=tuple(data.input_shape),
        train_batches=data.train_dataloader,
        finetune_epochs=epochs,
        finetune=finetune if epochs > 0 else None,
    )
    log.info("compress: %s of the %s (fine-tune %d epochs)", cfg.compress.method, cfg.compress.target, epochs)
    result, float_model = compress.apply(cfg.compress, uncompressed, context)
    artifact = out / "compressed" / "model.pt"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    staging = artifact.with_name(f".{artifact.name}.tmp")
    result.save(staging)
    os.replace(staging, artifact)
    return CompressedRun(result, float_model, uncompressed, artifact)


def finetune_with_teacher(
    cfg: DictConfig,
    data: InMemoryDataModule,
    model: nn.Module,
    teacher: nn.Module,
    epochs: int,
    on_epoch_start: Callable[[int], None] | None = None,
) -> None:
    """Train ``model`` in place for ``epochs`` with the run's loss, ``teacher`` frozen; the last
    epoch is the result (a pruning schedule changes the model from epoch to epoch)."""
    loss = _build("distill", cfg.distill)
    teacher = copy.deepcopy(teacher) if loss.needs_teacher else None
    loss.bind(model, teacher, _example(data).to(device_of(model)), same_architecture=True)
    module = DistillationModule(model, teacher, loss,
                                optimizer=instantiate(cfg.optim.optimizer))
    hooks = [_EpochStart(on_epoch_start)] if on_epoch_start is not None else []
    # in one process: a pruning schedule's closure and QAT observers cannot be sent to spawned
    # DDP workers, and fine-tuning is short
    trainer = make_trainer(cfg, [], None, epochs, extra=hooks, single_process=True)
    module.train()  # Lightning keeps the mode it is given; the model arrives in eval mode
    trainer.fit(module, datamodule=data)
    model.cpu().eval()


class _EpochStart(pl.Callback):
    def __init__(self, hook: Callable[[int], None]) -> None:
        self.hook = hook

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hook(trainer.current_epoch)


# -- building blocks -----------------------------------------------------------------------------
def _build(key: str, node: DictConfig, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        message = str(cause).splitlines()[0]
        # a message "<argument>=<value>: ..." names its key relative to the node
        if re.match(r"^\w+=", message):
            raise ConfigError(f"{key}.{message}") from None
        raise ConfigError(f"{key}: {type(cause).__name__}: {message}") from None


def build_model(role: str, node: DictConfig, data: InMemoryDataModule) -> nn.Module:
    """Instantiate an architecture with the input shape and class count of ``data``."""
    role_keys = teachers.ROLE_KEYS if role == "teacher" else STUDENT_ROLE_KEYS
    arch = OmegaConf.create({k: v for k, v in node.items() if k not in role_keys})
    return _build(role, arch, input_shape=data.input_shape, num_classes=data.num_classes)


def _scheduler(optim: DictConfig) -> Any:
    """The scheduler factory of an ``optim`` node; ``optim/scheduler=none`` has no target."""
    node = optim.get("scheduler")
    return instantiate(node) if node is not None and node.get("_target_") else None


def make_trainer(
    cfg: DictConfig, run_loggers: list, checkpoint_dir: Path | None, max_epochs: int, extra: list | None = None,
    single_process: bool = False,
) -> pl.Trainer:
    """A Trainer from ``cfg.trainer`` that keeps the checkpoint with the best validation
    accuracy in ``checkpoint_dir`` (None: no checkpoint, the last epoch is the result);
    ``single_process``: on one device whatever the configured strategy."""
    show_progress = bool(cfg.trainer.enable_progress_bar)
    callbacks = [
        instantiate(conf)
        for conf in (cfg.get("callbacks") or {}).values()
        if conf is not None and (show_progress or not conf._target_.endswith("ProgressBar"))
    ] + list(extra or [])
    if checkpoint_dir is not None:
        # ties keep the earlier epoch; the file is written through a temporary file (fsspec)
        callbacks.append(
            ModelCheckpoint(
                dirpath=checkpoint_dir,
                filename="best",
                monitor="val/acc",
                mode="max",
                save_top_k=1,
                save_weights_only=True,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
    return instantiate(
        cfg.trainer,
        max_epochs=int(max_epochs),
        callbacks=callbacks,
        logger=run_loggers or False,
        enable_checkpointing=checkpoint_dir is not None,
        default_root_dir=str(cfg.paths.output_dir),
        _convert_="all",
        **(teachers.SINGLE_PROCESS if single_process else {}),
    )


def restore_best(module: pl.LightningModule, trainer: pl.Trainer) -> int:
    """Load the best-on-validation weights into ``module``; return that epoch."""
    path = trainer.checkpoint_callback.best_model_path
    if not path:
        return int(trainer.current_epoch)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"])
    return int(checkpoint["epoch"])


def train_teacher(cfg: DictConfig, model: nn.Module, data: InMemoryDataModule, staging: Path,
                  role: str = "teacher") -> dict[str, Any]:
    recipe = cfg.teacher.recipe
    pl.seed_everything(int(recipe.seed), workers=True, verbose=False)
    module = ClassifierModule(
        model, CrossEntropy(), optimizer=instantiate(recipe.optim.optimizer), scheduler=_scheduler(recipe.optim)
    )
    run_loggers = loggers.build(cfg, role, _sweep_group())
    trainer = make_trainer(cfg, run_loggers, staging / "checkpoints", recipe.max_epochs)
    with _teacher_augmentation(data, recipe.get("augment")), _teacher_labels(data, recipe.get("labelled_fraction")):
        trainer.fit(module, datamodule=data)
    best_epoch = restore_best(module, trainer)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    val_preds, val_targets = predict(model, data.val_dataloader(), module.device)
    metrics = {
        "best_epoch": best_epoch,
        "val": classification_metrics(val_preds, val_targets, data.num_classes),
    }
    loggers.finish(run_loggers, {"teacher/val_acc": metrics["val"]["acc"]})
    return metrics


def _teacher_augmentation(data: Any, augment: bool | None) -> contextlib.AbstractContextManager:
    """The teacher recipe's augmentation switch, checked in ``prepare`` before any training."""
    if augment is None:
        return contextlib.nullcontext()
    if not hasattr(data, "augmentation"):
        raise ConfigError(f"teacher.recipe.augment={augment} needs a datamodule with an augmentation() switch "
                          f"(distillab.data.InMemoryDataModule); {type(data).__name__} has none: set it to null")
    return data.augmentation(augment)


def _teacher_labels(data: Any, fraction: float | None) -> contextlib.AbstractContextManager:
    """The teacher recipe's share of training labels (None: all of them, whatever the student
    sees), checked in ``prepare`` before any training."""
    if hasattr(data, "labelled"):
        return data.labelled(fraction)
    if fraction is None:
        return contextlib.nullcontext()
    raise ConfigError(f"teacher.recipe.labelled_fraction={fraction} needs a datamodule with a labelled() switch "
                      f"(distillab.data.InMemoryDataModule); {type(data).__name__} has none: set it to null")


def labelled_share(data: Any) -> dict[str, Any]:
    """``data.labelled_fraction`` and how many training samples kept their label for the student."""
    if not hasattr(data, "labelled_mask"):
        return {"labelled_fraction": 1.0, "labelled_samples": None}
    return {"labelled_fraction": data.labelled_fraction, "labelled_samples": int(data.labelled_mask().sum())}


# -- results ----------------------------------------------------------------------------------
def assemble(
    cfg: DictConfig,
    data: InMemoryDataModule,
    teacher: teachers.Teacher,
    student: nn.Module | None,
    best_epoch: int | None,
    method: str,
    compressed: CompressedRun | None,
    outputs: str = "none",
) -> dict[str, Any]:
    """Evaluate every model on the test split (once, for the chosen checkpoints) and measure it;
    ``outputs``: how the student got the teacher's logits (cached, live, or none)."""
    how = {"threads": cfg.measure.threads, "warmup": cfg.measure.warmup, "repeats": cfg.measure.repeats}
    device = device_of(teacher.model)
    teacher_preds, targets = predict(teacher.model, data.test_dataloader(), device)
    teacher_test = classification_metrics(teacher_preds, targets, data.num_classes)
    teacher_block = {
        "arch": teacher.arch or teachers.arch_name(cfg.teacher),
        **measure.profile(teacher.model, data.input_shape, **how),
        "cache": teacher.cache,
        "cache_key": teacher.key,
        "outputs": outputs,
        "test": teacher_test,
    }
    overrides = _overrides()
    record: dict[str, Any] = {
        "status": "ok",
        "config_hash": results.config_hash(cfg),
        "group": results.group_of(overrides),
        "overrides": overrides,
        "seed": int(cfg.seed),
        "dataset": data.name,
        **labelled_share(data),
        "method": method if student is not None else "none",
        "compress": str(cfg.compress.method),
        "teacher": teacher_block,
    }
    if teacher.members:
        record["teachers"] = [member_block(member, data, how) for member in teacher.members]
    if student is not None:
        record["student"] = {
            "arch": teachers.arch_name(cfg.student),
            **model_block(student, data, teacher_preds, how),
            "best_epoch": best_epoch,
        }
        record["ratios"] = ratios(record["student"], teacher_block)
    if compressed is not None:
        block = model_block(compressed.result.model, data, teacher_preds, how)
        block["size_bytes"] = compressed.artifact.stat().st_size  # the saved artifact
        if not block["macs"]:  # int8 kernels are invisible to the FLOP counter: same MACs in int8
            block["macs"] = measure.macs(compressed.float_model, data.input_shape)
        role = compress_target(cfg)
        base = record.get(role) or teacher_block
        record["compressed"] = {
            "arch": teachers.arch_name(cfg.student if role == "student" else cfg.teacher),
            "of": role,
            "method": compressed.result.method,
            "backend": compressed.result.backend,
            **block,
            "details": compressed.result.details,
            "vs_uncompressed": ratios(block, base),
            "vs_teacher": ratios(block, teacher_block),
        }
    record["env"] = results.environment(Path(cfg.paths.root_dir), str(device))
    return record


def member_block(member: teachers.Teacher, data: InMemoryDataModule, how: dict) -> dict[str, Any]:
    """One teacher of an ensemble: architecture, cache entry, size and test metrics."""
    preds, targets = predict(member.model, data.test_dataloader(), device_of(member.model))
    return {
        "arch": member.arch,
        **measure.profile(member.model, data.input_shape, **how),
        "cache": member.cache,
        "cache_key": member.key,
        "test": classification_metrics(preds, targets, data.num_classes),
    }


def model_block(model: nn.Module, data: InMemoryDataModule, teacher_preds: Tensor, how: dict) -> dict[str, Any]:
    """Measurements and test/val metrics of one model; quantized models run on the CPU."""
    device = device_of(model)
    preds, targets = predict(model, data.test_dataloader(), device)
    val_preds, val_targets = predict(model, data.val_dataloader(), device)
    test = classification_metrics(preds, targets, data.num_classes)
    test["agreement"] = agreement(preds, teacher_preds)
    return {
        **measure.profile(model, data.input_shape, **how),
        "test": test,
        "val": {"acc": classification_metrics(val_preds, val_targets, data.num_classes)["acc"]},
    }


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are; int8 models hold none and run on the CPU."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def ratios(block: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """``block`` relative to ``reference``: parameters, bytes, batch-64 latency, accuracy kept."""
    return {
        "params": block["params"] / max(reference["params"], 1),
        "size": block["size_bytes"] / max(reference["size_bytes"], 1),
        "latency_batch_64": block["latency_ms"]["batch_64"] / max(reference["latency_ms"]["batch_64"], 1e-9),
        "acc_retention": block["test"]["acc"] / max(reference["test"]["acc"], 1e-12),
    }


def failure(cfg: DictConfig, error: BaseException) -> dict[str, Any]:
    message = " ".join(str(error).split()) or type(error).__name__
    overrides = _overrides()
    return {
        "status": "failed",
        "error": f"{type(error).__name__}: {message}"[:500],
        "group": results.group_of(overrides),
        "overrides": overrides,
        "seed": int(cfg.seed),
    }


def summary_table(record: dict[str, Any]) -> str:
    """Teacher, student and compressed model side by side; ratios are against the teacher."""
    teacher = record["teacher"]
    columns = [("teacher", teacher, None)]
    if "student" in record:
        columns.append(("student", record["student"], record["ratios"]))
    if "compressed" in record:
        block = record["compressed"]
        columns.append((f"{block['method']}", block, block["vs_teacher"]))

    def cell(block: dict, ratio: dict | None, key: str) -> str:
        if key == "head":
            return f"({block['arch']})"
        if key in ("acc", "f1"):
            return f"{block['test'][key]:.4f}"
        if key in ("params", "size_bytes"):
            return f"{block[key]:,}"
        if ratio is None:
            return ""
        if key == "smaller":
            return f"{1 / ratio['params']:.1f}x smaller"
        if key == "retention":
            return f"{100 * ratio['acc_retention']:.1f} %"
        return f"{100 * block['test']['agreement']:.1f} %"

    labels = [("head", ""), ("acc", "test accuracy"), ("f1", "test macro F1"), ("params", "parameters"),
              ("size_bytes", "size (bytes)"), ("smaller", "compression (params)"),
              ("retention", "accuracy retention"), ("agreement", "agreement with teacher")]
    rows = [["", *(name for name, _, _ in columns)]]
    rows += [[label or "", *(cell(block, ratio, key) for _, block, ratio in columns)] for key, label in labels]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


# -- Hydra context ----------------------------------------------------------------------------
def _hydra() -> Any:
    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun() -> bool:
    hydra_cfg = _hydra()
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def _overrides() -> list[str]:
    hydra_cfg = _hydra()
    return list(hydra_cfg.overrides.task) if hydra_cfg is not None else []


def _sweep_group() -> str | None:
    hydra_cfg = _hydra()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return loggers.sweep_group(hydra_cfg.sweep.dir)


def _rank() -> int:
    from pytorch_lightning.utilities import rank_zero_only

    return int(rank_zero_only.rank)


def _is_rank_zero() -> bool:
    return _rank() == 0


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif not isinstance(value, list):
            flat[name] = value
    return flat
