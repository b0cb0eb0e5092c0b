"""The admin API's request checks (pure): Host, Origin, Sec-Fetch-Site, token, Content-Type, in that order."""

from workers.control.guard import Guard, host_forms

TOKEN = "t0ken"
GOOD = {b"host": b"127.0.0.1:9025", b"authorization": b"Bearer t0ken"}


def reason(guard: Guard, method: bytes = b"GET", **headers: bytes) -> str | None:
    refusal = guard.check_request(method, {**GOOD, **{k.replace("_", "-").encode(): v for k, v in headers.items()}})
    return refusal.reason if refusal is not None else None


def test_host_forms_are_the_listen_address_and_the_allowed_names_alone_or_with_the_port() -> None:
    assert host_forms("127.0.0.1:9025", ["localhost"]) == {b"127.0.0.1", b"127.0.0.1:9025", b"localhost",
                                                           b"localhost:9025"}
    assert host_forms("[::1]:9025", ["[::2]", "MX.Example"]) == {b"[::1]", b"[::1]:9025", b"[::2]", b"[::2]:9025",
                                                                 b"mx.example", b"mx.example:9025"}
    # A wildcard listener is asked on loopback (mta queue does); other names must be allowed_hosts.
    assert host_forms("0.0.0.0:9025", []) == host_forms("[::]:9025", []) == {
        b"127.0.0.1", b"127.0.0.1:9025", b"[::1]", b"[::1]:9025"}


def test_host_is_checked_first_then_origin_then_the_token_then_the_content_type() -> None:
    guard = Guard("127.0.0.1:9025", ["localhost"], TOKEN)
    assert reason(guard) is None
    assert reason(guard, host=b"LOCALHOST:9025") is None and reason(guard, host=b"127.0.0.1") is None
    for host in (b"", b"evil.example:9025", b"127.0.0.1:9026", b"127.0.0.1:9025.evil.example", b"::1"):
        assert reason(guard, host=host, authorization=b"") == "host", host
    refusal = guard.check_request(b"GET", {**GOOD, b"host": b"evil.example"})
    assert refusal is not None and refusal.status == b"421 Misdirected Request" and refusal.seen == "evil.example"
    assert reason(guard, origin=b"http://127.0.0.1:9025") is None and reason(guard, origin=b"http://localhost") is None
    for origin in (b"http://evil.example", b"https://127.0.0.1:9025", b"http://127.0.0.1:8080", b"null", b"file://"):
        assert reason(guard, origin=origin, authorization=b"") == "origin", origin
    for site in (b"same-origin", b"none"):
        assert reason(guard, sec_fetch_site=site) is None
    for site in (b"cross-site", b"same-site", b""):
        assert reason(guard, sec_fetch_site=site) == "fetch_site", site
    assert reason(guard, authorization=b"bearer t0ken") is None
    assert reason(guard, authorization=b"Bearer  t0ken ") is None
    for wrong in (b"Bearer t0ke", b"Bearer t0kenn", b"Basic t0ken", b"t0ken", b"Bearer"):
        assert reason(guard, authorization=wrong) == "token_wrong", wrong
    refusal = guard.check_request(b"GET", {b"host": b"localhost"})
    assert refusal is not None and refusal.reason == "token_missing" and refusal.status == b"401 Unauthorized"
    assert refusal.headers.startswith(b"WWW-Authenticate: Bearer") and refusal.seen is None
    assert reason(guard, b"POST", content_type=b"application/json") is None
    assert reason(guard, b"POST", content_type=b"Application/JSON; charset=utf-8") is None
    for kind in (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data", b"application/jsonp"):
        assert reason(guard, b"POST", content_type=kind) == "content_type", kind
    assert reason(guard, b"POST") == "content_type"
    assert reason(guard, b"POST", content_type=b"text/plain", authorization=b"") == "token_missing"


def test_a_session_stands_for_the_token_and_changes_need_its_csrf_token() -> None:
    from workers.control.websession import Sessions
    guard = Guard("127.0.0.1:9025", ["localhost"], TOKEN)
    session = Sessions(60).create("ops", 0.0)
    plain = {b"host": b"localhost"}
    assert guard.check_request(b"GET", plain, session) is None
    assert guard.check_request(b"HEAD", plain, session) is None
    json_post = {**plain, b"content-type": b"application/json"}
    for given in (None, b"", session.csrf[:-1].encode(), session.csrf.encode() + b"x", session.id.encode()):
        headers = json_post if given is None else {**json_post, b"x-csrf-token": given}
        refusal = guard.check_request(b"POST", headers, session)
        assert refusal is not None and (refusal.reason, refusal.status) == ("csrf", b"403 Forbidden"), given
    assert guard.check_request(b"POST", {**json_post, b"x-csrf-token": session.csrf.encode()}, session) is None
    # A session never excuses a wrong Bearer token, a foreign origin or a form body.
    assert reason_of(guard.check_request(b"GET", {**plain, b"authorization": b"Bearer nope"}, session)) == "token_wrong"
    assert reason_of(guard.check_request(b"GET", {**plain, b"origin": b"http://evil.example"}, session)) == "origin"
    form = {**plain, b"content-type": b"text/plain", b"x-csrf-token": session.csrf.encode()}
    assert reason_of(guard.check_request(b"POST", form, session)) == "content_type"


def test_over_tls_only_https_origins_are_same_origin() -> None:
    guard = Guard("127.0.0.1:9025", ["localhost"], TOKEN, tls=True)
    assert reason(guard, origin=b"https://127.0.0.1:9025") is None and reason(guard, origin=b"HTTPS://localhost") is None
    assert reason(guard, origin=b"http://127.0.0.1:9025") == "origin"


def test_off_loopback_needs_tls() -> None:
    from workers.control.guard import check_transport
    for client in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", None):
        assert check_transport(client, "127.0.0.1", tls=False) is None, client
    assert check_transport("192.0.2.2", "192.0.2.2", tls=False) is None  # this host, at the listener's address
    for client, local in (("192.0.2.7", "192.0.2.2"), ("192.0.2.7", "0.0.0.0"), ("2001:db8::1", "::"),
                          ("::ffff:192.0.2.7", "::ffff:192.0.2.2"), ("fe80::1%eth0", "fe80::2%eth0")):
        refusal = check_transport(client, local, tls=False)
        assert refusal is not None and refusal.status == b"403 Forbidden" and "tls_cert_file" in refusal.message
        assert check_transport(client, local, tls=True) is None


def reason_of(refusal) -> str | None:  # type: ignore[no-untyped-def]
    return refusal.reason if refusal is not None else None
