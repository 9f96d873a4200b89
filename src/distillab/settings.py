"""Settings: what a configurable part accepts, declared once, on the part itself.

A part (a distillation method, a model, a datamodule, a compressor, or one of the run's own
config nodes) declares its settings as the typed parameters of its constructor or function,
or as the fields of a dataclass. The type says what a value may be; ``typing.Annotated`` adds
a range::

    class MyLoss(nn.Module):
        def __init__(self, weight: Annotated[float, Range(0)], mode: Literal["sum", "mean"]): ...

The values themselves live in the part's YAML file (``conf/<group>/<name>.yaml``): a default
is written once, there. ``check(key, values, target)`` compares a config node with the
declaration of the object its ``_target_`` names and reports the first problem as one line
naming the key and what is allowed (``ConfigError``).

The declaration is read from the source file, without importing it (``declaration``): a
value out of range is reported before torch or Lightning is imported, in well under the
seconds those imports take. When the source cannot be read (a compiled module, an object
built at run time) the object is imported and inspected instead. ``checked`` enforces the
same declaration when the object is built from Python.
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

__all__ = [
    "AccuracyDrop",
    "REQUIRED",
    "UNRESOLVED",
    "ConfigError",
    "Count",
    "Declaration",
    "Fraction",
    "NonNegativeCount",
    "Positive",
    "Range",
    "Seed",
    "Setting",
    "Temperature",
    "Weight",
    "build",
    "check",
    "checked",
    "declaration",
    "problem",
]


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the key and what is allowed."""


def under(key: str, message: str) -> str:
    """A part's own message placed under its config key: ``lam=2 is not allowed…`` of the part at
    ``distill`` becomes ``distill.lam=2 is not allowed…``; other messages are left as they are."""
    return f"{key}.{message}" if re.match(r"^[\w.]+=", message) else message


# -- ranges -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric range, used inside ``Annotated``: ``Annotated[float, Range(0, 1)]`` is [0, 1].

    ``low_open``/``high_open`` exclude the ends; ``what`` names the value in messages ("a
    weight"), ``note`` is added in parentheses ("0 = no KD term")."""

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
def problem(value: Any, kind: Any) -> str | None:
    """What is allowed, when ``value`` (plain Python: dicts, lists, scalars) is not a ``kind``;
    None when it is. Unknown or opaque types accept anything."""
    if kind is Any or kind is inspect.Parameter.empty or isinstance(kind, (str, typing.ForwardRef)):
        return None
    origin = typing.get_origin(kind)
    if origin is Annotated:
        base, *extras = typing.get_args(kind)
        found = problem(value, base)
        if found is not None:
            return _with_ranges(found, extras, base)
        for extra in extras:
            if isinstance(extra, Range) and not extra.contains(value):
                return extra.describe(_kind_name(base))
        return None
    if origin in (Union, types.UnionType):
        arms = typing.get_args(kind)
        if value is None and type(None) in arms:
            return None
        found = [problem(value, arm) for arm in arms if arm is not type(None)]
        if any(f is None for f in found):
            return None
        allowed = " or ".join(dict.fromkeys(f for f in found if f))
        return f"{allowed}, or null" if type(None) in arms else allowed
    if kind is type(None):
        return None if value is None else "null"
    if origin is Literal:
        choices = typing.get_args(kind)
        if value in choices and type(value) in map(type, choices):
            return None
        return "one of " + ", ".join(map(str, choices)) if len(choices) > 1 else str(choices[0])
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if kind is str:
        return None if isinstance(value, str) else "a string"
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(kind))}"
        return None  # its keys are checked one by one by ``check``
    sequence = origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable) or kind in (list, tuple)
    if sequence:
        if not isinstance(value, (list, tuple)):
            return "a list"
        items = [arg for arg in typing.get_args(kind) if arg is not Ellipsis]
        if len(items) == 1:
            for item in value:
                found = problem(item, items[0])
                if found is not None:
                    return f"a list of {_plural(found)}"
        return None
    if origin in (dict, collections.abc.Mapping) or kind in (dict,):
        return None if isinstance(value, Mapping) else "a mapping"
    return None


