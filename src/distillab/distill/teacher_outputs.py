"""Cached teacher outputs: the frozen teacher's logits for the whole training split, computed once.

When the student's training inputs are deterministic (no random augmentation), a frozen
teacher in eval mode gives each training sample the same logits in every epoch, so running
it at every step repeats the same work. Instead, its logits are computed once, in sample
order, stored with the teacher in its cache folder, and the student's step reads them by the
sample index its batch carries (``DistillationModule(teacher_table=...)``).

``teacher_outputs.cache`` chooses the path: ``auto`` (the default) takes the table when the
inputs are deterministic and the loss reads nothing but the teacher's logits, the live
teacher otherwise; ``cached`` insists on the table (an error when it cannot apply); ``live``
never uses it.

Exact and approximate: the full table in float32 holds the teacher's float32 logits, so the
loss equals the live path's up to float rounding (the teacher runs on batches of another
composition). ``dtype: float16`` rounds every logit to half precision (relative error about
5e-4); ``top_k: k`` keeps the k largest logits of each sample exactly and gives every other
class the mean of the teacher's remaining logits, which is at most the k-th: the soft targets
keep their top k and the mass of the rest, not its order. Both shrink the stored file; on the
device the table is always a dense float32 N×C tensor.

A stored table is named by what determines it (the teacher's cache key, a hash of the
training inputs, dtype and top-k), written atomically under a file lock, so two sweep jobs
that need it at once compute it once, and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig
from torch import Tensor, nn

from distillab.config import ConfigError
from distillab.io import atomic_save

log = logging.getLogger(__name__)

MODES = ("auto", "cached", "live")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMAT = 1
FOLDER = "outputs"  # inside the teacher's cache folder
BATCH_SIZE = 128  # samples per teacher forward pass while filling the table, if the data has no batch_size


@dataclass
class TeacherOutputs:
    """How the student's step gets the teacher's logits in this run."""

    mode: str  # "cached" | "live" | "none" (the loss needs no teacher)
    reason: str
    table: Tensor | None = None  # N×C float32 logits, row i for training sample i
    source: str = ""  # "hit" | "miss" (stored file) | "memory" (not stored); cached mode only
    path: Path | None = None
    seconds: float = 0.0


# -- which path ----------------------------------------------------------------------------------
def settings(cfg: DictConfig) -> dict[str, Any]:
    node = cfg.get("teacher_outputs") or {}
    top_k = node.get("top_k")
    return {"cache": str(node.get("cache", "auto")), "dtype": str(node.get("dtype", "float32")),
            "top_k": None if top_k is None else int(top_k)}


def obstacle(data: Any, loss: nn.Module) -> str | None:
    """Why a table cannot stand in for the live teacher in this run, or None when it can."""
    if getattr(loss, "needs_features", False):
        return f"distill={loss.method} reads the teacher's intermediate features, which need the live teacher"
    if not hasattr(data, "splits") or not hasattr(data, "augments"):
        return (f"{type(data).__name__} does not serve training batches with sample indices "
                "(distillab.data.InMemoryDataModule does)")
    if data.augments:
        return "training batches are randomly augmented, so the teacher's inputs change every epoch"
    return None


def decide(cfg: DictConfig, data: Any, loss: nn.Module) -> tuple[str, str]:
    """``(mode, reason)``: ``cached``, ``live``, or ``none`` when the loss needs no teacher.
    ``teacher_outputs.cache=cached`` where a table cannot apply is a ``ConfigError``."""
    setting = settings(cfg)["cache"]
    if not getattr(loss, "needs_teacher", False):
        return "none", f"distill={getattr(loss, 'method', '') or type(loss).__name__} needs no teacher"
    if setting == "live":
        return "live", "teacher_outputs.cache=live"
    problem = obstacle(data, loss)
    if problem is not None:
        if setting == "cached":
            raise ConfigError(f"teacher_outputs.cache=cached is not allowed here: {problem}; "
                              "use teacher_outputs.cache=auto or live")
        return "live", f"{problem} (teacher_outputs.cache={setting})"
    return "cached", (f"the training inputs are deterministic and distill={loss.method} reads only the "
                      f"teacher's logits (teacher_outputs.cache={setting})")


def check(cfg: DictConfig, data: Any, loss: nn.Module) -> None:
    """Fail before any training when ``teacher_outputs.cache=cached`` cannot apply."""
    decide(cfg, data, loss)


def for_run(cfg: DictConfig, teacher: Any, data: Any, loss: nn.Module) -> TeacherOutputs:
    """The teacher-output path of this run and, when cached, its table (stored with the teacher
    in its cache folder; a teacher from ``teacher.ckpt_path`` has none, its table stays in memory).
    ``teacher`` is a ``teachers.Teacher``. Logs one line saying which path is taken and why."""
    mode, reason = decide(cfg, data, loss)
    if mode != "cached":
        log.info("teacher outputs: %s: %s", mode, reason)
        return TeacherOutputs(mode, reason)
    start = time.perf_counter()
    options = settings(cfg)
    folder = Path(teacher.path)
    inputs = data.splits["train"][0]
    device = compute_device(cfg, teacher.model)
    # the training batch size: the teacher's cost per sample is then the live path's (on a CPU,
    # batches of 512 CIFAR images take ~1.8x as long per image as batches of 64-128)
    batch_size = int(getattr(data, "batch_size", None) or BATCH_SIZE)
    if teacher.cache in ("hit", "miss") and folder.is_dir():
        table, source, path = obtain_table(teacher.model, inputs, folder, teacher.key, options["dtype"],
                                           options["top_k"], device, batch_size)
    else:
        logits = compute(teacher.model, inputs, batch_size, device)
        stored = compress(logits, options["dtype"], options["top_k"])
        table, source, path = expand(stored), "memory", None
    outputs = TeacherOutputs(mode, reason, table, source, path, time.perf_counter() - start)
    where = f"{path} ({source})" if path is not None else "memory (a teacher.ckpt_path teacher is not cached)"
    log.info("teacher outputs: cached: %s; %d x %d logits (%s%s) from %s in %.2f s", reason, *table.shape,
             options["dtype"], f", top-{options['top_k']}" if options["top_k"] else "", where, outputs.seconds)
    return outputs


def compute_device(cfg: DictConfig, model: nn.Module) -> torch.device:
    """This process's GPU when the run trains on one, else where the teacher is."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# -- computing and storing -----------------------------------------------------------------------
