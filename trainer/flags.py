"""Reading sd-scripts-style command lines and TOML recipes into ``TrainConfig`` values.

sd-scripts uses argparse, so its users write ``--flag=value``, ``--flag value``, bare ``--flag``
for booleans and ``--network_args k=v k=v`` lists, and its ``--config_file`` TOML may group keys
in tables that get flattened. This module accepts all of that (plus dashes for underscores and
the seed guides' typos), converts every value to the field's type and refuses unknown names
with the nearest valid one. No torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from loratools.errors import UsageError

# Flag spellings that are read as another flag: the guides' typos and sd-scripts' own aliases.
FLAG_ALIASES = {
    "spda": "sdpa",
    "caption_extention": "caption_extension",
    "config_file": "config",
}
# Values read as another value, per field (the Hungarian guide writes save_precision="fp32").
VALUE_ALIASES = {
    ("save_precision", "fp32"): "float",
}
# Flags some guides pass that no trainer reads: accepted, consumed with their value, reported.
IGNORED_FLAGS = {
    "use_reentrant": "no trainer option of that name exists "
                     "(the Hungarian guide passes it inside --network_args, where LyCORIS ignores it too)",
}
# accelerate's own options, which belong before the program name.
_ACCELERATE_FLAGS = {"num_processes", "multi_gpu", "num_machines", "gpu_ids", "num_cpu_threads_per_process",
                     "machine_rank", "main_process_ip", "main_process_port"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _fields() -> dict[str, Any]:
    from trainer.config import config_fields

    return config_fields()


def canonical_name(raw: str, *, where: str = "") -> str:
    """Map ``--train-data-dir`` / ``spda`` / ``caption_extention`` to the field name, or raise."""
    name = raw.lstrip("-").replace("-", "_")
    name = FLAG_ALIASES.get(name, name)
    fields = _fields()
    if name in fields:
        return name
    if name in _ACCELERATE_FLAGS:
        raise UsageError(f"{where}--{name} is an option of accelerate, not of the trainer; put it before the "
                         f"program: accelerate launch --{name}=... -m loratools train ...")
    near = difflib.get_close_matches(name, list(fields) + list(FLAG_ALIASES), n=1)
    hint = f"; did you mean --{FLAG_ALIASES.get(near[0], near[0])}?" if near else ""
    raise UsageError(f"{where}unknown training option --{name}{hint} (loratools train --list-flags lists every accepted flag)")


def field_kind(name: str) -> str:
    """``bool``, ``list`` or ``scalar``: how many command-line tokens the flag takes."""
    type_str = str(_fields()[name].type)
    if type_str == "bool":
        return "bool"
    if type_str.startswith("list["):
        return "list"
    return "scalar"


def convert_value(name: str, raw: Any, *, where: str = "") -> tuple[Any, list[str]]:
    """Convert one raw value (a CLI string or a TOML value) to the type of field ``name``.

    Returns the value and the notes about aliases applied. Raises ``UsageError`` naming the flag,
    the value and what it accepts.
    """
    f = _fields()[name]
    type_str = str(f.type)
    flag = f"{where}--{name}"
    notes: list[str] = []
    if raw is None:
        return None, notes
    if isinstance(raw, str) and raw.strip().lower() in {"none", "null"} and "None" in type_str:
        return None, notes
    try:
        value = _convert(type_str, raw)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{flag}: {raw!r} is not {_describe(type_str)} ({exc})" if str(exc) else
                         f"{flag}: {raw!r} is not {_describe(type_str)}") from None
    choices = f.metadata.get("choices")
    if choices and value is not None:
        if isinstance(value, str):
            alias = VALUE_ALIASES.get((name, value.lower()))
            if alias is not None and alias != value:
                notes.append(f"{flag}={value} is read as {alias}")
            value = alias or value
            lowered = {str(c).lower(): c for c in choices}
            value = lowered.get(value.lower(), value)
        if value not in choices:
            raise UsageError(f"{flag}: {raw!r} is not one of {', '.join(map(str, choices))}")
    return value, notes


def _describe(type_str: str) -> str:
    return {
        "bool": "true or false", "int": "an integer", "int | None": "an integer", "float": "a number",
        "float | None": "a number", "int | float": "a step count, a fraction below 1 or a percentage",
        "tuple[int, int] | None": "a size \"W,H\" or \"S\"", "tuple[float, float] | None": "a pair \"a,b\"",
        "list[float] | None": "a list of numbers",
    }.get(type_str, "a valid value")


def _convert(type_str: str, raw: Any) -> Any:
    base = type_str.replace(" | None", "")
    if base == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("")
    if base == "int":
        return _to_int(raw)
    if base == "float":
        if isinstance(raw, bool):
            raise ValueError("")
        return float(raw)
    if base == "str":
        if isinstance(raw, (dict, list, bool)):
            raise ValueError("expected text")
        return str(raw)
    if base == "int | float":
        return _int_or_fraction(raw)
    if base == "list[str]":
        return _to_str_list(raw)
    if base == "list[float]":
        items = raw if isinstance(raw, list) else _split_csv(raw)
        return [float(x) for x in items]
    if base == "tuple[int, int]":
        items = raw if isinstance(raw, list) else _split_csv(raw)
        sizes = [_to_int(x) for x in items]
        if len(sizes) == 1:
            sizes = sizes * 2
        if len(sizes) != 2 or min(sizes) <= 0:
            raise ValueError("give one or two positive sizes")
        return (sizes[0], sizes[1])
    if base == "tuple[float, float]":
        items = raw if isinstance(raw, list) else _split_csv(raw)
        pair = [float(x) for x in items]
        if len(pair) != 2:
            raise ValueError("give two numbers")
        return (pair[0], pair[1])
    raise TypeError(f"no converter for {type_str}")


def _split_csv(raw: Any) -> list[str]:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return [str(raw)]
    return [p.strip() for p in str(raw).split(",") if p.strip()]


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError("")
        return int(raw)
    return int(str(raw).strip())


def _int_or_fraction(raw: Any) -> int | float:
    """sd-scripts' ``lr_warmup_steps``: an int is steps, a float < 1 a fraction, ``"10%"`` a percentage."""
    if isinstance(raw, bool):
        raise ValueError("")
    text = str(raw).strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    value = float(text)
    if value < 0:
        raise ValueError("negative")
    if value >= 1:
        if not value.is_integer():
            raise ValueError("a value of 1 or more is a step count and must be whole")
        return int(value)
    return int(value) if value == 0 else value


