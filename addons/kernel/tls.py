"""Certificate files: read and check a certificate, its private key and chain.

Shared by the TLS listener (which serves them) and the profile schema (which checks them, so
validate-config and a reload name the line of the file that is wrong).

- `load_certificates`, `load_private_key`: one PEM file; `KeypairError` says which file
  (`cert`, `key`, `chain`) is wrong and why.
- `load_keypair`: all three, and that the key belongs to the leaf certificate.
- `validity_problem`: why clients would refuse the certificate today, or None.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization


class KeypairError(ValueError):
    """A certificate, key or chain file that cannot serve; `which` names the file's role."""

    def __init__(self, which: str, message: str) -> None:
        super().__init__(message)
        self.which = which  # "cert", "key" or "chain"


class Keypair(NamedTuple):
    cert: x509.Certificate
    key: Any  # a cryptography private key
    chain: tuple[x509.Certificate, ...]
    paths: tuple[str, str, str]  # cert, key, chain ("" when none)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(p for p in self.paths if p)

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc


_ROLE = {"cert": "certificate", "key": "private key", "chain": "chain"}


def _read(path: str, which: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise KeypairError(
            which, f"cannot read the {_ROLE[which]} file {path!r}: {e.strerror}"
        ) from None


def load_certificates(path: str, which: str) -> list[x509.Certificate]:
    """Every PEM certificate in the file (a leaf, or a leaf followed by its chain)."""
    data = _read(path, which)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise KeypairError(
            which, f"{path!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )
    return certs


def load_private_key(path: str) -> Any:
    data = _read(path, "key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "this one needs a password"
        raise KeypairError(
            "key",
            f"{path!r} is an encrypted private key; give it unencrypted "
            "(and protect the file with its permissions)",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeypairError(
            "key", f"{path!r} holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
        ) from None
    return key


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_keypair(cert: str, key: str, chain: str = "") -> Keypair:
    """Read and check the files; KeypairError says which file is wrong and why."""
    certs = load_certificates(cert, "cert")
    private = load_private_key(key)
    if _spki(private.public_key()) != _spki(certs[0].public_key()):
        raise KeypairError(
            "key",
            f"the key {key!r} does not belong to the certificate {cert!r} "
            f"({certs[0].subject.rfc4514_string()}): their public keys differ",
        )
    extra = load_certificates(chain, "chain") if chain else []
    return Keypair(certs[0], private, tuple(certs[1:] + extra), (cert, key, chain))


def validity_problem(pair: Keypair, now: datetime.datetime) -> str | None:
    """Why the certificate would be refused by clients today, or None."""
    if now < pair.cert.not_valid_before_utc:
        return f"not valid before {pair.cert.not_valid_before_utc.isoformat()}"
    if now > pair.not_after:
        return f"expired on {pair.not_after.isoformat()}"
    return None
