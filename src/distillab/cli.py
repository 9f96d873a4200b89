"""Command-line checks that run before Hydra starts a job.

Hydra reports a bad override as a multi-line composition error (or only when a sweep job
reaches it). Composing the config once per distinct override value up front turns every
such mistake, and every out-of-range value, into one line naming the key and what is
allowed, with exit code 2 and nothing written.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from distillab import settings
from distillab.conf import CONF_DIR
from distillab.config import ConfigError, validate

# This module is imported before any heavy package: a config error is reported before torch and
# Lightning load (they take seconds), and ``run_job`` imports the pipeline only for a real job.
# Hydra flags that print or inspect something instead of running a job
_NO_CHECK = ("help", "hydra_help", "version", "cfg", "info", "shell_completion", "experimental_rerun")


def override_variants(overrides: list[str]) -> Iterable[list[str]]:
    """The overrides with each sweep replaced by one of its values: first all first values,
    then each other value of each sweep once (linear in the number of values, not a product)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for override, text in zip(parsed, overrides):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in _sweep_values(override)])
        else:
            choices.append([text])
    base = [values[0] for values in choices if values]
    yield base
    for i, values in enumerate(choices):
        for value in values[1:]:
            variant = list(base)
            variant[sum(1 for v in choices[:i] if v)] = value
            yield variant


def _sweep_values(override: Override) -> list[str]:
    """The values to check of one sweep: each of a choice or a range, and both ends of an
    interval (``interval(0,1)``, ``tag(log,interval(...))``), between which Optuna samples."""
    if override.is_interval_sweep():
        sweep = override.value()
        return [repr(float(sweep.start)), repr(float(sweep.end))]
    try:
        return list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - a sweep this check cannot enumerate is left to the sweeper
        return []


def explain(error: BaseException, overrides: list[str] | None = None) -> str:
    """One line naming the key at fault and what is allowed."""
    if isinstance(error, ConfigError):
        return str(error)
    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").rsplit("/", 1)
        name = group[-1]
        group_name = group[0] if len(group) > 1 else "config"
        if group_name == "model":  # teacher= and student= name a model file
            roles = [o.split("=", 1)[0].lstrip("+~") for o in overrides or [] if o.endswith(f"={name}")]
            group_name = next((r for r in roles if r in ("teacher", "student")), "model")
        hint = '; the Optuna sweeper comes with pip install -e ".[tune]"' if name == "optuna" else ""
        return f"{group_name}={name} is not an option; allowed: {', '.join(sorted(error.options))}{hint}"
    cause = error.__cause__ if isinstance(error, HydraException) and error.__cause__ else error
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        return f"{cause.full_key} is not a known key{_allowed_keys(cause.full_key, overrides or [])}"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    if isinstance(cause, OmegaConfBaseException):
        return str(cause).splitlines()[0]
    return " ".join(str(error).split()) or type(error).__name__


def _allowed_keys(full_key: str, overrides: list[str]) -> str:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    others = [o for o in overrides if not o.lstrip("+~").startswith(full_key)]
    try:
        cfg = _compose(others)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        keys = [k for k in node.keys() if not str(k).startswith("_")]
    except Exception:  # noqa: BLE001 - the hint is optional
        return ""
    where = parent or "the top level"
    listed = ", ".join(map(str, keys)) or "none with this option"
    return f"; allowed keys of {where}: {listed}"


def _compose(overrides: list[str], config_dir: Path = CONF_DIR, config_name: str = "train") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, False)
    return cfg


def check(overrides: list[str], config_dir: Path = CONF_DIR, config_name: str = "train") -> None:
    """Raise ``ConfigError`` (one line) if any variant of ``overrides`` is not a valid run."""
    for variant in override_variants(overrides):
        try:
            validate(_compose(variant, config_dir, config_name))
        except ConfigError:
            raise
        except (HydraException, OmegaConfBaseException) as error:
            raise ConfigError(explain(error, variant)) from None


