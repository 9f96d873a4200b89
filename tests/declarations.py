"""Declarations of settings in a form that compares across processes, for tests/test_methods.py.

It lives apart from the test module so that a fresh interpreter can read declarations from
source with it and show that torch was never imported (``python tests/declarations.py``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from typing import Any

from distillab import settings


def kind(value: Any) -> Any:
    """A settings type as nested plain data: a settings dataclass (the class itself, or the source
    reader's stand-in for it) by its name and the kinds of its fields."""
    if dataclasses.is_dataclass(value):
        hints = typing.get_type_hints(value, include_extras=True)
        return [value.__name__, [[f.name, kind(hints[f.name])] for f in dataclasses.fields(value)]]
    args = typing.get_args(value)
    if args:
        return [repr(typing.get_origin(value)), [repr(a) if isinstance(a, settings.Range) else kind(a) for a in args]]
    return repr(value)


def described(declaration: settings.Declaration) -> dict[str, Any]:
    """Names, kinds and defaults of a declaration, and whether it is open to further keys."""
    return {
        "open": declaration.open,
        "settings": [[s.name, kind(s.kind), repr(s.default)] for s in declaration.settings.values()],
    }


def main(group: str) -> None:
    """Print, as JSON, each option's declaration read from source and whether its YAML values check,
    and whether torch was imported on the way."""
    from omegaconf import OmegaConf

    from distillab import conf

    found = {}
    for option in conf.options(group):
        values = OmegaConf.to_container(conf.load(group, option))
        target = values.pop("_target_")
        try:
            settings.check(group, values, target)
            problem = None
        except settings.ConfigError as error:
            problem = str(error)
        found[option] = {"target": target, "declaration": described(settings.declaration(target)), "problem": problem}
    print(json.dumps({"options": found, "torch": "torch" in sys.modules}))


if __name__ == "__main__":
    main(sys.argv[1])
