"""Typed schemas for the values that must be checked before any work starts.

Group files extend these schemas (``defaults: [/schema/<group>/<name>@_here_, _self_]``), so
Hydra rejects a misspelled key or a value of the wrong type at composition; ``validate``
then checks ranges and keys added with ``+``, and every failure becomes one line that names
the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional  # noqa: UP035 - OmegaConf reads typing.List / Optional

from hydra.core.config_store import ConfigStore
from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the key and what is allowed."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


# -- data -------------------------------------------------------------------------------------
@dataclass
class InMemoryDataSchema:
    _target_: str = "distillab.data.DigitsDataModule"
    batch_size: int = 64
    eval_batch_size: int = 512
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    normalize: bool = True
    # the share of the training split whose labels the student sees; the rest it learns from
    # the teacher's soft targets alone (val and test keep all labels)
    labelled_fraction: float = 1.0

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        _require(0 < self.labelled_fraction <= 1, "labelled_fraction", self.labelled_fraction,
                 "a fraction in (0, 1] of the training labels the student sees (1 = all)")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            _require(0 < value < 1, key, value, "a fraction in (0, 1)")
        total = self.val_fraction + self.test_fraction
        _require(total < 1, "val_fraction", self.val_fraction,
                 f"val_fraction + test_fraction must be < 1 (now {total:g})")


@dataclass
class SyntheticDataSchema(InMemoryDataSchema):
    _target_: str = "distillab.data.SyntheticDataModule"
    input_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    num_classes: int = 10
    num_samples: int = 1000
    noise: float = 1.0
    data_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(len(self.input_shape) >= 1 and all(d >= 1 for d in self.input_shape),
                 "input_shape", list(self.input_shape), "a list of positive sizes, e.g. [3, 32, 32]")
        _require(self.num_classes >= 2, "num_classes", self.num_classes, "an integer >= 2")
        _require(self.num_samples >= 10 * self.num_classes, "num_samples", self.num_samples,
                 f"at least 10 per class (>= {10 * self.num_classes})")


@dataclass
class VisionDataSchema:
    """torchvision datasets (MNIST family, CIFAR): official test set, validation carved from train."""

    _target_: str = "distillab.data.vision.CIFAR10DataModule"
    root: str = "data"
    download: bool = True
    augment: bool = False
    max_shift: int = 2
    val_size: int = 5000
    batch_size: int = 128
    eval_batch_size: int = 1000
    split_seed: int = 0
    labelled_fraction: float = 1.0

    def __post_init__(self) -> None:
        _require(0 < self.labelled_fraction <= 1, "labelled_fraction", self.labelled_fraction,
                 "a fraction in (0, 1] of the training labels the student sees (1 = all)")
        _require(self.val_size >= 1, "val_size", self.val_size, "an integer >= 1 (samples taken from the training set)")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        _require(0 <= self.max_shift <= 8, "max_shift", self.max_shift, "pixels in [0, 8]")


# -- distillation -----------------------------------------------------------------------------
@dataclass
class NoDistillSchema:
    _target_: str = "distillab.distill.losses.CrossEntropy"


@dataclass
class KDSchema:
    _target_: str = "distillab.distill.losses.KDLoss"
    lam: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        _require(0 <= self.lam <= 1, "lam", self.lam,
                 "a weight in [0, 1] (0 = cross-entropy only, 1 = soft targets only)")
        _require(self.temperature > 0, "temperature", self.temperature, "a temperature > 0")


@dataclass
class KDWeightsSchema:
    """The cross-entropy/KD part of a feature method: (1 − lam)·CE + lam·T²·KL."""

    lam: float = 0.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        _require(0 <= self.lam <= 1, "lam", self.lam, "a weight in [0, 1] (0 = no KD term)")
        _require(self.temperature > 0, "temperature", self.temperature, "a temperature > 0")


def _weight(value: float, name: str) -> None:
    _require(value >= 0, name, value, "a weight >= 0")


@dataclass
class FitNetSchema:
    _target_: str = "distillab.distill.methods.FitNetLoss"
    hint_weight: float = 100.0
    student_layer: Optional[str] = None  # noqa: UP045 - OmegaConf reads typing.Optional
    teacher_layer: Optional[str] = None  # noqa: UP045
    kd: KDWeightsSchema = field(default_factory=KDWeightsSchema)

    def __post_init__(self) -> None:
        _weight(self.hint_weight, "hint_weight")


@dataclass
class ATSchema:
    _target_: str = "distillab.distill.methods.ATLoss"
    at_weight: float = 1000.0
    p: float = 2.0
    student_layers: Optional[List[str]] = None  # noqa: UP006, UP045
    teacher_layers: Optional[List[str]] = None  # noqa: UP006, UP045
    kd: KDWeightsSchema = field(default_factory=KDWeightsSchema)

    def __post_init__(self) -> None:
        _weight(self.at_weight, "at_weight")
        _require(self.p > 0, "p", self.p, "an exponent > 0 (2 in the paper)")


@dataclass
class SPSchema:
    _target_: str = "distillab.distill.methods.SPLoss"
    sp_weight: float = 3000.0
    student_layers: Optional[List[str]] = None  # noqa: UP006, UP045
    teacher_layers: Optional[List[str]] = None  # noqa: UP006, UP045
    kd: KDWeightsSchema = field(default_factory=KDWeightsSchema)

    def __post_init__(self) -> None:
        _weight(self.sp_weight, "sp_weight")


@dataclass
class RKDSchema:
    _target_: str = "distillab.distill.methods.RKDLoss"
    distance_weight: float = 25.0
    angle_weight: float = 50.0
    student_layer: Optional[str] = None  # noqa: UP045
    teacher_layer: Optional[str] = None  # noqa: UP045
    kd: KDWeightsSchema = field(default_factory=KDWeightsSchema)

    def __post_init__(self) -> None:
        _weight(self.distance_weight, "distance_weight")
        _weight(self.angle_weight, "angle_weight")


@dataclass
class PKTSchema:
    _target_: str = "distillab.distill.methods.PKTLoss"
    pkt_weight: float = 30000.0
    student_layer: Optional[str] = None  # noqa: UP045
    teacher_layer: Optional[str] = None  # noqa: UP045
    kd: KDWeightsSchema = field(default_factory=KDWeightsSchema)

    def __post_init__(self) -> None:
        _weight(self.pkt_weight, "pkt_weight")


@dataclass
class DKDSchema:
    _target_: str = "distillab.distill.methods.DKDLoss"
    ce_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: int = 20

    def __post_init__(self) -> None:
        for name in ("ce_weight", "alpha", "beta"):
            _weight(getattr(self, name), name)
        _require(self.temperature > 0, "temperature", self.temperature, "a temperature > 0")
        _require(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs,
                 "epochs >= 0 over which the DKD terms ramp up (0 = none)")


# -- compression ------------------------------------------------------------------------------
TARGETS = ("student", "teacher")


@dataclass
class NoCompressSchema:
    method: str = "none"
    # accepted so that one sweep can vary compress= and compress.amount together
    amount: float | None = None

    def __post_init__(self) -> None:
        _require(self.method == "none", "method", self.method, "'none' for this config")


@dataclass
class CompressSchema:
    """Keys every compression method has; ``method``, ``target`` and ``finetune_epochs`` are
    the pipeline's, the rest are options of the function named by ``_target_``."""

    method: str = ""
    _target_: str = ""
    _partial_: bool = True
    target: str = "student"
    finetune_epochs: int = 0
    amount: float | None = None

    def __post_init__(self) -> None:
        _require(self.target in TARGETS, "target", self.target, f"one of {', '.join(TARGETS)}")
        _require(self.finetune_epochs >= 0, "finetune_epochs", self.finetune_epochs, "an integer >= 0")
        if self.amount is not None:
            _require(0 < self.amount < 1, "amount", self.amount, "a fraction in (0, 1) of the weights to remove")


