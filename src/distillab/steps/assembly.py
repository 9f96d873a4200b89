"""A run's record assembled: every model evaluated on the test split, once, for its chosen
checkpoint, and measured; ``results`` holds the schema, the hashes and the file, without torch."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distillab.results import environment, group_of


@dataclasses.dataclass(frozen=True)
class Models:
    """The models a run reports. ``teacher``: a ``teacher.cache.Teacher``; ``student`` the trained
    student (None when the teacher was compressed), ``student_arch`` its architecture and
    ``best_epoch`` its chosen epoch; ``outputs``: how it got the teacher's logits; ``compressed``: a
    ``steps.compression.CompressedRun`` or None; ``assistant``: the teacher assistant the student
    learned from (a ``Teacher``); ``peers``: the (architecture, model) of every peer of a co-training
    run, peer 0 the student."""

    teacher: Any
    student: Any = None
    student_arch: str = ""
    best_epoch: int | None = None
    outputs: str = "none"
    compressed: Any = None
    assistant: Any = None
    peers: Sequence[tuple[str, Any]] = ()


def header(hashes: dict[str, Any], overrides: list[str], seed: int, data: Any, names: dict[str, str]) -> dict[str, Any]:
    """The top of results.json: what ran (the config's ``results.hashes``, the job's ``overrides``),
    with which data (``names``: its dataset, the method and the compression)."""
    labelled = (
        {"labelled_fraction": data.labelled_fraction, "labelled_samples": int(data.labelled_mask().sum())}
        if hasattr(data, "labelled_mask")
        else {"labelled_fraction": 1.0, "labelled_samples": None}
    )
    return {
        "status": "ok",
        "config_hash": hashes["config_hash"],
        "setting_hashes": hashes["setting_hashes"],
        "group": group_of(overrides),
        "overrides": overrides,
        "seed": seed,
        "split_seed": hashes["split_seed"],
        "dataset": names["dataset"],
        **labelled,
        "method": names["method"],
        "compress": names["compress"],
    }


def assemble(
    header: dict[str, Any], models: Models, data: Any, info: Any, how: dict[str, Any], root_dir: Path
) -> dict[str, Any]:
    """A run's record: ``header`` (what ran), then every one of ``models`` evaluated on the test
    split of ``data``, once, for its chosen checkpoint, and measured (``how``: the measure settings;
    ``info``: the data's ``DataInfo``)."""
    shape, classes = info.input_shape, info.num_classes
    teacher, student, compressed = models.teacher, models.student, models.compressed
    data.setup("test")
    teacher_part, teacher_preds = teacher_block(teacher, data.test_dataloader(), classes, shape, how, models.outputs)
    record = {**header, "test_samples": len(teacher_preds), "teacher": teacher_part}
    if teacher.members:
        record["teachers"] = [teacher_block(m, data.test_dataloader(), classes, shape, how)[0] for m in teacher.members]
    if models.assistant is not None:
        block, _ = teacher_block(models.assistant, data.test_dataloader(), classes, shape, how, models.outputs)
        record["teacher_assistant"] = {**block, "best_epoch": models.assistant.metrics.get("best_epoch")}
    if student is not None:
        block = model_block(student, data.test_dataloader(), data.val_dataloader(), classes, shape, teacher_preds, how)
        record["student"] = {
            "arch": models.student_arch,
            **with_drops(block, teacher=teacher_part),
            "best_epoch": models.best_epoch,
        }
        record["ratios"] = ratios(record["student"], teacher_part)
    if models.peers:
        record["peers"] = [
            {
                "peer": k,
                "arch": arch,
                **with_drops(
                    model_block(m, data.test_dataloader(), data.val_dataloader(), classes, shape, teacher_preds, how),
                    teacher=teacher_part,
                ),
            }
            for k, (arch, m) in enumerate(models.peers)
        ]
        record["kept_peer"] = 0
    if compressed is not None:
        block = model_block(
            compressed.result.model, data.test_dataloader(), data.val_dataloader(), classes, shape, teacher_preds, how
        )
        base = record.get(compressed.role) or teacher_part
        block = with_drops(block, teacher=teacher_part, uncompressed=base)
        record["compressed"] = compressed_block(compressed, base, teacher_part, block, shape)
    record["env"] = environment(root_dir, str(device_of(teacher.model)))
    return record


def model_block(
    model: Any,
    test: Any,
    val: Any,
    num_classes: int,
    input_shape: tuple[int, ...],
    teacher_preds: Any,
    how: dict[str, Any],
) -> dict[str, Any]:
    """Measurements and test/val metrics of one model (the ``test`` and ``val`` loaders, one pass
    each); quantized models run on the CPU. ``agreement`` is against ``teacher_preds``."""
    from distillab import measure
    from distillab.evaluate import agreement, classification_metrics, predict

    tested, preds = evaluation(model, test, num_classes)
    tested["test"]["agreement"] = agreement(preds, teacher_preds)
    val_preds, val_targets = predict(model, val, device_of(model))
    return {
        **measure.profile(model, input_shape, **how),
        "test": tested.pop("test"),
        "val": {"acc": classification_metrics(val_preds, val_targets, num_classes)["acc"]},
        **tested,
    }


def evaluation(model: Any, test: Any, num_classes: int) -> tuple[dict[str, Any], Any]:
    """One pass of ``model`` over the ``test`` loader, and everything that follows from its logits:
    ``test`` {acc, f1, precision, recall}, ``calibration`` {ece, nll} and ``per_class`` {acc};
    with the predictions, which other models are compared with."""
    from distillab.evaluate import calibration, classification_metrics, logits_and_targets, per_class_accuracy

    logits, targets = logits_and_targets(model, test, device_of(model))
    preds = logits.argmax(dim=1)
    return {
        "test": classification_metrics(preds, targets, num_classes),
        "calibration": calibration(logits, targets, num_classes),
        "per_class": {"acc": per_class_accuracy(preds, targets, num_classes)},
    }, preds


def with_drops(block: dict[str, Any], **references: dict[str, Any]) -> dict[str, Any]:
    """``block`` with, for each named reference block (evaluated on the same split), the class it
    loses most accuracy on against that reference: ``per_class.largest_drop_vs_<name>``."""
    from distillab.evaluate import largest_drop

    acc = block["per_class"]["acc"]
    drops = {
        f"largest_drop_vs_{name}": largest_drop(acc, reference["per_class"]["acc"])
        for name, reference in references.items()
    }
    return {**block, "per_class": {**block["per_class"], **drops}}


def teacher_block(
    teacher: Any,
    test: Any,
    num_classes: int,
    input_shape: tuple[int, ...],
    how: dict[str, Any],
    outputs: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """The teacher's block (architecture, cache entry, size, test metrics, calibration, per-class
    accuracy) and its test predictions; ``outputs``: how the student got its logits (cached, live,
    none), absent for an ensemble member."""
    from distillab import measure

    tested, preds = evaluation(teacher.model, test, num_classes)
    block = {
        "arch": teacher.arch,
        **measure.profile(teacher.model, input_shape, **how),
        "cache": teacher.cache,
        "cache_key": teacher.key,
        **({"outputs": outputs} if outputs is not None else {}),
        **tested,
    }
    return block, preds


def compressed_block(
    compressed: Any,
    uncompressed_block: dict[str, Any],
    teacher: dict[str, Any],
    block: dict[str, Any],
    input_shape: tuple[int, ...],
) -> dict[str, Any]:
    """The compressed model's ``block`` (from ``model_block``) with what compression did: the saved
    artifact's bytes, its method and backend, and its ratios to the uncompressed model and the teacher."""
    from distillab import measure

    block["size_bytes"] = compressed.artifact.stat().st_size  # the saved artifact
    if not block["macs"]:  # int8 kernels are invisible to the FLOP counter: same MACs in int8
        block["macs"] = measure.macs(compressed.float_model, input_shape)
    return {
        "arch": compressed.arch,
        "of": compressed.role,
        "method": compressed.result.method,
        "backend": compressed.result.backend,
        **block,
        "details": compressed.result.details,
        "vs_uncompressed": ratios(block, uncompressed_block),
        "vs_teacher": ratios(block, teacher),
    }


def device_of(model: Any) -> Any:
    """Where the model's parameters are; int8 models hold none and run on the CPU."""
    import torch

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
