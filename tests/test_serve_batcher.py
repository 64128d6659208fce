"""The encoder's micro-batcher when the encoder fails: every waiting request gets a clear answer at
once, and readiness says what happened (the server's 503s come from these exceptions)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from dsmd.serve.batcher import EncoderFailed, EncoderStopped, MicroBatcher


class Die(BaseException):
    """Not an Exception: it gets past the worker's handler and ends its thread."""


def test_an_encoder_that_raises_fails_its_batch_and_is_unready_until_it_succeeds_again():
    calls = []

    def encode(items):
        calls.append(items)
        if any(i == "bad" for i in items):
            raise RuntimeError("onnxruntime: invalid input")
        return np.ones((len(items), 4), np.float32)

    async def main():
        b = MicroBatcher(encode, name="text encoder")
        with pytest.raises(EncoderFailed, match="text encoder failed: RuntimeError: onnxruntime: invalid input"):
            await asyncio.wait_for(b.submit("bad"), 30)
        assert not b.healthy  # /readyz turns 503
        assert (await asyncio.wait_for(b.submit("good"), 30)).shape == (4,)
        assert b.healthy
        b.close()

    asyncio.run(main())
    assert calls == [["bad"], ["good"]]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dying_worker_answers_the_batch_in_its_hands_and_the_queue_at_once():
    inside, release = threading.Event(), threading.Event()

    def encode(items):
        inside.set()
        release.wait(30)
        raise Die

    async def main():
        b = MicroBatcher(encode, name="image encoder", max_batch=1)
        held = asyncio.ensure_future(b.submit("first"))  # taken by the worker, then it dies
        await asyncio.get_running_loop().run_in_executor(None, inside.wait, 30)
        queued = asyncio.ensure_future(b.submit("second"))  # waiting in the queue
        await asyncio.sleep(0)
        release.set()
        for fut in (held, queued):
            with pytest.raises(EncoderStopped, match="image encoder has stopped; the server needs a restart"):
                await asyncio.wait_for(fut, 30)  # answered, not left to its deadline
        assert not b.healthy
        with pytest.raises(EncoderStopped):
            b.submit_nowait("third")  # refused at the door from now on
        b.thread.join(30)  # its exception is reported (and filtered) within this test

    asyncio.run(main())
