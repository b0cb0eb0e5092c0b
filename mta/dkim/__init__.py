"""DKIM signing (RFC 6376, RFC 8463): our own signer on `cryptography`.

The API the content pipeline calls:
    key = DkimKey.load(domain, selector, key_file)   # DkimKeyError says what to do
    if (d := from_domain(content)) and key.covers(d, subdomains):
        content = sign(content, key, headers) + content
"""

from mta.dkim.fields import DEFAULT_HEADERS, from_domain
from mta.dkim.keys import DkimKey, DkimKeyError
from mta.dkim.signer import sign

__all__ = ["DEFAULT_HEADERS", "DkimKey", "DkimKeyError", "from_domain", "sign"]
