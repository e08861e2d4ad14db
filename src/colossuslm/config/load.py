"""Build a validated `Config` from TOML files and `section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from colossuslm.config.schema import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig
from colossuslm.errors import ColossusError

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
}


def parse_override(text: str) -> tuple[str, str, Any]:
    """`train.lr=3e-4` -> ("train", "lr", 0.0003). Values are TOML literals; bare words are strings."""
    if "=" not in text:
        raise ColossusError(f"override {text!r} must look like section.key=value, e.g. train.lr=3e-4")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ColossusError(f"override {text!r}: the key must be section.key, e.g. train.lr")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as `cosine` or a path
    return parts[0], parts[1], value


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check a TOML value against a dataclass field type; ints are accepted where floats are."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(annotation) is dict:  # a table of name = number (data.mixture)
        numbers = isinstance(value, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        )
        if not numbers:
            raise ColossusError(
                f"config: {key} = {value!r} has the wrong type: expected a table of name = number, "
                'e.g. {"/data/web" = 7, "/data/code" = 3}'
            )
        return {str(name): float(number) for name, number in value.items()}
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, annotation)
    if not ok:
        expected = getattr(annotation, "__name__", str(annotation))
        raise ColossusError(
            f"config: {key} = {value!r} has the wrong type: expected {expected}, got {type(value).__name__}"
        )
    return value


def _build_section(name: str, raw: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            close = ", ".join(sorted(known))
            raise ColossusError(f"config: unknown key {name}.{key}; known keys in [{name}]: {close}")
    values = {key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in raw.items()}
    if name == "model" and values.get("preset"):
        from colossuslm.models.presets import get_preset  # no torch: presets are plain data

        base = dataclasses.asdict(get_preset(values["preset"]))
        base.update(values)
        values = base
    return cls(**values)


def build_config(raw: dict[str, Any]) -> Config:
    for name, section in raw.items():
        if name not in SECTIONS:
            raise ColossusError(f"config: unknown section [{name}]; known: {', '.join(SECTIONS)}")
        if not isinstance(section, dict):
            raise ColossusError(f"config: [{name}] must be a table of key = value pairs")
    sections = {name: _build_section(name, raw.get(name, {})) for name in SECTIONS}
    return Config(**sections).validate()


def load_config(paths: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> Config:
    """Merge TOML files left to right, then apply overrides, then validate."""
    raw: dict[str, dict[str, Any]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            named = Path(__file__).resolve().parents[3] / "configs" / f"{path}.toml"
            if named.is_file():
                path = named
            else:
                raise ColossusError(f"config file {str(path)!r} not found")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ColossusError(f"config file {path}: not valid TOML: {exc}") from None
        for name, section in data.items():
            if isinstance(section, dict):
                raw.setdefault(name, {}).update(section)
            else:
                raw[name] = section
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return build_config(raw)


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(config_to_dict(config)), encoding="utf-8")


def config_from_dict(raw: dict[str, Any]) -> Config:
    return build_config(raw)
