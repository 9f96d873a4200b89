"""``results.json``: one flat, stable record per run, written atomically.

Schema (accuracies are fractions in [0, 1]; docs/results.md describes every field):
    status, error?, config_hash, setting_hashes {setting, without_distill, without_compress}, group,
    overrides, seed, split_seed, dataset, method, compress, test_samples,
    teacher {arch, params, cache, cache_key, test {acc, f1, precision, recall}, calibration {ece, nll},
             per_class {acc [per class]}},
    student {arch, params, nonzero_params, size_bytes, macs, latency_ms {batch_1, batch_64},
             test {acc, f1, precision, recall, agreement}, val {acc}, calibration {ece, nll},
             per_class {acc, largest_drop_vs_teacher {class, drop}}},
    compressed {same as student, per_class also largest_drop_vs_uncompressed; absent when compress=none},
    ratios {params, size, acc_retention}, timing_s {teacher, student, compress, total},
    env {git_commit, python, torch, lightning, hydra, device}
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import platform
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distillab.io import atomic_write_json

FILENAME = "results.json"
SCHEMA_VERSION = 1
REQUIRED_OK = (
    "config_hash",
    "group",
    "overrides",
    "seed",
    "dataset",
    "method",
    "compress",
    "teacher",
    "timing_s",
    "env",
)
# settings that change where and how a run is shown, not what it computes; `rerun` only says
# whether a finished job is run again, so a forced rerun still matches the result it replaces
NOT_HASHED = ("paths", "logger", "callbacks", "rerun")


def config_hash(cfg: DictConfig) -> str:
    return _digest(_hashed(cfg))


def hashes(cfg: DictConfig) -> dict[str, Any]:
    """What results.json says of the whole config: ``config_hash``, ``setting_hashes``, ``split_seed``."""
    return {"config_hash": config_hash(cfg), "setting_hashes": setting_hashes(cfg), "split_seed": split_seed(cfg)}


def _hashed(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_HASHED:
        container.pop(key, None)
    container.get("trainer", {}).pop("enable_progress_bar", None)
    assistant = container.get("teacher_assistant")
    if isinstance(assistant, dict) and not assistant.get("_target_"):
        container["teacher_assistant"] = None  # no assistant: hashed as before its node had recipe keys
    return container


def _digest(container: dict[str, Any]) -> str:
    blob = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_seed(cfg: DictConfig) -> int | None:
    """The seed of the data split (``data.split_seed``); None for a datamodule without one."""
    data = cfg.get("data")
    value = data.get("split_seed") if isinstance(data, DictConfig) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def setting_hashes(cfg: DictConfig) -> dict[str, str]:
    """What the report pairs and merges jobs by, all without the replicate (``seed`` and
    ``data.split_seed``): ``setting`` is the whole configuration, so jobs with the same one are
    replicates of one setting (also across sweep folders); ``without_distill`` leaves out the
    method and ``without_compress`` the compression, so jobs that share it differ in that part
    alone and are compared replicate by replicate (``docs/sweeps.md``)."""
    container = _hashed(cfg)
    container.pop("seed", None)
    if isinstance(container.get("data"), dict):
        container["data"].pop("split_seed", None)
    without = {f"without_{part}": {k: v for k, v in container.items() if k != part} for part in ("distill", "compress")}
    return {"setting": _digest(container), **{key: _digest(rest) for key, rest in without.items()}}


def group_of(overrides: list[str]) -> str:
    """The configuration a job belongs to: its overrides minus the seed."""
    kept = sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("seed", "rerun"))
    return " ".join(kept) if kept else "(defaults)"


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(root: Path, device: str) -> dict[str, Any]:
    import hydra
    import pytorch_lightning
    import torch

    return {
        "git_commit": git_commit(root),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pytorch_lightning.__version__,
        "hydra": hydra.__version__,
        "device": device,
    }


def check(results: dict[str, Any]) -> None:
    """Raise ValueError when a record misses a field of the schema or a model block holds a malformed
    value (``check_model_block``)."""
    if results.get("status") not in ("ok", "failed"):
        raise ValueError(f"results.status must be 'ok' or 'failed', got {results.get('status')!r}")
    if results["status"] == "failed":
        if not isinstance(results.get("error"), str) or "\n" in results["error"]:
            raise ValueError("a failed result needs a one-line 'error'")
        return
    missing = [key for key in REQUIRED_OK if key not in results]
    if "student" not in results and "compressed" not in results:
        missing.append("student (or compressed, when the teacher is compressed)")
    if "student" in results and "ratios" not in results:
        missing.append("ratios")
    if missing:
        raise ValueError(f"results.json misses {', '.join(missing)}")
    for name, block in model_blocks(results):
        check_model_block(name, block)


def model_blocks(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every model block of a record, by its path: ``teacher``, ``teachers.0``, ``peers.1``, ..."""
    roles = ("teacher", "teacher_assistant", "student", "compressed")
    blocks = [(role, results[role]) for role in roles if role in results]
    for role in ("teachers", "peers"):
        blocks += [(f"{role}.{k}", block) for k, block in enumerate(results.get(role) or [])]
    return blocks


