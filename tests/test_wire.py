"""kimizmq.wire: every dtype and shape round-trips; every malformed input is refused."""

from __future__ import annotations

import contextlib
from unittest import mock

import mlx.core as mx
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimizmq import wire
from kimizmq.wire import WireError, decode, encode

FORWARD = {
    "req": "r-1",
    "seq": 3,
    "offset": 0,
    "sample": True,
    "params": {"temperature": 0.7},
}
ALL_DTYPES = list(wire.DTYPES)
RECV_TIMEOUT_MS = 5000


def blob_kind():
    """A test-only kind carrying one tensor of any dtype and shape."""
    return mock.patch.dict(wire.SCHEMAS, {"blob": wire.Schema({}, tensors=1)})


def random_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    if dtype == "bfloat16":
        words = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        return mx.array(words).view(mx.bfloat16)
    np_dtype = wire.DTYPES[dtype][1]
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        return mx.array(rng.integers(info.min, info.max, size=shape, dtype=np_dtype, endpoint=True))
    return mx.array(rng.standard_normal(shape).astype(np_dtype))


def bits(a: mx.array) -> np.ndarray:
    """The array's raw words, so NaNs and bfloat16 compare bit for bit."""
    words = {2: mx.uint16, 4: mx.uint32}[a.dtype.size]
    return np.array(a.view(words))


def assert_same(a: mx.array, b: mx.array) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    np.testing.assert_array_equal(bits(a), bits(b))


def raw(head: dict, *frames: bytes) -> list[bytes]:
    return [msgpack.packb(head), *frames]


def forward_head(**changes) -> dict:
    head = {"v": wire.PROTOCOL_VERSION, "kind": "forward", **FORWARD}
    head["tensors"] = [{"dtype": "int32", "shape": [1, 4]}]
    head.update(changes)
    return head


TOKENS = np.arange(4, dtype=np.int32).tobytes()


def tokens_head(**changes) -> dict:
    head = {"v": wire.PROTOCOL_VERSION, "kind": "tokens", "req": "r", "seq": 0, "tokens": [1], "logprobs": [-0.5]}
    return {**head, "tensors": [], **changes}


# ---- round trips -----------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (0,), (2, 0, 3), (1, 5, 8), (2, 3, 4, 5), (1, 0)])
def test_every_dtype_and_shape_round_trips_bit_exact(dtype, shape):
    x = random_array(dtype, shape)
    with blob_kind():
        msg = decode(encode("blob", {}, [x]))
    assert msg.kind == "blob"
    assert msg.header == {}
    assert_same(msg.tensors[0], x)


@pytest.mark.parametrize(
    "tensor",
    [
        mx.array([[1, 2, 3, 151000]], dtype=mx.int32),
        random_array("float32", (1, 7, 16)),
        random_array("float16", (1, 7, 16)),
        random_array("bfloat16", (1, 7, 16)),
    ],
    ids=["token-ids", "float32", "float16", "bfloat16"],
)
def test_forward_round_trips_header_and_tensor(tensor):
    msg = decode(encode("forward", FORWARD, [tensor]))
    assert msg.kind == "forward"
    assert msg.header == FORWARD
    assert_same(msg.tensors[0], tensor)


def test_forward_carries_the_ring_fields():
    ring = {**FORWARD, "stop_at": 160, "eos": [163585, 163586]}
    ids = mx.array([[7]], dtype=mx.int32)
    assert decode(encode("forward", ring, [ids])).header == ring


