"""Settings declared once, on the part itself: the reader, the checks, and every built-in part.

Each option of conf/distill, conf/data, conf/model and conf/compress names a class or function
whose typed parameters declare its settings; its YAML holds their values. Here: the declaration
read from source (what the command line checks, before torch is imported) is the one Python
sees when it imports the part; the YAML's values pass it and list every setting; and the code
writes no default of its own.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from omegaconf import OmegaConf

from distillab import conf, settings
from distillab.config import COMPRESS_KEYS, COMPRESSOR_PROVIDED, MODEL_PROVIDED
from distillab.settings import ConfigError, Range, checked, problem
from tests.conftest import ROOT

HYDRA_KEYS = ("_target_", "_partial_")


def parts() -> list[tuple[str, str, str, dict, tuple[str, ...]]]:
    """``(group, option, target, values, provided)`` of every built-in part (each step of a chain)."""
    found = []
    for group, provided in (
        ("distill", ()),
        ("data", ()),
        ("model", MODEL_PROVIDED),
        ("compress", COMPRESSOR_PROVIDED),
    ):
        for option in conf.options(group):
            # a compressor's default amount is an interpolation (null with a budget): resolved as in a job
            node = OmegaConf.to_container(conf.load(group, option), resolve=group == "compress")
            steps = node.get("steps") or ([node] if "_target_" in node else [])
            for step in steps:
                values = {k: v for k, v in step.items() if k not in HYDRA_KEYS}
                if group == "compress":
                    values = {k: v for k, v in values.items() if k not in COMPRESS_KEYS}
                    for key in ("amount", "max_acc_drop", "cycles"):
                        if key in settings.declaration(step["_target_"]).settings:
                            values[key] = step.get(key, node.get(key))
                found.append((group, option, step["_target_"], values, provided))
    return found


PARTS = parts()
IDS = [f"{group}={option}:{target.rsplit('.', 1)[-1]}" for group, option, target, _, _ in PARTS]


def kind(value: Any) -> Any:
    """A settings type as nested plain data (a settings dataclass, or the source reader's stand-in
    for one, by its name and its fields' kinds), comparable across processes."""
    if dataclasses.is_dataclass(value):
        hints = typing.get_type_hints(value, include_extras=True)
        return [value.__name__, [[f.name, kind(hints[f.name])] for f in dataclasses.fields(value)]]
    args = typing.get_args(value)
    if args:
        return [repr(typing.get_origin(value)), [repr(a) if isinstance(a, Range) else kind(a) for a in args]]
    return repr(value)


def described(declaration: settings.Declaration, provided: tuple[str, ...] = ()) -> dict[str, Any]:
    """Names, kinds and defaults; the kinds of what the run provides (``nn.Module``, ``Context``) are
    left out, since the source reader does not import torch to resolve them."""
    return {
        "open": declaration.open,
        "settings": [
            [s.name, None if s.name in provided else kind(s.kind), repr(s.default)]
            for s in declaration.settings.values()
        ],
    }


# -- every built-in part -------------------------------------------------------------------------
def test_every_group_is_covered():
    assert {group for group, *_ in PARTS} == {"distill", "data", "model", "compress"}
    assert {option for group, option, *_ in PARTS if group == "distill"} == set(conf.options("distill"))


@pytest.mark.parametrize(("group", "option", "target", "values", "provided"), PARTS, ids=IDS)
def test_the_declaration_read_from_source_is_the_imported_one(group, option, target, values, provided):
    from_source, imported = settings.declaration(target), settings._by_import(target)
    assert described(from_source, provided) == described(imported, provided)
    untyped = [s.name for s in from_source.settings.values() if s.kind is Any and s.name not in provided]
    assert not untyped, f"{target}: settings without a type: {untyped}"


@pytest.mark.parametrize(("group", "option", "target", "values", "provided"), PARTS, ids=IDS)
def test_the_yaml_holds_every_value_and_the_code_none(group, option, target, values, provided):
    settings.check(group, values, target, provided=provided)
    declared = settings.declaration(target).settings
    assert set(values) == set(declared) - set(provided), f"conf/{group}/{option}.yaml must list every setting"
    defaults = [name for name in values if declared[name].default is not settings.REQUIRED]
    assert not defaults, f"{target}: {defaults} have a default in the code as well as in the YAML"


def test_every_declaration_is_read_without_importing_torch():
    """What the command line does before a job: read every part's declaration and check its values,
    in a fresh interpreter that must not import torch or Lightning for it."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_settings import PARTS, described
        from distillab import settings
        found = {{}}
        for group, option, target, values, provided in PARTS:
            settings.check(group, values, target, provided=provided)
            found[target] = described(settings.declaration(target), provided)
        heavy = [m for m in ("torch", "pytorch_lightning", "torchvision") if m in sys.modules]
        print(json.dumps({{"found": found, "heavy": heavy}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["heavy"] == []
    for _, _, target, _, provided in PARTS:
        expected = json.loads(json.dumps(described(settings._by_import(target), provided)))
        assert result["found"][target] == expected, target


# -- what a value may be ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "kind", "allowed"),
    [
        (1.5, Annotated[float, Range(0, 1, what="a weight", note="0 = none")], "a weight in [0, 1] (0 = none)"),
        (0, Annotated[float, Range(0, low_open=True)], "a number > 0"),
        (1.0, Annotated[float, Range(0, 1, high_open=True)], "a number in [0, 1)"),
        (0, Annotated[int, Range(1)], "an integer >= 1"),
        (float("inf"), float, "a finite number"),
        (float("nan"), settings.Weight, "a weight >= 0"),
        (True, int, "an integer"),
        ("3", int, "an integer"),
        (2.5, int, "an integer"),
        ("x", Literal["a", "b"], "one of a, b"),
        ("x", Literal["a"] | None, "a, or null"),
        (1, bool, "true or false"),
        ([1, 0], list[Annotated[int, Range(1)]], "a list of integers >= 1"),
        ("a", list[str], "a list"),
        (3, str | list[str] | None, "a string or a list, or null"),
    ],
)
def test_problem_names_what_is_allowed(value, kind, allowed):
    assert problem(value, kind) == allowed


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (0.5, settings.Fraction),
        (1, float),
        (None, int | None),
        ("a", Literal["a", "b"]),
        ([1, 2], list[int]),
        (2**32 - 1, settings.Seed),
        ({"a": 1}, dict[str, Any]),
        (object(), Any),
    ],
)
def test_problem_accepts_what_fits(value, kind):
    assert problem(value, kind) is None


# -- reading a declaration from source --------------------------------------------------------------
PACKAGE = {
    "__init__.py": "import torch  # the package itself is heavy: reading its parts must not run it\n"
    "from plugpkg.methods import Child\n",
    "base.py": """
        from __future__ import annotations
        from dataclasses import dataclass
        from typing import Annotated, Literal
        from torch import nn
        from distillab.settings import Range, Temperature

        Gain = Annotated[float, Range(0, 10, what="a gain")]

        @dataclass
        class Term:
            lam: Annotated[float, Range(0, 1)]
            temperature: Temperature

        class Base(nn.Module):
            def __init__(self, scale: Gain, mode: Literal["sum", "mean"], term: Term, **kwargs) -> None:
                super().__init__()
        """,
    "methods.py": """
        from collections.abc import Sequence
        from torch import Tensor, nn
        from .base import Base
        from distillab.settings import Weight

        class Child(Base):
            def __init__(self, weight: Weight, layers: Sequence[str] | None, probe: Tensor, **kwargs) -> None:
                super().__init__(**kwargs)

        class Plain(nn.Module):
            def forward(self, x):
                return x

        Alias = Child

        def compressor(model, context, *, rank: int, keep: bool = True):
            return model
        """,
}


@pytest.fixture
def plugpkg(tmp_path, monkeypatch):
    package = tmp_path / "plugpkg"
    package.mkdir()
    for name, text in PACKAGE.items():
        (package / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [m for m in sys.modules if m.startswith("plugpkg")]:
        del sys.modules[name]
    settings._declaration.cache_clear()
    settings._parse.cache_clear()


def test_the_reader_follows_reexports_kwargs_aliases_and_dataclasses(plugpkg):
    declared = settings.declaration("plugpkg.Child")  # re-exported by the package's __init__
    assert list(declared.settings) == ["weight", "layers", "probe", "scale", "mode", "term"]
    assert problem(11, declared.settings["scale"].kind) == "a gain in [0, 10]"  # a module-level alias
    assert "plugpkg" not in sys.modules  # read, never run
    with pytest.raises(ConfigError, match=r"^distill\.term\.lam=2 is not allowed: a number in \[0, 1\]$"):
        settings.check(
            "distill",
            {"weight": 1, "layers": None, "probe": 0, "scale": 1, "mode": "sum", "term": {"lam": 2, "temperature": 1}},
            declared,
        )
    assert settings.declaration("plugpkg.methods.Alias").settings.keys() == declared.settings.keys()
    plain = settings.declaration("plugpkg.methods.Plain")  # nn.Module's constructor takes nothing
    assert plain.settings == {} and not plain.open
    function = settings.declaration("plugpkg.methods.compressor")
    assert function.settings["keep"].default is True and function.settings["rank"].default is settings.REQUIRED


def test_check_names_unknown_missing_and_provided_keys(plugpkg):
    declared = settings.declaration("plugpkg.methods.compressor")
    with pytest.raises(ConfigError, match=r"^compress\.rnak is not a known key; allowed keys of compress: rank, keep$"):
        settings.check("compress", {"rnak": 2}, declared, provided=("model", "context"))
    with pytest.raises(ConfigError, match=r"^compress\.rank is missing: compressor needs it \(an integer\)"):
        settings.check("compress", {"keep": False}, declared, provided=("model", "context"))
    settings.check("compress", {"keep": False}, declared, provided=("model", "context"), partial=True)
    with pytest.raises(ConfigError, match="compress.model is not a known key"):
        settings.check("compress", {"rank": 2, "model": 1}, declared, provided=("model", "context"))
    settings.check("compress", {"rank": settings.UNRESOLVED}, declared, provided=("model", "context"))


def test_checked_enforces_the_declaration_when_called_from_python():
    @checked
    def scale(x: float, factor: Annotated[float, Range(0, low_open=True, what="a factor")]) -> float:
        return x * factor

    assert scale(2.0, factor=3) == 6.0
    with pytest.raises(ConfigError, match=r"^factor=0 is not allowed: a factor > 0$"):
        scale(2.0, factor=0)


def test_build_makes_a_checked_settings_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Timing:
        threads: settings.Count | None
        repeats: settings.Count

    assert settings.build(Timing, {"threads": None, "repeats": 3}) == Timing(None, 3)
    with pytest.raises(ConfigError, match=r"^repeats=0 is not allowed: an integer >= 1$"):
        settings.build(Timing, {"threads": 1, "repeats": 0})


def test_declarations_of_the_run_nodes_are_read_from_source():
    from distillab.config import NODES, ROLES, RUN

    for target in [RUN, *NODES.values(), *ROLES.values()]:
        from_source = settings._SourceReader().find(target)
        assert from_source is not None and from_source.settings, target
        assert described(from_source) == described(settings._by_import(target)), target


def test_source_files_exist_for_every_built_in_target():
    for _, _, target, _, _ in PARTS:
        module = target.rsplit(".", 1)[0]
        path = settings._module_path(module)
        assert path is not None and Path(path).is_file(), target