@dataclass
class PruneUnstructuredSchema(CompressSchema):
    method: str = "prune_unstructured"
    _target_: str = "distillab.compress.prune.unstructured"
    amount: float | None = 0.5
    scope: str = "global"
    schedule: str = "oneshot"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.amount is not None, "amount", self.amount, "a fraction in (0, 1) of the weights to remove")
        _require(self.scope in ("global", "layer"), "scope", self.scope, "global or layer")
        _require(self.schedule in ("oneshot", "gradual"), "schedule", self.schedule, "oneshot or gradual")
        _require(self.schedule == "oneshot" or self.finetune_epochs >= 1, "schedule", self.schedule,
                 "gradual needs finetune_epochs >= 1 to spread the pruning over")


@dataclass
class PruneStructuredSchema(CompressSchema):
    method: str = "prune_structured"
    _target_: str = "distillab.compress.prune.structured"
    amount: float | None = 0.5
    target_params: int | None = None
    target_macs: int | None = None
    importance: str = "l1"
    iterative_steps: int = 1
    round_to: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        importances = ("l1", "l2", "bn_scale", "taylor")
        _require(self.importance in importances, "importance", self.importance, f"one of {', '.join(importances)}")
        _require(self.iterative_steps >= 1, "iterative_steps", self.iterative_steps, "an integer >= 1")
        for key in ("target_params", "target_macs"):
            value = getattr(self, key)
            _require(value is None or value >= 1, key, value, "a positive count, or null")


QUANT_ENGINES = ("x86", "fbgemm", "qnnpack")


