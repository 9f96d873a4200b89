"""The options of ``conf/`` from Python: what a group offers, and the object an option configures.

``conf/<group>/<option>.yaml`` is the one place a built-in part's values are written; its
class or function declares their types and ranges. So the part as configured is

    from distillab import conf
    fitnet = conf.build("distill", "fitnet", hint_weight=10.0)       # FitNet with its configured values
    cnn = conf.build("model", "cnn", input_shape=(1, 8, 8), num_classes=10)

Only option files without a defaults list are read this way (methods, models, datamodules,
compressors); the run's own composition is Hydra's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import Container, DictConfig, ListConfig, OmegaConf

from distillab import settings

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: keys of the teacher and student nodes that belong to the role, beside the architecture's, and the
#: settings dataclass that declares them
ROLE_KEYS = {"teacher": ("ckpt_path", "recipe"), "student": ("init", "init_weight"), "teacher_assistant": ("recipe",)}
ROLES = {
    "teacher": "distillab.steps.teacher.training.TeacherRole",
    "student": "distillab.distill.transfer.StudentRole",
    "teacher_assistant": "distillab.steps.teacher.assistant.AssistantRole",
}
#: what the run passes to a model itself (vocab_size: to a text model, which declares it)
MODEL_PROVIDED = ("input_shape", "num_classes", "vocab_size")
#: keys of a compress node that belong to the run (``CompressSettings``), not to the method
COMPRESS_KEYS = ("target", "finetune_epochs", "amount", "max_acc_drop", "cycles", "steps")
#: the run's compress keys a node may leave out, and what their absence means (no accuracy budget,
#: one-shot compression): a compressor's YAML written without them keeps working
OPTIONAL_COMPRESS_KEYS = {"max_acc_drop": None, "cycles": 1}


def options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The option names of ``group`` (its YAML files), sorted."""
    return sorted(path.stem for path in (conf_dir / group).glob("*.yaml"))


def load(group: str, option: str, conf_dir: Path = CONF_DIR) -> DictConfig:
    """The node ``conf/<group>/<option>.yaml`` holds, comments and all values."""
    path = conf_dir / group / f"{option}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{group}={option} is not an option; allowed: {', '.join(options(group, conf_dir))}")
    node = OmegaConf.load(path)
    if "defaults" in node:
        raise ValueError(f"{path} has a defaults list: compose it with Hydra instead")
    return node


def build(group: str, option: str, /, **overrides: Any) -> Any:
    """The object ``conf/<group>/<option>.yaml`` configures, with ``overrides`` on top of its values."""
    from hydra.utils import instantiate

    node = load(group, option)
    return instantiate(node, **overrides)


def option_list(group: str, sources: Any) -> str:
    """``"a, b, c"``: the options of ``group`` in every folder of Hydra's config search path
    (``hydra.runtime.config_sources``), for the help text; ``distillab.options`` in YAML."""
    names: set[str] = set()
    for source in sources or []:
        if source.get("schema") == "file" and source.get("path"):
            names.update(options(group, Path(str(source["path"]))))
    return ", ".join(sorted(names))


def unless_budget(amount: Any, *, _parent_: Any) -> Any:
    """``${distillab.unless_budget:<amount>}``: the default ``amount`` a compressor's YAML writes,
    which gives way to the search (null) when its node sets an accuracy budget (``max_acc_drop``).
    So a budget set alone lets the search choose the amounts, while an amount set explicitly
    replaces this interpolation and is refused with a budget."""
    return amount if _parent_.get("max_acc_drop") is None else None


def register_resolvers() -> None:
    """Make ``${distillab.options:<group>,<sources>}`` (the help text) and ``${distillab.unless_budget:...}``
    (a compressor's default amount) available to the config."""
    if not OmegaConf.has_resolver("distillab.options"):
        OmegaConf.register_new_resolver("distillab.options", option_list)
    if not OmegaConf.has_resolver("distillab.unless_budget"):
        OmegaConf.register_new_resolver("distillab.unless_budget", unless_budget)


def plain(node: Any) -> Any:
    """A config node as plain Python; a value that is an interpolation (``${paths.data_dir}`` is only
    known inside a Hydra job, and these checks run before one starts) is ``settings.UNRESOLVED``."""
    if _is_interpolation(node):
        return settings.UNRESOLVED
    if isinstance(node, Mapping) and not isinstance(node, DictConfig):
        return {key: plain(value) for key, value in node.items()}
    if isinstance(node, DictConfig):
        if node._is_none():
            return None
        return {key: plain(node._get_node(key)) for key in node.keys()}
    if isinstance(node, ListConfig):
        return None if node._is_none() else [plain(node._get_node(i)) for i in range(len(node))]
    if isinstance(node, Container):
        return OmegaConf.to_container(node, resolve=False)
    if hasattr(node, "_value"):  # a ValueNode
        return node._value()
    return node


def resolved(node: Any) -> Any:
    """A config node (or a dict of nodes) as plain Python with every interpolation resolved: the
    values a part is built with inside the job."""
    if isinstance(node, Container):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return {key: resolved(value) for key, value in node.items()}
    return node


def _is_interpolation(node: Any) -> bool:
    return hasattr(node, "_is_interpolation") and node._is_interpolation()


def no_compression(node: Any) -> bool:
    """``compress=none``: a compress node with neither ``_target_`` (one method) nor ``steps`` (a chain)."""
    return node is None or (not node.get("_target_") and not node.get("steps"))


# a job started in a new process (a SLURM job unpickles the task function) never runs train.py's
# module code, and the compressor configs it resolves name ``distillab.unless_budget``
register_resolvers()
