"""Stage configs: one @dataclass per stage, turned into a command line with one documented flag per field.

    @dataclass
    class Config:
        batch_size: Positive[int] = 64
        \"\"\"episodes per update, over all ranks\"\"\"

The string under a field is its `--help` text (cleanrl / tyro style), and a field's rule sits in its annotation:
`Positive[int]`, `NonNegative[float]`, `PositiveOrAll[int]` (-1 means "all" or "the default"), `Between(0, 1)`,
`Choice("k1", "k2", "k3")`. Every rule is checked when a config is parsed, one line per bad field, so a run never
starts with a bad value; a check that involves several fields (batch sizes that must divide) is a `require` where
the stage derives its sizes, naming the flags.

Values come from, in order: the dataclass defaults (the tiny preset), then `PRESETS[--preset]`, then the flags
given. String fields may hold `{preset}` (`runs/{preset}/sft`), filled in last, so stage paths chain per preset.
A Config may extend another (label.py's extends the labeler's, `labelers.LabelerConfig`): the inherited flags are
listed under their own heading in --help, and a field redeclared to change its default keeps the base's doc.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import sys
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


class UserError(SystemExit):
    """A mistake in what the user gave (a flag, a path, a file): printed as its message, no traceback, exit 1."""


def require(ok: bool, message: str) -> None:
    """Stop with `message` (which names the flags involved) unless `ok`."""
    if not ok:
        raise UserError(message)


# ----------------------------------------------------------------------------------------------------------------
# rules: `Annotated[type, Rule]`, so the rule is read next to the field it constrains


@dataclasses.dataclass(frozen=True)
class Rule:
    ok: Any  # value -> bool
    text: str  # completes "--flag ...": "must be > 0"

    def __repr__(self) -> str:
        return self.text


Positive = Annotated[T, Rule(lambda v: v > 0, "must be > 0")]
NonNegative = Annotated[T, Rule(lambda v: v >= 0, "must be >= 0")]
PositiveOrAll = Annotated[T, Rule(lambda v: v == -1 or v > 0, "must be > 0, or -1 for all / the default")]


def Between(lo: float, hi: float, tp: type = float):  # noqa: N802 (used like a type)
    return Annotated[tp, Rule(lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]")]


def Choice(*choices: str):  # noqa: N802 (used like a type)
    return Annotated[str, Rule(lambda v: v in choices, f"must be one of {', '.join(choices)}")]


def rules(cls) -> dict[str, Rule]:
    """{field name: its Rule} of a config class."""
    out = {}
    for name, tp in get_type_hints(cls, include_extras=True).items():
        found = [r for r in get_args(tp)[1:] if isinstance(r, Rule)] if get_origin(tp) is Annotated else []
        if found:
            out[name] = found[0]
    return out


def config_errors(cfg) -> list[str]:
    """One message per field whose value breaks its rule (a NaN or an infinity breaks every numeric rule), in the
    order --help lists the fields."""
    errors, have = [], rules(type(cfg))
    for name in (f.name for f in ordered_fields(type(cfg)) if f.name in have):
        rule, v = have[name], getattr(cfg, name)
        if not rule.ok(v) or (isinstance(v, float) and not math.isfinite(v)):
            errors.append(f"--{name.replace('_', '-')} {rule.text}, got {v!r}")
    return errors


# ----------------------------------------------------------------------------------------------------------------
# the command line


def field_docs(cls) -> dict[str, str]:
    """The string literal written under each field of a dataclass, for it and its bases (a subclass's wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.cleandoc("\n" + inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:] + [None]):
            doc = getattr(getattr(nxt, "value", None), "value", None) if isinstance(nxt, ast.Expr) else None
            if isinstance(stmt, ast.AnnAssign) and isinstance(doc, str):
                docs[stmt.target.id] = " ".join(doc.split())
    return docs


def _defining_class(cls, name: str):
    """The first class of the MRO that declares field `name` (a redeclared default stays with its base)."""
    for klass in reversed(cls.__mro__):
        if name in getattr(klass, "__annotations__", {}):
            return klass
    return cls


def ordered_fields(cls) -> list:
    """The dataclass fields of `cls`, its own first, then the inherited ones (the order of --help)."""
    return sorted(dataclasses.fields(cls), key=lambda f: _defining_class(cls, f.name) is not cls)


# presets every stage has, each another preset on the offline dialogue task (--task hh): `run_pipeline.sh hh-tiny`
TASK_PRESETS = {"hh-micro": ("micro", {"task": "hh"}), "hh-tiny": ("tiny", {"task": "hh"})}


def parse_config(cls, presets: dict[str, dict[str, Any]], argv: list[str] | None = None):
    """Build `cls` from its defaults, `presets[--preset]` and the flags in `argv` (default sys.argv[1:])."""
    if any(f.name == "task" for f in dataclasses.fields(cls)):  # the dialogue presets: a base preset + --task hh
        presets = {**presets, **{name: {**presets.get(base, {}), **extra} for name, (base, extra) in
                                 TASK_PRESETS.items() if name not in presets}}
    docs, hints = field_docs(cls), get_type_hints(cls)
    defaults = cls()
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}  # the stage's own flags first, then each inherited config's under its name
    for f in ordered_fields(cls):
        owner = _defining_class(cls, f.name)
        if owner is cls:
            group = parser
        elif owner not in groups:
            group = groups[owner] = parser.add_argument_group(
                f"{owner.__name__} ({owner.__module__})", (owner.__doc__ or "").split("\n")[0])
        else:
            group = groups[owner]
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        overrides = [f"{p}: {v[f.name]}" for p, v in presets.items() if f.name in v]
        help_ = docs.get(f.name, "") + (f" [{'; '.join(overrides)}]" if overrides else "")
        # argparse %-formats help strings: a literal % (in a doc, an override or a default) must be doubled
        kw = dict(default=argparse.SUPPRESS, help=(help_ + f" (default: {default})").replace("%", "%%"))
        if f.name == "preset":
            kw["choices"] = ["tiny", *[p for p in presets if p != "tiny"]]
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif get_origin(tp) is list:
            group.add_argument(flag, type=get_args(tp)[0], action="append", **kw)
        else:
            group.add_argument(flag, type=next((a for a in get_args(tp) if a is not type(None)), tp), **kw)
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", getattr(defaults, "preset", "tiny"))
    cfg = resolve_paths(dataclasses.replace(defaults, **{**presets.get(preset, {}), **given}))
    if errors := config_errors(cfg):
        raise UserError("\n  ".join([f"{parser.prog}: bad flag values (one line per field):", *errors]))
    return cfg


def resolve_paths(cfg):
    """Fill `{preset}` in every string field (idempotent)."""
    updates = {f.name: getattr(cfg, f.name).format(preset=cfg.preset) for f in dataclasses.fields(cfg)
               if isinstance(getattr(cfg, f.name), str) and "{preset}" in getattr(cfg, f.name)}
    return dataclasses.replace(cfg, **updates)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
