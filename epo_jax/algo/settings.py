"""Typed settings read from a config section whose field names they share."""
import dataclasses
import typing
from typing import Any, TypeVar

import ml_collections

SettingsT = TypeVar("SettingsT")
_CONVERTED = (bool, int, float)


def from_section(cls: type[SettingsT], section: ml_collections.ConfigDict, **given: Any) -> SettingsT:
    """cls(**values): each dataclass field of `cls` not in `given` is `section.<field name>`,
    converted to the field's type when that is bool, int or float (so that `--config.x=1` gives
    1.0 for a float). No field is checked or defaulted: `epo_jax.config.validate` has done that."""
    types = typing.get_type_hints(cls)
    values = dict(given)
    for field in dataclasses.fields(cls):
        if field.name not in values:
            value = section[field.name]
            values[field.name] = types[field.name](value) if types[field.name] in _CONVERTED else value
    return cls(**values)
