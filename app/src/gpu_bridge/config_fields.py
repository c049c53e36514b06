"""How one setting is declared, parsed and turned into a settings-dataclass field.

A ``Setting`` is one environment variable: its name, its default, how its text is parsed and
checked, and a short doc. The default is written only there: ``field_for`` makes the dataclass
field's default from it and ``read_fields`` builds ``from_env``'s arguments from the same object, so
the two cannot drift apart. tests/test_docs.py compares every ``Setting`` with the README's tables
and the roles' defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")
_META = "gpu_bridge_setting"  # the key under which a dataclass field keeps its Setting


def raw_value(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    """The stripped value of ``name``; a missing or blank variable means ``default``."""
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def _integer(name: str, raw: str, minimum: int | None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _number(name: str, raw: str, minimum: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value != value or value < minimum:  # NaN or below the floor
        raise ConfigError(f"{name}={raw} must be a number >= {minimum}")
    return value


def _boolean(name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


def _items(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable. ``shown`` overrides how the README's table states the default
    (for a default computed at run time, such as the host name)."""

    env: str
    default: T
    doc: str
    shown: str | None = None

    def parse(self, raw: str) -> T:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def read(self, env: Mapping[str, str]) -> T:
        raw = raw_value(env, self.env)
        return self.default if raw is None else self.parse(raw)

    @property
    def kind(self) -> str:
        """The Ansible argument-spec type a role variable feeding this setting should have."""
        return "str"

    def render(self) -> str:
        """The default as the README's table writes it."""
        if self.shown is not None:
            return self.shown
        value: object = self.default
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


@dataclass(frozen=True)
class IntSetting(Setting[int]):
    minimum: int | None = 0

    def parse(self, raw: str) -> int:
        return _integer(self.env, raw, self.minimum)

    @property
    def kind(self) -> str:
        return "int"


@dataclass(frozen=True)
class FloatSetting(Setting[float]):
    minimum: float = 0.0

    def parse(self, raw: str) -> float:
        return _number(self.env, raw, self.minimum)

    @property
    def kind(self) -> str:
        return "float"


@dataclass(frozen=True)
class BoolSetting(Setting[bool]):
    def parse(self, raw: str) -> bool:
        return _boolean(self.env, raw)

    @property
    def kind(self) -> str:
        return "bool"


@dataclass(frozen=True)
class StrSetting(Setting[str]):
    """Free text, or one of ``choices``; ``lower`` folds case first (``GPU_BRIDGE_TRANSPORT=NFS``),
    ``rstrip`` drops trailing characters (a URL's slash)."""

    choices: tuple[str, ...] = ()
    lower: bool = False
    rstrip: str = ""

    def parse(self, raw: str) -> str:
        value = raw.lower() if self.lower else raw
        if self.choices and value not in self.choices:
            raise ConfigError(f"{self.env}={value!r} must be {' or '.join(self.choices)}")
        return value.rstrip(self.rstrip) if self.rstrip else value


@dataclass(frozen=True)
class OptionalStrSetting(Setting[str | None]):
    """A path or name that is unset unless given."""

    def parse(self, raw: str) -> str | None:
        return raw


@dataclass(frozen=True)
class ListSetting(Setting[tuple[str, ...]]):
    """Comma-separated; blanks between commas are dropped."""

    def parse(self, raw: str) -> tuple[str, ...]:
        return _items(raw)

    @property
    def kind(self) -> str:
        return "list"


def field_for(setting: Setting[Any], convert: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field whose default is ``setting``'s (through ``convert`` when the field keeps
    another unit than the variable, e.g. bytes for a GiB setting)."""
    default = convert(setting.default) if convert else setting.default
    return dataclasses.field(default=default, metadata={_META: (setting, convert)})


def read_fields(cls: type[Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``{field name: value}`` for every field of ``cls`` declared with ``field_for``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if _META in f.metadata:
            setting, convert = f.metadata[_META]
            value = setting.read(env)
            values[f.name] = convert(value) if convert else value
    return values
