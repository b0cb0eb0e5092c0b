"""GroupCommitter over a real LMDB spool: a caller's group of messages is one unit."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mtaqueue import Envelope, NewMessage, QueueFull, Recipient, new_id
from mtaqueue.backend_lmdb import LmdbBackend
from mtaqueue.committer import GroupCommitter

MIB = 1024 * 1024


def message(size: int) -> NewMessage:
    body = b"Subject: x\r\n\r\n" + b"x" * size
    envelope = Envelope(id=new_id(), sender="a@example.org", recipients=[Recipient("b@local.test")],
                        size=len(body), arrival=1000.0, next_attempt=1000.0)
    return NewMessage(envelope, body)


def test_a_group_is_stored_whole_or_not_at_all_and_never_fails_its_neighbours(tmp_path: Path) -> None:
    backend = LmdbBackend(str(tmp_path / "q"), MIB)

    async def run() -> list[BaseException | None]:
        committer = GroupCommitter(backend, asyncio.get_running_loop())
        try:
            # One batch: a small message, a group whose second message does not fit, another small one.
            return await asyncio.gather(committer.commit(small[0]), committer.commit_all(group),
                                        committer.commit(small[1]), return_exceptions=True)
        finally:
            committer.close()

    small = [message(100), message(100)]
    group = (message(100), message(2 * MIB))
    try:
        results = asyncio.run(run())
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], QueueFull)
        stored = {e.id for e in backend.envelopes()}
        assert stored == {small[0].envelope.id, small[1].envelope.id}  # not the group's first either
        ok = (message(100), message(100))

        async def again() -> None:
            committer = GroupCommitter(backend, asyncio.get_running_loop())
            try:
                await committer.commit_all(ok)
            finally:
                committer.close()

        asyncio.run(again())
        assert {m.envelope.id for m in ok} <= {e.id for e in backend.envelopes()}
    finally:
        backend.close()