def check_model_block(name: str, block: dict[str, Any]) -> None:
    """Raise ValueError when a model block's ``test`` holds a value that is not a fraction, or its
    ``calibration`` or ``per_class`` (when present) is malformed."""
    for key, value in block.get("test", {}).items():
        if not _is_fraction(value):
            raise ValueError(f"{name}.test.{key}={value!r} is not a fraction in [0, 1]")
    if "calibration" in block:
        _check_calibration(f"{name}.calibration", block["calibration"])
    if "per_class" in block:
        _check_per_class(f"{name}.per_class", block["per_class"])


def _check_calibration(name: str, calibration: Any) -> None:
    """``{ece: fraction, nll: nats >= 0}``, both null together when the model's logits were not finite."""
    if not isinstance(calibration, dict) or set(calibration) != {"ece", "nll"}:
        raise ValueError(f"{name} must be an object with exactly the keys ece and nll, got {calibration!r}")
    ece, nll = calibration["ece"], calibration["nll"]
    if ece is None and nll is None:
        return
    if not _is_fraction(ece):
        raise ValueError(f"{name}.ece={ece!r} is not a fraction in [0, 1]")
    if not (_is_number(nll) and nll >= 0.0):
        raise ValueError(f"{name}.nll={nll!r} is not a finite number >= 0 (nats)")


def _check_per_class(name: str, per_class: Any) -> None:
    """``{acc: [fraction or null per class], largest_drop_vs_<reference>: {class, drop}, ...}``."""
    acc = per_class.get("acc") if isinstance(per_class, dict) else None
    if not isinstance(acc, list) or not acc or not all(a is None or _is_fraction(a) for a in acc):
        raise ValueError(f"{name}.acc must be a non-empty list of fractions in [0, 1] (null for an absent class)")
    for key, drop in per_class.items():
        if key == "acc":
            continue
        if not key.startswith("largest_drop_vs_") or not isinstance(drop, dict) or set(drop) != {"class", "drop"}:
            raise ValueError(f"{name}.{key} is not allowed: use acc or largest_drop_vs_<reference> {{class, drop}}")
        k = drop["class"]
        if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(acc) and acc[k] is not None):
            raise ValueError(f"{name}.{key}.class={k!r} is not a class with an accuracy, in [0, {len(acc)})")
        if not (_is_number(drop["drop"]) and -1.0 <= drop["drop"] <= 1.0):
            raise ValueError(f"{name}.{key}.drop={drop['drop']!r} is not a difference of fractions, in [-1, 1]")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_fraction(value: Any) -> bool:
    return _is_number(value) and 0.0 <= value <= 1.0


def write(folder: str | Path, results: dict[str, Any]) -> Path:
    check(results)
    return atomic_write_json(Path(folder) / FILENAME, results)


def tuned_model(record: dict[str, Any]) -> dict[str, Any]:
    """The model block whose validation accuracy a sweeper maximises: the student's, or the
    compressed teacher's when no student was trained; empty for a failed run."""
    return record.get("student") or record.get("compressed") or {}


def read(folder_or_file: str | Path) -> dict[str, Any]:
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / FILENAME
    return json.loads(path.read_text())


def previous(folder: str | Path, current: str) -> tuple[dict[str, Any] | None, str | None]:
    """What an earlier attempt of the job whose config hash is ``current`` left in ``folder``.

    ``(record, None)`` when its results.json is complete for that job: it parses, passes ``check``,
    has status ok and the config hash ``current``. ``(None, why)`` when there is one but it is not
    (a failure, a corrupt file, another configuration's result), ``(None, None)`` when there is none.
    """
    path = Path(folder) / FILENAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:
        return None, f"its {FILENAME} cannot be read ({' '.join(str(error).split())})"
    if not isinstance(record, dict):
        return None, f"its {FILENAME} is not a JSON object"
    if record.get("status") == "failed":
        return None, f"it failed: {record.get('error') or 'no error recorded'}"
    try:
        check(record)
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        return None, f"its {FILENAME} is incomplete: {error}"
    stored = record.get("config_hash")
    if stored != current:
        return None, (
            f"its {FILENAME} is the result of another configuration (config {stored}, this job's is "
            f"{current}): the folder was reused"
        )
    return record, None


def completed(folder: str | Path, current: str) -> dict[str, Any] | None:
    """The record in ``folder`` when it is a complete result of the config hash ``current``
    (see ``previous``), else None."""
    return previous(folder, current)[0]


def failure(error: BaseException, overrides: list[str], seed: Any) -> dict[str, Any]:
    """The record of a run that failed: one line saying why."""
    message = " ".join(str(error).split()) or type(error).__name__
    return {
        "status": "failed",
        "error": f"{type(error).__name__}: {message}"[:500],
        "group": group_of(overrides),
        "overrides": overrides,
        "seed": int(seed) if isinstance(seed, int) else seed,
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

    labels = [
        ("head", ""),
        ("acc", "test accuracy"),
        ("f1", "test macro F1"),
        ("params", "parameters"),
        ("size_bytes", "size (bytes)"),
        ("smaller", "compression (params)"),
        ("retention", "accuracy retention"),
        ("agreement", "agreement with teacher"),
    ]
    rows = [["", *(name for name, _, _ in columns)]]
    rows += [[label or "", *(cell(block, ratio, key) for _, block, ratio in columns)] for key, label in labels]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    )


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"student/test/acc": ...}``: a record's scalars by path, for a logger's run summary."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif not isinstance(value, list):
            flat[name] = value
    return flat