def check_launcher(overrides: list[str], config_dir: Path = CONF_DIR, config_name: str = "train") -> None:
    """Raise ``ConfigError`` (one line) for a bad value of distillab's own launcher (``hydra/launcher=
    stacked``), given the command line's ``hydra`` overrides; other launchers check their own."""
    if not any(o.replace(" ", "").startswith("hydra/launcher=") for o in overrides):
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            node = compose(config_name, overrides=overrides, return_hydra_config=True).hydra.launcher
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(explain(error, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    target = str(node.get("_target_", ""))
    if target.startswith("hydra_plugins.distillab_launcher."):
        values = OmegaConf.to_container(node, resolve=True)
        settings.check("hydra.launcher", {k: v for k, v in values.items() if k != "_target_"}, target)


def run_job(cfg: DictConfig, handoff: Any = None) -> float:
    """One Hydra job: run it, and turn its failure into one line and an exit code. ``handoff``: what
    the stacked launcher trained for the job (``steps.handoff.Handoff``), passed on to the run.

    Bad input exits with 2 (nothing written); a failed run with 1, after its results.json
    recorded the error. ``HYDRA_FULL_ERROR=1`` shows the traceback instead. Returns the
    objective a Hydra sweeper maximises (see ``objective``), -inf for a failed job of a sweep:
    Optuna records NaN as a failed trial, which ``n_trials`` does not count, while -inf is
    recorded as the worst complete trial and tuning goes on.
    """
    from distillab import pipeline

    try:
        record = pipeline.run(cfg, handoff=handoff)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        remove_empty_run(Path(str(cfg.paths.output_dir)))
        sys.exit(2)
    except Exception as error:  # noqa: BLE001 - the run already recorded it in results.json
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(error).split())
        print(
            f"error: run failed: {type(error).__name__}: {message} (HYDRA_FULL_ERROR=1 shows the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
    value = objective(record)
    return float("-inf") if math.isnan(value) else value


def remove_empty_run(folder: Path) -> None:
    """Bad input found inside the job leaves no run behind: the folder goes when it holds nothing
    but what Hydra itself wrote at the start (``.hydra/``, the log)."""
    if not folder.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in folder.iterdir()):
        return
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def objective(record: dict) -> float:
    """The student's validation accuracy (the compressed model's when the teacher was compressed).

    NaN, never None, when there is none (a failed job of a sweep): None is no number at all.
    ``run_job`` hands a sweeper -inf instead: Optuna records it as the worst trial and goes on.
    """
    from distillab import results

    value = (results.tuned_model(record).get("val") or {}).get("acc")
    return float(value) if value is not None else float("nan")


#: keys that were plain values before they became config groups: Hydra takes no null for a group,
#: so the old way of saying "none" (teacher_assistant=null, or null in a sweep's list) is read as none
NULL_IS_NONE = ("teacher_assistant",)


def null_as_none(override: str) -> str:
    """``teacher_assistant=null`` (or ``=null,cnn``) as ``teacher_assistant=none`` (``=none,cnn``)."""
    key, sep, value = override.partition("=")
    if not sep or key.lstrip("+") not in NULL_IS_NONE:
        return override
    return f"{key}={','.join('none' if choice.strip() == 'null' else choice for choice in value.split(','))}"


def check_command_line(argv: list[str] | None = None) -> None:
    """Check the command line (``sys.argv`` when ``argv`` is None) before the heavy imports: a
    mistake is one line and exit 2. The old spelling of a key that became a group is read anew in
    place, so that Hydra, which parses ``sys.argv`` after this, reads it too."""
    if argv is None:
        sys.argv[1:] = [null_as_none(arg) for arg in sys.argv[1:]]
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else [null_as_none(arg) for arg in argv])
    if any(getattr(args, name, None) for name in _NO_CHECK):
        return
    config_name = args.config_name or "train"
    # Hydra's own settings do not change what a job computes, except where its configs come from
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    search = [o.split("=", 1)[1].strip("[]") for o in args.overrides if o.lstrip("+").startswith("hydra.searchpath=")]
    folders = [entry.strip() for entries in search for entry in entries.split(",") if entry.strip()]
    if args.config_dir:
        # Hydra's --config-dir adds a folder to the search path; conf/ stays the primary one
        folders.append(f"file://{Path(args.config_dir).resolve()}")
    if folders:
        overrides.append(f"hydra.searchpath=[{','.join(folders)}]")
    try:
        check(overrides, CONF_DIR, config_name)
        # a preset (sweep=tune_kd) may choose the sweeper whose keys the hydra overrides set
        first_job = next(iter(override_variants(overrides)), [])
        hydra_overrides = [o for o in args.overrides if o.lstrip("+~").startswith("hydra")]
        check_launcher([*first_job, *hydra_overrides], CONF_DIR, config_name)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        GlobalHydra.instance().clear()
