"""Typed dataclass configs to and from plain dicts and YAML files, with strict validation.

A config is a tree of small dataclasses. `load_config` reads a YAML mapping, applies dotted
command-line overrides (`optim.lr=3e-4`) and builds the tree with `from_dict`, which rejects
unknown keys and wrongly typed values with a message naming the dotted key, where it came from
and what was expected. `save_config` writes the resolved tree back so a run records exactly
what it ran with; `config_help` lists every leaf key for CLI help.

Supported field types: int, float, str, bool, Literal[...], X | None, tuple[X, ...],
tuple[A, B], list[X], dict[str, X], nested dataclasses, and unions of dataclasses that are told
apart by a `family: Literal["name"]` field.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import io
import math
import os
import re
import tokenize
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from llmlab.common import LlmlabError, atomic_write_text

T = TypeVar("T")
_REQUIRED = object()  # marks a field with neither a default nor a default_factory


class ConfigError(LlmlabError):
    """A config value is missing, unknown or of the wrong type; the message names the dotted key."""


# --------------------------------------------------------------------------- type helpers


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Human-readable name of a type annotation, e.g. "tuple[int, ...]" or "'adamw' | 'sgd'"."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return getattr(tp, "__name__", repr(tp))


def _dataclass_members(tp: Any) -> list[type]:
    """The dataclasses inside `tp`: [tp] for a dataclass, its dataclass members for a union."""
    candidates = get_args(tp) if _is_union(tp) else (tp,)
    return [a for a in candidates if dataclasses.is_dataclass(a) and isinstance(a, type)]


def _families(members: list[type]) -> dict[Any, type]:
    """Map each `family` literal value to the union member that declares it."""
    table = {}
    for member in members:
        hint = get_type_hints(member).get("family")
        if get_origin(hint) is not Literal:
            raise TypeError(f"{member.__name__} is in a union of dataclasses but has no "
                            f"`family: Literal[...]` field to tell it apart")
        table.update({value: member for value in get_args(hint)})
    return table


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: PyYAML's own str() spans several lines and quotes the source."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {getattr(e, 'problem', None) or e}"


def _suggest(word: Any, choices: Sequence[Any]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- dict -> dataclass

# `where(path)` returns the source to blame for an error at `path` ("" for none), so that
# load_config can tell the YAML file apart from command-line overrides.
_Where = Callable[[str], str]


def _error(where: _Where, path: str, message: str, blame: str | None = None) -> ConfigError:
    """`blame` is the key whose source (file or command line) is named, when it is not `path` itself."""
    prefix = "".join(f"{part}: " for part in (where(path if blame is None else blame), path) if part)
    return ConfigError(prefix + message)


def _convert(tp: Any, value: Any, path: str, where: _Where) -> Any:
    """Check `value` against annotation `tp` and return it converted (dicts -> dataclasses)."""
    origin, args = get_origin(tp), get_args(tp)
    got = _got(value)
    if tp is Any:
        return value
    if origin is Literal:
        # `True == 1`, so compare types too or Literal[1] would accept True
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _error(where, path, f"expected one of {', '.join(map(repr, args))}, {got}"
                     + _suggest(value, [a for a in args if isinstance(a, str)]))
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and members[0] not in (int, float, str, bool):
            return _convert(members[0], value, path, where)
        dataclass_members = _dataclass_members(tp)
        if dataclass_members and len(dataclass_members) == len(members):
            return _convert_family(dataclass_members, value, path, where)
        for member in members:  # e.g. int | str: the first member that accepts the value wins
            try:
                return _convert(member, value, path, where)
            except ConfigError:
                pass
        raise _error(where, path, f"expected {_type_name(tp)}, {got}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _error(where, path, f"expected a mapping for {tp.__name__}, {got}")
        return _build(tp, value, path, where)
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _error(where, path, f"expected {_type_name(tp)} ({len(args)} items), {got}")
            return tuple(_convert(a, v, f"{path}[{i}]", where) for i, (a, v) in enumerate(zip(args, value)))
        items = [_convert(args[0], v, f"{path}[{i}]", where) if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict and isinstance(value, dict):
        key_type, value_type = args or (Any, Any)
        return {_convert(key_type, k, path, where): _convert(value_type, v, _join(path, k), where)
                for k, v in value.items()}
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # strings too: PyYAML follows YAML 1.1, which reads `3e-4` (no dot) as a string
            number = float(value)
        except (ValueError, OverflowError):
            pass
        else:
            if not math.isfinite(number):
                raise _error(where, path, f"expected a finite number, {got}")
            return number
    elif (tp is int and not isinstance(value, bool) and isinstance(value, int)) or \
            (tp in (str, bool) and type(value) is tp):
        return value
    raise _error(where, path, f"expected {_type_name(tp)}, {got}")


def _convert_family(members: list[type], value: Any, path: str, where: _Where) -> Any:
    """Pick the union member whose `family` literal matches value["family"] and build it."""
    if isinstance(value, tuple(members)):
        return value
    if not isinstance(value, dict):
        raise _error(where, path, f"expected a mapping with a 'family' key, {_got(value)}")
    table = _families(members)
    allowed = ", ".join(map(repr, table))
    if "family" not in value:
        raise _error(where, path, f"missing key 'family'; expected one of {allowed}")
    family = value["family"]
    if family not in list(table):  # a list, so an unhashable family (e.g. [1]) is an error, not a crash
        raise _error(where, _join(path, "family"), f"unknown family {family!r}; expected one of "
                     f"{allowed}" + _suggest(family, list(table)))
    return _build(table[family], value, path, where)


def _build(cls: type, data: dict, path: str, where: _Where) -> Any:
    """Construct dataclass `cls` from `data`; unknown keys and missing required fields are errors."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _error(where, _join(path, key), f"unknown key{_suggest(key, list(fields))}; "
                         f"allowed keys in {cls.__name__}: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            value = data[name]
            if isinstance(value, dict) and field.default_factory is not dataclasses.MISSING:
                value = _onto_default(field.default_factory(), value)
            kwargs[name] = _convert(hints[name], value, _join(path, name), where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise _error(where, _join(path, name), f"missing required key ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ checks, which name the fields they refuse
        named = [_join(path, w) for w in dict.fromkeys(re.findall(r"\w+", str(e))) if w in fields]
        # of the named fields, one the command line set is the likelier culprit than the file's
        blame = next((n for n in named if where(n) == "command line"), named[0] if named else path)
        raise _error(where, path, str(e), blame) from None


def _onto_default(default: Any, value: dict) -> dict:
    """A partial mapping given for a field completed from the field's default instance, so that
    `model.dim=256` keeps the default model's family and other settings (and `optim.lr` in
    fine-tuning keeps fine-tuning's own warmup). A mapping that names another family starts from that
    family's defaults instead."""
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return value
    if "family" in value and value["family"] != getattr(default, "family", value["family"]):
        return value
    return _deep_merge(_init_args(default), value)


def _init_args(default: Any) -> dict:
    """The fewest constructor arguments that rebuild `default`, as plain data: a field that
    `__post_init__` derives from the others (a head_dim from dim) is left out, to be derived again
    from the values it is merged with."""
    cls = type(default)
    args = {f.name: getattr(default, f.name) for f in dataclasses.fields(cls) if f.init}
    for name in list(args):
        if name == "family":
            continue
        trial = {k: v for k, v in args.items() if k != name}
        try:
            if cls(**trial) == default:
                args = trial
        except Exception:  # a required field, or a combination the constructor refuses: keep it
            pass
    return {k: _plain(v) for k, v in args.items()}


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _deep_merge(merged[key], value)
        merged[key] = value
    return merged


def from_dict(cls: type[T], data: dict, *, source: str = "") -> T:
    """Build the dataclass `cls` (or a union of family dataclasses) from a nested dict, strictly.

    Missing keys take the dataclass defaults; `from __future__ import annotations` is fine.

    Args:
        cls: A dataclass type, or a union of dataclasses told apart by their `family` field.
        data: Nested dict of builtins, as read from YAML.
        source: Where `data` came from (a file name, "command line"); put in error messages.

    Returns:
        An instance of `cls` with every nested dict converted to its dataclass.

    Raises:
        ConfigError: A key is unknown or missing, a value has the wrong type, an unknown family
            was named, or the dataclass constructor raised ValueError.
    """
    return _convert(cls, data, "", lambda path: source)


# --------------------------------------------------------------------------- dataclass -> dict, files


def flatten(data: dict, prefix: str = "") -> dict:
    """A nested dict (a config as `to_dict` or YAML gives it) as {dotted key: leaf value}; an empty
    mapping is a leaf."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_dict(cfg: Any) -> dict:
    """Turn a config dataclass into a plain nested dict of builtins (tuples become lists).

    Args:
        cfg: A dataclass instance.

    Returns:
        A YAML-safe dict that `from_dict(type(cfg), ...)` turns back into an equal config.

    Raises:
        TypeError: `cfg` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # only init fields: from_dict rejects the others as unknown keys
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply "a.b.c=value" overrides to a nested dict; values are parsed as YAML.

    So "3" is an int, "true" a bool, "[1,2]" a list, "null" None and "adamw" a string.
    Missing intermediate dicts are created; a key that holds null is replaced by a dict.

    Args:
        data: The nested dict to start from; it is not mutated.
        overrides: Strings of the form "dotted.key=value".

    Returns:
        A new dict with every override applied in order (later ones win).

    Raises:
        ConfigError: An override has no "=", an empty key part, an unparsable value, or walks
            through a key that holds a non-mapping value.
    """
    result = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"command line: bad override {item!r}; expected key=value, e.g. optim.lr=3e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"command line: {key}: {_yaml_problem(e)} in value {raw[:80]!r}") from None
        except RecursionError:
            raise ConfigError(f"command line: {key}: the value is nested too deeply") from None
        except ValueError as e:  # an integer of more than 4,300 digits
            raise ConfigError(f"command line: {key}: {e}") from None
        node = result
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise ConfigError(f"command line: cannot set {key!r}: "
                                  f"{'.'.join(parts[:depth + 1])!r} holds {node[part]!r}, not a mapping")
            node = node[part]
        node[parts[-1]] = value
    return result


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML config file, apply dotted overrides and build `cls` strictly.

    Args:
        cls: The config dataclass (or union of family dataclasses) to build.
        path: A YAML file holding a mapping (an empty file counts as {}); None means defaults only.
        overrides: "dotted.key=value" strings, applied after the file (see `apply_overrides`).

    Returns:
        An instance of `cls`.

    Raises:
        ConfigError: The file is missing or unreadable, is not valid YAML (the message gives the
            line), does not hold a mapping, or its content fails `from_dict`. Errors name the file,
            or "command line" for keys set by an override.
    """
    data: Any = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"{os.fspath(path)}: config file not found") from e
        except OSError as e:
            raise ConfigError(f"{os.fspath(path)}: cannot read config file ({e.strerror})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{os.fspath(path)}: {_yaml_problem(e)}") from None
        except RecursionError:
            raise ConfigError(f"{os.fspath(path)}: nested too deeply to be a config") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except ValueError as e:  # an integer of more than 4,300 digits
            raise ConfigError(f"{os.fspath(path)}: {e}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{os.fspath(path)}: top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    keys = [item.partition("=")[0].strip() for item in overrides]
    file_name = "" if path is None else os.fspath(path)

    def where(error_path: str) -> str:
        from_override = any(error_path == k or error_path.startswith((k + ".", k + "[")) for k in keys)
        # a check of a whole mapping blames the command line when it set something inside it
        from_override |= bool(error_path) and any(k.startswith(error_path + ".") for k in keys)
        return "command line" if from_override else file_name

    return _convert(cls, data, "", where)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write `to_dict(cfg)` as YAML, atomically, so a crash never leaves a half-written config.

    The text goes to a temporary file beside `path`, is fsynced and renamed into place
    (`llmlab.common.atomic_write_text`).

    Args:
        cfg: A config dataclass instance.
        path: Destination file; its parent directory is created if needed.
    """
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))


# --------------------------------------------------------------------------- help


def config_help(cls: type) -> list[tuple[str, str, str, str]]:
    """List every leaf key of a config class for CLI help.

    Nested dataclasses are walked recursively; for a union of family dataclasses the fields of
    every member are listed once, with the `family` row naming all families.

    Args:
        cls: A config dataclass type.

    Returns:
        (dotted_key, type_name, default_repr, comment) rows in field order; default_repr is
        "required" for a field without a default; comment is the `# ...` that ends the field's
        line in the source ("" if none).
    """
    rows: dict[str, tuple[str, str, str, str]] = {}
    _help_rows(cls, "", None, rows)
    return list(rows.values())


@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment ending its line in `cls`'s source; {} when the source is unavailable."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    line_comments = {tok.start[0]: tok.string.lstrip("#").strip()
                     for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    comments = {}
    for number, line in enumerate(source.splitlines(), start=1):
        m = re.match(r"^\s+(\w+)\s*:", line)
        if m and number in line_comments:
            comments.setdefault(m.group(1), line_comments[number])
    return comments


def _help_rows(cls: type, prefix: str, obj: Any, rows: dict[str, tuple[str, str, str, str]]) -> None:
    """Add `cls`'s rows to `rows`, keyed by dotted key so a union's shared fields appear once."""
    hints, comments = get_type_hints(cls), _field_comments(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key, tp = prefix + field.name, hints[field.name]
        # a parent's default instance (obj) may differ from this class's own defaults
        default = getattr(obj, field.name) if obj is not None else field.default
        if default is dataclasses.MISSING:
            has_factory = field.default_factory is not dataclasses.MISSING
            default = field.default_factory() if has_factory else _REQUIRED
        members = _dataclass_members(tp)
        shown = "required" if default is _REQUIRED else repr(default)
        if not members or default is None:
            rows.setdefault(key, (key, _type_name(tp), shown, comments.get(field.name, "")))
        if len(members) > 1:  # first, so it wins over each member's single-family row
            families = " | ".join(repr(f) for f in _families(members))
            family = getattr(default, "family", _REQUIRED)
            rows.setdefault(f"{key}.family", (f"{key}.family", families,
                                              "required" if family is _REQUIRED else repr(family), "model family"))
        # the default's own member first, so shared keys such as `dim` show the real default
        for member in sorted(members, key=lambda m: not isinstance(default, m)):
            _help_rows(member, key + ".", default if isinstance(default, member) else None, rows)
