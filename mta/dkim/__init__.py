"""DKIM signing (RFC 6376, RFC 8463): our own signer on `cryptography`.

The API the content pipeline calls (cryptography is imported by keys.py and signer.py
only, so the `mta` command line that names `mta dkim keygen` does not load it):
    from mta.dkim.fields import from_domain
    from mta.dkim.keys import DkimKey, DkimKeyError
    from mta.dkim.signer import sign
    key = DkimKey.load(domain, selector, key_file)   # DkimKeyError says what to do
    if (d := from_domain(content)) and key.covers(d, subdomains):
        content = sign(content, key, headers) + content
"""

from typing import Final

ALGORITHMS: Final = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}  # key type -> a=
MIN_RSA_BITS: Final = 2048  # RFC 8301
