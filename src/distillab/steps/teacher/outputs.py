"""Cached teacher outputs: the frozen teacher's logits for the whole training split, computed once.

When the student's training inputs are deterministic (no random augmentation), a frozen
teacher in eval mode gives each training sample the same logits in every epoch, so running
it at every step repeats the same work. Instead, its logits are computed once, in sample
order, stored with the teacher in its cache folder, and the student's step reads them by the
sample index its batch carries (``DistillationModule(teacher_table=...)``). The teacher's side
of the loss is then constant for the fit too: a method that says how (``KD``:
``prepare_teacher``, the log-probabilities at T) has it computed once from the whole table, and
its step reads rows of that instead of recomputing them from the logits.

``teacher_outputs.cache`` chooses the path: ``auto`` (the default) takes the table when the
inputs are deterministic and the loss reads nothing but the teacher's logits, the live
teacher otherwise; ``cached`` insists on the table (an error when it cannot apply); ``live``
never uses it. The run's log says which path it took and why.

Any datamodule: the built-in ones (``data.InMemoryDataModule``) serve ``(x, y, index)``
batches from tensors, and the table is computed from the training tensor. Any other
LightningDataModule with a map-style training set trains on an indexed copy of its training
DataLoader (``data.adapter.fit_arguments``) and the table is computed over the training set in
index order, batch by batch (no copy of the whole set in memory). Not when the training set
is an IterableDataset, when its samples differ from one read to the next (random transforms),
or when the datamodule overrides a batch-transfer hook (``data.adapter.index_obstacle``); and
the stored table is only used if two passes over the training set give the same inputs.

Exact and approximate: the full table in float32 holds the teacher's float32 logits, so the
loss equals the live path's up to float rounding (the teacher runs on batches of another
composition). ``dtype: float16`` rounds every logit to half precision (relative error about
5e-4); ``top_k: k`` keeps the k largest logits of each sample exactly and gives every other
class the mean of the teacher's remaining logits, which is at most the k-th: the soft targets
keep their top k and the mass of the rest, not its order. Both shrink the stored file; on the
device the table is always a dense float32 N×C tensor (and, for a method that prepares it, a
second N×C tensor of what it prepared).

A stored table is named by what determines it (the teacher's cache key, a hash of the
training inputs, dtype and top-k), written atomically under a file lock, so two sweep jobs
that need it at once compute it once, and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock
from torch import Tensor, nn

from distillab.data import adapter
from distillab.distill.methods.base import is_feature_method, needs_teacher
from distillab.io import atomic_save
from distillab.settings import ConfigError, Count

log = logging.getLogger(__name__)

MODES = ("auto", "cached", "live")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMAT = 1
FOLDER = "outputs"  # inside the teacher's cache folder
BATCH_SIZE = 128  # samples per teacher forward pass while filling the table, if the data has no batch_size

#: the training inputs in sample order: one tensor (row i = sample i), or a re-iterable of input
#: batches whose ``len()`` is the number of samples (``data.adapter.InputsInOrder``)
Inputs = Tensor | Iterable[Tensor]


class InputsChanged(RuntimeError):
    """Two passes over the training set gave different inputs: a table would not fit them."""


@dataclass
class TeacherOutputs:
    """How the student's step gets the teacher's logits in this run."""

    mode: str  # "cached" | "live" | "none" (the loss needs no teacher)
    reason: str
    table: Tensor | None = None  # N×C float32 logits, row i for training sample i
    source: str = ""  # "hit" | "miss" (stored file) | "memory" (not stored); cached mode only
    path: Path | None = None
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class OutputSettings:
    """``teacher_outputs``: ``cache`` auto (the table when it can stand in for the live teacher),
    cached (insist on it) or live (never); the stored table's ``dtype`` and ``top_k`` (keep the k
    largest logits per sample; null for all)."""

    cache: Literal["auto", "cached", "live"]
    dtype: Literal["float32", "float16", "bfloat16"]
    top_k: Count | None


# -- which path ----------------------------------------------------------------------------------
def obstacle(data: Any, method: nn.Module) -> str | None:
    """Why a table cannot stand in for the live teacher in this run, or None when it can."""
    if is_feature_method(method):
        return f"{type(method).__name__} reads the teacher's intermediate features, which need the live teacher"
    if adapter.serves_indices(data) and data.augments:
        return "training batches are randomly augmented, so the teacher's inputs change every epoch"
    return adapter.index_obstacle(data)


def decide(settings: OutputSettings, data: Any, method: nn.Module) -> tuple[str, str]:
    """``(mode, reason)``: ``cached``, ``live``, or ``none`` when the method needs no teacher.
    ``teacher_outputs.cache=cached`` where a table cannot apply is a ``ConfigError``."""
    name = type(method).__name__
    if not needs_teacher(method):
        return "none", f"{name} needs no teacher"
    if settings.cache == "live":
        return "live", "teacher_outputs.cache=live"
    problem = obstacle(data, method)
    if problem is not None:
        if settings.cache == "cached":
            raise ConfigError(
                f"teacher_outputs.cache=cached is not allowed here: {problem}; use teacher_outputs.cache=auto or live"
            )
        return "live", f"{problem} (teacher_outputs.cache={settings.cache})"
    served = (
        ""
        if adapter.serves_indices(data)
        else (f" ({type(data).__name__}'s training set is map-style: its batches get sample indices)")
    )
    return "cached", (
        f"the training inputs are deterministic{served} and {name} reads only the teacher's logits "
        f"(teacher_outputs.cache={settings.cache})"
    )


def for_run(settings: OutputSettings, accelerator: str, teacher: Any, data: Any, method: nn.Module) -> TeacherOutputs:
    """The teacher-output path of this run and, when cached, its table (stored with the teacher
    in its cache folder; a teacher from ``teacher.ckpt_path`` has none, its table stays in memory).
    ``teacher`` is a ``teacher.cache.Teacher``; ``accelerator`` the trainer's. Logs one line saying
    which path is taken and why."""
    mode, reason = decide(settings, data, method)
    if mode != "cached":
        log.info("teacher outputs: %s: %s", mode, reason)
        return TeacherOutputs(mode, reason)
    start = time.perf_counter()
    folder = Path(teacher.path)
    inputs = adapter.training_inputs(data)
    device = compute_device(accelerator, teacher.model)
    # the training batch size: the teacher's cost per sample is then the live path's (on a CPU,
    # batches of 512 CIFAR images take ~1.8x as long per image as batches of 64-128)
    batch_size = int(getattr(data, "batch_size", None) or BATCH_SIZE)
    try:
        if teacher.cache in ("hit", "miss") and folder.is_dir():
            table, source, path = obtain_table(
                teacher.model, inputs, folder, teacher.key, settings.dtype, settings.top_k, device, batch_size
            )
        else:
            logits = compute(teacher.model, inputs, batch_size, device)
            table, source, path = expand(compress(logits, settings.dtype, settings.top_k)), "memory", None
    except InputsChanged as error:
        if settings.cache == "cached":
            raise ConfigError(
                f"teacher_outputs.cache=cached is not allowed here: {error}; use teacher_outputs.cache=auto or live"
            ) from None
        reason = f"{error} (teacher_outputs.cache={settings.cache})"
        log.info("teacher outputs: live: %s", reason)
        return TeacherOutputs("live", reason, seconds=time.perf_counter() - start)
    outputs = TeacherOutputs(mode, reason, table, source, path, time.perf_counter() - start)
    where = f"{path} ({source})" if path is not None else "memory (a teacher.ckpt_path teacher is not cached)"
    log.info(
        "teacher outputs: cached: %s; %d x %d logits (%s%s) from %s in %.2f s",
        reason,
        *table.shape,
        settings.dtype,
        f", top-{settings.top_k}" if settings.top_k else "",
        where,
        outputs.seconds,
    )
    return outputs


def compute_device(accelerator: str, model: nn.Module) -> torch.device:
    """This process's GPU when the run trains on one, else where the teacher is."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# -- computing and storing -----------------------------------------------------------------------
