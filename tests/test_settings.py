"""Settings declared once, on the part itself: the declarations, their cache, the checks, and every
built-in part.

Each option of conf/distill, conf/data, conf/model and conf/compress names a class or function
whose typed parameters declare its settings; its YAML holds their values. Here: every setting has
a type, the YAML's values pass it and list every setting, and the code writes no default of its
own; a declaration is read by import once and then from its cache entry until a file it was read
from changes; a part that cannot be read says so in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
from typing import Annotated, Any, Literal

import pytest
from omegaconf import OmegaConf

from distillab import cli, conf, settings
from distillab.conf import COMPRESS_KEYS, MODEL_PROVIDED
from distillab.config import COMPRESSOR_PROVIDED
from distillab.settings import ConfigError, Range, checked, problem

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


# -- every built-in part -------------------------------------------------------------------------
def test_every_group_is_covered():
    assert {group for group, *_ in PARTS} == {"distill", "data", "model", "compress"}
    assert {option for group, option, *_ in PARTS if group == "distill"} == set(conf.options("distill"))


@pytest.mark.parametrize(("group", "option", "target", "values", "provided"), PARTS, ids=IDS)
def test_the_yaml_holds_every_value_and_the_code_none(group, option, target, values, provided):
    settings.check(group, values, target, provided=provided)
    declared = settings.declaration(target).settings
    assert set(values) == set(declared) - set(provided), f"conf/{group}/{option}.yaml must list every setting"
    defaults = [name for name in values if not declared[name].required]
    assert not defaults, f"{target}: {defaults} have a default in the code as well as in the YAML"
    untyped = [name for name, s in declared.items() if s.kind == "any" and name not in provided]
    assert not untyped, f"{target}: settings without a type: {untyped}"


def test_the_run_nodes_and_roles_declare_their_settings():
    from distillab.config import NODES, RUN

    for target in [RUN, *NODES.values(), *conf.ROLES.values()]:
        assert settings.declaration(target).settings, target


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


# -- reading a declaration, and its cache -------------------------------------------------------------
PACKAGE = {
    "__init__.py": "from plugpkg.methods import Child\n",
    "units.py": """
        from typing import Annotated
        from distillab.settings import Range

        Gain = Annotated[float, Range(0, 10, what="a gain")]
        """,
    "base.py": """
        from __future__ import annotations
        from dataclasses import dataclass
        from typing import Annotated, Literal
        from torch import nn
        from distillab.settings import Range, Temperature
        from .units import Gain

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
    "broken.py": """
        from __future__ import annotations
        from torch import nn

        class Unresolved(nn.Module):
            def __init__(self, scale: Gain) -> None:  # Gain is not defined in this module
                super().__init__()

        """,
}
CHILD = {"weight": 1, "layers": None, "probe": 0, "scale": 1, "mode": "sum", "term": {"lam": 0.5, "temperature": 1}}


def forget(package: str = "plugpkg") -> None:
    """As a new process would start: nothing of ``package`` imported, no declaration in memory."""
    for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
        del sys.modules[name]
    settings.declaration.cache_clear()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty declaration cache of this test's own."""
    folder = tmp_path / "declarations"
    monkeypatch.setenv(settings.CACHE_ENV, str(folder))
    settings.declaration.cache_clear()
    yield folder
    settings.declaration.cache_clear()


