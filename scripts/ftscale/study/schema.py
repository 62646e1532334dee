"""Validation of the YAML inputs against the JSON schemas in config/ (defaults filled in).

Every error names the file, the key path and the offending value (``ConfigError``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from ftscale.study.paths import SCHEMAS

CONFIG_SCHEMA = SCHEMAS / "config.schema.yaml"
MODEL_SCHEMA = SCHEMAS / "model.schema.yaml"
REFERENCES_SCHEMA = SCHEMAS / "references.schema.yaml"


class ConfigError(ValueError):
    """Bad input, found before any job runs. The message names file, key and value."""


def key_path(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _fill_defaults(validator_class: type) -> type:
    """A jsonschema validator that also writes schema defaults into the instance (as Snakemake's
    ``validate(..., set_default=True)`` does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _fill_defaults(jsonschema.Draft202012Validator)


def shown(value: Any, limit: int = 120) -> str:
    """``value`` as JSON for an error message. One longer than ``limit`` shows its first whole items (of a
    list or mapping) or characters (of a string), then an ellipsis: never a value cut mid-item."""
    text = json.dumps(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return json.dumps(value[:max(0, limit - 5)] + "...")
    if isinstance(value, (list, dict)):
        items = (json.dumps(v) for v in value) if isinstance(value, list) else \
            (f"{json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
        kept: list[str] = []
        for item in items:
            if len(", ".join([*kept, item, "..."])) + 2 > limit:
                break
            kept.append(item)
        opening, closing = ("[", "]") if isinstance(value, list) else ("{", "}")
        return opening + ", ".join([*kept, "..."]) + closing
    return text


def validate(instance: dict, schema_path: Path, source: str) -> dict:
    """Validate ``instance`` (filling defaults) against a YAML JSON schema; raise ConfigError
    naming ``source``, the key path and the offending value."""
    schema = yaml.safe_load(schema_path.read_text())
    instance = copy.deepcopy(instance)
    errors = sorted(_Validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [
            f"{source}: key '{key_path(e.absolute_path)}' = {shown(e.instance)}: {e.message}"
            for e in errors
        ]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return instance


def load_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax error names the file and the line."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror}") from None