def compute(
    model: nn.Module, inputs: Inputs, batch_size: int = BATCH_SIZE, device: torch.device | None = None
) -> Tensor:
    """``model``'s float32 logits for every training sample of ``inputs``, in order, in eval mode, on
    the CPU (a tensor is cut into batches of ``batch_size``). The model is put back in its mode
    and on its device afterwards."""
    return _forward(model, inputs, batch_size, device, digest=False)[0]


@torch.no_grad()
def _forward(
    model: nn.Module, inputs: Inputs, batch_size: int, device: torch.device | None, digest: bool
) -> tuple[Tensor, str | None]:
    """The logits of ``compute`` and, if asked, the ``inputs_digest`` of the inputs they were computed from."""
    parameter = next(model.parameters(), None)
    home = parameter.device if parameter is not None else torch.device("cpu")
    device = device or home
    was_training = model.training
    hashed = _Digest(len(inputs)) if digest else None
    model.eval().to(device)
    try:
        chunks = []
        for batch in batches(inputs, batch_size):
            if hashed is not None:
                hashed.update(batch)
            chunks.append(model(batch.to(device)).float().cpu())
    finally:
        model.train(was_training).to(home)
    return torch.cat(chunks), hashed.hexdigest() if hashed is not None else None


def batches(inputs: Inputs, batch_size: int = BATCH_SIZE) -> Iterator[Tensor]:
    """The input batches of ``inputs`` in sample order: slices of a tensor, or a fresh pass over an iterable."""
    if isinstance(inputs, Tensor):
        for start in range(0, len(inputs), batch_size):
            yield inputs[start : start + batch_size]
    else:
        yield from inputs