def _kind_name(kind: Any) -> str:
    return "an integer" if kind is int else "a number"


def _with_ranges(found: str, extras: Iterable[Any], base: Any) -> str:
    ranges = [extra for extra in extras if isinstance(extra, Range)]
    return ranges[0].describe(_kind_name(base)) if ranges else found


def _plural(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            word, _, rest = text[len(article) :].partition(" ")
            return f"{word}s {rest}".strip()
    return text


# -- declarations -------------------------------------------------------------------------------
class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
#: a config value known only inside the job (an interpolation such as ``${paths.data_dir}``): present, not checked
UNRESOLVED: Any = type("_Unresolved", (), {"__repr__": lambda self: "<interpolation>"})()
#: a default that exists but could not be read without running code
_UNREAD: Any = type("_Unread", (), {"__repr__": lambda self: "<default>"})()


@dataclasses.dataclass
class Setting:
    name: str
    kind: Any = Any
    default: Any = REQUIRED


@dataclasses.dataclass
class Declaration:
    """The settings of one class, function or dataclass. ``open``: it takes ``**kwargs`` that
    could not be followed, so keys beyond ``settings`` are let through."""

    target: str
    settings: dict[str, Setting]
    open: bool = False


def declaration(target: str) -> Declaration:
    """The settings of the object a ``_target_`` path names, read from its source when possible."""
    return _declaration(target)


@functools.lru_cache(maxsize=512)
def _declaration(target: str) -> Declaration:
    found = _SourceReader().find(target)
    if found is not None:
        return found
    return _by_import(target)


def _by_import(target: str) -> Declaration:
    obj = _import(target)
    if dataclasses.is_dataclass(obj):
        hints = _hints(obj)
        settings = {
            f.name: Setting(f.name, hints.get(f.name, Any), _field_default(f))
            for f in dataclasses.fields(obj)
            if f.init
        }
        return Declaration(target, settings)
    return _from_signature(target, obj)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return _UNREAD if field.default_factory is not dataclasses.MISSING else REQUIRED


def _from_signature(target: str, obj: Any) -> Declaration:
    if inspect.isclass(obj):
        owner = next((base for base in obj.__mro__ if "__init__" in vars(base)), object)
        if f"{owner.__module__}.{owner.__qualname__}" in _NO_SETTINGS or owner is object:
            return Declaration(target, {})  # a library base that takes no settings (nn.Module)
    function = obj.__init__ if inspect.isclass(obj) else obj
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return Declaration(target, {}, open=True)
    hints = _hints(function)
    settings, is_open = {}, False
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            is_open = True
        elif parameter.kind is not parameter.VAR_POSITIONAL:
            default = REQUIRED if parameter.default is parameter.empty else parameter.default
            settings[parameter.name] = Setting(parameter.name, hints.get(parameter.name, Any), default)
    if is_open and inspect.isclass(obj):
        # follow **kwargs to the constructors of the bases, as the source reader does
        for base in obj.__mro__[1:]:
            if "__init__" not in vars(base) or base is object:
                continue
            inherited = _from_signature(f"{base.__module__}.{base.__qualname__}", base)
            for name, setting in inherited.settings.items():
                settings.setdefault(name, setting)
            is_open = inherited.open
            break
    return Declaration(target, settings, is_open)


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is simply not checked
        return {}


def _import(target: str) -> Any:
    module_name, _, attribute = target.rpartition(".")
    parts = attribute.split(".")
    while module_name:
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            module_name, _, head = module_name.rpartition(".")
            parts.insert(0, head)
            continue
        for part in parts:
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"cannot import {target}")


