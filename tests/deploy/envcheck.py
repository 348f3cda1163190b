"""Does an ``XZ_*`` environment variable name a real setting? (deploy files must not set typos)

Settings are read by pydantic-settings with the prefix ``XZ_`` and ``__`` between nested keys,
case-insensitively (``shared/settings.py``). ``xz_env_is_valid("XZ_GATEWAY__PUBLIC_HOST")`` walks
``Settings`` down those keys: every part must be a field of the model it reaches; a part that
reaches a ``dict`` field may be followed by anything (its keys are free), anything else must be
the last part. Shared by the compose and the Kubernetes tests.
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel

from shared.settings import Settings

PREFIX = "XZ_"
DELIMITER = "__"
# Read by load_settings() itself, not a field: the YAML settings file.
EXTRA = {"XZ_CONFIG"}


def _models_and_dicts(annotation: typing.Any) -> tuple[list[type[BaseModel]], bool]:
    """The BaseModel classes inside an annotation (through Optional/Union), and whether a dict is."""
    models: list[type[BaseModel]] = []
    is_dict = False
    stack = [annotation]
    while stack:
        tp = stack.pop()
        origin = typing.get_origin(tp)
        if origin is typing.Union or origin is types.UnionType:
            stack.extend(typing.get_args(tp))
        elif origin is typing.Annotated:
            stack.append(typing.get_args(tp)[0])
        elif origin in (dict, typing.Dict) or tp is dict:
            is_dict = True
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            models.append(tp)
    return models, is_dict


def xz_env_is_valid(name: str, model: type[BaseModel] = Settings) -> bool:
    """True when ``name`` (e.g. ``XZ_NATS__PASSWORD_FILE``) sets a field of ``Settings``."""
    if name.upper() in EXTRA:
        return True
    if not name.upper().startswith(PREFIX):
        return False
    parts = name[len(PREFIX):].split(DELIMITER)
    if not parts or any(not part for part in parts):
        return False
    current: type[BaseModel] | None = model
    for index, part in enumerate(parts):
        if current is None:
            return False
        fields = {key.lower(): field for key, field in current.model_fields.items()}
        field = fields.get(part.lower())
        if field is None:
            return False
        models, is_dict = _models_and_dicts(field.annotation)
        last = index == len(parts) - 1
        if last:
            return True
        if is_dict and not models:
            return True  # XZ_TOOLS__ROLES__PIRATE__...: a dict's keys are free
        current = models[0] if models else None
    return False


def invalid_xz_env(names: typing.Iterable[str]) -> list[str]:
    """The ``XZ_*`` names among ``names`` that set no setting (other names are not checked)."""
    return sorted(n for n in names if n.upper().startswith(PREFIX) and not xz_env_is_valid(n))
