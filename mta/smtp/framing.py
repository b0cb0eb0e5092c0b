"""Message content framing: DATA's end and dot-stuffing, BDAT's chunks.

    reader = DataReader()                 # the connection's buffer starts with the CRLF that
    end = reader.find_end(buffer)         # ended the DATA command (the first line's start)
    content = reader.take(buffer, end)    # unstuffed, removed from the buffer with the end mark
    reader.drop(buffer)                   # refusing: keep only what may start the end mark

DATA ends only at CRLF.CRLF (SMTP smuggling, CVE-2023-51764 family). One scan
(`bytearray.find(b"\\r\\n.")`, resumed where the last one stopped) finds both the end
and the stuffed lines (a CRLF "." not followed by CRLF), whose dots are left out as
the content is copied out: no second pass. Past MAX_TRACKED_DOTS stuffed lines the
end is searched for directly and the content unstuffed with one replace, so a
message of nothing but dot lines costs C loops, not a Python step and a slice per line.

BDAT (RFC 3030 2): a chunk's octets follow its command whatever we answer, so every
octet is read; a ChunkReader keeps them only while the chunk has no `verdict` (the
reply that refuses it, sent at its end), and holds the transaction's chunks so far.

Pure: no I/O. The buffer is the caller's (a bytearray); the DataReader keeps only
offsets into it, valid until the next take() or drop().
"""

from __future__ import annotations

from typing import Final

from mta.smtp.replies import Reply

END_OF_DATA: Final = b"\r\n.\r\n"
MAX_TRACKED_DOTS: Final = 64  # stuffed lines whose dots are left out while copying


class DataReader:
    __slots__ = ("_scan_from", "_dots")

    def __init__(self) -> None:
        self._scan_from = 0  # where to resume looking for CRLF "."
        self._dots: list[int] = []  # where in the buffer a line starts with a stuffing "."

    def reset(self) -> None:
        self._scan_from = 0
        self._dots.clear()

    def find_end(self, buf: bytearray) -> int:
        """Where CRLF.CRLF starts in `buf`, or -1 (not yet: the next call resumes the scan)."""
        dots = self._dots
        while True:
            if len(dots) < MAX_TRACKED_DOTS:
                hit = buf.find(b"\r\n.", self._scan_from)
                if 0 <= hit and hit + 5 <= len(buf):  # else none yet, or too close to the end to tell
                    if buf[hit + 3: hit + 5] == b"\r\n":
                        return hit
                    dots.append(hit + 2)
                    self._scan_from = hit + 3
                    continue
                self._scan_from = hit if hit >= 0 else max(0, len(buf) - 2)
                return -1
            hit = buf.find(END_OF_DATA, self._scan_from)
            if hit >= 0:
                return hit
            self._scan_from = max(0, len(buf) - 4)
            return -1

    def take(self, buf: bytearray, end: int) -> bytes:
        """The content before `end` (from find_end), unstuffed, in one copy; `buf` loses it and the end mark."""
        content = self._unstuffed(buf, end + 2)
        del buf[: end + 5]
        self.reset()
        return content

    def drop(self, buf: bytearray) -> None:
        """Forget the content read so far, keeping what may be the start of a CRLF.CRLF."""
        del buf[:-4]
        self.reset()

    def _unstuffed(self, buf: bytearray, end: int) -> bytes:
        """`buf` up to `end` without the virtual CRLF and the stuffing dots."""
        dots = self._dots
        with memoryview(buf) as view:
            if len(dots) >= MAX_TRACKED_DOTS:  # many: one replace over it all
                return bytes(view[:end]).replace(b"\r\n.", b"\r\n")[2:]
            if not dots:
                return bytes(view[2:end])
            starts = [2] + [dot + 1 for dot in dots]
            return b"".join([view[start:stop] for start, stop in zip(starts, dots + [end])])


class ChunkReader:
    __slots__ = ("left", "last", "verdict", "size", "_chunks")

    def __init__(self) -> None:
        self.left: int | None = None  # octets of the current chunk still to read; None: no chunk
        self.last = False
        self.verdict: Reply | None = None  # the chunk is read only to be dropped; this answers it
        self.size = 0  # octets kept so far in the transaction
        self._chunks: list[bytes] = []

    def begin(self, size: int, last: bool, verdict: Reply | None) -> None:
        self.left, self.last, self.verdict = size, last, verdict

    def read(self, buf: bytearray) -> int:
        """Take what `buf` holds of the chunk (kept unless there is a verdict); octets still to come."""
        assert self.left is not None
        take = min(self.left, len(buf))
        if self.verdict is None:
            self._chunks.append(bytes(buf[:take]))
            self.size += take
        del buf[:take]
        self.left -= take
        return self.left

    def end(self) -> Reply | None:
        """The chunk is read: its verdict, if it had one."""
        verdict, self.verdict, self.left = self.verdict, None, None
        return verdict

    def content(self) -> bytes:
        return b"".join(self._chunks)  # joined first: a CRLF split across two chunks is no bare CR

    def clear(self) -> None:
        self._chunks = []
        self.size = 0
