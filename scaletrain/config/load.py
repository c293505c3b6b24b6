"""Build a validated :class:`Config` from defaults, a TOML file and CLI overrides.

Precedence is CLI > file > defaults (DESIGN.md principle 5). Every problem is raised as a
:class:`ConfigError` with one line naming the field; nothing is computed before the whole
config has been checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import tomllib
import types
from pathlib import Path
from typing import Any, get_type_hints

from scaletrain.config.checks import check_combinations
from scaletrain.config.paths import resolve_paths
from scaletrain.config.schema import Config, sections
from scaletrain.errors import ConfigError


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in sections().items() for f in dataclasses.fields(cls)]


def _field_types(section_cls) -> dict[str, type]:
    return get_type_hints(section_cls)


def _text(key: str, value: str) -> str:
    """`value` if it is valid Unicode text. Python decodes command-line bytes that are not
    UTF-8 into lone surrogates (surrogateescape); such a string cannot be tokenized, nor
    written into the UTF-8 config.toml, so it is refused here, before any work."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(value[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise ConfigError(f"{key}: not valid UTF-8 text ({what} at character {e.start})"
                          ) from None
    return value


def _toml_list(text: str) -> list | None:
    """`text` as a TOML array, or None when it is not one (e.g. a glob '[ab]*.txt')."""
    try:
        v = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return None
    return v if isinstance(v, list) else None


def _coerce(key: str, value: Any, typ: type, from_cli: bool) -> Any:
    """Convert `value` to `typ`; CLI values arrive as strings, TOML values typed."""
    if isinstance(typ, types.UnionType):
        typ = _union_member(typ, value, from_cli)
    if from_cli and isinstance(value, str) and _reads_text(typ):
        return _from_text(key, value, typ)
    return _from_typed(key, value, typ)


def _union_member(typ: types.UnionType, value: Any, from_cli: bool) -> type:
    """The member of `str | list[str]` (data.source: one or a list) that `value` is."""
    listed = isinstance(value, (list, tuple)) or (
        from_cli and isinstance(value, str) and _toml_list(value) is not None)
    return next(t for t in typ.__args__ if (getattr(t, "__origin__", None) is list) == listed)


def _is_list(typ: type) -> bool:
    return typ in (list, tuple) or getattr(typ, "__origin__", None) in (list, tuple)


def _reads_text(typ: type) -> bool:
    """The field types a command-line string is parsed into (others stay as given)."""
    return typ in (bool, int, float, str, dict) or _is_list(typ)


def _from_text(key: str, value: str, typ: type) -> Any:
    """A command-line string as `typ` (bool, int, float, str, an inline table, a list)."""
    text = value.strip()
    if typ is str:
        return _text(key, value)
    if typ in (bool, int, float):
        return _scalar_from_text(key, value, text, typ)
    if typ is dict:  # an inline TOML table: '{gopher_quality = {min_doc_words = 20}}'
        try:
            return _coerce(key, tomllib.loads(f"v = {text}")["v"], typ, from_cli=False)
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{key}: expected an inline TOML table such as "
                              f"'{{name = {{arg = 1}}}}', got '{value}'") from None
    try:
        parsed = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        # "3,5" or "c_attn,c_proj": items typed like single CLI values.
        (item_t,) = typ.__args__[:1]
        return [_coerce(f"{key}[{i}]", p.strip(), item_t, from_cli=True)
                for i, p in enumerate(text.split(",")) if p.strip()]
    return _coerce(key, parsed, typ, from_cli=False)


def _scalar_from_text(key: str, value: str, text: str, typ: type) -> bool | int | float:
    """`text` (the stripped `value`) as a bool (true/1/yes/on, false/0/no/off), an
    integer (also written 1e3, but not 2.5) or a number."""
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got '{value}'")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
            raise ConfigError(f"{key}: expected an integer, got '{value}'") from None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got '{value}'") from None


