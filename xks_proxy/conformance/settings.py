"""What the tester was asked to check: endpoint, path, credential, keys and knobs, from flags or a file.

The KMS console hands operators a "proxy configuration file"; accepting it (`--config`) means the
tester signs with exactly the path and credential KMS will be given, so a copy-paste mistake shows
up here rather than as INVALID_CREDENTIALS in the console. The secret lives only in `Credential`,
whose repr hides it, so no traceback or report can print it.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

SECRET_ENV = "XKS_SECRET_ACCESS_KEY"
CATEGORIES = ("config", "transport", "connection", "key", "crypto", "errors", "probes", "latency")


class SettingsError(Exception):
    """A usage mistake, reported as one line (never containing the secret)."""


@dataclass(frozen=True)
class Credential:
    access_key_id: str
    secret: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credential(access_key_id={self.access_key_id!r}, secret=<hidden>)"


@dataclass(frozen=True)
class OptionalKeys:
    """Key ids the operator has set up to exercise usage and state errors (all optional)."""

    encrypt_only: str | None = None
    decrypt_only: str | None = None
    no_usage: str | None = None
    disabled: str | None = None


@dataclass(frozen=True)
class Settings:
    scheme: str
    host: str
    port: int
    uri_path: str
    credential: Credential
    key_id: str
    region: str = "us-east-1"
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    allow_http: bool = False
    burst: int = 100
    concurrency: int = 10
    timeout: float = 5.0
    budget_ms: float = 250.0
    clock_offset: float = 0.0
    probes: OptionalKeys = OptionalKeys()
    only: frozenset[str] = frozenset(CATEGORIES)

    @property
    def host_header(self) -> str:
        """What KMS puts in Host (and signs): the name alone on the default port."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def wants(self, category: str) -> bool:
        return category in self.only


def from_args(args: argparse.Namespace) -> Settings:
    """Merge flags over the optional KMS proxy configuration file. Raises SettingsError."""
    file_conf = _read_config(args.config) if getattr(args, "config", None) else {}
    endpoint = args.endpoint or file_conf.get("XksProxyUriEndpoint")
    if not endpoint:
        raise SettingsError("--endpoint is required (https://host[:port])")
    scheme, host, port = _parse_endpoint(endpoint)
    cred_conf = file_conf.get("XksProxyAuthenticationCredential") or {}
    uri_path = args.uri_path or file_conf.get("XksProxyUriPath")
    akid = args.access_key_id or cred_conf.get("AccessKeyId")
    secret = args.secret_access_key or cred_conf.get("RawSecretAccessKey") or os.environ.get(SECRET_ENV)
    missing = [name for name, value in (("--uri-path", uri_path), ("--access-key-id", akid),
                                        ("--secret-access-key", secret), ("--key-id", args.key_id)) if not value]
    if missing:
        raise SettingsError(f"missing {', '.join(missing)} (give them as flags or with --config)")
    if bool(args.client_cert) != bool(args.client_key):
        raise SettingsError("--client-cert and --client-key go together")
    _check_tls_files(args)
    if args.burst < 0 or args.concurrency < 1 or args.timeout <= 0:
        raise SettingsError("--burst must be >= 0, --concurrency >= 1 and --timeout > 0")
    return Settings(
        scheme=scheme, host=host, port=port, uri_path="/" + str(uri_path).strip("/"),
        credential=Credential(str(akid), str(secret)), key_id=args.key_id, region=args.region,
        ca_bundle=args.ca_bundle, client_cert=args.client_cert, client_key=args.client_key,
        allow_http=args.allow_http, burst=args.burst, concurrency=args.concurrency, timeout=args.timeout,
        clock_offset=args.clock_offset,
        probes=OptionalKeys(args.encrypt_only_key, args.decrypt_only_key, args.no_usage_key, args.disabled_key),
        only=_categories(args.only),
    )


def _read_config(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"--config: cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise SettingsError(f"--config: {path} is not JSON") from None
    if not isinstance(data, dict):
        raise SettingsError(f"--config: {path} must hold a JSON object")
    return data


def _check_tls_files(args: argparse.Namespace) -> None:
    """Fail early, as a usage error, on a CA bundle or client certificate that cannot be loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if args.ca_bundle:
            ctx.load_verify_locations(cafile=args.ca_bundle)
        if args.client_cert:
            ctx.load_cert_chain(args.client_cert, args.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load --ca-bundle/--client-cert/--client-key: {exc}") from None


def _parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise SettingsError(f"--endpoint {endpoint!r} must look like https://host[:port]")
    if parts.path not in ("", "/"):
        raise SettingsError("--endpoint takes no path; give the path with --uri-path")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise SettingsError(f"--endpoint {endpoint!r} has an invalid port") from None
    return parts.scheme, parts.hostname, port


def _categories(only: str | None) -> frozenset[str]:
    if not only:
        return frozenset(CATEGORIES)
    chosen = frozenset(part.strip() for part in only.split(",") if part.strip())
    unknown = chosen - set(CATEGORIES)
    if unknown:
        raise SettingsError(f"--only: unknown categories {', '.join(sorted(unknown))} (choose from {', '.join(CATEGORIES)})")
    return chosen
