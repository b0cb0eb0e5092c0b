"""Signing keys from PEM: RSA 2048+ and Ed25519 in PKCS#1 and PKCS#8; what is refused and
what the operator is told; which From: domains a key covers; the record to publish."""

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mta.dkim.keys import DkimKey, DkimKeyError

RSA_2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(private, fmt=serialization.PrivateFormat.PKCS8, encryption=None) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, fmt, encryption or serialization.NoEncryption())


def test_rsa_pkcs1_and_pkcs8(tmp_path: Path) -> None:
    for fmt, begin in ((serialization.PrivateFormat.TraditionalOpenSSL, b"BEGIN RSA PRIVATE KEY"),
                       (serialization.PrivateFormat.PKCS8, b"BEGIN PRIVATE KEY")):
        path = tmp_path / "k.pem"
        path.write_bytes(_pem(RSA_2048, fmt))
        assert begin in path.read_bytes()
        key = DkimKey.load("Example.TEST.", "Sel1", str(path))
        assert (key.domain, key.selector, key.algorithm) == ("example.test", "sel1", "rsa-sha256")


def test_ed25519(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(DkimKey.generate("ed25519"))
    key = DkimKey.load("example.test", "ed", str(path))
    assert key.algorithm == "ed25519-sha256"
    assert len(base64.b64decode(key.public_p())) == 32  # RFC 8463: the raw key, not SubjectPublicKeyInfo
    assert key.txt_value().startswith("v=DKIM1; k=ed25519; p=")


def test_small_rsa_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.pem"
    path.write_bytes(_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    with pytest.raises(DkimKeyError, match=r"RSA key of 1024 bits: DKIM needs 2048 or more.*mta dkim keygen"):
        DkimKey.load("example.test", "s", str(path))


@pytest.mark.parametrize(("pem", "message"), [
    (_pem(ec.generate_private_key(ec.SECP256R1())), "RSA .* or Ed25519 keys only"),
    (_pem(RSA_2048, encryption=serialization.BestAvailableEncryption(b"pw")), "encrypted: store it without"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM private key"),
    (b"", "not a PEM private key"),
])
def test_unusable_keys_refused(tmp_path: Path, pem: bytes, message: str) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(pem)
    with pytest.raises(DkimKeyError, match=message) as caught:
        DkimKey.load("example.test", "s", str(path))
    assert str(path) in str(caught.value)


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    path = tmp_path / "none.pem"
    with pytest.raises(DkimKeyError, match=f"cannot read the DKIM key {path}.*mta dkim keygen --domain "
                                           f"example.test --selector s --key-file {path}"):
        DkimKey.load("example.test", "s", str(path))


@pytest.mark.parametrize(("domain", "selector"), [("exa mple.test", "s"), ("example.test", "s;h=x"),
                                                   ("example.test", ""), ("-bad.test", "s")])
def test_names_that_cannot_go_in_a_signature(domain: str, selector: str) -> None:
    with pytest.raises(DkimKeyError, match="is not a DNS name"):
        DkimKey.from_pem(domain, selector, _pem(RSA_2048))


def test_covers() -> None:
    key = DkimKey.from_pem("example.test", "s", _pem(RSA_2048))
    assert key.covers("example.test", subdomains=False)
    assert key.covers("EXAMPLE.test.", subdomains=False)
    assert not key.covers("mail.example.test", subdomains=False)
    assert key.covers("mail.example.test", subdomains=True)
    assert not key.covers("badexample.test", subdomains=True)
    assert not key.covers("example.test.evil", subdomains=True)


def test_txt_record_strings_at_most_255_bytes() -> None:
    key = DkimKey.from_pem("example.test", "s", DkimKey.generate("rsa", 4096))
    record = key.txt_record()
    assert record.startswith('s._domainkey.example.test. IN TXT ( "v=DKIM1; k=rsa; p=')
    strings = record.split('"')[1::2]
    assert len(strings) > 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == key.txt_value()
