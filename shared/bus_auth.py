"""How the bus authenticates to NATS, and URLs as they may be logged.

- ``BusAuth``: the ``ONEPOOL_NATS_*`` settings (user and password, a token or a creds file; TLS files), read
  by every service through ``shared.runner``. Checked when built: files are read (a ``*_FILE`` variant holds a
  secret), the TLS context is made; a ``SettingsError`` names the variable and the path, never the secret.
- ``load_bus_auth()``: ``BusAuth`` from the environment.
- ``redact_url()``: a NATS URL without its credentials (``nats://***@host:4222``).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from shared import schemas
from shared.errors import SettingsError
from shared.settings import doc, env_var_name, load_settings

ENV_PREFIX: Final = "ONEPOOL_NATS_"

AuthMethod = Literal["user", "token", "creds", "none"]

# A JWT: header.claims.signature, each base64url without padding.
_JWT: Final = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _var(name: str) -> str:
    return env_var_name(ENV_PREFIX, name)


@dataclass(frozen=True)
class BusAuth:
    """NATS credentials (at most one way: user and password, token, or creds file) and TLS files.

    A ``*_FILE`` field names a file holding the secret (compose secrets; one trailing newline is dropped);
    giving both a secret and its file is an error. Any TLS file (or a ``tls://`` URL) makes the bus insist
    on TLS (``shared.bus``). A user name must be one NATS subject token: the bus's replies come to
    ``_INBOX.<user>`` (``schemas.inbox_prefix``)."""

    user: str | None = field(
        default=None,
        metadata=doc(
            "user name, with PASSWORD or PASSWORD_FILE; one subject token: replies come to `_INBOX.<user>`"
        ),
    )
    password: str | None = field(default=None, repr=False, metadata=doc("the user's password"))
    password_file: Path | None = field(
        default=None, metadata=doc("a file holding the password (one trailing newline is dropped)")
    )
    token: str | None = field(default=None, repr=False, metadata=doc("an authentication token"))
    token_file: Path | None = field(
        default=None, metadata=doc("a file holding the token (one trailing newline is dropped)")
    )
    creds_file: Path | None = field(
        default=None,
        metadata=doc("a NATS credentials file (a user JWT and its NKey seed; `nsc generate creds`)"),
    )
    tls_ca_file: Path | None = field(
        default=None, metadata=doc("CA certificates (PEM) to verify the server with; none: the system's")
    )
    tls_cert_file: Path | None = field(
        default=None, metadata=doc("client certificate (PEM) for mutual TLS, with TLS_KEY_FILE")
    )
    tls_key_file: Path | None = field(
        default=None, metadata=doc("the unencrypted private key (PEM) of TLS_CERT_FILE")
    )
    # Resolved when built: the secrets themselves and the TLS context.
    _password: str | None = field(init=False, default=None, repr=False, compare=False)
    _token: str | None = field(init=False, default=None, repr=False, compare=False)
    _tls: ssl.SSLContext | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        password = _secret("password", self.password, self.password_file)
        token = _secret("token", self.token, self.token_file)
        if password is not None and self.user is None:
            var = _var("password" if self.password is not None else "password_file")
            raise SettingsError(var, f"{var} is set but {_var('user')} is not")
        if self.user is not None and password is None:
            var, alone = _var("user"), _var("password")
            raise SettingsError(var, f"{var} is set but neither {alone} nor {alone}_FILE")
        if self.user is not None:
            try:
                schemas.inbox_prefix(self.user)  # the bus's reply inbox is _INBOX.<user>
            except ValueError as e:
                raise SettingsError(_var("user"), f"{_var('user')}: {e}") from None
        ways = [
            name
            for name, given in (("user", self.user), ("token", token), ("creds_file", self.creds_file))
            if given is not None
        ]
        if len(ways) > 1:
            raise SettingsError(
                _var(ways[1]),
                f"{' and '.join(_var(w) for w in ways)} are set together: give one way to authenticate "
                "(user and password, a token, or a creds file)",
            )
        if self.creds_file is not None:
            _check_creds(self.creds_file)
        object.__setattr__(self, "_password", password)
        object.__setattr__(self, "_token", token)
        object.__setattr__(self, "_tls", self._tls_context())

    @property
    def method(self) -> AuthMethod:
        """How the bus authenticates (``none``: anonymously, or with credentials in the URL)."""
        if self.user is not None:
            return "user"
        if self._token is not None:
            return "token"
        return "creds" if self.creds_file is not None else "none"

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The TLS context built from the TLS files; None when none is given."""
        return self._tls

    def connect_options(self) -> dict[str, Any]:
        """The keyword arguments of nats-py's ``Client.connect`` for these credentials and TLS files."""
        out: dict[str, Any] = {}
        if self.user is not None:
            out["user"] = self.user
            out["password"] = self._password
        if self._token is not None:
            out["token"] = self._token
        if self.creds_file is not None:
            out["user_credentials"] = str(self.creds_file)  # nats-py reads it at each (re)connect
        if self._tls is not None:
            out["tls"] = self._tls
        return out

    def _tls_context(self) -> ssl.SSLContext | None:
        ca, cert, key = self.tls_ca_file, self.tls_cert_file, self.tls_key_file
        ca_var, cert_var, key_var = _var("tls_ca_file"), _var("tls_cert_file"), _var("tls_key_file")
        if cert is not None and key is None:
            raise SettingsError(cert_var, f"{cert_var} needs {key_var}")
        if key is not None and cert is None:
            raise SettingsError(key_var, f"{key_var} needs {cert_var}")
        if ca is None and cert is None:
            return None
        for var, path in ((ca_var, ca), (cert_var, cert), (key_var, key)):
            if path is not None:
                _read(var, path)
        try:
            context = ssl.create_default_context(cafile=None if ca is None else str(ca))
        except ssl.SSLError as e:
            why = f"{ca_var}: {ca} holds no usable CA certificate (PEM): {e.reason}"
            raise SettingsError(ca_var, why) from e
        if cert is not None and key is not None:
            try:
                context.load_cert_chain(cert, key, password=_no_key_password)
            except ssl.SSLError as e:
                raise SettingsError(
                    cert_var,
                    f"{cert_var} and {key_var}: {cert} and {key} are not a PEM certificate and its "
                    f"unencrypted private key: {e.reason}",
                ) from e
        return context


def load_bus_auth(env: Mapping[str, str] | None = None) -> BusAuth:
    """``BusAuth`` from ``ONEPOOL_NATS_*`` in ``env`` (default: the process environment)."""
    return load_settings(BusAuth, prefix=ENV_PREFIX, env=env)


def redact_url(url: str) -> str:
    """``url`` as it may be logged: whatever lies between ``scheme://`` (or the start) and the last ``@``
    (``user:password``, a token) becomes ``***``. A URL without ``@`` is returned as is."""
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    head = f"{scheme}{sep}" if sep else ""
    return f"{head}***@{(rest if sep else url).rpartition('@')[2]}"


# ---- internals ----


def _secret(name: str, value: str | None, path: Path | None) -> str | None:
    """The secret given in ``name`` or read from the file in ``name_file``; never both."""
    file_var = _var(f"{name}_file")
    if value is not None and path is not None:
        raise SettingsError(file_var, f"{_var(name)} and {file_var} are both set: give one of them")
    if path is None:
        return value
    text = _read(file_var, path)
    try:
        secret = text.decode()
    except UnicodeDecodeError:
        raise SettingsError(file_var, f"{file_var}: {path} is not UTF-8 text") from None
    if secret.endswith("\n"):
        secret = secret[:-1].removesuffix("\r")
    if not secret:
        raise SettingsError(file_var, f"{file_var}: {path} is empty")
    return secret


def _read(var: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SettingsError(var, f"{var}: cannot read {path}: {e.strerror or type(e).__name__}") from None


def _check_creds(path: Path) -> None:
    """``path`` as nats-py reads it at each (re)connect: the line after ``BEGIN NATS USER JWT`` is the JWT,
    the line after ``BEGIN USER NKEY SEED`` the seed, each section closed by its END line. Checked here
    because nats-py reads a file without the JWT marker forever, keeps a carriage return or drops a last
    character of a seed not followed by a newline, and a seed that is not the JWT's key would only be an
    "Authorization Violation" from the server. Messages name the variable, the path and public keys, never
    the seed."""
    import nkeys  # nats-py's own dependency for creds (the nkeys extra); only a creds file needs it

    var = _var("creds_file")
    text = _read(var, path)
    if b"BEGIN NATS USER JWT" not in text and b"BEGIN USER NKEY SEED" not in text:
        raise SettingsError(var, f"{var}: {path} is not a NATS credentials file (no user JWT and NKey seed)")
    if b"\r" in text:
        raise SettingsError(var, f"{var}: {path} has CRLF line endings, which nats-py cannot read: use LF")
    lines = text.split(b"\n")
    subject = _jwt_subject(_creds_section(var, path, lines, "NATS USER JWT", "user JWT"))
    if subject is None:
        raise SettingsError(var, f"{var}: {path}: the user JWT is not a JWT (header.claims.signature)")
    seed = _creds_section(var, path, lines, "USER NKEY SEED", "NKey seed")
    try:
        public: str = nkeys.from_seed(seed).public_key.decode()
    except (nkeys.NkeysError, ValueError):  # not base32, a wrong prefix or length
        raise SettingsError(var, f"{var}: {path}: the NKey seed is not a valid NKey seed") from None
    if not public.startswith("U"):
        raise SettingsError(var, f"{var}: {path}: the NKey seed is not a user's (SU...): its key is {public}")
    if subject != public:
        raise SettingsError(
            var, f"{var}: {path}: the user JWT is for {subject} but the NKey seed is of {public}"
        )


def _creds_section(var: str, path: Path, lines: list[bytes], name: str, what: str) -> bytes:
    """The one line of a creds file between ``-----BEGIN <name>-----`` and ``------END <name>------``."""
    begin = next((i for i, line in enumerate(lines) if f"BEGIN {name}".encode() in line), None)
    if begin is None:
        raise SettingsError(var, f"{var}: {path} is incomplete: no {what} section (-----BEGIN {name}-----)")
    body = lines[begin + 1] if begin + 1 < len(lines) else b""  # as nats-py reads it: spaces included
    if not body or not any(f"END {name}".encode() in line for line in lines[begin + 2 :]):
        raise SettingsError(var, f"{var}: {path} is incomplete: the {what} section is empty or not closed")
    return body


def _jwt_subject(jwt: bytes) -> str | None:
    """The ``sub`` claim of ``jwt`` (unverified: the server verifies the JWT), or None if it is no JWT."""
    if _JWT.fullmatch(jwt) is None:
        return None
    payload = jwt.split(b".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except ValueError:  # bad base64, UTF-8 or JSON
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) else None


def _no_key_password() -> bytes:
    var = _var("tls_key_file")
    raise SettingsError(var, f"{var} is an encrypted key: give an unencrypted one (no passphrase is asked)")


__all__ = ["ENV_PREFIX", "AuthMethod", "BusAuth", "load_bus_auth", "redact_url"]