@pytest.mark.parametrize(
    "fields",
    [
        {"stop_at": -1},
        {"stop_at": 2.5},
        {"eos": [1, -2]},
        {"eos": [1, "2"]},
        {"eos": [True]},
        {"eos": list(range(wire.MAX_ID_LIST + 1))},
        {"eos": 5},
    ],
    ids=["negative-stop", "float-stop", "negative-eos", "str-eos", "bool-eos", "long-eos", "eos-not-list"],
)
def test_bad_ring_fields_are_refused_both_ways(fields):
    ids = mx.array([[7]], dtype=mx.int32)
    with pytest.raises(WireError):
        encode("forward", {**FORWARD, **fields}, [ids])
    frames = encode("forward", FORWARD, [ids])
    head = msgpack.unpackb(frames[0])
    with pytest.raises(WireError):
        decode([msgpack.packb({**head, **fields}), *frames[1:]])


def test_bfloat16_special_values_survive_bit_exact():
    words = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x3F80, 0xFFFF], np.uint16)
    x = mx.array(words).view(mx.bfloat16)
    with blob_kind():
        y = decode(encode("blob", {}, [x])).tensors[0]
    assert y.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(y.view(mx.uint16)), words)


def test_strided_and_lazy_tensors_are_sent_in_c_order():
    base = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4)
    strided = mx.transpose(base, (2, 0, 1))[None][:, ::2]
    with blob_kind():
        y = decode(encode("blob", {}, [strided])).tensors[0]
    np.testing.assert_array_equal(np.array(y), np.array(strided))


@pytest.mark.parametrize(
    ("kind", "header"),
    [
        ("release", {"req": "r-1"}),
        ("tokens", {"req": "r-1", "seq": 9, "tokens": [42], "logprobs": [-0.25]}),
        (
            "tokens",
            {
                "req": "r",
                "seq": 0,
                "tokens": [0, 7],
                "logprobs": [float("-inf"), -0.5],
                "top_logprobs": [[[1, -0.5]], [[7, -0.5], [2, -1.5]]],
            },
        ),
        ("error", {"req": "r-1", "message": "stage 2 ran out of memory"}),
        ("command", {"cmd": "load", "id": "c1"}),
        (
            "command",
            {"cmd": "load", "id": "c1", "args": {"layers": [0, 44], "model": "/m"}},
        ),
        ("reply", {"id": "c1", "ok": True}),
        ("reply", {"id": "", "ok": False, "error": "bad message: unknown kind"}),
        ("reply", {"id": "c1", "ok": False, "error": "no such model", "result": {}}),
    ],
)
def test_tensorless_kinds_round_trip(kind, header):
    msg = decode(encode(kind, header))
    assert (msg.kind, msg.header, msg.tensors) == (kind, header, [])


def test_decode_accepts_bytearray_memoryview_and_zmq_frames():
    frames = encode("forward", FORWARD, [mx.array([[5, 6, 7, 8]], dtype=mx.int32)])
    shifted = memoryview(b"\x00" + bytes(frames[1]))[1:]  # unaligned buffer
    for parts in (
        [bytes(f) for f in frames],
        [bytearray(f) for f in frames],
        [frames[0], shifted],
        [zmq.Frame(bytes(f)) for f in frames],
    ):
        msg = decode(parts)
        assert msg.tensors[0].tolist() == [[5, 6, 7, 8]]


@pytest.mark.parametrize("copy", [True, False], ids=["bytes", "zmq-frames"])
def test_push_pull_round_trip_over_tcp(copy):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        acts = random_array("bfloat16", (1, 33, 64), seed=7)
        push.send_multipart(encode("forward", FORWARD, [acts]), copy=copy)
        assert pull.poll(RECV_TIMEOUT_MS), "no message within the deadline"
        msg = decode(pull.recv_multipart(copy=copy))
        assert msg.header == FORWARD
        assert_same(msg.tensors[0], acts)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


# ---- malformed input: each refused with WireError ---------------------------


