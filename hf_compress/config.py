"""Compression plans: which modules get which method, as plain data with a JSON round trip.

A ``CompressionConfig`` maps module-name patterns to method configs. A pattern matches a module when
it matches, as a regular expression, the module's full dotted name or any dotted suffix of it: so
``"q_proj"`` (like PEFT's ``target_modules``), ``r"self_attn\\.(q|k|v|o)_proj$"`` and
``r"model\\.layers\\.0\\.mlp\\..*"`` all work. The first matching pattern wins.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

CONFIG_VERSION = 1


class BudgetError(ValueError):
    """A method cannot meet the requested size on this module (e.g. a compression too high for a tiny table);
    planners skip such candidates, direct calls report it."""


class CalibrationRequiredError(ValueError):
    """A method of the plan reads activations (whitened/ASVD low-rank, JLCM/GPTQ codebooks, whitened twins) and
    ``compress`` was called without ``calibration=`` batches."""


def check_field_types(cfg: Any) -> None:
    """Raise ``TypeError`` unless every field of the dataclass ``cfg`` has its annotated type: ``int`` (not a bool),
    ``float`` (an int or float, finite), ``bool``, ``str``, ``list[...]`` of those, or ``None`` where optional.
    Catches ``rank=True``, ``damping=nan`` (which made a whitening loop spin forever) or ``order=2.5`` up front."""
    import math
    import types
    import typing

    def fits(value: Any, hint: Any) -> bool:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            return any(fits(value, h) for h in typing.get_args(hint))
        if hint is type(None):
            return value is None
        if hint is bool:
            return isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if origin in (list, tuple):
            inner = typing.get_args(hint)
            return isinstance(value, (list, tuple)) and all(fits(v, inner[0]) for v in value) if inner else \
                isinstance(value, (list, tuple))
        return isinstance(value, hint) if isinstance(hint, type) else True

    def name(hint: Any) -> str:
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            return " or ".join(name(h) for h in args)
        if args:
            return f"{typing.get_origin(hint).__name__}[{', '.join(name(h) for h in args)}]"
        return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in hints and not fits(value, hints[f.name]):
            raise TypeError(f"hf_compress: {type(cfg).__name__}.{f.name} must be {name(hints[f.name])} (numbers "
                            f"finite), got {value!r}.")


@dataclass
class MethodConfig:
    """Base of every method's config dataclass.

    Subclasses set ``registry_name`` (written as ``"type"`` in JSON) and validate in ``__post_init__``.
    """

    registry_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.registry_name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        from .registry import get_method

        if not isinstance(data, dict):
            raise TypeError(f"hf_compress: a method config is a JSON object {{\"type\": method, ...}}, got {data!r}.")
        data = dict(data)
        name = data.pop("type", None)
        if name is None:
            raise ValueError(f"hf_compress: method config {data} has no 'type' key naming its method.")
        config_cls = get_method(name).config_class
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"hf_compress: unknown parameter(s) {unknown} for method {name!r}; valid ones: {sorted(known)}."
            )
        return config_cls(**data)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(rf"(?:^|\.)(?:{pattern})$")
    except re.error as err:
        raise ValueError(f"hf_compress: module pattern {pattern!r} is not a valid regular expression: {err}") from err


def matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` matches the full module ``name`` or one of its dotted suffixes."""
    return _pattern_regex(pattern).search(name) is not None


@dataclass
class CompressionConfig:
    """A compression plan.

    Args:
        modules: module-name pattern -> method config (e.g. ``{"q_proj": LowRankConfig(rank_ratio=0.5)}``).
        skip_modules: patterns never compressed, whatever ``modules`` says (e.g. ``["lm_head"]``).
        version: format version of the serialized plan.
    """

    modules: dict[str, MethodConfig] = field(default_factory=dict)
    skip_modules: list[str] = field(default_factory=list)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.modules, dict):
            raise TypeError("hf_compress: CompressionConfig.modules must be a dict {pattern: MethodConfig}.")
        parsed: dict[str, MethodConfig] = {}
        for pattern, cfg in self.modules.items():
            if not isinstance(pattern, str):
                raise TypeError(f"hf_compress: CompressionConfig.modules keys are module-name patterns (str), got "
                                f"{pattern!r}.")
            _pattern_regex(pattern)
            if isinstance(cfg, dict):
                cfg = MethodConfig.from_dict(cfg)
            if not isinstance(cfg, MethodConfig):
                raise TypeError(
                    f"hf_compress: modules[{pattern!r}] must be a method config such as LowRankConfig(...), "
                    f"got {type(cfg).__name__}."
                )
            parsed[pattern] = cfg
        self.modules = parsed
        if not isinstance(self.skip_modules, (list, tuple)) or not all(isinstance(p, str) for p in self.skip_modules):
            raise TypeError(f"hf_compress: CompressionConfig.skip_modules must be a list of module-name patterns, got "
                            f"{self.skip_modules!r}.")
        self.skip_modules = list(self.skip_modules)
        for pattern in self.skip_modules:
            _pattern_regex(pattern)
        if not isinstance(self.version, int) or isinstance(self.version, bool):
            raise TypeError(f"hf_compress: CompressionConfig.version must be an int, got {self.version!r}.")
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"hf_compress: compression config version {self.version} is newer than this hf_compress supports "
                f"({CONFIG_VERSION}); upgrade hf_compress."
            )

    def method_for(self, name: str) -> tuple[str, MethodConfig] | None:
        """The first ``(pattern, config)`` whose pattern matches module ``name``, unless it is skipped."""
        if any(matches(p, name) for p in self.skip_modules):
            return None
        for pattern, cfg in self.modules.items():
            if matches(pattern, name):
                return pattern, cfg
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "modules": {p: c.to_dict() for p, c in self.modules.items()},
            "skip_modules": list(self.skip_modules),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        if not isinstance(data, dict) or not isinstance(data.get("modules", {}), dict):
            raise TypeError("hf_compress: a compression plan is a JSON object {\"modules\": {pattern: {\"type\": "
                            "method, ...}}, \"skip_modules\": [...]}; got " + repr(data)[:200])
        data = dict(data)
        for key in ("layers", "base_model"):  # what a model's config records beside the plan
            data.pop(key, None)
        unknown = sorted(set(data) - {"version", "modules", "skip_modules"})
        if unknown:
            raise ValueError(f"hf_compress: unknown CompressionConfig key(s) {unknown}.")
        modules = {p: MethodConfig.from_dict(c) for p, c in data.get("modules", {}).items()}
        return cls(modules=modules, skip_modules=data.get("skip_modules", []), version=data.get("version", 1))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> CompressionConfig:
        """Parse a JSON string, or read it from a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise FileNotFoundError(f"hf_compress: compression config file {path} does not exist.")
            text = path.read_text()
        return cls.from_dict(json.loads(text))