@dataclass
class QuantDynamicSchema(CompressSchema):
    method: str = "quant_dynamic"
    _target_: str = "distillab.compress.quantize.dynamic"


@dataclass
class QuantStaticSchema(CompressSchema):
    method: str = "quant_static"
    _target_: str = "distillab.compress.quantize.static"
    calibration_batches: int = 16
    per_channel: bool = True
    engine: str = "x86"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.calibration_batches >= 1, "calibration_batches", self.calibration_batches, "an integer >= 1")
        _require(self.engine in QUANT_ENGINES, "engine", self.engine, f"one of {', '.join(QUANT_ENGINES)}")


@dataclass
class QATSchema(QuantStaticSchema):
    method: str = "qat"
    _target_: str = "distillab.compress.quantize.qat"
    finetune_epochs: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.finetune_epochs >= 1, "finetune_epochs", self.finetune_epochs,
                 "an integer >= 1: quantization-aware training needs epochs")


@dataclass
class ChainSchema:
    """Several methods in order (``compress=prune_structured+quant_static``)."""

    method: str = ""
    target: str = "student"
    finetune_epochs: int = 0
    amount: float | None = None
    steps: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        CompressSchema(target=self.target, finetune_epochs=self.finetune_epochs, amount=self.amount)
        _require(len(self.steps) >= 2, "steps", self.steps, "a list of at least two method configs")


# -- student role -----------------------------------------------------------------------------
STUDENT_INITS = ("from_teacher",)


@dataclass
class StudentRoleSchema:
    """The student's role keys, beside its architecture's (``conf/student/*.yaml`` merge both).

    ``init: from_teacher`` starts the student from the teacher's weights where the shapes match
    (``distill.transfer``), interpolated as init_weight·θ_teacher + (1 − init_weight)·θ_init.
    """

    # the node also holds the architecture's keys, which its constructor checks
    open_keys: ClassVar[bool] = True
    init: Optional[str] = None  # noqa: UP045 - OmegaConf reads typing.Optional
    init_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.init is None or self.init in STUDENT_INITS, "init", self.init,
                 f"null or {' or '.join(STUDENT_INITS)}")
        _require(0 <= self.init_weight <= 1, "init_weight", self.init_weight,
                 "a weight in [0, 1] of the teacher's tensors (1 = copy them)")


STUDENT_ROLE_KEYS = tuple(f.name for f in dataclasses.fields(StudentRoleSchema))


# -- teacher recipe ---------------------------------------------------------------------------
@dataclass
class TeacherRecipeSchema:
    max_epochs: int = 40
    seed: int = 0
    optim: Any = None
    # training-batch augmentation for the teacher only; null: as the data config says
    augment: bool | None = None
    # the share of the training labels the teacher trains on; null: all of them, whatever
    # data.labelled_fraction gives the student
    labelled_fraction: Optional[float] = None  # noqa: UP045

    def __post_init__(self) -> None:
        _require(self.max_epochs >= 1, "max_epochs", self.max_epochs, "an integer >= 1")
        _require(self.labelled_fraction is None or 0 < self.labelled_fraction <= 1, "labelled_fraction",
                 self.labelled_fraction, "a fraction in (0, 1] of the training labels, or null for all")


# -- trainer ----------------------------------------------------------------------------------
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true",
              "transformer-engine")


