"""API keys of a server: ``redpen serve keys add NAME`` prints a key once; the keys file keeps only its hash.

Each key belongs to a tenant (its name, unless given), and a tenant sees and feeds only its own mistake memory.
Keys are 256 random bits, so one SHA-256 is enough to store them: nobody can search that space from a hash, and
a slow password hash would only slow down every request.

Every route but ``/health`` takes its caller through ``Authorized``: the bearer key's tenant, or 401. Keys are
managed by ``redpen serve keys`` on the server's machine, never over HTTP (that would need a key above the keys).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from runtime.errors import ConfigError, DataError
from runtime.server.errors import APIError

PREFIX = "rp-"  # so a leaked redpen key is recognisable (secret scanners match on prefixes)
OPEN_TENANT = "default"  # the one tenant of an app built without keys (in-process tests); `redpen serve` has keys


@dataclass(frozen=True)
class KeyEntry:
    name: str
    tenant: str
    created: str


def key_hash(key: str) -> str:
    """The SHA-256 of a key, as the keys file stores it.

    >>> key_hash("rp-example")[:16]
    '0bedf1dc049caa03'
    """
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The keys file (``keys.json``): key hash -> name, tenant, creation time. Reads once; writes replace the file.

    >>> import tempfile
    >>> ring = KeyRing(Path(tempfile.mkdtemp()) / "keys.json")
    >>> key = ring.add("acme-app", tenant="acme")
    >>> ring.tenant_of(key), ring.tenant_of("rp-guess"), key in ring.path.read_text()
    ('acme', None, False)
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, KeyEntry] = {}
        if self.path.exists():
            try:
                rows = json.loads(self.path.read_text(encoding="utf-8"))
                self.entries = {h: KeyEntry(**row) for h, row in rows.items()}
            except (OSError, ValueError, TypeError) as exc:
                raise DataError(f"{self.path}: not a redpen keys file ({exc}); fix it or move it away") from None

    def __len__(self) -> int:
        return len(self.entries)

    def tenant_of(self, key: str) -> str | None:
        """The tenant a key belongs to, or None for a key not in the file."""
        entry = self.entries.get(key_hash(key))
        return entry.tenant if entry is not None else None

    def add(self, name: str, tenant: str | None = None) -> str:
        """Make a key for ``name`` (tenant ``tenant``, by default ``name``), store its hash, return the key itself."""
        tenant = tenant or name
        for label, value in (("name", name), ("tenant", tenant)):
            if not value or not value.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ConfigError(f"key {label} {value!r}: use letters, digits, '-', '_' and '.' only")
        if any(e.name == name for e in self.entries.values()):
            raise ConfigError(f"a key named {name!r} exists in {self.path}; revoke it first or pick another name")
        key = PREFIX + secrets.token_urlsafe(32)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        self.entries[key_hash(key)] = KeyEntry(name=name, tenant=tenant, created=created)
        self._write()
        return key

    def revoke(self, name: str) -> bool:
        """Remove the key named ``name``; returns whether there was one."""
        kept = {h: e for h, e in self.entries.items() if e.name != name}
        if len(kept) == len(self.entries):
            return False
        self.entries = kept
        self._write()
        return True

    def _write(self) -> None:
        """Replace the file atomically, readable by its owner only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({h: asdict(e) for h, e in self.entries.items()}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class Caller:
    key_id: str  # the key's hash: what in-flight requests are counted by
    tenant: str


def authenticate(request: Request) -> Caller:
    """The caller of a request, by its bearer key (the app's ``state.keys``); 401 for a missing or unknown key."""
    keys: KeyRing | None = request.app.state.keys
    if keys is None:
        return Caller(key_id="", tenant=OPEN_TENANT)
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise APIError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer KEY' "
            "(make one with `redpen serve keys add NAME`)",
            code="invalid_api_key",
        )
    tenant = keys.tenant_of(key)
    if tenant is None:
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
    return Caller(key_id=key_hash(key), tenant=tenant)


Authorized = Annotated[Caller, Depends(authenticate)]
