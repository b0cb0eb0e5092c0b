"""The server side of TLS: one SSLContext from [tls], for STARTTLS and implicit TLS, and
one from [control] tls_cert_file / tls_key_file for the control listener (HTTPS).

Modern defaults: TLS 1.2 at least (or 1.3 by [tls] min_version), OpenSSL's default
cipher list at security level 2 (forward-secret AEAD suites first), no compression,
no renegotiation, server cipher preference. No client certificates are requested.

`server_context` raises TlsError with the file and what is wrong, so the master can
refuse to start (or keep the running configuration on SIGHUP) with a useful message
before any worker tries the certificate.
"""

from __future__ import annotations

import ssl

from mta.config import ControlConfig, TlsConfig


class TlsError(ValueError):
    """The certificate or key is unusable; the message says which file and why."""


def server_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The context for inbound TLS, or None when no certificate is configured."""
    if not tls.cert_file:
        return None
    return _context("[tls] ", tls.cert_file, tls.key_file, tls.min_version)


def control_context(control: ControlConfig) -> ssl.SSLContext | None:
    """The context of the control listener (HTTPS), or None when it has no certificate."""
    if not control.tls_cert_file:
        return None
    return _context("[control] tls_", control.tls_cert_file, control.tls_key_file, "TLSv1.2")


def _context(prefix: str, cert_file: str, key_file: str, min_version: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.verify_mode = ssl.CERT_NONE
    for key, path in (("cert_file", cert_file), ("key_file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            raise TlsError(f"{prefix}{key} {path}: no such file") from None
        except PermissionError:
            raise TlsError(f"{prefix}{key} {path}: permission denied (mta reads it as the user it runs as)") from None
        except OSError as exc:
            raise TlsError(f"{prefix}{key} {path}: {exc.strerror}") from None
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TlsError(f"{prefix}cert_file {cert_file} / {prefix}key_file {key_file}: not a matching PEM "
                       f"certificate chain and private key ({exc.reason or exc})") from None
    return context


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """'TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)' for Received and logs."""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    if cipher is None:
        return ssl_object.version() or ""
    name, _, bits = cipher
    return f"{ssl_object.version()} with cipher {name} ({bits}/{bits} bits)"
