"""The capture spec as it travels in an OpenAI request's ``vllm_xargs``.

The server's request models allow only strings, numbers or lists of them as ``vllm_xargs`` values
(``vllm/entrypoints/openai/*/protocol.py``), so a nested dict is refused. Two flat forms are accepted and may be
mixed (a field given twice is an error)::

    "vllm_xargs": {"attncap": "{\\"layers\\": [-1], \\"reduce\\": \\"head_mean\\"}"}
    "vllm_xargs": {"attncap_layers": [-1], "attncap_reduce": "head_mean"}
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..spec import SPEC_FIELDS

__all__ = ["SPEC_XARG", "FLAT_PREFIX", "SpecError", "spec_from_xargs"]

#: ``vllm_xargs`` key holding the spec as a JSON object string.
SPEC_XARG = "attncap"
#: Prefix of the flat form: ``attncap_<field>`` for each spec field.
FLAT_PREFIX = "attncap_"


class SpecError(ValueError):
    """A capture spec the server refuses; ``field`` names the offending spec field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def spec_from_xargs(extra_args: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Split a request's extra args into (capture spec dict or None, the other extra args).

    Accepts ``extra_args["attncap"]`` as a JSON object string or a dict (Python
    clients of ``AsyncLLM``), and flat ``attncap_<field>`` keys; both may be
    combined as long as no field is given twice.

    Raises:
        SpecError: the JSON does not parse or is not an object, a flat key names
            no spec field, or a field is given twice.

    Example:
        >>> spec_from_xargs({"attncap": '{"layers": [-1]}', "attncap_reduce": "head_mean", "x": 1})
        ({'layers': [-1], 'reduce': 'head_mean'}, {'x': 1})
        >>> spec_from_xargs({"x": 1})
        (None, {'x': 1})
    """
    if not extra_args:
        return None, dict(extra_args or {})
    rest: dict[str, Any] = {}
    spec: dict[str, Any] | None = None
    flat: dict[str, Any] = {}
    for name, value in extra_args.items():
        if name == SPEC_XARG:
            if isinstance(value, str):
                try:
                    value = json.loads(value) if value.strip() else {}
                except json.JSONDecodeError as e:
                    raise SpecError(f"attncap spec: vllm_xargs.attncap is not valid JSON ({e.msg} at character {e.pos})") from None
            if not isinstance(value, Mapping):
                raise SpecError(
                    f"attncap spec: vllm_xargs.attncap must be a JSON object (as a string), got {type(value).__name__}"
                )
            spec = dict(value)
        elif name.startswith(FLAT_PREFIX):
            field = name[len(FLAT_PREFIX):]
            if field not in SPEC_FIELDS:
                raise SpecError(
                    f"attncap spec: unknown field {field!r} (from vllm_xargs.{name}); allowed fields are {list(SPEC_FIELDS)}",
                    field,
                )
            flat[field] = value
        else:
            rest[name] = value
    if spec is None and not flat:
        return None, rest
    spec = spec or {}
    twice = sorted(set(spec) & set(flat))
    if twice:
        raise SpecError(f"attncap spec field '{twice[0]}': given both in vllm_xargs.attncap and as vllm_xargs.attncap_{twice[0]}", twice[0])
    spec.update(flat)
    return spec, rest
