"""frames.StreamFrameReader: the frames of a stream, however its bytes arrive, in order;
what is not a message is refused only after the frames before it."""

from __future__ import annotations

import asyncio
import struct

from mta import frames, messages

DONE = [messages.Done(1, n, ((0, 250, "2.0.0", "ok"),), "mx.test[127.0.0.9]:25") for n in range(40)]
NEW = messages.New(tuple(f"{n:021X}" for n in range(3000)))  # a New of thousands of ids: ~75 KB


def read_all(chunks: list[bytes], eof: bool = True) -> tuple[list[list[messages.Message]], BaseException | None]:
    """Feed `chunks` one at a time, reading after each; the bursts read and the error that ended them."""
    async def main() -> tuple[list[list[messages.Message]], BaseException | None]:
        reader = asyncio.StreamReader()
        incoming = frames.StreamFrameReader(reader)
        bursts: list[list[messages.Message]] = []
        try:
            for chunk in chunks:
                reader.feed_data(chunk)
                bursts.append(await incoming.read() or [])
            if eof:
                reader.feed_eof()
                while (burst := await incoming.read()) is not None:
                    bursts.append(burst)
        except (messages.MessageError, asyncio.IncompleteReadError) as exc:
            return bursts, exc
        return bursts, None

    return asyncio.run(main())


def test_frames_come_whole_and_in_order_however_the_bytes_are_cut() -> None:
    wire = b"".join(frames.encode_stream_frame(m) for m in [*DONE[:20], NEW, *DONE[20:]])
    async def fed_at_once(chunks: list[bytes]) -> list[messages.Message]:
        reader = asyncio.StreamReader()
        incoming = frames.StreamFrameReader(reader)
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        got: list[messages.Message] = []
        while (burst := await incoming.read()) is not None:
            assert burst
            got += burst
        return got

    for size in (1, 3, 7, 100, 4096, len(wire)):
        chunks = [wire[i:i + size] for i in range(0, len(wire), size)]
        assert asyncio.run(fed_at_once(chunks)) == [*DONE[:20], NEW, *DONE[20:]], size
    bursts, error = read_all([wire])
    assert error is None and bursts == [[*DONE[:20], NEW, *DONE[20:]]]  # one await for all that was there


def test_the_frames_before_one_that_is_not_a_message_are_handled_first() -> None:
    bad = struct.pack(">I", 3) + b"\xc1\xc1\xc1"  # not msgpack
    wire = b"".join(frames.encode_stream_frame(m) for m in DONE[:3]) + bad + frames.encode_stream_frame(DONE[3])
    bursts, error = read_all([wire])
    assert bursts == [DONE[:3]] and isinstance(error, messages.MessageError) and "not msgpack" in str(error)
    bursts, error = read_all([bad + frames.encode_stream_frame(DONE[3])])
    assert bursts == [] and isinstance(error, messages.MessageError)


def test_a_frame_over_the_limit_is_refused_from_its_length_alone() -> None:
    head = struct.pack(">I", frames.MAX_STREAM_FRAME_BYTES + 1)
    bursts, error = read_all([frames.encode_stream_frame(DONE[0]) + head + b"x"])
    assert bursts == [[DONE[0]]] and isinstance(error, messages.MessageError) and "limit" in str(error)
    bursts, error = read_all([head + b"x"], eof=False)
    assert bursts == [] and isinstance(error, messages.MessageError) and "limit" in str(error)


def test_eof_inside_a_frame_is_an_incomplete_read_and_between_frames_the_end() -> None:
    wire = frames.encode_stream_frame(DONE[0])
    bursts, error = read_all([wire + wire[:5]])
    assert bursts == [[DONE[0]]] and isinstance(error, asyncio.IncompleteReadError)
    assert read_all([wire + wire]) == ([[DONE[0], DONE[0]]], None)
    assert read_all([]) == ([], None)
