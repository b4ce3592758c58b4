"""The capture spec as it travels in an OpenAI request's ``vllm_xargs``.

The server's request models allow only strings, numbers or lists of them as ``vllm_xargs`` values
(``vllm/entrypoints/openai/*/protocol.py``), so a nested dict is refused. Two flat forms are accepted and may be
mixed (a field given twice is an error)::

    "vllm_xargs": {"attncap": "{\\"layers\\": [-1], \\"reduce\\": \\"head_mean\\"}"}
    "vllm_xargs": {"attncap_layers": [-1], "attncap_reduce": "head_mean"}

Both forms follow the same rules: a field given twice (in either form, or as a duplicate key of the JSON
object) is an error; booleans are refused where ints are expected, and integers beyond int64 (:data:`MAX_INT`),
naming the field; a value nested deeper than :data:`MAX_DEPTH` is refused before it is parsed.

:func:`check_request_body` applies the same rules to an HTTP body as the server parses it (``json.loads`` of the
bytes, so escapes resolved and UTF-16/32 decoded), before the route's request model sees it: that model would turn
``true`` into ``1``, keep the last of duplicate keys, and fail without naming the field on a huge integer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..spec import SPEC_FIELDS

__all__ = [
    "SPEC_XARG", "FLAT_PREFIX", "MAX_DEPTH", "MAX_INT", "BodyCheck", "SpecError", "check_request_body",
    "check_spec_fields", "is_capture_name", "mentions_capture", "spec_from_xargs",
]

#: ``vllm_xargs`` key holding the spec as a JSON object string.
SPEC_XARG = "attncap"
#: Prefix of the flat form: ``attncap_<field>`` for each spec field.
FLAT_PREFIX = "attncap_"
#: Deepest nesting a spec may have: the spec object (1) holding lists (2); one level of slack.
MAX_DEPTH = 3
#: A JSON spec string longer than this is refused unparsed.
MAX_SPEC_CHARS = 1 << 20
_FIELD_RE = re.compile(r"field '(\w+)'")


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


#: Largest magnitude of an integer in a spec: vLLM's engine core serialises ``extra_args`` with msgpack (int64).
MAX_INT = 2**63 - 1
#: Integers with more digits than this are not converted while parsing (Python refuses > 4300 digits anyway).
_MAX_INT_DIGITS = 20


class _BigInt(str):
    """An integer literal too long to convert, kept as its text so the field check can name it."""


def _parse_int(text: str):
    return int(text) if len(text) <= _MAX_INT_DIGITS else _BigInt(text)


def _check_value(field: str, value: Any, where: str) -> None:
    """Booleans and integers outside int64, at any depth of a field's value, are refused naming the field."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, bool):
            raise SpecError(
                f"attncap spec field '{field}': booleans are not allowed here (got {value!r} in {where}); "
                "give an int, a string, or a list of ints", field,
            )
        if isinstance(v, _BigInt) or (isinstance(v, int) and not -MAX_INT <= v <= MAX_INT):
            digits = len(str(v).lstrip("-"))
            raise SpecError(
                f"attncap spec field '{field}': an integer of {digits} digits is out of range (at most "
                f"{MAX_INT} in magnitude) in {where}", field,
            )
        if isinstance(v, (list, tuple, Mapping)):
            _check_value(field, list(v.values()) if isinstance(v, Mapping) else v, where)


