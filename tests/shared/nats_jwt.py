"""NATS decentralized (JWT) authentication for tests: NKey pairs, operator/account/user JWTs signed the way
the Go nats-io/jwt v2 library signs them, creds files, and a nats-server configuration trusting an operator.

An NKey seed is base32 (no padding) of two prefix bytes (seed, then the key's role), the 32-byte ed25519
seed and a CRC16 of those 34 bytes (``nkeys.encode_seed``). A JWT is ``header.claims.signature``, each
base64url without padding: header ``{"typ":"JWT","alg":"ed25519-nkey"}``, the signature ed25519 over
``header.claims`` by the issuer's key. ``jti`` is base32 (no padding) of SHA-512/256 over the standard
claims with ``jti`` empty (nats-server does not check it; it is made as the Go library makes it anyway)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nkeys

Role = Literal["operator", "account", "user"]

_PREFIX: dict[Role, int] = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
# The Go library's defaults (NewAccountClaims, NewUserClaims): -1 is no limit.
_ACCOUNT_LIMITS: dict[str, Any] = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
_USER_LIMITS: dict[str, Any] = {"subs": -1, "data": -1, "payload": -1}


@dataclass(frozen=True)
class NKey:
    """An NKey pair: ``seed`` (``S`` + role letter ...) and ``public`` (``O...``, ``A...``, ``U...``)."""

    seed: str
    public: str

    @classmethod
    def create(cls, role: Role) -> NKey:
        seed = nkeys.encode_seed(os.urandom(32), _PREFIX[role])
        pair = nkeys.from_seed(seed)
        return cls(seed=seed.decode(), public=pair.public_key.decode())

    def sign(self, data: bytes) -> bytes:
        pair = nkeys.from_seed(bytearray(self.seed.encode()))
        try:
            signature: bytes = pair.sign(data)
        finally:
            pair.wipe()
        return signature


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(issuer: NKey, subject: str, name: str, role: Role, nats: dict[str, Any] | None = None) -> str:
    """A v2 JWT of ``role`` for ``subject`` (a public key), signed by ``issuer``."""
    # The standard claims in the Go struct's field order (ClaimsData), as the jti hash covers them.
    standard: dict[str, Any] = {"iat": int(time.time()), "iss": issuer.public, "name": name, "sub": subject}
    digest = hashlib.new("sha512_256", json.dumps(standard, separators=(",", ":")).encode()).digest()
    jti = base64.b32encode(digest).rstrip(b"=").decode()
    claims = {"jti": jti, **standard, "nats": {**(nats or {}), "type": role, "version": 2}}
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = _b64(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of ``token``, unverified."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


@dataclass(frozen=True)
class Operator:
    """An operator, its system account (JetStream, which the test servers run, needs one) and one account for
    the services, as nats-server's configuration trusts them."""

    key: NKey
    jwt: str
    system: NKey
    system_jwt: str
    account: NKey
    account_jwt: str

    @classmethod
    def create(cls, name: str = "test-operator", account_name: str = "ONEPOOL") -> Operator:
        key, system, account = NKey.create("operator"), NKey.create("account"), NKey.create("account")
        limits = {"limits": _ACCOUNT_LIMITS}
        return cls(
            key=key,
            jwt=encode_jwt(key, key.public, name, "operator", {"system_account": system.public}),
            system=system,
            system_jwt=encode_jwt(key, system.public, "SYS", "account", limits),
            account=account,
            account_jwt=encode_jwt(key, account.public, account_name, "account", limits),
        )

    def server_config(self) -> str:
        """nats-server configuration text: trust this operator, its accounts preloaded in memory."""
        return (
            f'operator: "{self.jwt}"\n'
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f'  {self.system.public}: "{self.system_jwt}"\n'
            f'  {self.account.public}: "{self.account_jwt}"\n'
            "}\n"
        )


def user_jwt(account: NKey, user: NKey, name: str = "test-user") -> str:
    """A user JWT for ``user`` issued by ``account``, without limits or permissions."""
    return encode_jwt(account, user.public, name, "user", {"pub": {}, "sub": {}, **_USER_LIMITS})


def creds_text(jwt: str, user: NKey) -> str:
    """A creds file's text, as the Go library's FormatUserConfig (and ``nsc``) writes it."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def write_creds(path: Path, jwt: str, user: NKey) -> Path:
    path.write_text(creds_text(jwt, user))
    path.chmod(0o600)
    return path