MALFORMED = {
    "no frames": [],
    "not a frame list": b"\x80",
    "frame not bytes-like": ["header"],
    "bad msgpack bytes": [b"\xc1\xc1"],
    "truncated msgpack": [msgpack.packb(forward_head())[:-3], TOKENS],
    "trailing bytes after header": [msgpack.packb(forward_head()) + b"\x00", TOKENS],
    "header not a map": [msgpack.packb([1, "forward"]), TOKENS],
    "header a bare int": [msgpack.packb(7)],
    "int map keys": [msgpack.packb({1: 2})],
    "bin map keys": [msgpack.packb({b"v": 1})],
    "invalid utf-8 string": [b"\x81\xa1v\xa2\xff\xfe"],
    "ext type": [msgpack.packb({"v": wire.PROTOCOL_VERSION, "kind": msgpack.ExtType(5, b"x")})],
    "deep nesting": [b"\x81\xa1v" + b"\x91" * 5000 + b"\xc0"],
    "oversized header": raw({**forward_head(), "params": {"x": "a" * wire.MAX_HEADER_BYTES}}, TOKENS),
    "missing v": raw({k: v for k, v in forward_head().items() if k != "v"}, TOKENS),
    "older version": raw(forward_head(v=wire.PROTOCOL_VERSION - 1), TOKENS),
    "newer version": raw(forward_head(v=wire.PROTOCOL_VERSION + 1), TOKENS),
    "version as bool": raw(forward_head(v=True), TOKENS),
    "version as string": raw(forward_head(v="1"), TOKENS),
    "missing kind": raw({k: v for k, v in forward_head().items() if k != "kind"}, TOKENS),
    "unknown kind": raw(forward_head(kind="launch"), TOKENS),
    "kind not a str": raw(forward_head(kind=["forward"]), TOKENS),
    "missing req": raw({k: v for k, v in forward_head().items() if k != "req"}, TOKENS),
    "missing params": raw({k: v for k, v in forward_head().items() if k != "params"}, TOKENS),
    "unknown field": raw(forward_head(extra=1), TOKENS),
    "req not a str": raw(forward_head(req=17), TOKENS),
    "req as bytes": raw(forward_head(req=b"r-1"), TOKENS),
    "huge req": raw(forward_head(req="r" * (wire.MAX_ID_CHARS + 1)), TOKENS),
    "60 kB req": raw(forward_head(req="r" * 60_000), TOKENS),
    "seq as bool": raw(forward_head(seq=True), TOKENS),
    "seq as float": raw(forward_head(seq=1.0), TOKENS),
    "negative seq": raw(forward_head(seq=-1), TOKENS),
    "offset as str": raw(forward_head(offset="0"), TOKENS),
    "sample as int": raw(forward_head(sample=1), TOKENS),
    "params a list": raw(forward_head(params=[]), TOKENS),
    "params with int keys": raw(forward_head(params={1: 2}), TOKENS),
    "token as bool": raw(tokens_head(tokens=[False])),
    "tokens not a list": raw(tokens_head(tokens=1)),
    "negative token": raw(tokens_head(tokens=[-1])),
    "too many tokens": raw(tokens_head(tokens=[1] * (wire.MAX_ID_LIST + 1))),
    "logprobs not a list": raw(tokens_head(logprobs=-0.5)),
    "old single token": raw(tokens_head(token=1)),
    "optional field wrong type": raw(
        {"v": wire.PROTOCOL_VERSION, "kind": "reply", "id": "c", "ok": True, "error": None, "tensors": []}
    ),
    "command id too long": raw(
        {"v": wire.PROTOCOL_VERSION, "kind": "command", "cmd": "load", "id": "i" * 1000, "tensors": []}
    ),
    "missing tensors list": raw({k: v for k, v in forward_head().items() if k != "tensors"}, TOKENS),
    "tensors not a list": raw(forward_head(tensors={"dtype": "int32", "shape": [1, 4]}), TOKENS),
    "too few frames": raw(forward_head()),
    "too many frames": raw(forward_head(), TOKENS, TOKENS),
    "too many descriptors": raw(forward_head(tensors=[{"dtype": "int32", "shape": [1, 4]}] * 2), TOKENS, TOKENS),
    "tensor on a tensorless kind": raw(
        {"v": wire.PROTOCOL_VERSION, "kind": "release", "req": "r", "tensors": []}, TOKENS
    ),
    "descriptor not a map": raw(forward_head(tensors=["int32"]), TOKENS),
    "descriptor extra key": raw(forward_head(tensors=[{"dtype": "int32", "shape": [1, 4], "x": 0}]), TOKENS),
    "unknown dtype": raw(forward_head(tensors=[{"dtype": "float64", "shape": [1, 2]}]), TOKENS),
    "dtype not a str": raw(forward_head(tensors=[{"dtype": ["int32"], "shape": [1, 4]}]), TOKENS),
    "shape not a list": raw(forward_head(tensors=[{"dtype": "int32", "shape": 4}]), TOKENS),
    "negative dim": raw(forward_head(tensors=[{"dtype": "int32", "shape": [-1, 4]}]), TOKENS),
    "bool dim": raw(forward_head(tensors=[{"dtype": "int32", "shape": [True, 4]}]), TOKENS),
    "float dim": raw(forward_head(tensors=[{"dtype": "int32", "shape": [1.0, 4]}]), TOKENS),
    "dim over 32 bits": raw(forward_head(tensors=[{"dtype": "int32", "shape": [2**31, 0]}]), b""),
    "too many dims": raw(forward_head(tensors=[{"dtype": "float32", "shape": [1, 1, 1, 1, 4]}]), TOKENS),
    "forward tokens not int32": raw(forward_head(tensors=[{"dtype": "uint32", "shape": [1, 4]}]), TOKENS),
    "forward activations wrong rank": raw(forward_head(tensors=[{"dtype": "float32", "shape": [4]}]), TOKENS),
    "three forward tensors": raw(
        forward_head(
            tensors=[{"dtype": "float32", "shape": [1, 1, 1]}, *[{"dtype": "float32", "shape": [1, 1, 1, 1]}] * 2]
        ),
        b"\x00" * 4,
        b"\x00" * 4,
        b"\x00" * 4,
    ),
    "residual blocks not rank 4": raw(
        forward_head(tensors=[{"dtype": "float32", "shape": [1, 1, 1]}, {"dtype": "float32", "shape": [1, 1, 1]}]),
        b"\x00" * 4,
        b"\x00" * 4,
    ),
    "residual blocks not float": raw(
        forward_head(tensors=[{"dtype": "float32", "shape": [1, 1, 1]}, {"dtype": "int32", "shape": [1, 1, 1, 1]}]),
        b"\x00" * 4,
        b"\x00" * 4,
    ),
    "truncated tensor frame": raw(forward_head(), TOKENS[:-1]),
    "padded tensor frame": raw(forward_head(), TOKENS + b"\x00"),
    "empty tensor frame": raw(forward_head(), b""),
}


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_is_refused_with_wire_error(frames):
    with pytest.raises(WireError):
        decode(frames)


