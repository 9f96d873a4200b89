"""Settings: what a configurable part accepts, declared once, on the part itself.

A part (a distillation method, a model, a datamodule, a compressor, or one of the run's own
config nodes) declares its settings as the typed parameters of its constructor or function, or
as the fields of a dataclass: the type says what a value may be, ``typing.Annotated`` adds a
range (``weight: Annotated[float, Range(0)]``, ``mode: Literal["sum", "mean"]``). The values live
in the part's YAML file: a default is written once, there. ``check`` compares a config node with
the declaration of the object its ``_target_`` names and reports the first problem in one line
naming the key and what is allowed (``ConfigError``); ``checked`` does so from Python.

``declaration`` imports the object and inspects it (``typing.get_type_hints``; ``**kwargs`` followed
to the next base's constructor), and keeps what it read as JSON (``CACHE_ENV``), keyed by the size and
modification time of each file it depends on: the target's module, each class of its MRO or named by
its annotations, each project module holding a type alias they use. A warm check needs no torch; a part
that cannot be read is one line, never a skipped check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import sysconfig
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from distillab.io import atomic_write_json


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the key and what is allowed."""


def under(key: str, message: str) -> str:
    """A part's own message placed under its config key: ``lam=2 is not allowed…`` of the part at
    ``distill`` becomes ``distill.lam=2 is not allowed…``; other messages are left as they are."""
    return f"{key}.{message}" if re.match(r"^[\w.]+=", message) else message


