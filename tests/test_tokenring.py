"""The last stage's token ring on its own, over a real PUSH/PULL pair."""

import zmq

from kimizmq import wire
from kimizmq.stage import ForwardResult
from kimizmq.tokenring import TokenRing


def test_a_request_s_first_and_last_tokens_go_at_once_and_the_rest_wait_for_the_interval():
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://tokens")
    push.connect("inproc://tokens")
    counters = {"tokens_sampled": 0, "token_messages": 0, "coordinator_not_reading": 0}
    steps: list[wire.Message] = []

    def to_first(step: wire.Message) -> bool:
        steps.append(step)
        return True

    ring = TokenRing(60.0, counters, lambda sock, frames, what: sock.send_multipart(frames), to_first)
    ring.coordinator = push
    try:
        h = {"req": "r", "seq": 0, "offset": 0, "sample": True, "params": {}, "stop_at": 6}
        assert ring.deliver(h, 3, ForwardResult(token=7, logprob=-0.5))  # prompt of 3: position 3
        assert pull.poll(5000)
        first = wire.decode(pull.recv_multipart())
        assert (first.header["seq"], first.header["tokens"]) == (0, [7])

        assert ring.deliver({**h, "seq": 1, "offset": 3}, 1, ForwardResult(token=8, logprob=-0.25))
        assert ring.outbox["r"].tokens == [8] and ring.poll_ms(100) == 100  # gathered: due in a minute
        assert ring.deliver({**h, "seq": 2, "offset": 4}, 1, ForwardResult(token=9, logprob=-0.125))
        assert pull.poll(5000)  # position 5 of stop_at 6: the last token, sent with the one held
        rest = wire.decode(pull.recv_multipart())
        assert (rest.header["seq"], rest.header["tokens"], rest.header["logprobs"]) == (1, [8, 9], [-0.25, -0.125])

        assert [(s.header["seq"], s.header["offset"], s.tensors[0].tolist()) for s in steps] == [
            (1, 3, [[7]]),
            (2, 4, [[8]]),
        ]
        assert counters == {"tokens_sampled": 3, "token_messages": 2, "coordinator_not_reading": 0}
        assert not ring.outbox and not ring.sent_at and ring.poll_ms(100) == 100
    finally:
        pull.close(linger=0)
        push.close(linger=0)
        ctx.term()