def test_forward_carries_activations_and_residual_blocks_bit_for_bit():
    """A stage message of a model with attention residuals (Kimi K3): the
    hidden state and the residual blocks, (blocks, 1, L, D), both exact."""
    h, blocks = random_array("bfloat16", (1, 5, 16), 1), random_array("bfloat16", (2, 1, 5, 16), 2)
    msg = decode(encode("forward", FORWARD, [h, blocks]))
    assert len(msg.tensors) == 2
    assert_same(msg.tensors[0], h)
    assert_same(msg.tensors[1], blocks)


def test_wrong_version_names_both_versions():
    with pytest.raises(WireError, match=rf"version 7 .*speaks {wire.PROTOCOL_VERSION}"):
        decode(raw(forward_head(v=7), TOKENS))


def test_truncated_tensor_says_expected_and_actual_bytes():
    with pytest.raises(WireError, match=r"needs 16 bytes, frame has 15"):
        decode(raw(forward_head(), TOKENS[:-1]))


def test_tensors_over_max_tensor_bytes_are_refused_before_use():
    frames = encode("forward", FORWARD, [mx.zeros((1, 8, 32), dtype=mx.float32)])
    assert decode(frames, max_tensor_bytes=1024).tensors[0].shape == (1, 8, 32)
    with pytest.raises(WireError, match="limit 1023"):
        decode(frames, max_tensor_bytes=1023)