@dataclass
class TrainerSchema:
    """The Lightning Trainer arguments a run may set (unknown ones are rejected)."""

    _target_: str = "pytorch_lightning.Trainer"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    sync_batchnorm: bool = False
    max_epochs: int = 100
    min_epochs: int | None = None
    max_steps: int = -1
    max_time: str | None = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    check_val_every_n_epoch: int | None = 1
    val_check_interval: Any = None
    log_every_n_steps: int = 50
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    num_sanity_val_steps: int = 0
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    deterministic: Any = False
    benchmark: bool | None = None
    detect_anomaly: bool = False
    fast_dev_run: Any = False
    inference_mode: bool = True
    profiler: str | None = None

    def __post_init__(self) -> None:
        _require(self.max_epochs >= 1, "max_epochs", self.max_epochs, "an integer >= 1")
        _require(self.accelerator in ACCELERATORS, "accelerator", self.accelerator, f"one of {', '.join(ACCELERATORS)}")
        _require(str(self.precision) in PRECISIONS, "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        _require(self.num_nodes >= 1, "num_nodes", self.num_nodes, "an integer >= 1")
        _require(not (self.sync_batchnorm and self.accelerator == "cpu"), "sync_batchnorm", self.sync_batchnorm,
                 "false with accelerator=cpu (torch's SyncBatchNorm runs on GPUs only)")
        _require(self.log_every_n_steps >= 1, "log_every_n_steps", self.log_every_n_steps, "an integer >= 1")
        _require(self.accumulate_grad_batches >= 1, "accumulate_grad_batches", self.accumulate_grad_batches,
                 "an integer >= 1")


# -- cached teacher outputs -------------------------------------------------------------------
TEACHER_OUTPUT_CACHE = ("auto", "cached", "live")
TEACHER_OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class TeacherOutputsSchema:
    """Whether the student reads the teacher's logits from a table computed once (``cached``),
    runs the teacher at every step (``live``), or the run chooses (``auto``: cached when the
    training inputs are not augmented and the loss reads only logits); see
    ``distill.teacher_outputs``. ``dtype`` and ``top_k`` shrink the stored table (float32 with
    all logits is exact; float16, bfloat16 and top-k are approximations)."""

    cache: str = "auto"
    dtype: str = "float32"
    top_k: Optional[int] = None  # noqa: UP045 - OmegaConf reads typing.Optional

    def __post_init__(self) -> None:
        _require(self.cache in TEACHER_OUTPUT_CACHE, "cache", self.cache, ", ".join(TEACHER_OUTPUT_CACHE))
        _require(self.dtype in TEACHER_OUTPUT_DTYPES, "dtype", self.dtype, ", ".join(TEACHER_OUTPUT_DTYPES))
        _require(self.top_k is None or self.top_k >= 1, "top_k", self.top_k,
                 "an integer >= 1 (the largest logits kept per sample), or null for all")


@dataclass
class MeasureSchema:
    threads: int | None = 1
    warmup: int = 5
    repeats: int = 30

    def __post_init__(self) -> None:
        _require(self.threads is None or self.threads >= 1, "threads", self.threads, "an integer >= 1, or null")
        _require(self.warmup >= 0, "warmup", self.warmup, "an integer >= 0")
        _require(self.repeats >= 1, "repeats", self.repeats, "an integer >= 1")


SCHEMAS = {
    "data": {"in_memory": InMemoryDataSchema, "synthetic": SyntheticDataSchema, "vision": VisionDataSchema},
    "distill": {"none": NoDistillSchema, "kd": KDSchema, "kd_weights": KDWeightsSchema, "fitnet": FitNetSchema,
                "at": ATSchema, "sp": SPSchema, "rkd": RKDSchema, "pkt": PKTSchema, "dkd": DKDSchema},
    "compress": {"none": NoCompressSchema, "prune_unstructured": PruneUnstructuredSchema,
                 "prune_structured": PruneStructuredSchema, "quant_dynamic": QuantDynamicSchema,
                 "quant_static": QuantStaticSchema, "qat": QATSchema, "chain": ChainSchema},
    "teacher": {"recipe": TeacherRecipeSchema},
    "student": {"role": StudentRoleSchema},
    "trainer": {"default": TrainerSchema},
    "measure": {"default": MeasureSchema},
    "teacher_outputs": {"default": TeacherOutputsSchema},
}


def register_schemas() -> None:
    """Store the schemas as ``schema/<group>/<name>`` in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, schema in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=schema)


# -- validation -------------------------------------------------------------------------------
def _schema_nodes(node: DictConfig, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            child_path = f"{path}.{key}" if path else str(key)
            if dataclasses.is_dataclass(OmegaConf.get_type(child)):
                yield child_path, child
            yield from _schema_nodes(child, child_path)


def validate(cfg: DictConfig) -> None:
    """Check every schema-typed node of ``cfg``; raise ``ConfigError`` with one line."""
    for path, node in _schema_nodes(cfg):
        schema = OmegaConf.get_type(node)
        allowed = [f.name for f in dataclasses.fields(schema)]
        unknown = [] if getattr(schema, "open_keys", False) else [key for key in node.keys() if key not in allowed]
        if unknown:
            raise ConfigError(
                f"{path}.{unknown[0]} is not a known key; allowed keys of {path}: "
                + ", ".join(k for k in allowed if not k.startswith("_"))
            )
        try:
            schema(**_concrete_values(node, allowed))
        except ConfigError as error:
            raise ConfigError(f"{path}.{error}") from None
        except (OmegaConfBaseException, TypeError) as error:
            raise ConfigError(f"{path}: {str(error).splitlines()[0]}") from None


def _concrete_values(node: DictConfig, names: list[str]) -> dict[str, Any]:
    """The node's values that are set and not interpolations: ``${paths.data_dir}`` is only
    known inside a Hydra job, and the checks must run before one starts."""
    values = {}
    for name in names:
        if name not in node or OmegaConf.is_missing(node, name) or OmegaConf.is_interpolation(node, name):
            continue
        child = node._get_node(name)
        values[name] = OmegaConf.to_container(child, resolve=False) if isinstance(child, Container) else child._value()
    return values