# -- ranges -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric range inside ``Annotated``: ``Annotated[float, Range(0, 1)]`` is [0, 1]. ``low_open``/``high_open``
    exclude the ends; ``what`` names the value in messages ("a weight"), ``note`` follows in parentheses."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    what: str = ""
    note: str = ""

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self, kind: str) -> str:
        what = self.what or kind
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{what} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{what} {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{what} {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = what
        return f"{text} ({self.note})" if self.note else text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


Fraction = Annotated[float, Range(0, 1, low_open=True, high_open=True, what="a fraction")]
#: the largest loss of validation accuracy a compression may cause (0: none at all)
AccuracyDrop = Annotated[float, Range(0, 1, high_open=True, what="an accuracy drop")]
Weight = Annotated[float, Range(0, what="a weight")]
Positive = Annotated[float, Range(0, low_open=True)]
Temperature = Annotated[float, Range(0, low_open=True, what="a temperature")]
Count = Annotated[int, Range(1)]
NonNegativeCount = Annotated[int, Range(0)]
#: a random seed: what ``torch.manual_seed`` and numpy accept
Seed = Annotated[int, Range(0, 2**32 - 1)]


# -- what a value may be ------------------------------------------------------------------------
#: a config value known only inside the job (an interpolation such as ``${paths.data_dir}``): present, not checked
UNRESOLVED: Any = type("_Unresolved", (), {"__repr__": lambda self: "<interpolation>"})()
_NAMES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null", dict: "mapping", Mapping: "mapping"}
_SIMPLE = {"any": (object, ""), "null": (type(None), "null"), "bool": (bool, "true or false"), "str": (str, "a string")}
_SIMPLE |= {"int": (int, "an integer"), "float": ((int, float), "a finite number"), "mapping": (Mapping, "a mapping")}


def kind_of(annotation: Any) -> Any:
    """An annotation as plain data: ``"int"``, ``{"ranges": [...], "of": "float"}``, ``{"union": [...]}``,
    ``{"literal": [...]}``, ``{"list": kind}``, ``{"fields": {name: kind}}`` (a settings dataclass);
    ``"any"`` for what is not checked (a tensor, a model, a callable)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        ranges = [dataclasses.asdict(extra) for extra in args[1:] if isinstance(extra, Range)]
        return {"ranges": ranges, "of": kind_of(args[0])} if ranges else kind_of(args[0])
    if origin in (Union, types.UnionType):
        return {"union": [kind_of(arm) for arm in args]}
    if origin is Literal:
        return {"literal": list(args)}
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        hints = _hints(annotation)
        return {"fields": {f.name: kind_of(hints.get(f.name, Any)) for f in dataclasses.fields(annotation) if f.init}}
    if origin in (list, tuple, Sequence, Iterable) or annotation in (list, tuple):
        items = [arg for arg in args if arg is not Ellipsis]
        return {"list": kind_of(items[0]) if len(items) == 1 else "any"}
    return next((name for kind, name in _NAMES.items() if kind in (annotation, origin)), "any")


def problem(value: Any, kind: Any) -> str | None:
    """What is allowed, when ``value`` (plain Python: dicts, lists, scalars) is not a ``kind`` (an
    annotation, or its plain form from ``kind_of``); None when it is."""
    kind = kind if isinstance(kind, (str, dict)) else kind_of(kind)
    if isinstance(kind, str):
        allowed = _SIMPLE[kind]
        fits = isinstance(value, allowed[0]) and not (isinstance(value, bool) and kind in ("int", "float"))
        return None if fits and (kind != "float" or math.isfinite(value)) else allowed[1]
    if "ranges" in kind:
        ranges = [Range(**found) for found in kind["ranges"]]
        what = "an integer" if kind["of"] == "int" else "a number"
        if problem(value, kind["of"]) is not None:
            return ranges[0].describe(what)
        return next((found.describe(what) for found in ranges if not found.contains(value)), None)
    if "union" in kind:
        arms = kind["union"]
        found = [problem(value, arm) for arm in arms if arm != "null"]
        if (value is None and "null" in arms) or None in found:
            return None
        allowed = " or ".join(dict.fromkeys(found))
        return f"{allowed}, or null" if "null" in arms else allowed
    if "literal" in kind:
        choices = kind["literal"]
        if value in choices and type(value) in map(type, choices):
            return None
        return "one of " + ", ".join(map(str, choices)) if len(choices) > 1 else str(choices[0])
    if "fields" in kind:  # its keys are checked one by one by ``check``
        return None if isinstance(value, Mapping) else f"a mapping with keys {', '.join(kind['fields'])}"
    if not isinstance(value, (list, tuple)):
        return "a list"
    found = next((f for f in (problem(item, kind["list"]) for item in value) if f is not None), None)
    if found is None:
        return None
    article, _, rest = found.partition(" ")  # "an integer >= 1": "integers >= 1"
    if article in ("a", "an"):
        word, _, rest = rest.partition(" ")
        found = f"{word}s {rest}".strip()
    return f"a list of {found}"


# -- declarations -------------------------------------------------------------------------------
@dataclasses.dataclass
class Setting:
    name: str
    kind: Any = "any"  # plain data: see ``kind_of``
    required: bool = True


@dataclasses.dataclass
class Declaration:
    """The settings of one class, function or dataclass; ``open``: ``**kwargs`` not followed, any key passes."""

    target: str
    settings: dict[str, Setting]
    open: bool = False


#: library bases whose constructor takes no settings (``nn.Module`` refuses any keyword; both Lightnings)
_NO_SETTINGS = ("torch.nn.modules.module.Module", ".core.datamodule.LightningDataModule")
#: the folder of the declaration cache; else ``$XDG_CACHE_HOME/distillab/declarations`` (``~/.cache/...``)
CACHE_ENV = "DISTILLAB_DECLARATION_CACHE"


@functools.cache
def declaration(target: str) -> Declaration:
    """The settings of the object a ``_target_`` path names; ``ConfigError`` when it cannot be read."""
    where = json.dumps([1, sys.version, target]).encode()  # 1: the entry's format
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "distillab", "declarations")
    path = Path(os.environ.get(CACHE_ENV) or home, f"{hashlib.sha256(where).hexdigest()[:32]}.json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or corrupt
        name, origin, sources, found = json.loads(path.read_text(encoding="utf-8"))
        if name == target and origin == _origin(target) and all(_stat(f) == [f, *rest] for f, *rest in sources):
            settings = {key: Setting(**setting) for key, setting in found["settings"].items()}
            return Declaration(target, settings, bool(found["open"]))
    done = "imported"
    try:
        module, obj = _import(target)
        done = "read"  # an annotation that does not resolve, a signature that cannot be inspected
        declared, annotations = _read(obj, target)
        sources = [_stat(file) for file in sorted(_files([module, obj, *annotations]) | {__file__})]
    except Exception as error:  # noqa: BLE001 - whatever stopped it, in one line
        raise ConfigError(f"_target_={target!r} cannot be {done}: {_one_line(error)}") from None
    with contextlib.suppress(OSError, TypeError, ValueError):  # a cache that cannot be written only costs time
        atomic_write_json(path, [target, _origin(target), sources, dataclasses.asdict(declared)])
    return declared


def _origin(target: str) -> str:
    """Where the target's top package is (found, not imported): under another sys.path, another one may be."""
    spec = importlib.util.find_spec(target.partition(".")[0])
    return f"{spec.origin} {list(spec.submodule_search_locations or [])}" if spec else ""


def _stat(file: str) -> list[Any]:
    return [file, os.stat(file).st_size, os.stat(file).st_mtime_ns]


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _import(target: str) -> tuple[types.ModuleType, Any]:
    """The module a ``_target_`` path imports (its longest prefix that is one), and the object it names."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and f"{name}.".startswith(f"{error.name}."):
                continue  # no such module: a shorter prefix may be one
            raise
        return module, functools.reduce(getattr, parts[cut:], module)
    raise ModuleNotFoundError(f"No module named {parts[0]!r}")


def _read(obj: Any, target: str) -> tuple[Declaration, list[Any]]:
    """The declaration of ``obj``, read by inspection, and the annotations it was read from."""
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        required = {f.name: f.default is f.default_factory is dataclasses.MISSING for f in dataclasses.fields(obj)}
        settings = {name: Setting(name, kind, required[name]) for name, kind in kind_of(obj)["fields"].items()}
        return Declaration(target, settings), [*_hints(obj).values()]
    settings, annotations = {}, []
    owners = [base for base in obj.__mro__ if "__init__" in vars(base)] if isinstance(obj, type) else [obj]
    for owner in owners:
        is_open = False
        if owner is object or f"{owner.__module__}.{owner.__qualname__}".endswith(_NO_SETTINGS):
            break
        function = owner.__init__ if isinstance(obj, type) else owner
        hints = _hints(function)
        annotations += hints.values()
        for parameter in list(inspect.signature(function).parameters.values())[isinstance(obj, type) :]:
            if parameter.kind is parameter.VAR_KEYWORD:
                is_open = True  # followed to the next base's constructor
            elif parameter.kind is not parameter.VAR_POSITIONAL:
                kind = kind_of(hints.get(parameter.name, Any))
                settings.setdefault(parameter.name, Setting(parameter.name, kind, parameter.default is parameter.empty))
        if not is_open:
            break
    return Declaration(target, settings, is_open), annotations


def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(obj, include_extras=True)


def _files(roots: Iterable[Any]) -> set[str]:
    """The files of the modules, classes (their MRO, a dataclass's fields) and aliases ``roots`` reach."""
    files, stack, seen = set(), list(roots), set()
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (str, int, float, types.NoneType, types.EllipsisType)):
            continue
        seen.add(id(item))
        if isinstance(item, type):
            files.update(getattr(sys.modules.get(base.__module__), "__file__", None) for base in item.__mro__)
            stack += _hints(item).values() if dataclasses.is_dataclass(item) else []
        elif typing.get_origin(item) is not None:
            files.update(_holders(item))
            stack += typing.get_args(item)
        elif isinstance(item, (types.ModuleType, types.FunctionType)):
            files.add(getattr(sys.modules.get(getattr(item, "__module__", item.__name__)), "__file__", None))
        else:
            stack += list(item) if isinstance(item, (list, tuple)) else [type(item)]  # a ``Range``
    return {file for file in files if file}


def _holders(alias: Any) -> set[str]:
    """The project's files holding ``alias`` (an alias records no module); installed ones change whole."""
    if any(alias is value for value in globals().values()):
        return set()
    installed, found = tuple({sysconfig.get_paths()[name] for name in ("stdlib", "purelib", "platlib")}), set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None) or ""
        if file.endswith(".py") and not file.startswith(installed) and any(v is alias for v in vars(module).values()):
            found.add(file)
    return found


# -- checking a node, building and enforcing ------------------------------------------------------------
def check(
    key: str, values: Mapping[str, Any], target: str | Declaration, provided: Iterable[str] = (), partial: bool = False
) -> None:
    """Check the plain ``values`` of the node at ``key`` (``UNRESOLVED``: known in the job only) against ``target``'s
    declaration (``provided``: what the run passes itself, not the node; ``partial``: missing ones filled later)."""
    try:
        declared = target if isinstance(target, Declaration) else declaration(target)
    except ConfigError as error:
        raise ConfigError(_join(key, str(error))) from None
    provided = set(provided)
    allowed = [name for name in declared.settings if name not in provided]
    for name, value in values.items():
        if name not in declared.settings or name in provided:
            if declared.open and name not in provided:
                continue
            listing = ", ".join(allowed) if allowed else "none"
            raise ConfigError(
                f"{_join(key, name)} is not a known key; allowed keys of {key or 'the top level'}: {listing}"
            )
        _check_value(_join(key, name), value, declared.settings[name].kind)
    missing = [name for name in allowed if declared.settings[name].required and name not in values]
    if missing and not partial:
        what = problem(object(), declared.settings[missing[0]].kind) or "a value"
        raise ConfigError(
            f"{_join(key, missing[0])} is missing: {declared.target.rsplit('.', 1)[-1]} needs it "
            f"({what}); set it in the config"
        )


def _check_value(key: str, value: Any, kind: Any) -> None:
    if value is UNRESOLVED:  # known inside the job only
        return
    found = problem(value, kind)
    if found is not None:
        shown = str(value) if isinstance(value, float) and not math.isfinite(value) else repr(value)
        raise ConfigError(f"{key}={shown} is not allowed: {found}")
    arms = [arm for arm in kind["union"] if arm != "null"] if isinstance(kind, dict) and "union" in kind else [kind]
    fields = arms[0].get("fields") if len(arms) == 1 and isinstance(arms[0], dict) else None
    for name, item in value.items() if fields is not None and isinstance(value, Mapping) else ():
        if name not in fields:
            raise ConfigError(f"{key}.{name} is not a known key; allowed keys of {key}: {', '.join(fields)}")
        _check_value(f"{key}.{name}", item, fields[name])


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def build(kind: type, values: Mapping[str, Any]) -> Any:
    """The settings dataclass ``kind`` (and those nested in it) from a config node's plain values, checked."""
    check("", values, _read(kind, f"{kind.__module__}.{kind.__qualname__}")[0])
    hints, arguments = _hints(kind), dict(values)
    for name, value in values.items():  # a settings dataclass, or one or null
        arms = [arm for arm in typing.get_args(hints[name]) or [hints[name]] if arm is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]) and isinstance(value, Mapping):
            arguments[name] = build(arms[0], value)
    return kind(**arguments)


def checked(obj: Callable) -> Callable:
    """Enforce a class's or function's declared settings when it is called from Python: a value
    outside its declared type or range raises ``ConfigError`` ("lam=1.5 is not allowed: ...")."""
    if inspect.isclass(obj):
        obj.__init__ = checked(obj.__init__)
        return obj

    @functools.cache
    def declared() -> tuple[inspect.Signature, Declaration]:
        try:
            return inspect.signature(obj), _read(obj, obj.__qualname__)[0]
        except Exception as error:  # noqa: BLE001 - an unreadable declaration is said, not skipped
            raise ConfigError(f"{obj.__qualname__}: its settings cannot be read: {_one_line(error)}") from None

    @functools.wraps(obj)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signature, declaration = declared()
        for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
            if type(value).__module__.startswith("omegaconf"):  # as Hydra passes a setting
                from omegaconf import OmegaConf

                value = OmegaConf.to_container(value, resolve=True)
            if name in declaration.settings and _is_plain(value):
                _check_value(name, value, declaration.settings[name].kind)
        return obj(*args, **kwargs)

    return wrapper


def _is_plain(value: Any) -> bool:
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else None
    return all(map(_is_plain, items)) if items is not None else isinstance(value, (type(None), bool, int, float, str))