def test_declared_huge_tensor_is_refused_without_allocating():
    head = forward_head(tensors=[{"dtype": "float32", "shape": [1, 2**31 - 1, 2**31 - 1]}])
    with pytest.raises(WireError, match="limit"):
        decode(raw(head, b"\x00" * 16))


# ---- encode refuses what decode would refuse --------------------------------


@pytest.mark.parametrize(
    ("kind", "header", "tensors"),
    [
        ("launch", {}, []),
        ("forward", {**FORWARD, "v": 2}, [mx.zeros((1, 2), dtype=mx.int32)]),
        ("forward", {**FORWARD, "seq": True}, [mx.zeros((1, 2), dtype=mx.int32)]),
        ("forward", FORWARD, []),
        ("forward", FORWARD, [mx.zeros((1, 2), dtype=mx.int64)]),
        ("forward", FORWARD, [mx.zeros((1, 2, 3), dtype=mx.int32)]),
        ("forward", FORWARD, [np.zeros((1, 2), dtype=np.int32)]),
        (
            "forward",
            {**FORWARD, "params": {"x": np.int64(1)}},
            [mx.zeros((1, 2), dtype=mx.int32)],
        ),
        (
            "forward",
            {**FORWARD, "params": {"x": "a" * wire.MAX_HEADER_BYTES}},
            [mx.zeros((1, 2), dtype=mx.int32)],
        ),
        ("release", {"req": "r" * 500}, []),
        ("release", {"req": "r"}, [mx.zeros((1, 2), dtype=mx.int32)]),
    ],
    ids=[
        "unknown-kind",
        "envelope-key",
        "bool-for-int",
        "missing-tensor",
        "int64",
        "int32-rank-3",
        "numpy-tensor",
        "numpy-scalar-in-params",
        "oversized-header",
        "huge-req",
        "tensor-on-release",
    ],
)
def test_encode_refuses_invalid_messages(kind, header, tensors):
    with pytest.raises(WireError):
        encode(kind, header, tensors)


# ---- properties: nothing but WireError, whatever arrives ---------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
frame_bytes = st.binary(max_size=64)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_refuses(frames) -> None:
    with contextlib.suppress(WireError):
        decode(frames, max_tensor_bytes=4096)


@PROPERTY
@given(st.lists(frame_bytes, max_size=4))
def test_random_frames_raise_nothing_but_wire_error(frames):
    decodes_or_refuses(frames)


@PROPERTY
@given(
    key=st.sampled_from([*forward_head(), "extra"]),
    value=msgpack_values,
    drop=st.booleans(),
    tensor=frame_bytes,
)
def test_mutated_headers_raise_nothing_but_wire_error(key, value, drop, tensor):
    head = forward_head()
    if drop:
        head.pop(key, None)
    else:
        head[key] = value
    decodes_or_refuses(raw(head, tensor))
    decodes_or_refuses(raw(head, TOKENS))


@PROPERTY
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    shape=st.lists(st.integers(-2, 6), max_size=6),
    tensor=frame_bytes,
)
def test_random_descriptors_raise_nothing_but_wire_error(dtype, shape, tensor):
    with blob_kind():
        decodes_or_refuses(
            raw(
                {"v": wire.PROTOCOL_VERSION, "kind": "blob", "tensors": [{"dtype": dtype, "shape": shape}]},
                tensor,
            )
        )


@PROPERTY
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    shape=st.lists(st.integers(0, 5), max_size=wire.MAX_NDIM).map(tuple),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_supported_tensor_round_trips(dtype, shape, seed):
    x = random_array(dtype, shape, seed)
    with blob_kind():
        assert_same(decode(encode("blob", {}, [x])).tensors[0], x)


