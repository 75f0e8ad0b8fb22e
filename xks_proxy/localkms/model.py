"""botocore's own KMS service model as the request validator: names, shapes, enums and limits.

Nothing here is copied from the model: required members, enums, lengths, patterns and ranges are
read from `botocore.session.get_session().get_service_model("kms")`, so the local KMS refuses
what KMS refuses and accepts what a current SDK can send. Messages follow KMS's wording
("1 validation error detected: Value 'x' at 'aliasName' failed to satisfy constraint: ...").
A wrong JSON type is a `SerializationException`, as AWS's JSON services answer it.

`parse` returns the request with blobs decoded to bytes and timestamps to epoch seconds.
"""

from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache
from typing import Any

import botocore.session
from botocore.model import OperationModel, OperationNotFoundError, ServiceModel, Shape

from xks_proxy.localkms.errors import KmsApiError

_QUOTE_MAX = 128

#: Where the local KMS knowingly accepts more than KMS: KMS calls a proxy on port 443 only, a
#: proxy on a developer's machine listens on any port, so the endpoint may name one.
RELAXED_PATTERNS = {"XksProxyUriEndpointType": r"^https://[a-zA-Z0-9.-]+(:[0-9]{1,5})?$"}


@lru_cache(maxsize=1)
def service_model() -> ServiceModel:
    return botocore.session.get_session().get_service_model("kms")


def operation(name: str) -> OperationModel:
    """The operation `TrentService.<name>` names; UnknownOperationException if KMS has none."""
    try:
        return service_model().operation_model(name)
    except OperationNotFoundError:
        raise KmsApiError("UnknownOperationException", f"Unknown operation {name[:100]}") from None


def enum(shape_name: str) -> list[str]:
    """An enum's values (e.g. `ConnectionErrorCodeType`), for code that must name one."""
    return list(service_model().shape_for(shape_name).enum)


def parse(op: OperationModel, body: Any) -> dict[str, Any]:
    """The request body checked against the operation's input shape. Raises KmsApiError."""
    if op.input_shape is None:
        return {}
    if not isinstance(body, dict):
        raise KmsApiError("SerializationException", "the request body must be a JSON object")
    problems: list[str] = []
    value = _check(op.input_shape, body, "", problems)
    if problems:
        count = len(problems)
        raise KmsApiError("ValidationException", f"{count} validation error{'s' if count > 1 else ''} detected: " + "; ".join(problems))
    return value


def _member_path(parent: str, name: str) -> str:
    camel = name[:1].lower() + name[1:]
    return f"{parent}.{camel}" if parent else camel


def _quoted(shape: Shape, value: Any) -> str:
    if shape.metadata.get("sensitive") or shape.type_name == "blob":
        return "Value"
    text = str(value)
    return f"Value '{text[:_QUOTE_MAX]}'"


def _wrong_type(path: str, expected: str) -> KmsApiError:
    return KmsApiError("SerializationException", f"Unexpected value type at '{path or 'request'}': expected {expected}")


def _check(shape: Shape, value: Any, path: str, problems: list[str]) -> Any:
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            raise _wrong_type(path, "an object")
        out: dict[str, Any] = {}
        for name in shape.required_members:
            if value.get(name) is None:
                problems.append(f"Value null at '{_member_path(path, name)}' failed to satisfy constraint: Member must not be null")
        for name, member in shape.members.items():
            if value.get(name) is not None:
                out[name] = _check(member, value[name], _member_path(path, name), problems)
        return out
    if kind == "list":
        if not isinstance(value, list):
            raise _wrong_type(path, "a list")
        _length(shape, value, len(value), path, problems)
        return [_check(shape.member, item, f"{path}.{i + 1}.member", problems) for i, item in enumerate(value)]
    if kind == "map":
        if not isinstance(value, dict):
            raise _wrong_type(path, "a map")
        _length(shape, value, len(value), path, problems)
        return {_check(shape.key, k, f"{path}.key", problems): _check(shape.value, v, f"{path}.value", problems) for k, v in value.items()}
    if kind == "string":
        if not isinstance(value, str):
            raise _wrong_type(path, "a string")
        _length(shape, value, len(value), path, problems)
        if shape.enum and value not in shape.enum:
            problems.append(f"{_quoted(shape, value)} at '{path}' failed to satisfy constraint: Member must satisfy enum value set: [{', '.join(shape.enum)}]")
        pattern = RELAXED_PATTERNS.get(shape.name, shape.metadata.get("pattern"))
        if pattern and not _regex(pattern).fullmatch(value):
            problems.append(f"{_quoted(shape, value)} at '{path}' failed to satisfy constraint: Member must satisfy regular expression pattern: {pattern}")
        return value
    if kind == "blob":
        if not isinstance(value, str):
            raise _wrong_type(path, "a base64 string")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise KmsApiError("SerializationException", f"Value at '{path}' is not valid base64") from None
        _length(shape, value, len(raw), path, problems)
        return raw
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(path, "an integer")
        if "min" in shape.metadata and value < shape.metadata["min"]:
            problems.append(f"Value '{value}' at '{path}' failed to satisfy constraint: Member must have value greater than or equal to {shape.metadata['min']}")
        if "max" in shape.metadata and value > shape.metadata["max"]:
            problems.append(f"Value '{value}' at '{path}' failed to satisfy constraint: Member must have value less than or equal to {shape.metadata['max']}")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _wrong_type(path, "a boolean")
        return value
    if kind == "timestamp":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(path, "a timestamp in epoch seconds")
        return float(value)
    return value


def _length(shape: Shape, value: Any, length: int, path: str, problems: list[str]) -> None:
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    if low is not None and length < low:
        problems.append(f"{_quoted(shape, value)} at '{path}' failed to satisfy constraint: Member must have length greater than or equal to {low}")
    if high is not None and length > high:
        problems.append(f"{_quoted(shape, value)} at '{path}' failed to satisfy constraint: Member must have length less than or equal to {high}")


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    """A model pattern (Java syntax; the KMS ones are also Python syntax) matched as Java's `matches`."""
    return re.compile(pattern.replace("$", r"\Z"))
