"""The control process: /metrics across processes, /healthz, /readyz during a drain."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import MtaServer, SmtpClient, queued_id, wait_until
from tests.integration.sink import SmtpSink
from tests.integration.test_delivery import delivering, mailbox, message, send_all

pytestmark = pytest.mark.integration


def control_url(server: MtaServer, path: str) -> str:
    assert server.config_path is not None
    listen = re.search(r'listen = "([^"]+)"', server.config_path.read_text())
    assert listen is not None
    return f"http://{listen.group(1)}{path}"


def get(server: MtaServer, path: str) -> tuple[int, str]:
    """(status, body); (0, why) while nothing listens yet (the control process is still starting)."""
    try:
        with urllib.request.urlopen(control_url(server, path), timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return 0, str(exc.reason)
        raise
    except (http.client.RemoteDisconnected, ConnectionResetError) as exc:
        # The control process was (re)starting: on a loaded machine the master may restart
        # it (heartbeat) just as a test scrapes; callers wait_until a real answer.
        return 0, f"{type(exc).__name__}: {exc}"


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` that carry `labels` (other labels summed over)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_counters_match_what_happened(mta_server, tmp_path: Path) -> None:
    with SmtpSink("127.0.0.2") as sink:
        server = delivering(mta_server, tmp_path, {"remote.test": f"{sink.address}:{sink.port}"},
                            delivery={"min_backoff_seconds": 3600, "max_backoff_seconds": 7200})
        mailbox(tmp_path, "local.test", "sender")
        wait_until(lambda: get(server, "/healthz")[0] == 200, 10, "the control process", server)
        asyncio.run(send_all(server.port, [
            ("sender@local.test", [f"ok{n}@remote.test"], message(n)) for n in range(4)] + [
            ("sender@local.test", ["r450-a@remote.test", "r550-b@remote.test"], message(9))]))

        async def refused() -> None:
            client = await SmtpClient.connect(server.port)
            await client.command("MAIL FROM:<x@client.test>")
            assert (await client.command("RCPT TO:<nobody@local.test>")).code == 550  # no such mailbox
            await client.close()
        asyncio.run(refused())
        wait_until(lambda: sample(get(server, "/metrics")[1], "mta_delivery_recipients_total", result="delivered") >= 5,
                   15, "the outcomes", server)
        text = get(server, "/metrics")[1]
        listener = f"127.0.0.1:{server.port}"
        # 5 injected + 1 bounce to the local sender (bounces are not counted as inbound)
        assert sample(text, "mta_inbound_messages_total", listener=listener) == 5
        assert sample(text, "mta_inbound_rejected_total", reason="user_unknown", code="5xx") == 1
        assert sample(text, "mta_delivery_recipients_total", result="delivered") == 4 + 1  # + the DSN to Maildir
        assert sample(text, "mta_delivery_recipients_total", result="deferred") == 1
        assert sample(text, "mta_delivery_recipients_total", result="bounced") == 1
        assert sample(text, "mta_scheduler_bounces_total") == 1
        assert sample(text, "mta_queue_commit_seconds_count") >= 1
        assert sample(text, "mta_delivery_latency_seconds_count") == 5
        assert sample(text, "mta_master_children", kind="inbound", state="ready") == 1
        assert sample(text, "mta_master_children", kind="delivery", state="ready") == 1
        wait_until(lambda: sample(get(server, "/metrics")[1], "mta_queue_recipients", state="deferred") == 1,
                   10, "the queue gauges", server)
        text = get(server, "/metrics")[1]
        assert sample(text, "mta_queue_messages") == 1  # the one with the deferred recipient
        assert sample(text, "mta_queue_stored_bytes") > 0
        assert sample(text, "mta_inbound_active_sessions") == 0
        # Bytes in = what reached the sink (4 messages, stored bytes relayed as they are) + what waits.
        relayed = sum(len(m.data) for m in sink.messages if m.recipients[0].startswith("ok"))
        queued = sum(m["size"] for m in server.queue_list())
        assert sample(text, "mta_inbound_bytes_total", listener=listener) == relayed + queued
        assert 0 < sample(text, "mta_queue_map_used_bytes") < sample(text, "mta_queue_map_bytes")
        assert sample(text, "mta_cache_entries", namespace="dns") == 0  # routes only: no DNS asked
        assert sample(text, "mta_cache_entries", namespace="auth") == 0


def test_readyz_is_false_during_a_drain_and_restarts_do_not_grow_the_directory(mta_server) -> None:
    server = mta_server(server={"inbound_workers": 2, "drain_timeout_seconds": 30})
    wait_until(lambda: get(server, "/readyz") == (200, "ready\n"), 10, "ready", server)
    metrics_dir = Path(re.search(r'metrics_dir = "([^"]+)"', server.config_path.read_text()).group(1))  # type: ignore[union-attr]
    from tests.integration.test_master import inbound_workers
    listener = f"127.0.0.1:{server.port}"
    seen, sizes = [], []

    async def one() -> None:
        client = await SmtpClient.connect(server.port)
        assert queued_id(await client.send_mail("a@client.test", ["u@local.test"], b"Subject: r\r\n\r\nx\r\n"))
        await client.close()

    for _ in range(20):  # kill and replace: dead processes' counters merge into one file
        asyncio.run(one())
        time.sleep(1.1)  # older than the crash-at-start window: replaced at once, no back-off
        victim = min(inbound_workers(server.master_pid))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in inbound_workers(server.master_pid)
                   and len(inbound_workers(server.master_pid)) == 2, 10, "a replacement", server)
        seen.append(sample(get(server, "/metrics")[1], "mta_inbound_messages_total", listener=listener))
        sizes.append(len(list(metrics_dir.iterdir())))
    assert seen == sorted(seen) and seen[-1] == 20, seen  # monotonic, nothing lost with the dead
    assert max(sizes[5:]) <= max(sizes[:5]), sizes  # the directory does not grow with restarts
    pids = {int(m) for m in re.findall(r"_(\d+)\.db$", "\n".join(p.name for p in metrics_dir.iterdir()), re.M)}
    live = set(inbound_workers(server.master_pid)) | {server.master_pid}
    from tests.integration.test_master import children_of
    live |= set(children_of(server.master_pid))
    assert pids <= live, (pids - live)  # only live processes have files of their own

    async def hold_a_transaction() -> None:
        client = await SmtpClient.connect(server.port)
        await client.command("MAIL FROM:<a@client.test>")
        await client.command("RCPT TO:<u@local.test>")
        assert (await client.command("DATA")).code == 354
        os.kill(server.master_pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        status = get(server, "/readyz")
        client.writer.write(b"Subject: finished during the drain\r\n\r\nx\r\n.\r\n")
        reply = await client.read_reply()
        client.writer.close()
        assert status == (503, "draining\n")
        assert queued_id(reply) is not None

    asyncio.run(hold_a_transaction())
    assert server.proc is not None
    assert server.proc.wait(15) == 0


def test_a_scrape_that_meets_a_damaged_metrics_file_gets_an_answer_and_the_next_one_works(mta_server) -> None:
    # A file whose header claims more than it holds (disk damage, a hand edit): the scrape
    # answers 500 at once naming the file (it used to leave the connection open until
    # Prometheus timed out), the control process stays up, and scrapes work again once
    # the file is gone.
    server = mta_server()
    wait_until(lambda: get(server, "/healthz")[0] == 200, 10, "the control process", server)
    metrics_dir = Path(re.search(r'metrics_dir = "([^"]+)"', server.config_path.read_text()).group(1))  # type: ignore[union-attr]
    damaged = metrics_dir / "counter_999999.db"
    damaged.write_bytes((1 << 20).to_bytes(4, "little") + bytes(4))
    started = time.monotonic()
    status, body = get(server, "/metrics")
    assert status == 500 and f"metrics unavailable: {damaged} is damaged" in body and "remove it" in body
    assert time.monotonic() - started < 4  # answered, not left to the client's timeout
    assert get(server, "/healthz")[0] == 200
    damaged.unlink()
    status, body = get(server, "/metrics")
    assert status == 200 and "mta_inbound_connections_total" in body


def test_json_logs_carry_the_message_id_through_its_life(mta_server) -> None:
    server = mta_server(log={"format": "json"})

    async def one() -> str:
        client = await SmtpClient.connect(server.port)
        reply = await client.send_mail("a@client.test", ["u@local.test"], b"Subject: j\r\n\r\nx\r\n")
        await client.close()
        msgid = queued_id(reply)
        assert msgid is not None
        return msgid

    msgid = asyncio.run(one())
    server.stop()
    import json
    records = [json.loads(line) for line in server.log_bytes().decode().splitlines() if line.strip()]
    procs = {r["proc"] for r in records}
    assert "master" in procs and any(p.startswith("inbound#") for p in procs), procs
    [received] = [r for r in records if r["event"] == "received"]
    assert received["msgid"] == msgid and received["client"] == "127.0.0.1"


def test_admin_api_needs_the_token_and_acts_on_the_queue(mta_server) -> None:
    server = mta_server(control={"token": "s3cret"})
    auth = {"Authorization": "Bearer s3cret"}

    def call(method: str, path: str, body: object | None = None, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        import json as jsonlib
        data = jsonlib.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(control_url(server, path), data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, jsonlib.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, jsonlib.loads(exc.read())

    wait_until(lambda: get(server, "/healthz")[0] == 200, 10, "the control process", server)

    async def two() -> list[str]:
        client = await SmtpClient.connect(server.port)
        ids = []
        for rcpt in ("a@local.test", "b@local.test"):
            reply = await client.send_mail("s@client.test", [rcpt], b"Subject: api\r\n\r\nx\r\n")
            ids.append(queued_id(reply))
        await client.close()
        return ids  # type: ignore[return-value]

    first, second = asyncio.run(two())
    assert call("GET", "/api/queue")[0] == 401
    assert call("GET", "/api/queue", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, listing = call("GET", "/api/queue", headers=auth)
    assert status == 200 and sorted(e["id"] for e in listing) == sorted([first, second])
    assert call("GET", f"/api/queue/{first}", headers=auth)[1]["recipients"][0]["address"] == "a@local.test"
    assert call("GET", "/api/queue/00000000000000000000Z", headers=auth)[0] == 404
    assert call("GET", "/api/domains", headers=auth)[1] == {"local.test": {"ready": 2}}
    assert call("POST", "/api/queue/hold", {"ids": [first]}, auth) == (200, {"op": "hold", "count": 1})
    assert [r["state"] for r in call("GET", f"/api/queue/{first}", headers=auth)[1]["recipients"]] == ["held"]
    assert call("POST", "/api/queue/delete", {}, auth)[0] == 400
    assert call("POST", "/api/queue/delete", {"domain": "local.test"}, auth) == (200, {"op": "delete", "count": 2})
    assert server.queue_list() == []
    assert get(server, "/metrics")[0] == 200  # scrapes need no token


def test_queue_commands_go_through_the_admin_api_and_work_with_the_server_stopped(mta_server, tmp_path: Path) -> None:
    from tests.integration.conftest import run_mta

    server = mta_server(control={"token": "s3cret"})  # [delivery] workers = 0: mail stays queued
    wait_until(lambda: get(server, "/healthz")[0] == 200, 10, "the control process", server)

    async def two() -> list[str]:
        client = await SmtpClient.connect(server.port)
        ids = [queued_id(await client.send_mail("s@client.test", [rcpt], b"Subject: cli\r\n\r\nx\r\n"))
               for rcpt in ("a@local.test", "b@local.test")]
        await client.close()
        return ids  # type: ignore[return-value]

    first, second = asyncio.run(two())
    assert server.mta("queue", "hold", first).stdout == b"hold: 1 message(s) (applied by the running scheduler)\n"
    # The control process logs a request after answering it: wait for the line.
    wait_until(lambda: re.search(rb"proc=control .*event=api method=POST path=/api/queue/hold status=200 "
                                 rb"client=127.0.0.1", server.log_bytes()), 5, "the API log line", server)
    running = [server.mta("queue", "list").stdout, server.mta("queue", "list", "--json").stdout,
               server.mta("queue", "show", first).stdout, server.queue_body(first)]
    for path in (b"/api/queue", b"/api/queue/" + first.encode(), b"/api/queue/" + first.encode() + b"/body"):
        pattern = rb"event=api method=GET path=" + re.escape(path) + rb" status=200"
        wait_until(lambda: re.search(pattern, server.log_bytes()), 5, f"the API log line for {path!r}", server)
    assert [r["state"] for e in json.loads(running[1]) for r in e["recipients"]] == ["held", "ready"]
    missing = server.mta("queue", "show", "0" * 21, check=False)
    assert missing.returncode == 1 and b"no message" in missing.stderr

    assert server.config_path is not None
    config = server.config_path.read_text()
    for name, text in (("wrong", config.replace('token = "s3cret"', 'token = "nope"')),
                       ("none", config.replace('token = "s3cret"', ""))):
        other = tmp_path / f"{name}.toml"
        other.write_text(text)
        for args in (("release", first), ("list",)):
            done = run_mta("queue", *args, "-c", str(other), check=False)
            assert done.returncode == 1 and b"[control] token" in done.stderr, done.stderr
    assert [r["state"] for e in server.queue_list() for r in e["recipients"]] == ["held", "ready"]  # unchanged

    server.stop()
    stopped = [server.mta("queue", "list").stdout, server.mta("queue", "list", "--json").stdout,
               server.mta("queue", "show", first).stdout, server.queue_body(first)]
    assert stopped == running  # the same output whichever way it was read
    done = server.mta("queue", "release", first, second)
    assert done.stdout == b"release: 2 message(s) (server not running: applied to the spool)\n"
    assert [r["state"] for e in server.queue_list() for r in e["recipients"]] == ["ready", "ready"]