def _from_typed(key: str, value: Any, typ: type) -> Any:
    """A typed value (TOML, or a parsed list) checked against `typ`; lists item by item."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return _text(key, value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if typ is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    if getattr(typ, "__origin__", None) in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_t,) = typ.__args__[:1]
        return [_coerce(f"{key}[{i}]", v, item_t, from_cli=False) for i, v in enumerate(value)]
    return value


def _set(cfg: Config, key: str, value: Any, from_cli: bool) -> None:
    parts = key.split(".")
    secs = sections(cfg)
    if len(parts) != 2:
        raise ConfigError(f"'{key}': config keys look like section.key{_suggest(key, _all_keys())}")
    sec_name, name = parts
    if sec_name not in secs:
        raise ConfigError(f"unknown config section '{sec_name}' in '{key}'"
                          f"{_suggest(key, _all_keys()) or _suggest(sec_name, list(secs))}")
    section = secs[sec_name]
    types = _field_types(type(section))
    if keyword.iskeyword(name) and name + "_" in types:
        name += "_"  # `init.from` is the field `from_` (a keyword cannot be a field name)
    if name not in types:
        raise ConfigError(f"unknown config key '{key}'{_suggest(key, _all_keys())}")
    setattr(section, name, _coerce(key, value, types[name], from_cli))


def _check_field(key: str, value: Any, meta: dict) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be finite, got {value}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, choices))}"
                          f"{_suggest(str(value), [str(c) for c in choices])}")
    for op, bad, word in (("ge", lambda v, b: v < b, ">="), ("gt", lambda v, b: v <= b, ">"),
                          ("le", lambda v, b: v > b, "<="), ("lt", lambda v, b: v >= b, "<")):
        bound = meta.get(op)
        if bound is not None and isinstance(value, (int, float)) and bad(value, bound):
            raise ConfigError(f"{key}: must be {word} {bound}, got {value}")


def validate(cfg: Config) -> Config:
    """Check every field's own constraints, then the combinations between fields."""
    resolve_paths(cfg)  # `~` and absolute paths (config/paths.py); idempotent
    for sec_name, section in sections(cfg).items():
        for f in dataclasses.fields(section):
            _check_field(f"{sec_name}.{f.name}", getattr(section, f.name), f.metadata)
    check_combinations(cfg)  # cross-field rules (config/checks.py)
    return cfg


def parse_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Split `--section.key=value` (or `--section.key value`) from other arguments."""
    pairs, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key = arg[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                value = argv[i]
            else:
                value = "true"  # a bare boolean flag: --run.overwrite
            pairs.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return pairs, rest


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from None


def apply_dict(cfg: Config, data: dict, *, source: str = "config file") -> Config:
    for sec_name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: top-level key '{sec_name}' must be a [section] table"
                              f"{_suggest(sec_name, list(sections()))}")
        for name, value in table.items():
            _set(cfg, f"{sec_name}.{name}", value, from_cli=False)
    return cfg


def build_config(config_file: str | None = None, overrides: list[tuple[str, str]] = (),
                 base: dict | None = None) -> Config:
    """Defaults, then `base` (e.g. a saved run's config), then the file, then the CLI."""
    cfg = Config()
    if base:
        apply_dict(cfg, base, source="saved config")
    if config_file:
        apply_dict(cfg, load_toml(config_file), source=str(config_file))
    for key, value in overrides:
        _set(cfg, key, value, from_cli=True)
    resolve_paths(cfg)  # a saved config must mean the same from any directory
    return validate(cfg)


def user_keys(config_file: str | None, overrides: list[tuple[str, str]]) -> frozenset[str]:
    """The `section.key`s the user set for this command: the --config file's and the
    CLI's, as written (`init.from`), not a resumed run's saved config nor a default.

    Passed to `resolve_init` (finetune/init_from.py), which refuses such a model shape
    field when init.from's differs, even if the value equals the field's default."""
    keys = {key for key, _ in overrides}
    if config_file:
        keys |= {f"{sec}.{name}" for sec, table in load_toml(config_file).items()
                 if isinstance(table, dict) for name in table}
    return frozenset(keys)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (data.mixture's entries, data.filter_args)
        return "{" + ", ".join(f"{_key_name(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _key_name(field_name: str) -> str:
    """The user-facing key of a field: `from_` is written `from` (see _set)."""
    bare = field_name[:-1] if field_name.endswith("_") else field_name
    return bare if keyword.iskeyword(bare) else field_name


def dumps_toml(cfg: Config | dict) -> str:
    """The resolved config as TOML (stdlib has a reader only; the subset we use is tiny)."""
    data = to_dict(cfg) if isinstance(cfg, Config) else cfg
    lines = []
    for sec, table in data.items():
        lines.append(f"[{sec}]")
        lines += [f"{_key_name(k)} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def describe() -> str:
    """Every field with its default and documentation, for `--help-config`."""
    out = []
    for sec_name, cls in sections().items():
        out.append(f"[{sec_name}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"  {sec_name}.{_key_name(f.name)} = {_toml_value(default)}\n      {f.metadata['doc']}")
    return "\n".join(out)