@PROPERTY
@given(data=st.data())
def test_corrupted_header_bytes_raise_nothing_but_wire_error(data):
    head = bytearray(msgpack.packb(forward_head()))
    for _ in range(data.draw(st.integers(1, 4))):
        head[data.draw(st.integers(0, len(head) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(head)))
    decodes_or_refuses([bytes(head[:cut]), TOKENS])


GOOD_RUN = {"req": "r", "seq": 4, "tokens": [3, 9], "logprobs": [-0.5, float("-inf")]}


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"tokens": [], "logprobs": []}, "no token"),
        ({"logprobs": [-0.5]}, "one entry per token"),
        ({"top_logprobs": [[[3, -0.5]]]}, "one entry per token"),
        ({"top_logprobs": [[[3, -0.5]], [[1]]]}, "pairs"),
        ({"top_logprobs": [[[3, -0.5]], 7]}, "pairs"),
        ({"top_logprobs": [[[3, -0.5]], [[True, -1.0]]]}, "pairs"),
        ({"tokens": [3, 100]}, "outside the vocabulary"),
        ({"top_logprobs": [[[3, -0.5]], [[100, -1.0]]]}, "outside the vocabulary"),
        ({"logprobs": [-0.5, float("nan")]}, "NaN"),
        ({"logprobs": [-0.5, float("inf")]}, r"\+inf"),
        ({"logprobs": [-0.5, "x"]}, "not a number"),
        ({"logprobs": [-0.5, 0]}, "not a number"),
        ({"top_logprobs": [[[3, -0.5]], [[4, float("nan")]]]}, "NaN"),
    ],
)
def test_check_tokens_refuses_bad_values(changes, says):
    """What the coordinator checks in a run of tokens beyond the types (vocabulary of 100)."""
    with pytest.raises(wire.WireError, match=says):
        wire.check_tokens({**GOOD_RUN, **changes}, 100)


def test_check_tokens_accepts_a_run_with_top_logprobs():
    wire.check_tokens({**GOOD_RUN, "top_logprobs": [[[3, -0.5], [1, -2.0]], []]}, 100)
    wire.check_tokens(GOOD_RUN, 100)


def test_prefix_cache_fields_round_trip_and_are_checked():
    ids = mx.array([[1, 2, 3]], dtype=mx.int32)
    msg = decode(encode("forward", {**FORWARD, "offset": 40, "prefix": {"entry": "p1-0", "length": 40}}, [ids]))
    assert wire.check_prefix(msg.header) == ("p1-0", 40)
    assert wire.check_prefix(decode(encode("forward", FORWARD, [ids])).header) is None
    for bad in ({"entry": "p1-0", "length": 39}, {"entry": "", "length": 40}, {"entry": "p", "length": 40, "x": 1}):
        with pytest.raises(WireError, match="prefix"):
            wire.check_prefix({**FORWARD, "offset": 40, "prefix": bad})
    release = decode(encode("release", {"req": "r", "keep": "p1-1"}))
    assert release.header == {"req": "r", "keep": "p1-1"}
    assert wire.check_drop(decode(encode("drop", {"all": True})).header) is None
    assert wire.check_drop(decode(encode("drop", {"entries": ["a", "b"]})).header) == ["a", "b"]
    with pytest.raises(WireError, match="drop"):
        wire.check_drop({"entries": [1]})
    with pytest.raises(WireError, match="drop"):
        wire.check_drop({"entries": ["e"] * (wire.MAX_DROP + 1)})
    kept = {"entry": "p1-1", "worker": "w0", "length": 57, "bytes": 1 << 20, "trimmable": True}
    assert decode(encode("kept", kept)).header == kept
    with pytest.raises(WireError, match="length"):
        encode("kept", {**kept, "length": -1})
