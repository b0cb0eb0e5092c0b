"""Event log lines: key=value quoting and the JSON format."""

import io
import json
import sys

from mta import logs


def capture(fmt: str, **fields: object) -> str:
    out = io.StringIO()
    logs.setup("test", stream=out)
    logs.set_format(fmt)
    try:
        logs.event("received", **fields)
    finally:
        logs.set_format("keyvalue")
        logs.setup("test", stream=sys.stderr)
    return out.getvalue()


def test_keyvalue_quotes_what_would_split_and_skips_none() -> None:
    line = capture("keyvalue", msgid="ABC", reply='550 5.1.1 "no" such=user', size=10, gone=None)
    assert line.endswith(' msgid=ABC reply="550 5.1.1 \\"no\\" such=user" size=10\n')
    assert "gone" not in line and "event=received" in line


def test_json_is_one_object_per_line() -> None:
    line = capture("json", msgid="ABC", reply="250 ok\nsecond", size=10, gone=None)
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record["event"] == "received" and record["msgid"] == "ABC" and record["size"] == 10
    assert record["reply"] == "250 ok\nsecond" and "gone" not in record and record["proc"] == "test"
