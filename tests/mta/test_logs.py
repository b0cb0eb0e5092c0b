"""Event log lines: key=value quoting and the JSON format."""

import io
import json
import re
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

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


def split_fields(line: str) -> dict[str, str]:
    """What a logfmt reader does: split on spaces outside double quotes, undo the escapes."""
    out = {}
    for key, quoted, bare in re.findall(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|(\S*))(?= |\n)', line):
        out[key] = re.sub(r'\\(["\\])', r"\1", quoted) if quoted else bare
    return out


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(" '\"=\\\\ab\n\x7fé"), max_size=12) | st.text(max_size=40))
def test_keyvalue_any_value_reads_back_as_one_field(value: str) -> None:
    line = capture("keyvalue", reply=value, size=1)
    assert line.count("\n") == 1 and line.endswith(" size=1\n")
    fields = split_fields(line)
    assert set(fields) == {"ts", "proc", "pid", "event", "reply", "size"}
    printable = all(c.isprintable() for c in value)
    if printable:
        assert fields["reply"] == value
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["ts"])