def parse_spec_json(text: str) -> Any:
    """Parse the JSON-string form: depth-limited, duplicate keys refused, huge integers kept for the field check."""
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError(f"attncap spec: vllm_xargs.attncap is {len(text)} characters; at most {MAX_SPEC_CHARS}")
    if _json_depth(text) > MAX_DEPTH:
        raise SpecError(f"attncap spec: vllm_xargs.attncap is nested deeper than {MAX_DEPTH} levels")
    try:
        if not text.strip():
            return {}
        return json.loads(text, object_pairs_hook=_no_duplicates("vllm_xargs.attncap"), parse_int=_parse_int)
    except SpecError:  # a duplicate key, from the hook (a ValueError too)
        raise
    except json.JSONDecodeError as e:
        raise SpecError(f"attncap spec: vllm_xargs.attncap is not valid JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise SpecError(f"attncap spec: vllm_xargs.attncap is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # e.g. a float out of range; never an empty message
        raise SpecError(f"attncap spec: vllm_xargs.attncap is not usable JSON ({e})") from None


def is_capture_name(name: Any) -> bool:
    """Whether a JSON object key is one of the spec's names (``attncap`` or ``attncap_<field>``)."""
    return isinstance(name, str) and (name == SPEC_XARG or name.startswith(FLAT_PREFIX))


def mentions_capture(value: Any, depth: int = 0) -> bool:
    """Whether a parsed JSON value holds a spec name as an object key at any depth."""
    if depth > 64:
        return True  # deeper than any request model: treat as a capture request (the checks refuse it)
    if isinstance(value, Mapping):
        return any(is_capture_name(k) or mentions_capture(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return any(mentions_capture(v, depth + 1) for v in value)
    return False


#: Object keys under which vLLM's request models take extra args (``vllm_xargs``; the token endpoint's
#: ``sampling_params.extra_args``).
XARGS_KEYS = ("vllm_xargs", "extra_args")


@dataclass
class BodyCheck:
    """What :func:`check_request_body` found: whether the body asks for a capture, and the error, if any."""

    asks_capture: bool = False
    error: SpecError | None = None


def check_request_body(body: bytes) -> BodyCheck:
    """Check an HTTP request body as the server will read it (``json.loads`` of the bytes: UTF-8, UTF-16 or
    UTF-32, escapes resolved), so that the outcome cannot depend on how the bytes were spelled.

    A body asks for a capture when a spec name (``attncap``, ``attncap_<field>``) is an object key anywhere in
    it. Such a body is refused when a key is given twice on the way to the spec (``vllm_xargs`` twice, a spec
    field twice, ...), or when a spec under ``vllm_xargs`` / ``extra_args`` fails the checks that need no model
    (names, types, booleans, integers beyond int64, nesting). A body that does not parse is left to the server
    (it answers with its own 400)."""
    dups: list[tuple[str, list[Any]]] = []

    def hook(pairs):
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                dups.append((k, [out[k], v]))
            out[k] = v
        return out

    try:
        obj = json.loads(body, object_pairs_hook=hook, parse_int=_parse_int)
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError):
        return BodyCheck(asks_capture=b"attncap" in body)
    if not mentions_capture(obj):
        return BodyCheck()
    for k, values in dups:
        if is_capture_name(k) or k in XARGS_KEYS or any(mentions_capture(v) for v in values):
            field = k[len(FLAT_PREFIX):] if k.startswith(FLAT_PREFIX) else None
            where = f"attncap spec field '{field}'" if field else f"attncap spec: {k!r}"
            return BodyCheck(True, SpecError(f"{where} is given twice in the request body (as {k!r}); give it once",
                                             field))
    try:
        _check_xargs_in(obj, 0)
    except SpecError as e:
        return BodyCheck(True, e)
    return BodyCheck(True)


def _check_xargs_in(value: Any, depth: int) -> None:
    if depth > 64:
        raise SpecError(f"attncap spec: the request body is nested deeper than 64 levels")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if k in XARGS_KEYS and isinstance(v, Mapping) and any(is_capture_name(n) for n in v):
                spec, _ = spec_from_xargs(v)
                if spec is not None:
                    check_spec_fields(spec)
            else:
                _check_xargs_in(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_xargs_in(v, depth + 1)


def check_spec_fields(spec: Mapping[str, Any]) -> None:
    """The checks of a spec dict that need no model: known names and well-typed values (``CaptureSpec``)."""
    from ..spec import CaptureSpec

    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise SpecError(f"attncap spec: unknown field {unknown[0]!r}; allowed fields are {list(SPEC_FIELDS)}",
                        unknown[0])
    try:
        CaptureSpec.from_any(spec)
    except (ValueError, TypeError) as e:
        m = _FIELD_RE.search(str(e))
        raise SpecError(str(e) or f"attncap spec: {type(e).__name__}", m.group(1) if m else None) from None


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
    for field, value in spec.items():
        _check_value(str(field), value, f"vllm_xargs.attncap_{field}" if field in flat else "vllm_xargs.attncap")
    return spec, rest