@torch.no_grad()
def compute(model: nn.Module, inputs: Tensor, batch_size: int = BATCH_SIZE,
            device: torch.device | None = None) -> Tensor:
    """``model``'s float32 logits for every row of ``inputs``, in order, in eval mode, on the CPU.
    The model is put back in its mode and on its device afterwards."""
    parameter = next(model.parameters(), None)
    home = parameter.device if parameter is not None else torch.device("cpu")
    device = device or home
    was_training = model.training
    model.eval().to(device)
    try:
        chunks = [model(inputs[start : start + batch_size].to(device)).float().cpu()
                  for start in range(0, len(inputs), batch_size)]
    finally:
        model.train(was_training).to(home)
    return torch.cat(chunks)


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
    return {"values": values.to(kind), "indices": indices.to(torch.int32 if classes < 2**31 else torch.int64),
            "rest": rest.to(kind), "classes": classes}


def expand(stored: dict[str, Any]) -> Tensor:
    """Dense float32 N×C logits from ``compress``'s output: the kept entries exactly (as stored),
    every other class at the mean of the teacher's other logits."""
    values = stored["values"].float()
    if "indices" not in stored:
        return values.contiguous()
    dense = stored["rest"].float().unsqueeze(1).repeat(1, int(stored["classes"]))
    return dense.scatter_(1, stored["indices"].long(), values)


def inputs_digest(inputs: Tensor) -> str:
    """A hash of the training inputs (shape, dtype, bytes): a table is never served for other data."""
    digest = hashlib.sha256(f"{tuple(inputs.shape)}{inputs.dtype}".encode())
    digest.update(inputs.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def entry_name(teacher_key: str, digest: str, dtype: str, top_k: int | None) -> str:
    """The stored table's file name: a hash of everything that determines its content."""
    blob = json.dumps({"teacher": teacher_key, "inputs": digest, "dtype": dtype, "top_k": top_k,
                       "format": FORMAT}, sort_keys=True)
    suffix = f"-top{top_k}" if top_k else ""
    return f"logits-{dtype}{suffix}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt"


def obtain_table(model: nn.Module, inputs: Tensor, folder: Path, teacher_key: str, dtype: str = "float32",
                 top_k: int | None = None, device: torch.device | None = None,
                 batch_size: int = BATCH_SIZE) -> tuple[Tensor, str, Path]:
    """``(table, "hit"|"miss", path)``: the stored table of this teacher and these inputs, or
    computed now and stored, under a file lock so that concurrent jobs compute it once."""
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
        stored = {**compress(compute(model, inputs, batch_size, device), dtype, top_k),
                  "format": FORMAT, "teacher_key": teacher_key, "inputs": digest, "samples": len(inputs)}
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