def compress(logits: Tensor, dtype: str = "float32", top_k: int | None = None) -> dict[str, Any]:
    """What is stored for ``logits`` (N×C): all of them, or per sample the ``top_k`` largest
    (values and class indices) and the mean of the others; in ``dtype``."""
    kind = DTYPES[dtype]
    classes = logits.shape[1]
    if top_k is None or top_k >= classes:
        return {"values": logits.to(kind), "classes": classes}
    values, indices = logits.topk(top_k, dim=1)
    rest = (logits.double().sum(dim=1) - values.double().sum(dim=1)) / (classes - top_k)
    # the rest's mean is at most the k-th value; rounding keeps that (it is monotone)
    return {
        "values": values.to(kind),
        "indices": indices.to(torch.int32 if classes < 2**31 else torch.int64),
        "rest": rest.to(kind),
        "classes": classes,
    }


def expand(stored: dict[str, Any]) -> Tensor:
    """Dense float32 N×C logits from ``compress``'s output: the kept entries exactly (as stored),
    every other class at the mean of the teacher's other logits."""
    values = stored["values"].float()
    if "indices" not in stored:
        return values.contiguous()
    dense = stored["rest"].float().unsqueeze(1).repeat(1, int(stored["classes"]))
    return dense.scatter_(1, stored["indices"].long(), values)


def inputs_digest(inputs: Inputs) -> str:
    """A hash of the training inputs (shape, dtype, bytes): a table is never served for other data.
    Over batches it is the hash of their concatenation, computed without holding it."""
    hashed = _Digest(len(inputs))
    for batch in [inputs] if isinstance(inputs, Tensor) else inputs:
        hashed.update(batch)
    return hashed.hexdigest()


class _Digest:
    """SHA-256 of ``(N, *sample shape)``, the dtype and the bytes of the input batches, in order."""

    def __init__(self, samples: int) -> None:
        self.samples, self.hash = samples, None

    def update(self, batch: Tensor) -> None:
        if self.hash is None:
            self.hash = hashlib.sha256(f"{(self.samples, *batch.shape[1:])}{batch.dtype}".encode())
        self.hash.update(batch.detach().cpu().contiguous().view(torch.uint8).numpy())

    def hexdigest(self) -> str:
        return (self.hash or hashlib.sha256()).hexdigest()[:16]


def entry_name(teacher_key: str, digest: str, dtype: str, top_k: int | None) -> str:
    """The stored table's file name: a hash of everything that determines its content."""
    blob = json.dumps(
        {"teacher": teacher_key, "inputs": digest, "dtype": dtype, "top_k": top_k, "format": FORMAT}, sort_keys=True
    )
    suffix = f"-top{top_k}" if top_k else ""
    return f"logits-{dtype}{suffix}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt"


def obtain_table(
    model: nn.Module,
    inputs: Inputs,
    folder: Path,
    teacher_key: str,
    dtype: str = "float32",
    top_k: int | None = None,
    device: torch.device | None = None,
    batch_size: int = BATCH_SIZE,
) -> tuple[Tensor, str, Path]:
    """``(table, "hit"|"miss", path)``: the stored table of this teacher and these inputs, or
    computed now and stored, under a file lock so that concurrent jobs compute it once.

    Inputs given as batches are read twice on a miss (for the digest, then for the teacher): if
    the two passes differ, ``InputsChanged`` is raised and nothing is stored."""
    digest = inputs_digest(inputs)
    path = folder / FOLDER / entry_name(teacher_key, digest, dtype, top_k)
    stored = _load(path, len(inputs), digest)
    if stored is not None:
        return expand(stored), "hit", path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        stored = _load(path, len(inputs), digest)  # another job may have stored it while we waited
        if stored is not None:
            return expand(stored), "hit", path
        logits, again = _forward(model, inputs, batch_size, device, digest=not isinstance(inputs, Tensor))
        if again is not None and again != digest:
            raise InputsChanged(
                "two passes over the training set gave different inputs (a random transform?), "
                "so the teacher's inputs change every epoch"
            )
        stored = {
            **compress(logits, dtype, top_k),
            "format": FORMAT,
            "teacher_key": teacher_key,
            "inputs": digest,
            "samples": len(inputs),
        }
        atomic_save(path, lambda handle: torch.save(stored, handle))
    return expand(stored), "miss", path


def _load(path: Path, samples: int, digest: str) -> dict[str, Any] | None:
    """The stored table at ``path`` if it is there and belongs to these inputs, else None."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unreadable entry is recomputed, never trusted
        log.warning("teacher outputs: ignoring unreadable %s (%s)", path, error)
        return None
    if stored.get("format") != FORMAT or stored.get("inputs") != digest or stored.get("samples") != samples:
        log.warning("teacher outputs: ignoring %s: it was made for other inputs or by another version", path)
        return None
    return stored