# -- reading declarations from source -----------------------------------------------------------
# modules whose names an annotation may use as they are: importing them costs nothing here
_LIGHT = (
    "typing",
    "typing_extensions",
    "collections",
    "dataclasses",
    "enum",
    "pathlib",
    "numbers",
    "types",
    "abc",
    __name__,
)
_BUILTINS = {
    name: getattr(__import__("builtins"), name)
    for name in ("int", "float", "str", "bool", "list", "tuple", "dict", "set", "type", "object")
}


#: library bases whose constructor takes no settings (``nn.Module`` refuses any keyword)
_NO_SETTINGS = frozenset(
    {
        "torch.nn.Module",
        "torch.nn.modules.module.Module",
        "pytorch_lightning.LightningDataModule",
        "pytorch_lightning.core.LightningDataModule",
        "pytorch_lightning.core.datamodule.LightningDataModule",
        "lightning.pytorch.LightningDataModule",
        "lightning.LightningDataModule",
    }
)


class _Opaque(Exception):
    """A name an annotation uses that cannot be resolved without importing a heavy module."""


@dataclasses.dataclass
class _Module:
    name: str
    path: Path
    tree: ast.Module
    package: str


def _module_path(name: str) -> Path | None:
    """The source file of module ``name``, found without executing it or its packages."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        file = getattr(loaded, "__file__", None)
        return Path(file) if file and file.endswith(".py") else None
    parts = name.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
        for i in range(1, len(parts)):
            if spec is None or not spec.submodule_search_locations:
                return None
            spec = importlib.machinery.PathFinder.find_spec(
                ".".join(parts[: i + 1]), list(spec.submodule_search_locations)
            )
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


@functools.lru_cache(maxsize=256)
def _parse(name: str) -> _Module | None:
    path = _module_path(name)
    if path is None:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return _Module(name, path, tree, package)


def _absolute(module: _Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - node.level + 1] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _top_level(module: _Module) -> Iterator[ast.stmt]:
    """The module's top-level statements, with those inside ``if``/``try`` blocks (not TYPE_CHECKING ones)."""
    stack = list(reversed(module.tree.body))
    while stack:
        statement = stack.pop()
        if isinstance(statement, ast.If):
            if "TYPE_CHECKING" in ast.unparse(statement.test):
                continue
            stack.extend(reversed(statement.body + statement.orelse))
        elif isinstance(statement, ast.Try):
            stack.extend(reversed(statement.body))
        else:
            yield statement


