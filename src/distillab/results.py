"""``results.json``: one flat, stable record per run, written atomically.

Schema (accuracies are fractions in [0, 1]; see the README for every field):
    status, error?, config_hash, group, overrides, seed, dataset, method, compress,
    teacher {arch, params, cache, cache_key, test {acc, f1, precision, recall}},
    student {arch, params, nonzero_params, size_bytes, macs, latency_ms {batch_1, batch_64},
             test {acc, f1, precision, recall, agreement}, val {acc}},
    compressed {same as student; absent when compress=none},
    ratios {params, size, acc_retention}, timing_s {teacher, student, compress, total},
    env {git_commit, python, torch, lightning, hydra, device}
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distillab.io import atomic_write_json

FILENAME = "results.json"
SCHEMA_VERSION = 1
REQUIRED_OK = ("config_hash", "group", "overrides", "seed", "dataset", "method", "compress",
               "teacher", "timing_s", "env")
# settings that change where and how a run is shown, not what it computes; `rerun` only says
# whether a finished job is run again, so a forced rerun still matches the result it replaces
NOT_HASHED = ("paths", "logger", "callbacks", "rerun")


def config_hash(cfg: DictConfig) -> str:
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_HASHED:
        container.pop(key, None)
    container.get("trainer", {}).pop("enable_progress_bar", None)
    blob = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    """Raise ValueError when a record misses a field of the schema."""
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
    for role in ("teacher", "student", "compressed"):
        block = results.get(role)
        if block is None:
            continue
        for name, value in block.get("test", {}).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{role}.test.{name}={value} is not a fraction in [0, 1]")


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


def previous(folder: str | Path, cfg: DictConfig) -> tuple[dict[str, Any] | None, str | None]:
    """What an earlier attempt of the job ``cfg`` left in ``folder``.

    ``(record, None)`` when its results.json is complete for ``cfg``: it parses, passes ``check``,
    has status ok and the config hash of ``cfg``. ``(None, why)`` when there is one but it is not
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
    stored, current = record.get("config_hash"), config_hash(cfg)
    if stored != current:
        return None, (f"its {FILENAME} is the result of another configuration (config {stored}, this job's is "
                      f"{current}): the folder was reused")
    return record, None


def completed(folder: str | Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The record in ``folder`` when it is a complete result of ``cfg`` (see ``previous``), else None."""
    return previous(folder, cfg)[0]