@pytest.fixture
def plugpkg(tmp_path, monkeypatch, cache):
    package = tmp_path / "plugpkg"
    package.mkdir()
    for name, text in PACKAGE.items():
        (package / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    forget()
    yield package
    forget()


def test_a_declaration_follows_reexports_kwargs_aliases_and_dataclasses(plugpkg):
    declared = settings.declaration("plugpkg.Child")  # re-exported by the package's __init__
    assert list(declared.settings) == ["weight", "layers", "probe", "scale", "mode", "term"]
    assert problem(11, declared.settings["scale"].kind) == "a gain in [0, 10]"  # an alias of another module
    settings.check("distill", CHILD, declared)
    with pytest.raises(ConfigError, match=r"^distill\.term\.lam=2 is not allowed: a number in \[0, 1\]$"):
        settings.check("distill", {**CHILD, "term": {"lam": 2, "temperature": 1}}, declared)
    with pytest.raises(ConfigError, match=r"^distill\.term\.lamda is not a known key; allowed keys of distill.term: "):
        settings.check("distill", {**CHILD, "term": {"lamda": 2}}, declared)
    assert settings.declaration("plugpkg.methods.Alias").settings.keys() == declared.settings.keys()
    plain = settings.declaration("plugpkg.methods.Plain")  # nn.Module's constructor takes nothing
    assert plain.settings == {} and not plain.open
    function = settings.declaration("plugpkg.methods.compressor")
    assert not function.settings["keep"].required and function.settings["rank"].required


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


def entry(cache) -> tuple[str, str, list, dict]:
    """The one cache entry: the target, where its package was found, its source files with their sizes and
    times, the declaration."""
    (path,) = cache.glob("*.json")
    target, origin, sources, declared = json.loads(path.read_text())
    return target, origin, sources, declared


def test_a_cached_declaration_is_read_without_importing_the_part(plugpkg, cache):
    first = settings.declaration("plugpkg.Child")
    sources = {file for file, *_ in entry(cache)[2]}
    for name in ("__init__.py", "methods.py", "base.py", "units.py"):  # the target, its bases, the alias
        assert str(plugpkg / name) in sources, name
    assert str(plugpkg / "broken.py") not in sources
    forget()
    assert settings.declaration("plugpkg.Child") == first
    assert "plugpkg" not in sys.modules  # served from the cache entry, nothing imported


@pytest.mark.parametrize(
    ("name", "old", "new", "allowed"),
    [
        ("methods.py", "weight: Weight,", "weight: float, ", "a finite number"),  # the target's own file
        ("base.py", "scale: Gain,", "scale: int, ", "an integer"),  # a base class's, in another module
        ("units.py", "Range(0, 10,", "Range(0, 20,", "a gain in [0, 20]"),  # an alias's, used by the base
    ],
)
def test_editing_a_source_file_reads_the_declaration_again(plugpkg, cache, name, old, new, allowed):
    settings.declaration("plugpkg.Child")
    path = plugpkg / name
    text = path.read_text()
    assert old in text and len(new) == len(old)  # the same size: only the modification time tells
    before = path.stat().st_mtime_ns
    path.write_text(text.replace(old, new))
    os.utime(path, ns=(before + 10**9, before + 10**9))
    forget()
    key = "weight" if name == "methods.py" else "scale"
    assert problem("x", settings.declaration("plugpkg.Child").settings[key].kind) == allowed
    assert len(list(cache.glob("*.json"))) == 1  # the stale entry was replaced


def test_the_same_name_under_another_path_is_read_again(plugpkg, tmp_path, monkeypatch):
    settings.declaration("plugpkg.Child")
    other = tmp_path / "other" / "plugpkg"  # another package of the same name, found first
    other.mkdir(parents=True)
    for name, text in PACKAGE.items():
        (other / name).write_text(textwrap.dedent(text).replace("Range(0, 10,", "Range(0, 30,"))
    monkeypatch.syspath_prepend(str(other.parent))
    forget()
    assert problem("x", settings.declaration("plugpkg.Child").settings["scale"].kind) == "a gain in [0, 30]"


def test_a_corrupt_cache_entry_is_read_again(plugpkg, cache):
    declared = settings.declaration("plugpkg.Child")
    (path,) = cache.glob("*.json")
    for garbage in ("{not json", json.dumps({"target": "plugpkg.Child"}), json.dumps([1, 2]), ""):
        path.write_text(garbage)
        forget()
        assert settings.declaration("plugpkg.Child") == declared
        assert entry(cache)[0] == "plugpkg.Child"  # written anew


def test_a_part_that_cannot_be_read_is_one_line(plugpkg):
    cases = {
        "plugpkg.broken.Unresolved": r"cannot be read: NameError: name 'Gain' is not defined$",
        "nowhere.Loss": r"cannot be imported: ModuleNotFoundError: No module named 'nowhere'$",
        "plugpkg.missing.Loss": r"cannot be imported: AttributeError: module 'plugpkg' has no attribute 'missing'$",
        "plugpkg.methods.Missing": r"cannot be imported: AttributeError: .*has no attribute 'Missing'$",
        "math.log": r"cannot be read: ValueError: no signature found",  # a builtin: no signature to inspect
    }
    for target, message in cases.items():
        with pytest.raises(ConfigError, match=rf"^distill\._target_={target!r} {message}") as error:
            settings.check("distill", {"scale": 1}, target)
        assert len(str(error.value).splitlines()) == 1
    (plugpkg / "failing.py").write_text("raise RuntimeError('no GPU\\nfound')\n")
    with pytest.raises(
        ConfigError, match=r"^distill\._target_='plugpkg.failing.X' cannot be imported: RuntimeError: no GPU found$"
    ):
        settings.check("distill", {}, "plugpkg.failing.X")


def test_an_unreadable_part_on_the_command_line_is_one_line(plugpkg, tmp_path, capsys):
    (tmp_path / "conf" / "distill").mkdir(parents=True)
    (tmp_path / "conf" / "distill" / "broken.yaml").write_text("_target_: plugpkg.broken.Unresolved\nscale: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.check_command_line(["--config-dir", str(tmp_path / "conf"), "distill=broken"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(
        "error: distill._target_='plugpkg.broken.Unresolved' cannot be read: NameError: name 'Gain' is not defined"
    ), err


def test_checked_enforces_the_declaration_when_called_from_python():
    @checked
    def scale(x: float, factor: Annotated[float, Range(0, low_open=True, what="a factor")]) -> float:
        return x * factor

    assert scale(2.0, factor=3) == 6.0
    with pytest.raises(ConfigError, match=r"^factor=0 is not allowed: a factor > 0$"):
        scale(2.0, factor=0)

    @checked
    def unreadable(x: Undefined) -> None:  # noqa: F821 - the point of the test
        return None

    with pytest.raises(ConfigError, match=r"unreadable: its settings cannot be read: NameError: name 'Undefined'"):
        unreadable(1)


def test_build_makes_a_checked_settings_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Timing:
        threads: settings.Count | None
        repeats: settings.Count

    assert settings.build(Timing, {"threads": None, "repeats": 3}) == Timing(None, 3)
    with pytest.raises(ConfigError, match=r"^repeats=0 is not allowed: an integer >= 1$"):
        settings.build(Timing, {"threads": 1, "repeats": 0})
