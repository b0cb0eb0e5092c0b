"""DKIM signing keys: loaded from PEM (PKCS#1 or PKCS#8), made new, published as a TXT record.

RSA of 2048 bits or more (rsa-sha256) and Ed25519 (ed25519-sha256, RFC 8463); anything
else is refused with a DkimKeyError whose message says what to do. The signing itself
is OpenSSL's, through `cryptography`: an RSA-2048 signature costs well under a
millisecond there, several in a pure-Python RSA (dkimpy's), and it runs on the inbound
worker's event loop.

Invariants: a DkimKey's domain and selector are lower-case DNS names fit to go into a
DKIM-Signature tag as they are (no ';', '=', spaces).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from mta.dkim import ALGORITHMS, MIN_RSA_BITS

_LABEL: Final = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
TXT_STRING_BYTES: Final = 255  # one character-string of a TXT record


class DkimKeyError(Exception):
    """The key cannot be used; the message names the file and what to do."""


@dataclass(frozen=True, eq=False)
class DkimKey:
    domain: str     # d=
    selector: str   # s=
    algorithm: str  # a=: "rsa-sha256" | "ed25519-sha256"
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    @classmethod
    def load(cls, domain: str, selector: str, key_file: str) -> DkimKey:
        try:
            with open(key_file, "rb") as f:
                pem = f.read()
        except OSError as exc:
            raise DkimKeyError(f"cannot read the DKIM key {key_file}: {exc.strerror}; "
                               f"make one with `mta dkim keygen --domain {domain} --selector {selector} "
                               f"--key-file {key_file}`") from exc
        return cls.from_pem(domain, selector, pem, key_file)

    @classmethod
    def from_pem(cls, domain: str, selector: str, pem: bytes, where: str = "the key") -> DkimKey:
        domain, selector = check_name("domain", domain), check_name("selector", selector)
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except TypeError as exc:  # encrypted
            raise DkimKeyError(f"{where} is encrypted: store it without a passphrase "
                               "(openssl pkey -in KEY -out PLAIN), readable by mta only") from exc
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise DkimKeyError(f"{where} is not a PEM private key (PKCS#1 or PKCS#8): {exc}") from exc
        if isinstance(private, rsa.RSAPrivateKey):
            if private.key_size < MIN_RSA_BITS:
                raise DkimKeyError(f"{where} is an RSA key of {private.key_size} bits: DKIM needs "
                                   f"{MIN_RSA_BITS} or more (RFC 8301); make a new one with `mta dkim keygen`"
                                   " and publish it under a new selector")
            return cls(domain, selector, ALGORITHMS["rsa"], private)
        if isinstance(private, ed25519.Ed25519PrivateKey):
            return cls(domain, selector, ALGORITHMS["ed25519"], private)
        raise DkimKeyError(f"{where} is a {type(private).__name__.removeprefix('_')}: DKIM signs with "
                           f"RSA ({MIN_RSA_BITS} bits or more) or Ed25519 keys only")

    @staticmethod
    def generate(algorithm: str = "rsa", bits: int = MIN_RSA_BITS) -> bytes:
        """A new private key as PKCS#8 PEM."""
        if algorithm not in ALGORITHMS:
            raise DkimKeyError(f"unknown key algorithm {algorithm!r}: rsa or ed25519")
        if algorithm == "rsa" and bits < MIN_RSA_BITS:
            raise DkimKeyError(f"an RSA DKIM key needs {MIN_RSA_BITS} bits or more, not {bits}")
        private = (rsa.generate_private_key(public_exponent=65537, key_size=bits) if algorithm == "rsa"
                   else ed25519.Ed25519PrivateKey.generate())
        return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())

    def covers(self, from_domain: str, subdomains: bool) -> bool:
        """Whether a message whose From: domain is `from_domain` is ours to sign."""
        name = from_domain.rstrip(".").lower()
        return name == self.domain or (subdomains and name.endswith("." + self.domain))

    def sign(self, data: bytes) -> bytes:
        """The b= signature of the canonical header data (RFC 6376 3.7; RFC 8463 3: Ed25519
        signs the SHA-256 digest of it)."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return self.private.sign(hashlib.sha256(data).digest())

    def public_p(self) -> str:
        """The p= value: base64 of the SubjectPublicKeyInfo (RSA), of the raw 32 bytes (Ed25519)."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            raw = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        else:
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def txt_value(self) -> str:
        """The key record (RFC 6376 3.6.1) as one string."""
        return f"v=DKIM1; k={self.algorithm.partition('-')[0]}; p={self.public_p()}"

    def txt_strings(self) -> str:
        """The record's data as a zone file writes it: quoted strings of at most 255 bytes."""
        value = self.txt_value()
        return " ".join(f'"{value[i:i + TXT_STRING_BYTES]}"' for i in range(0, len(value), TXT_STRING_BYTES))

    def txt_record(self) -> str:
        """The zone-file line to publish."""
        return f"{self.record_name}. IN TXT ( {self.txt_strings()} )"


def check_name(what: str, name: str) -> str:
    """`name` as a lower-case DNS name (labels of letters, digits, '-', '_'), or DkimKeyError."""
    lowered = name.rstrip(".").lower()
    if not lowered or len(lowered) > 253 or not all(_LABEL.fullmatch(label) for label in lowered.split(".")):
        raise DkimKeyError(f"the DKIM {what} {name!r} is not a DNS name")
    return lowered
