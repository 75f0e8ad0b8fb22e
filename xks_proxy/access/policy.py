"""Secondary authorization: allow/deny rules over requestMetadata, per store and per key.

A store's `[[stores.policy]]` rules are compiled once, at load or reload, into regular
expressions; a request costs a handful of `re.match` calls and no allocation. The semantics
(docs/access-control.md states them for operators):

1. A rule applies to a request when it has no `keys`, or one of its `keys` patterns matches the
   external key id. A rule matches when every condition it lists matches (a condition is one of
   FIELDS, given as a pattern or a list of patterns, any of which may match; a field the request
   does not carry matches nothing). A rule with no conditions matches every request.
2. An applicable deny rule that matches denies: explicit deny wins over any allow.
3. Store scope: if the store has allow rules without `keys`, one of them must match.
4. Key scope: if allow rules with `keys` apply to this key, one of them must match.
5. Otherwise the request is allowed. No rules at all: everything signed is allowed.

Health checks are never evaluated (the server does not call this for them).

Patterns are shell-style (`fnmatch.fnmatchcase`: case-sensitive, `*` also crosses `:` and `/`).
This module does not import the configuration: it raises PolicyError, which config.py turns
into a ConfigError naming the field.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Protocol

#: TOML field name -> attribute of protocol.RequestMetadata.
FIELDS = {
    "awsPrincipalArn": "aws_principal_arn",
    "kmsOperation": "kms_operation",
    "kmsViaService": "kms_via_service",
    "awsSourceVpc": "aws_source_vpc",
    "awsSourceVpce": "aws_source_vpce",
    "kmsKeyArn": "kms_key_arn",
}
RULE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
IMPLICIT_STORE = "implicit-deny:store"  # no store-wide allow rule matched
IMPLICIT_KEY = "implicit-deny:key"  # no allow rule for this key matched
_MAX_PATTERN = 2048


class PolicyError(ValueError):
    """A policy that does not validate, phrased as `field: what is wrong`."""


class Metadata(Protocol):
    """What a rule reads (protocol.RequestMetadata has these attributes)."""

    aws_principal_arn: str | None
    kms_operation: str
    kms_via_service: str | None
    aws_source_vpc: str | None
    aws_source_vpce: str | None
    kms_key_arn: str | None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    allow: bool
    keys: re.Pattern[str] | None
    conditions: tuple[tuple[str, re.Pattern[str]], ...]

    def matches(self, meta: Metadata) -> bool:
        for attribute, pattern in self.conditions:
            value = getattr(meta, attribute)
            if value is None or pattern.match(value) is None:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    store_allows: bool = False  # some allow rule has no `keys`

    def denial(self, key_id: str, meta: Metadata) -> str | None:
        """The name of the rule that denies this request, or None when it is allowed."""
        if not self.rules:
            return None
        store_ok = not self.store_allows
        key_ok: bool | None = None  # None: no allow rule applies to this key
        for rule in self.rules:
            if rule.keys is not None and rule.keys.match(key_id) is None:
                continue
            if not rule.allow:
                if rule.matches(meta):
                    return rule.name
            elif rule.keys is None:
                store_ok = store_ok or rule.matches(meta)
            else:
                key_ok = bool(key_ok) or rule.matches(meta)
        if not store_ok:
            return IMPLICIT_STORE
        if key_ok is False:
            return IMPLICIT_KEY
        return None


EMPTY_POLICY = Policy()


def compile_policy(raw: Any, where: str) -> Policy:
    """Validate and compile a store's list of rule tables. Raises PolicyError."""
    if not isinstance(raw, list):
        raise PolicyError(f"{where}: must be a list of [[...policy]] tables")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, table in enumerate(raw):
        rule = _rule(table, f"{where}[{i}]")
        if rule.name in names:
            raise PolicyError(f"{where}[{i}].name: {rule.name!r} is used by another rule of this store")
        names.add(rule.name)
        rules.append(rule)
    return Policy(rules=tuple(rules), store_allows=any(r.allow and r.keys is None for r in rules))


def _rule(table: Any, where: str) -> Rule:
    if not isinstance(table, dict):
        raise PolicyError(f"{where}: must be a table")
    for key in table:
        if key not in FIELDS and key not in ("name", "effect", "keys"):
            raise PolicyError(
                f"{where}.{key}: unknown field (rules take name, effect, keys and {', '.join(FIELDS)})"
            )
    name = table.get("name")
    if not isinstance(name, str) or not RULE_NAME_RE.match(name):
        raise PolicyError(f"{where}.name: is required, 1-64 characters of [A-Za-z0-9._-]")
    effect = table.get("effect")
    if effect not in ("allow", "deny"):
        raise PolicyError(f"{where}.effect: must be \"allow\" or \"deny\"")
    keys = _patterns(table["keys"], f"{where}.keys") if "keys" in table else None
    conditions = tuple(
        (attribute, _patterns(table[field], f"{where}.{field}")) for field, attribute in FIELDS.items() if field in table
    )
    return Rule(name=name, allow=effect == "allow", keys=keys, conditions=conditions)


def _patterns(value: Any, where: str) -> re.Pattern[str]:
    """One pattern or a non-empty list of them, compiled into a single anchored regex."""
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not patterns:
        raise PolicyError(f"{where}: must be a pattern or a non-empty list of patterns")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern or len(pattern) > _MAX_PATTERN:
            raise PolicyError(f"{where}: each pattern must be a non-empty string of at most {_MAX_PATTERN} characters")
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