def _is_dataclass_def(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        expression = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(expression).rsplit(".", 1)[-1] == "dataclass":
            return True
    return False


class _SourceReader:
    """Finds classes, functions and type aliases in source files and reads their declarations."""

    def __init__(self) -> None:
        self._depth = 0

    # where a name is defined
    def locate(self, module_name: str, name: str) -> tuple[_Module, ast.AST] | None:
        self._depth += 1
        try:
            if self._depth > 12:
                return None
            module = _parse(module_name)
            if module is None:
                return None
            for statement in _top_level(module):
                if (
                    isinstance(statement, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                    and statement.name == name
                ):
                    return module, statement
                if isinstance(statement, ast.ImportFrom):
                    for alias in statement.names:
                        if (alias.asname or alias.name) == name:
                            source = _absolute(module, statement)
                            if _parse(f"{source}.{alias.name}") is not None:
                                return None  # a module, not an object
                            return self.locate(source, alias.name)
                if isinstance(statement, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == name for t in statement.targets
                ):
                    return module, statement
                if (
                    isinstance(statement, ast.AnnAssign)
                    and isinstance(statement.target, ast.Name)
                    and statement.target.id == name
                    and statement.value is not None
                ):
                    return module, statement
            return None
        finally:
            self._depth -= 1

    def find(self, target: str) -> Declaration | None:
        module_name, _, name = target.rpartition(".")
        if not module_name:
            return None
        found = self.locate(module_name, name)
        if found is None:
            return None
        module, node = found
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Name, ast.Attribute)):
            alias = ast.unparse(node.value)
            return self.find(f"{module.name}.{alias}") if "." not in alias else self.find(alias)
        if isinstance(node, ast.ClassDef):
            return self.class_declaration(target, module, node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return self.function_declaration(target, module, node, skip_first=False)
        return None

    def class_declaration(self, target: str, module: _Module, node: ast.ClassDef) -> Declaration | None:
        if _is_dataclass_def(node):
            settings: dict[str, Setting] = {}
            for base in self.bases(module, node):
                if base is not None:
                    settings.update(base.settings)
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    if "ClassVar" in ast.unparse(statement.annotation):
                        continue
                    default = REQUIRED if statement.value is None else _literal(statement.value)
                    if _is_factory_field(statement.value):
                        default = _UNREAD
                    settings[statement.target.id] = Setting(
                        statement.target.id, self.annotation(module, statement.annotation), default
                    )
            return Declaration(target, settings)
        init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
        if init is not None:
            return self.function_declaration(target, module, init, skip_first=True, owner=node)
        for base in self.bases(module, node):  # no constructor of its own: the first base's
            return dataclasses.replace(base, target=target) if base is not None else Declaration(target, {}, open=True)
        return Declaration(target, {})

    def bases(self, module: _Module, node: ast.ClassDef) -> Iterator[Declaration | None]:
        for base in node.bases:
            text = ast.unparse(base)
            if text in ("object", "Generic") or text.startswith(("Generic[", "Protocol", "abc.ABC", "ABC")):
                continue
            yield self.resolve_class(module, text)

    def resolve_class(self, module: _Module, text: str) -> Declaration | None:
        head, _, rest = text.partition(".")
        if self._qualified(module, head, rest) in _NO_SETTINGS:
            return Declaration(text, {})
        found = self.locate(module.name, head) if not rest else None
        if found is not None and isinstance(found[1], ast.ClassDef):
            return self.class_declaration(f"{found[0].name}.{head}", found[0], found[1])
        imported = self._imported_module(module, head)
        if imported is not None and rest:
            return self.find(f"{imported}.{rest}")
        return None

    def _qualified(self, module: _Module, head: str, rest: str) -> str | None:
        """The full dotted name a base class is imported under (``nn.Module`` → ``torch.nn.Module``)."""
        for statement in _top_level(module):
            if isinstance(statement, ast.Import):
                for alias in statement.names:
                    if (alias.asname or alias.name.split(".")[0]) == head:
                        return ".".join(filter(None, [alias.name if alias.asname else head, rest]))
            if isinstance(statement, ast.ImportFrom):
                for alias in statement.names:
                    if (alias.asname or alias.name) == head:
                        return ".".join(filter(None, [_absolute(module, statement), alias.name, rest]))
        return None

    def _imported_module(self, module: _Module, name: str) -> str | None:
        for statement in _top_level(module):
            if isinstance(statement, ast.Import):
                for alias in statement.names:
                    if (alias.asname or alias.name.split(".")[0]) == name:
                        return alias.name if alias.asname else name
            if isinstance(statement, ast.ImportFrom):
                for alias in statement.names:
                    if (alias.asname or alias.name) == name:
                        full = f"{_absolute(module, statement)}.{alias.name}"
                        if _parse(full) is not None:
                            return full
        return None

    def function_declaration(
        self,
        target: str,
        module: _Module,
        node: ast.FunctionDef | ast.AsyncFunctionDef,
        skip_first: bool,
        owner: ast.ClassDef | None = None,
    ) -> Declaration:
        arguments = node.args
        positional = arguments.posonlyargs + arguments.args
        defaults: list[Any] = [REQUIRED] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
        pairs = list(zip(positional, defaults))[1 if skip_first else 0 :]
        pairs += list(zip(arguments.kwonlyargs, arguments.kw_defaults))
        settings = {}
        for argument, default in pairs:
            value = REQUIRED if default is REQUIRED or default is None else _literal(default)
            kind = self.annotation(module, argument.annotation) if argument.annotation is not None else Any
            settings[argument.arg] = Setting(argument.arg, kind, value)
        is_open = arguments.kwarg is not None
        if is_open and owner is not None and _passes_kwargs_to_super(node, arguments.kwarg.arg):
            for base in self.bases(module, owner):
                if base is None:
                    break
                for name, setting in base.settings.items():
                    settings.setdefault(name, setting)
                is_open = base.open
                break
        return Declaration(target, settings, is_open)

    # annotations
    def annotation(self, module: _Module, node: ast.expr) -> Any:
        try:
            return self.evaluate(module, node)
        except _Opaque:
            return Any
        except Exception:  # noqa: BLE001 - an annotation this reader cannot evaluate is not checked
            return Any

    def evaluate(self, module: _Module, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node = ast.parse(node.value, mode="eval").body
        code = compile(ast.Expression(body=node), str(module.path), "eval")
        return eval(code, {"__builtins__": _BUILTINS}, _Names(self, module))  # noqa: S307 - annotations of source files

    def name(self, module: _Module, name: str) -> Any:
        for statement in _top_level(module):
            if isinstance(statement, ast.Import):
                for alias in statement.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    if bound == name:
                        return self.module_object(alias.name if alias.asname else name)
            elif isinstance(statement, ast.ImportFrom):
                for alias in statement.names:
                    if (alias.asname or alias.name) == name:
                        source = _absolute(module, statement)
                        if source.split(".")[0] in _LIGHT or source in _LIGHT or source in sys.modules:
                            return getattr(self.module_object(source), alias.name)
                        found = self.locate(source, alias.name)
                        if found is None:
                            raise _Opaque(name)
                        return self.defined(found[0], found[1], alias.name)
        found = self.locate(module.name, name)
        if found is not None:
            return self.defined(found[0], found[1], name)
        if hasattr(typing, name):
            return getattr(typing, name)
        raise _Opaque(name)

    def module_object(self, name: str) -> Any:
        if name in sys.modules or name.split(".")[0] in _LIGHT or name in _LIGHT:
            return importlib.import_module(name)
        raise _Opaque(name)

    def defined(self, module: _Module, node: ast.AST, name: str) -> Any:
        """The value of a type alias, or a stand-in dataclass for a settings dataclass."""
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            return self.evaluate(module, node.value)
        if isinstance(node, ast.ClassDef) and _is_dataclass_def(node):
            declared = self.class_declaration(f"{module.name}.{name}", module, node)
            fields = [(s.name, s.kind, dataclasses.field(default=None)) for s in declared.settings.values()]
            return dataclasses.make_dataclass(name, fields)
        raise _Opaque(name)


class _Names(Mapping):
    """The names an annotation uses, resolved on demand (``eval`` looks locals up by item)."""

    def __init__(self, reader: _SourceReader, module: _Module) -> None:
        self.reader, self.module = reader, module

    def __getitem__(self, key: str) -> Any:
        if key in _BUILTINS:
            return _BUILTINS[key]
        try:
            return self.reader.name(self.module, key)
        except _Opaque:
            raise
        except Exception as error:  # noqa: BLE001
            raise KeyError(key) from error

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _UNREAD


def _is_factory_field(node: ast.expr | None) -> bool:
    return (
        isinstance(node, ast.Call)
        and ast.unparse(node.func).rsplit(".", 1)[-1] == "field"
        and any(keyword.arg == "default_factory" for keyword in node.keywords)
    )


def _passes_kwargs_to_super(node: ast.FunctionDef, kwarg: str) -> bool:
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("__init__"):
            if any(
                keyword.arg is None and isinstance(keyword.value, ast.Name) and keyword.value.id == kwarg
                for keyword in call.keywords
            ):
                return True
    return False


# -- checking a node -------------------------------------------------------------------------------
def check(
    key: str, values: Mapping[str, Any], target: str | Declaration, provided: Iterable[str] = (), partial: bool = False
) -> None:
    """Check the settings ``values`` of the config node at ``key`` against the declaration of
    ``target``; raise ``ConfigError`` with one line naming the first bad key.

    ``values`` are plain Python (dicts, lists, scalars) without ``_target_``-style keys; a value
    known only inside the job (an interpolation) is given as ``UNRESOLVED`` and not checked.
    ``provided``: parameters the run passes itself (``input_shape`` of a model), which the node
    must not set. ``partial``: the node is a ``_partial_`` factory, whose missing parameters the
    run fills later.
    """
    declared = target if isinstance(target, Declaration) else declaration(target)
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
    if not partial:
        missing = [name for name in allowed if declared.settings[name].default is REQUIRED and name not in values]
        if missing:
            setting = declared.settings[missing[0]]
            what = problem(object(), setting.kind) or "a value"
            raise ConfigError(
                f"{_join(key, missing[0])} is missing: {declared.target.rsplit('.', 1)[-1]} needs it "
                f"({what}); set it in the config"
            )


def _check_value(key: str, value: Any, kind: Any) -> None:
    if value is UNRESOLVED:  # known inside the job only
        return
    found = problem(value, kind)
    if found is not None:
        raise ConfigError(f"{key}={_show(value)} is not allowed: {found}")
    nested = _dataclass_of(kind)
    if nested is not None and isinstance(value, Mapping):
        fields = {f.name: f for f in dataclasses.fields(nested)}
        hints = _hints(nested) or {name: f.type for name, f in fields.items()}
        for name, item in value.items():
            if name not in fields:
                raise ConfigError(f"{key}.{name} is not a known key; allowed keys of {key}: {', '.join(fields)}")
            _check_value(f"{key}.{name}", item, hints.get(name, Any))


def _dataclass_of(kind: Any) -> type | None:
    if typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (Union, types.UnionType):
        arms = [arm for arm in typing.get_args(kind) if arm is not type(None)]
        kind = arms[0] if len(arms) == 1 else None
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


# -- building and enforcing --------------------------------------------------------------------------
def build(kind: type, values: Mapping[str, Any]) -> Any:
    """An instance of the settings dataclass ``kind`` from a config node's plain values, checked;
    nested settings dataclasses are built too."""
    key = ""
    _check_against_hints(key, kind, values)
    hints = _hints(kind)
    arguments = {}
    for name, value in values.items():
        nested = _dataclass_of(hints.get(name, Any))
        arguments[name] = build(nested, value) if nested is not None and isinstance(value, Mapping) else value
    return kind(**arguments)


def _check_against_hints(key: str, kind: type, values: Mapping[str, Any]) -> None:
    hints = _hints(kind)
    settings = {
        f.name: Setting(f.name, hints.get(f.name, Any), _field_default(f)) for f in dataclasses.fields(kind) if f.init
    }
    check(key, values, Declaration(f"{kind.__module__}.{kind.__qualname__}", settings))


def checked(obj: Callable) -> Callable:
    """Enforce a class's or function's declared settings when it is called from Python: a value
    outside its declared type or range raises ``ConfigError`` ("lam=1.5 is not allowed: ...")."""
    if inspect.isclass(obj):
        obj.__init__ = checked(obj.__init__)
        return obj

    @functools.wraps(obj)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hints = _hints(obj)
        bound = inspect.signature(obj).bind_partial(*args, **kwargs)
        for name, value in bound.arguments.items():
            kind = hints.get(name)
            if kind is None:
                continue
            plain = _plain(value)
            if _plain_checkable(plain):
                _check_value(name, plain, kind)
        return obj(*args, **kwargs)

    return wrapper


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain Python, so that settings passed by Hydra check like literals."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _plain_checkable(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain_checkable(item) for item in value)
    if isinstance(value, Mapping):
        return all(_plain_checkable(item) for item in value.values())
    return value is None or isinstance(value, (bool, int, float, str))
