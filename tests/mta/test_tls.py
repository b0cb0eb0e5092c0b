"""mta/tls.py: the server context, and errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import TlsConfig
from mta.tls import TlsError, server_context
from tests.integration.tlscerts import make_pki


def test_no_certificate_means_no_context() -> None:
    assert server_context(TlsConfig()) is None


def test_a_good_pair_gives_a_tls12_plus_context(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    context = server_context(TlsConfig(cert_file=str(pki.cert), key_file=str(pki.key)))
    assert context is not None and context.minimum_version.name == "TLSv1_2"
    strict = server_context(TlsConfig(cert_file=str(pki.cert), key_file=str(pki.key), min_version="TLSv1.3"))
    assert strict is not None and strict.minimum_version.name == "TLSv1_3"


@pytest.mark.parametrize(("which", "message"), [
    ("missing_cert", "[tls] cert_file {d}/nope.pem: no such file"),
    ("missing_key", "[tls] key_file {d}/nope.key: no such file"),
    ("broken_key", "not a matching PEM certificate chain and private key"),
    ("other_key", "not a matching PEM certificate chain and private key"),
])
def test_errors_name_the_file(tmp_path: Path, which: str, message: str) -> None:
    pki = make_pki(tmp_path / "a")
    other = make_pki(tmp_path / "b")
    broken = tmp_path / "broken.key"
    broken.write_text("not a key\n")
    cert, key = {"missing_cert": (tmp_path / "nope.pem", pki.key), "missing_key": (pki.cert, tmp_path / "nope.key"),
                 "broken_key": (pki.cert, broken), "other_key": (pki.cert, other.key)}[which]
    with pytest.raises(TlsError) as caught:
        server_context(TlsConfig(cert_file=str(cert), key_file=str(key)))
    assert message.format(d=tmp_path) in str(caught.value)