def _to_str_list(raw: Any) -> list[str]:
    """Lists of ``key=value`` strings; a TOML table ``{conv_dim = 32}`` is accepted as the same list."""
    if isinstance(raw, dict):
        return [f"{k}={_kv_text(v)}" for k, v in raw.items()]
    if isinstance(raw, list):
        return [_kv_text(x) for x in raw]
    return [str(raw)]


def _kv_text(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, list):
        return ",".join(_kv_text(v) for v in value)
    return str(value)


def parse_argv(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Parse sd-scripts-style flags into ``{field: typed value}`` plus notes about aliases.

    Later occurrences win, as with argparse. A boolean flag takes an explicit value only in the
    ``--flag=false`` form or when the next token is literally true/false, so ``--shuffle_caption
    --keep_tokens 1`` reads as sd-scripts reads it.
    """
    values: dict[str, Any] = {}
    notes: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument {token!r}: training options are written --name=value "
                             f"or --name value (a list after --network_args is written k=v k=v)")
        raw_name, has_eq, inline = token[2:].partition("=")
        if raw_name.replace("-", "_") in IGNORED_FLAGS:
            i += 1
            if not has_eq and i < len(argv) and not argv[i].startswith("--"):
                inline = argv[i]
                i += 1
            shown = f"--{raw_name}" + (f"={inline}" if inline else "")
            notes.append(f"{shown} has no effect: {IGNORED_FLAGS[raw_name.replace('-', '_')]}")
            continue
        name = canonical_name(raw_name)
        if raw_name.replace("-", "_") != name and raw_name.replace("-", "_") in FLAG_ALIASES:
            notes.append(f"--{raw_name} is read as --{name}")
        kind = field_kind(name)
        i += 1
        if kind == "bool":
            if has_eq:
                raw: Any = inline
            elif i < len(argv) and argv[i].strip().lower() in _TRUE | _FALSE:
                raw = argv[i]
                i += 1
            else:
                raw = True
        elif kind == "list":
            items = [inline] if has_eq else []
            while i < len(argv) and not argv[i].startswith("--"):
                items.append(argv[i])
                i += 1
            raw = items
        else:
            if has_eq:
                raw = inline
            elif i < len(argv) and not argv[i].startswith("--"):
                raw = argv[i]
                i += 1
            else:
                raise UsageError(f"--{name} needs a value (write --{name}=VALUE or --{name} VALUE)")
        value, value_notes = convert_value(name, raw)
        values[name] = value
        notes.extend(value_notes)
    return values, notes


def read_toml(path: Path, missing: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a ``UsageError`` naming it (``missing`` is the hint)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(missing, path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"not valid TOML: {exc}", path=path) from None


def load_recipe(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Read a TOML recipe: flat keys, or keys grouped in tables (flattened, as sd-scripts' config_file).

    Keys are sd-scripts argument names (dashes allowed); unknown keys are an error naming the
    file, the key and the nearest valid name.
    """
    path = Path(path)
    data = read_toml(path, "recipe not found (check the --config path)")
    fields = _fields()
    values: dict[str, Any] = {}
    notes: list[str] = []
    for key, raw, section in _flatten(data):
        where = f"{path}: [{section}] " if section else f"{path}: "
        name = key.replace("-", "_")
        if name in IGNORED_FLAGS:
            notes.append(f"{path}: {key} has no effect: {IGNORED_FLAGS[name]}")
            continue
        if name not in fields and name not in FLAG_ALIASES and isinstance(raw, dict):
            raise UsageError(f"table [{section + '.' if section else ''}{key}] is nested too deeply; recipes "
                             f"group flags in one level of tables", path=path)
        name = canonical_name(name, where=where)
        if name == "config":
            raise UsageError("a recipe cannot name another recipe (config); pass one --config", path=path)
        if key.replace("-", "_") in FLAG_ALIASES:
            notes.append(f"{path}: {key} is read as {name}")
        if name in values:
            raise UsageError(f"{name} is set twice (tables are flattened, so each key may appear once)", path=path)
        value, value_notes = convert_value(name, raw, where=where)
        values[name] = value
        notes.extend(f"{path}: {n}" for n in value_notes)
    return values, notes


def _flatten(data: dict[str, Any]) -> list[tuple[str, Any, str]]:
    fields = _fields()
    out: list[tuple[str, Any, str]] = []
    for key, raw in data.items():
        name = key.replace("-", "_")
        if isinstance(raw, dict) and name not in fields:
            out.extend((k, v, key) for k, v in raw.items())
        else:
            out.append((key, raw, ""))
    return out
