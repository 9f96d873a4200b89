"""The README and docs/ stay true: every ``python train.py ...`` they show composes into a valid
config (or fails with the error shown next to it), every link resolves, and the README stays a
front page.

A command is composed the way ``python train.py ARGS --cfg job`` composes it, but in-process with
Hydra's compose API (a sweep by the first value of each swept key), then checked with
``distillab.config.validate``. A command shown with an ``error:`` line must fail with that
message: at validation, or, for what can only be checked on the models (layer paths, checkpoint
files), when the run is prepared, still before any training. A few commands are also run for
real, as a subprocess, to show that the fast path composes what ``train.py`` composes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from distillab import cli, conf
from distillab.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 350
# what .ci/run greps the README for, word for word
INSTALL, TEST = 'pip install -e ".[dev]"', "pytest"

conf.register_resolvers()

FENCE = re.compile(r"^\s*(```|~~~)")
# inline `python train.py ...`, and an `error: ...` shown after it on the same line
INLINE = re.compile(r"`(python train\.py(?: [^`]*)?)`(?:\s*(?:→|->)\s*`error: ([^`]*)`)?")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
ELLIPSIS = ("...", "…")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`]*`")
HYDRA_FLAGS_WITH_VALUE = (
    "--config-dir",
    "-cd",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--cfg",
    "-c",
    "--package",
    "-p",
)


# -- finding the commands -----------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """One ``python train.py ...`` shown in a page."""

    where: str  # page:line
    text: str  # as shown, continuation lines joined
    args: tuple[str, ...]  # what follows ``python train.py``
    env: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    error: str | None = None  # the ``error:`` line shown with it, without ``error: ``

    @property
    def multirun(self) -> bool:
        return "-m" in self.args or "--multirun" in self.args

    def flag(self, *names: str) -> str | None:
        for i, arg in enumerate(self.args):
            if arg in names and i + 1 < len(self.args):
                return self.args[i + 1]
            for name in names:
                if arg.startswith(f"{name}="):
                    return arg.split("=", 1)[1]
        return None

    def config_dir(self) -> str | None:
        return self.flag("--config-dir", "-cd")

    def overrides(self) -> list[str]:
        """The Hydra overrides: the arguments minus Hydra's own flags."""
        found, skip = [], False
        for arg in self.args:
            if skip:
                skip = False
            elif arg in HYDRA_FLAGS_WITH_VALUE:
                skip = True
            elif not arg.startswith("-"):
                found.append(arg)
        return found

    def folders(self) -> list[Path]:
        """The folders the command needs (``PYTHONPATH``, ``--config-dir``), from the repository root."""
        paths = [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if self.config_dir():
            paths.append(self.config_dir())
        return [ROOT / p for p in paths]


def logical_lines(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """A code block's lines with trailing-backslash continuations joined, each with its first line's number."""
    start, parts = None, []
    for number, line in lines:
        start = number if start is None else start
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1].strip())
            continue
        parts.append(line.strip())
        yield start, " ".join(parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(parts)


def parse(text: str) -> tuple[dict[str, str], tuple[str, ...]] | None:
    """``(env, args)`` of a ``[$ ][NAME=value ...] python train.py ARGS [# comment]`` line, else None.
    ``python train.py ...`` (an ellipsis for arguments) is prose, not a command."""
    text = text.strip().removeprefix("$ ")
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return None
    env = {}
    while tokens and ENV.match(tokens[0]):
        name, value = tokens.pop(0).split("=", 1)
        env[name] = value
    if tokens[:2] != ["python", "train.py"] or any(token in ELLIPSIS for token in tokens[2:]):
        return None
    return env, tuple(tokens[2:])


def blocks_and_prose(path: Path) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    """``("code", lines)`` for each fenced block and ``("prose", [line])`` for every other line."""
    block: list[tuple[int, str]] | None = None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                yield "code", block
                block = None
        elif block is not None:
            block.append((number, line))
        else:
            yield "prose", [(number, line)]
    if block is not None:
        yield "code", block


def commands_of(path: Path) -> list[Command]:
    """Every ``python train.py`` command of a page: in code blocks, and in inline code."""
    name = path.relative_to(ROOT).as_posix()
    found: list[Command] = []
    for kind, lines in blocks_and_prose(path):
        if kind == "code":
            found.extend(_block_commands(name, lines))
            continue
        number, line = lines[0]
        for match in INLINE.finditer(line):
            parsed = parse(match.group(1))
            if parsed:
                found.append(Command(f"{name}:{number}", match.group(1), parsed[1], parsed[0], match.group(2)))
    return found


def _block_commands(name: str, block: list[tuple[int, str]]) -> list[Command]:
    lines = list(logical_lines(block))
    found = []
    for i, (number, text) in enumerate(lines):
        parsed = parse(text)
        if parsed is None:
            continue
        following = lines[i + 1][1] if i + 1 < len(lines) else ""
        error = following[len("error: ") :] if following.startswith("error: ") else None
        found.append(Command(f"{name}:{number}", text.removeprefix("$ "), parsed[1], parsed[0], error))
    return found


COMMANDS = [command for page in PAGES for command in commands_of(page)]


def unrunnable(command: Command) -> str | None:
    """Why a command shown cannot be typed as it stands: a placeholder, or a folder that does not exist."""
    placeholder = PLACEHOLDER.search(command.text)
    if placeholder:
        return f"{command.where}: {placeholder.group(0)} is a placeholder to fill in"
    missing = [folder for folder in command.folders() if not folder.exists()]
    if missing:
        return f"{command.where}: {missing[0].relative_to(ROOT)} does not exist"
    return None


# -- composing a command -------------------------------------------------------------------------
def variants(command: Command) -> list[list[str]]:
    """The overrides of each job to check: a single run's own; for a sweep (``-m``, a preset, or a
    swept value) the first value of each swept key first, then each other value once."""
    extra = [f"hydra.searchpath=[file://{(ROOT / command.config_dir()).resolve()}]"] if command.config_dir() else []
    return [variant + extra for variant in cli.override_variants(command.overrides())]


@contextlib.contextmanager
def importable(command: Command) -> Iterator[None]:
    """The command's ``PYTHONPATH`` folders on ``sys.path``, as ``train.py`` would have them."""
    added = [str(folder) for folder in command.folders() if str(folder) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            sys.path.remove(folder)


def compose_job(overrides: list[str]) -> DictConfig:
    """``python train.py OVERRIDES --cfg job`` in-process: the composed job config, unresolved
    (read-only: the pages show the same command more than once, and it is composed once)."""
    return _compose_job(tuple(overrides))


@functools.cache
def _compose_job(overrides: tuple[str, ...]) -> DictConfig:
    overrides = list(overrides)
    with_hydra = any(o.lstrip("+~").startswith("hydra") for o in overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=with_hydra)
        if with_hydra:
            with open_dict(cfg):
                del cfg.hydra
        OmegaConf.set_readonly(cfg, True)
        return cfg
    finally:
        GlobalHydra.instance().clear()


def composed(overrides: list[str], command: Command) -> DictConfig:
    """The job config of ``overrides``, checked as ``train.py`` checks it before any work."""
    with importable(command):
        cfg = compose_job(overrides)
        validate(cfg)
    return cfg


def one_line(error: BaseException, overrides: list[str]) -> str:
    return str(error) if isinstance(error, ConfigError) else cli.explain(error, overrides)


def first_error(command: Command, tmp_path: Path) -> str | None:
    """The one-line error of the first job of ``command`` that fails, before any training, or None."""
    for overrides in variants(command):
        try:
            composed(overrides, command)
        except Exception as error:  # noqa: BLE001 - the message is the point
            return one_line(error, overrides)
        problem = prepared_error(overrides, command, tmp_path)
        if problem is not None:
            return problem
    return None


def prepared_error(overrides: list[str], command: Command, tmp_path: Path) -> str | None:
    """What ``pipeline.prepare`` reports: the checks on the built models (layer paths, feature
    shapes, a checkpoint file, a compression budget), made before any training."""
    from distillab import pipeline

    GlobalHydra.instance().clear()
    try:
        with importable(command), initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.cache_dir = str(tmp_path / "cache")
            del cfg.hydra
        pipeline.prepare(cfg)
    except ConfigError as error:
        return str(error)
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    return None


def matches(message: str, expected: str) -> bool:
    """``expected`` as a page shows it: the message, or pieces of it in order, ``…``/``...`` between."""
    pieces = [piece.strip() for piece in re.split(r"…|\.\.\.", expected) if piece.strip()]
    at = 0
    for piece in pieces:
        at = message.find(piece, at)
        if at < 0:
            return False
        at += len(piece)
    return bool(pieces)


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 50, [c.where for c in COMMANDS]
    assert sum(c.error is not None for c in COMMANDS) >= 5


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_every_command_shown_composes(command, tmp_path, monkeypatch):
    problem = unrunnable(command)
    assert problem is None, f"{problem}: show a command a reader can type as it stands"
    if command.error is not None:
        monkeypatch.chdir(ROOT)  # paths in a command are relative to the repository root
        message = first_error(command, tmp_path)
        assert message is not None and matches(message, command.error), (
            f"{command.where}: {command.text}\n  shows: error: {command.error}\n  gives: {message}"
        )
        return
    overrides = variants(command)[0]
    try:
        composed(overrides, command)
    except Exception as error:  # noqa: BLE001 - the message is the point
        pytest.fail(f"{command.where}: {command.text}\n  does not compose: {one_line(error, overrides)}")


# -- the fast path against train.py ----------------------------------------------------------------
def sample() -> list[Command]:
    """A handful of commands to run for real: one of each shape the pages show."""
    usable = [
        c
        for c in COMMANDS
        if unrunnable(c) is None
        and not c.multirun
        and not any(a.startswith(("--help", "--cfg", "--info", "-h")) for a in c.args)
    ]
    shapes = {
        "defaults": lambda c: not c.args and c.error is None,
        "quoted list": lambda c: (
            c.error is None and any(part.startswith("'") and "[" in part for part in c.text.split()[2:])
        ),
        "experiment": lambda c: c.error is None and any(a.startswith("experiment=") for a in c.args),
        "preset sweep": lambda c: (
            c.error is None
            and any(a.startswith("sweep=") for a in c.args)
            and not any(a.startswith("sweep=tune") for a in c.args)
        ),
        "example folder": lambda c: c.error is None and c.config_dir() is not None,
        "bad value": lambda c: c.error is not None and "is not allowed" in c.error and c.where.startswith("README"),
        "unknown key": lambda c: (
            c.error is not None and "is not a known key" in c.error and c.where.startswith("README")
        ),
    }
    chosen = []
    for predicate in shapes.values():
        found = next((c for c in usable if predicate(c) and c not in chosen), None)
        if found is not None:
            chosen.append(found)
    return chosen


SAMPLE = sample()


def run_train(command: Command, *extra: str) -> subprocess.CompletedProcess:
    shown = [str(ROOT / p) for p in command.env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, **command.env, "PYTHONPATH": os.pathsep.join([*shown, str(ROOT / "src")])}
    return subprocess.run(
        [sys.executable, "train.py", *command.args, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_handful_of_commands_run_for_real():
    assert len(SAMPLE) >= 6, [c.where for c in SAMPLE]


@pytest.mark.parametrize("command", SAMPLE, ids=[c.where for c in SAMPLE])
def test_the_fast_path_composes_what_train_py_composes(command, tmp_path):
    if command.error is not None:
        # --cfg skips the check; a bad value stops train.py before any work, with the line shown
        done = run_train(command)
        assert done.returncode == 2, done.stderr[-2000:]
        assert matches(done.stderr.strip().splitlines()[-1], f"error: {command.error}"), done.stderr[-2000:]
        return
    done = run_train(command, "--cfg", "job")
    assert done.returncode == 0, done.stderr[-2000:]
    printed = OmegaConf.create(done.stdout)
    fast = composed(variants(command)[0], command)
    assert OmegaConf.to_container(printed) == OmegaConf.to_container(fast)


# -- the pages -------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for kind, lines in blocks_and_prose(path):
        if kind == "prose" and lines[0][1].startswith("#"):
            base = slug(lines[0][1].lstrip("#"))
            name, n = base, 1
            while name in found:
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every Markdown link outside code."""
    found = []
    for kind, lines in blocks_and_prose(path):
        if kind == "prose":
            number, line = lines[0]
            found.extend((number, target) for target in LINK.findall(CODE_SPAN.sub("", line)))
    return found


def test_the_readme_is_a_front_page():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move a topic to docs/"
    assert INSTALL in text
    assert f"    {TEST}" in lines or TEST in lines


def test_the_readme_links_every_docs_page_and_the_examples():
    linked = {(README.parent / target.split("#")[0]).resolve() for _, target in links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    missing = [page.name for page in pages if page.resolve() not in linked]
    assert not missing, f"README.md links no docs/{missing[0]}"
    assert (ROOT / "examples").resolve() in linked


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_every_docs_page_opens_with_a_summary_and_a_way_back(page):
    text = page.read_text()
    assert text.startswith("# "), f"{page.name} starts with its title"
    first = text.split("\n\n", 2)[1]
    assert not first.startswith(("#", "```", "|", "-")), f"{page.name}: a summary paragraph comes first"
    assert any(target.split("#")[0] == "../README.md" for _, target in links(page)), f"{page.name} links no README"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{page.name}:{number}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{page.name}:{number}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# -- the report's command line ------------------------------------------------------------------
REPORT_COMMAND = re.compile(r"(?:distillab-report|python -m distillab\.report)((?: [^`\n]*)?)")
OPTIONAL = re.compile(r"\s*\[[^\]]*\]")


def report_commands() -> list[tuple[str, list[str]]]:
    """Every ``distillab-report ...`` (or ``python -m distillab.report ...``) a page shows with
    arguments; an optional ``[...]`` part and a ``# comment`` are left out, and a ``<placeholder>``
    stands for a folder."""
    found = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for match in REPORT_COMMAND.finditer(line):
                rest = OPTIONAL.sub("", re.sub(r"<[^<>]+>", "DIR", match.group(1).split(" #")[0])).strip()
                if rest:
                    found.append((f"{page.relative_to(ROOT)}:{number}", shlex.split(rest)))
    return found


def test_the_docs_show_report_commands() -> None:
    shown = {where.split(":")[0] for where, _ in report_commands()}
    assert {"README.md", "docs/sweeps.md"} <= shown


@pytest.mark.parametrize(("where", "args"), report_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_report_command_shown_parses(where: str, args: list[str]) -> None:
    from distillab import report

    try:
        parsed = report.parser().parse_args(args)
    except SystemExit as exit:
        pytest.fail(f"{where}: `distillab-report {' '.join(args)}` does not parse (exit {exit.code})")
    assert len(parsed.sweep_dirs) == 1 or parsed.out is not None, f"{where}: several folders need --out"
