"""The capture spec as it travels in an OpenAI request's ``vllm_xargs``.

The server's request models allow only strings, numbers or lists of them as ``vllm_xargs`` values
(``vllm/entrypoints/openai/*/protocol.py``), so a nested dict is refused. Two flat forms are accepted and may be
mixed (a field given twice is an error)::

    "vllm_xargs": {"attncap": "{\\"layers\\": [-1], \\"reduce\\": \\"head_mean\\"}"}
    "vllm_xargs": {"attncap_layers": [-1], "attncap_reduce": "head_mean"}

Both forms follow the same rules: a field given twice (in either form, or as a duplicate key of the JSON
object) is an error; booleans are refused where ints are expected (:func:`check_request_body` sees the raw HTTP
body, since the server's request model turns ``true`` into ``1``); a value nested deeper than
:data:`MAX_DEPTH` is refused before it is parsed.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..spec import SPEC_FIELDS

__all__ = ["SPEC_XARG", "FLAT_PREFIX", "MAX_DEPTH", "SpecError", "spec_from_xargs", "check_request_body"]

#: ``vllm_xargs`` key holding the spec as a JSON object string.
SPEC_XARG = "attncap"
#: Prefix of the flat form: ``attncap_<field>`` for each spec field.
FLAT_PREFIX = "attncap_"
#: Deepest nesting a spec may have: the spec object (1) holding lists (2); one level of slack.
MAX_DEPTH = 3
#: A JSON spec string longer than this is refused unparsed.
MAX_SPEC_CHARS = 1 << 20


class SpecError(ValueError):
    """A capture spec the server refuses; ``field`` names the offending spec field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _value_depth(value: Any, depth: int = 0) -> int:
    if depth > MAX_DEPTH:
        return depth
    if isinstance(value, Mapping):
        return max([_value_depth(v, depth + 1) for v in value.values()] or [depth + 1])
    if isinstance(value, (list, tuple)):
        return max([_value_depth(v, depth + 1) for v in value] or [depth + 1])
    return depth


def _no_duplicates(where: str):
    def hook(pairs):
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                field = k[len(FLAT_PREFIX):] if k.startswith(FLAT_PREFIX) else k
                raise SpecError(f"attncap spec field '{field}': given twice in {where}", field)
            seen[k] = v
        return seen

    return hook


def _check_no_bools(field: str, value: Any, where: str) -> None:
    if isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)):
        raise SpecError(
            f"attncap spec field '{field}': booleans are not allowed here (got {value!r} in {where}); "
            "give ints, strings or lists of them", field,
        )


def parse_spec_json(text: str) -> Any:
    """Parse the JSON-string form: depth-limited, duplicate keys refused."""
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError(f"attncap spec: vllm_xargs.attncap is {len(text)} characters; at most {MAX_SPEC_CHARS}")
    if _json_depth(text) > MAX_DEPTH:
        raise SpecError(f"attncap spec: vllm_xargs.attncap is nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates("vllm_xargs.attncap")) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise SpecError(f"attncap spec: vllm_xargs.attncap is not valid JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise SpecError(f"attncap spec: vllm_xargs.attncap is nested deeper than {MAX_DEPTH} levels") from None


def check_request_body(body: bytes) -> SpecError | None:
    """Checks of an HTTP request body that the server's request model would hide: duplicate ``attncap*`` keys
    in ``vllm_xargs`` and booleans in flat fields (pydantic turns ``true`` into ``1``). Returns the error, or
    None when the body is fine or not JSON (the server then answers as usual)."""
    try:
        obj = json.loads(body, object_pairs_hook=_dup_attncap_keys)
    except SpecError as e:
        return e
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    xargs = obj.get("vllm_xargs") if isinstance(obj, dict) else None
    if not isinstance(xargs, dict):
        return None
    for name, value in xargs.items():
        if name.startswith(FLAT_PREFIX):
            if _value_depth(value) > MAX_DEPTH - 1:
                return SpecError(f"attncap spec field '{name[len(FLAT_PREFIX):]}': nested too deeply", name[len(FLAT_PREFIX):])
            try:
                _check_no_bools(name[len(FLAT_PREFIX):], value, f"vllm_xargs.{name}")
            except SpecError as e:
                return e
    return None


def _dup_attncap_keys(pairs):
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen and k.startswith(SPEC_XARG):
            field = k[len(FLAT_PREFIX):] if k.startswith(FLAT_PREFIX) else None
            raise SpecError(f"attncap spec: vllm_xargs.{k} is given twice", field)
        seen[k] = v
    return seen


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
                value = parse_spec_json(value)
            elif _value_depth(value) > MAX_DEPTH:
                raise SpecError(f"attncap spec: vllm_xargs.attncap is nested deeper than {MAX_DEPTH} levels")
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
            if _value_depth(value) > MAX_DEPTH - 1:
                raise SpecError(f"attncap spec field '{field}': nested too deeply", field)
            _check_no_bools(field, value, f"vllm_xargs.{name}")
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
