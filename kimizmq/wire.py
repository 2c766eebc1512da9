"""The wire format: one msgpack header frame, then one raw frame per tensor.

Every message a daemon sends or receives goes through `encode` and `decode`.
The header is a msgpack map holding the envelope (`v`, `kind`, `tensors`) and
the kind's own fields; each following frame is one tensor's bytes in C order.
bfloat16 travels as its raw 16-bit words. No pickle anywhere.

`decode` checks everything before it is used: header size, msgpack limits,
protocol version, kind, each field's type (from `SCHEMAS`), tensor count,
dtype, shape and exact byte length. Anything malformed raises `WireError`
and nothing else, so a daemon can log the message and keep serving.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import msgpack
import numpy as np
import zmq

PROTOCOL_VERSION = (
    3  # 2: `tokens` carries a run of sampled tokens; 3: the prefix cache (`prefix`, `keep`, `drop`, `kept`)
)
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_TENSOR_BYTES = 1 << 30
MAX_ID_CHARS = 128
MAX_NDIM = 4
MAX_DIM = 2**31 - 1  # MLX shapes are 32-bit

# name on the wire -> (MLX dtype, numpy dtype of the bytes on the wire)
DTYPES: dict[str, tuple[mx.Dtype, type[np.generic]]] = {
    "float32": (mx.float32, np.float32),
    "float16": (mx.float16, np.float16),
    "bfloat16": (mx.bfloat16, np.uint16),
    "int32": (mx.int32, np.int32),
    "uint32": (mx.uint32, np.uint32),
}
_DTYPE_NAMES = {mx_dtype: name for name, (mx_dtype, _) in DTYPES.items()}
_FLOATS = ("float32", "float16", "bfloat16")

_ENVELOPE = frozenset({"v", "kind", "tensors"})
# Rules for a field of this name in every kind. Ids may be "": a worker replies
# with id "" to a command it could not read.
_ID_FIELDS = frozenset({"req", "id", "cmd", "keep", "entry", "worker", "code"})  # at most MAX_ID_CHARS
_COUNT_FIELDS = frozenset({"seq", "offset", "stop_at", "length", "bytes"})  # non-negative
_ID_LIST_FIELDS = frozenset({"eos", "tokens"})  # lists of non-negative ints, at most MAX_ID_LIST
MAX_ID_LIST = 64  # also the most tokens one `tokens` message carries

FieldType = type | tuple[type, ...]
TensorCheck = Callable[[int, str, list[int]], str | None]


class WireError(ValueError):
    """A message refused by encode or decode; the text says what was wrong."""


@dataclass
class Message:
    """A decoded message: `header` holds the kind's fields, without the envelope."""

    kind: str
    header: dict
    tensors: list[mx.array]


@dataclass(frozen=True)
class Schema:
    """One message kind: required and optional fields, tensor count, tensor rule."""

    required: dict[str, FieldType]
    optional: dict[str, FieldType] = field(default_factory=dict)
    tensors: int = 0
    check_tensor: TensorCheck | None = None  # (index, dtype, shape) -> problem or None
    max_tensors: int | None = None  # more than `tensors` allowed, up to this many

    @property
    def tensor_counts(self) -> range:
        return range(self.tensors, max(self.tensors, self.max_tensors or 0) + 1)


def _forward_tensor(i: int, dtype: str, shape: list[int]) -> str | None:
    if i == 0 and ((dtype == "int32" and len(shape) == 2) or (dtype in _FLOATS and len(shape) == 3)):
        return None
    if i == 0:
        return f"expected int32 token ids (1, L) or float activations (1, L, D), got {dtype} {shape}"
    if dtype in _FLOATS and len(shape) == 4:
        return None
    return f"expected float attention-residual blocks (blocks, 1, L, D) beside the activations, got {dtype} {shape}"


SCHEMAS: dict[str, Schema] = {
    # data plane
    "forward": Schema(
        {"req": str, "seq": int, "offset": int, "sample": bool, "params": dict},
        # The last stage feeds its sampled token straight back to the first
        # stage until the sequence is `stop_at` tokens long or a token in `eos`
        # comes out; without `stop_at` it only samples.
        # `prefix` ({"entry", "length"}): the request's first message starts at
        # `offset` == length from the prefix cache's entry (its first `length` tokens).
        {"stop_at": int, "eos": list, "prefix": dict},
        # The hidden state (or token ids), then for a model with attention
        # residuals (Kimi K3) the residual blocks that cross the boundary too.
        tensors=1,
        check_tensor=_forward_tensor,
        max_tensors=2,
    ),
    # `keep`: the prefix cache keeps the request's state under this entry id.
    "release": Schema({"req": str}, {"keep": str}),
    # The prefix cache's entries every stage forgets (`all`: every one it holds).
    "drop": Schema({}, {"entries": list, "all": bool}),
    # A stage kept (length > 0) or could not keep (length 0) a prefix entry.
    "kept": Schema({"entry": str, "worker": str, "length": int, "bytes": int, "trimmable": bool}),
    # The last stage's sampled tokens for the coordinator, a run of them in
    # sampling order (the stage gathers them for `stream_interval_ms`): `seq`
    # is the first one's, `logprobs` and `top_logprobs` have one entry per token.
    "tokens": Schema(
        {"req": str, "seq": int, "tokens": list, "logprobs": list},
        {"top_logprobs": list},
    ),
    # `code` "prefix_missing": a stage lacks the prefix entry the request named.
    "error": Schema({"req": str, "message": str}, {"code": str}),
    # control plane
    # `versions` (kimizmq.versions): the sender's protocol, kimizmq and MLX versions.
    "command": Schema({"cmd": str, "id": str}, {"args": dict, "versions": dict}),
    "reply": Schema({"id": str, "ok": bool}, {"result": dict, "error": str, "versions": dict}),
}


def encode(kind: str, header: dict | None = None, tensors: Sequence[mx.array] = ()) -> list[bytes | memoryview]:
    """Frames for `zmq.Socket.send_multipart`: the header, then each tensor's bytes."""
    schema = _schema(kind)
    fields = dict(header or {})
    if clash := _ENVELOPE & fields.keys():
        raise WireError(f"{kind}: header uses reserved envelope key(s) {sorted(clash)}")
    _check_fields(kind, schema, fields)
    arrays = list(tensors)
    descs = []
    for i, a in enumerate(arrays):
        if not isinstance(a, mx.array):
            raise WireError(f"{kind}: tensor {i} must be an mx.array, got {type(a).__name__}")
        if a.dtype not in _DTYPE_NAMES:
            raise WireError(f"{kind}: tensor {i} has dtype {a.dtype}, expected one of {list(DTYPES)}")
        descs.append({"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape)})
    _check_tensor_descs(kind, schema, descs)
    mx.eval(*arrays)
    try:
        head = msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind, **fields, "tensors": descs})
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"{kind}: header is not msgpack-serializable: {exc}") from exc
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"{kind}: header is {len(head)} bytes, limit {MAX_HEADER_BYTES}")
    return [head, *(_tensor_frame(a) for a in arrays)]


def decode(
    frames: Sequence[bytes | memoryview | zmq.Frame],
    *,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
) -> Message:
    """Validate a received multipart message and build its tensors, or raise WireError."""
    buffers = _buffers(frames)
    head = _unpack_header(buffers[0])
    kind = _check_envelope(head)
    schema = SCHEMAS[kind]
    fields = {k: v for k, v in head.items() if k not in _ENVELOPE}
    _check_fields(kind, schema, fields)
    specs = _check_tensor_descs(kind, schema, head.get("tensors"))
    data = buffers[1:]
    if len(data) != len(specs):
        raise WireError(f"{kind}: header declares {len(specs)} tensor frame(s), message has {len(data)}")
    sizes = [math.prod(shape) * np.dtype(DTYPES[dtype][1]).itemsize for dtype, shape in specs]
    if sum(sizes) > max_tensor_bytes:
        raise WireError(f"{kind}: tensors total {sum(sizes)} bytes, limit {max_tensor_bytes}")
    for i, (buf, size) in enumerate(zip(data, sizes, strict=True)):
        if buf.nbytes != size:
            dtype, shape = specs[i]
            raise WireError(f"{kind}: tensor {i} ({dtype} {shape}) needs {size} bytes, frame has {buf.nbytes}")
    tensors = [_tensor(buf, dtype, shape) for buf, (dtype, shape) in zip(data, specs, strict=True)]
    return Message(kind, fields, tensors)


def check_tokens(header: dict, vocab_size: int) -> None:
    """A decoded `tokens` message's values beyond their types: at least one
    token, one logprob (and one top_logprobs list, if any) per token, every id
    inside the vocabulary, every logprob a number that is not NaN or +inf."""
    tokens, logprobs, tops = header["tokens"], header["logprobs"], header.get("top_logprobs")
    if not tokens:
        raise WireError("tokens: carries no token")
    if len(logprobs) != len(tokens) or (tops is not None and len(tops) != len(tokens)):
        raise WireError("tokens: logprobs and top_logprobs need one entry per token")
    pairs = [p for top in tops or () for p in (top if isinstance(top, list) else [None])]
    if not all(isinstance(p, list) and len(p) == 2 and _type_ok(p[0], int) and _type_ok(p[1], float) for p in pairs):
        raise WireError("tokens: top_logprobs must hold a list of [token id, logprob] pairs per token")
    if not all(0 <= i < vocab_size for i in [*tokens, *(p[0] for p in pairs)]):
        raise WireError(f"tokens: token id outside the vocabulary 0..{vocab_size - 1}")
    lps = [*logprobs, *(p[1] for p in pairs)]
    if not all(_type_ok(lp, float) and not math.isnan(lp) and lp != math.inf for lp in lps):
        raise WireError("tokens: a logprob is not a number, or NaN or +inf")


MAX_DROP = 1024  # entries one `drop` names


def check_prefix(header: dict) -> tuple[str, int] | None:
    """A decoded `forward` message's prefix (entry id, length), or None; the
    length must be the message's offset."""
    prefix = header.get("prefix")
    if prefix is None:
        return None
    entry, length = prefix.get("entry"), prefix.get("length")
    if set(prefix) != {"entry", "length"} or not isinstance(entry, str) or not 0 < len(entry) <= MAX_ID_CHARS:
        raise WireError("forward: prefix must be {entry: id, length: int}")
    if not _type_ok(length, int) or length <= 0 or length != header["offset"]:
        raise WireError(f"forward: prefix length must be the message's offset {header['offset']} (> 0), got {length!r}")
    return entry, length


def check_drop(header: dict) -> list[str] | None:
    """A decoded `drop` message's entry ids, or None for all of them."""
    if header.get("all"):
        return None
    entries = header.get("entries", [])
    if len(entries) > MAX_DROP or not all(isinstance(e, str) and 0 < len(e) <= MAX_ID_CHARS for e in entries):
        raise WireError(f"drop: entries must be a list of at most {MAX_DROP} entry ids")
    return entries


def _schema(kind: object) -> Schema:
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise WireError(f"unknown message kind {reprlib.repr(kind)}, expected one of {list(SCHEMAS)}")
    return SCHEMAS[kind]


def _type_ok(value: object, expected: FieldType) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _type_names(expected: FieldType) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(t.__name__ for t in types)


def _check_fields(kind: str, schema: Schema, fields: dict) -> None:
    if missing := schema.required.keys() - fields.keys():
        raise WireError(f"{kind}: missing field(s) {sorted(missing)}")
    if unknown := fields.keys() - schema.required.keys() - schema.optional.keys():
        raise WireError(f"{kind}: unknown field(s) {sorted(unknown)}")
    for name, value in fields.items():
        expected = schema.required.get(name) or schema.optional[name]
        if not _type_ok(value, expected):
            raise WireError(f"{kind}: field {name!r} must be {_type_names(expected)}, got {type(value).__name__}")
        if name in _ID_FIELDS and len(value) > MAX_ID_CHARS:
            raise WireError(f"{kind}: field {name!r} must be at most {MAX_ID_CHARS} characters, got {len(value)}")
        if name in _COUNT_FIELDS and value < 0:
            raise WireError(f"{kind}: field {name!r} must be non-negative, got {value}")
        if name in _ID_LIST_FIELDS and (
            len(value) > MAX_ID_LIST or not all(_type_ok(v, int) and v >= 0 for v in value)
        ):
            raise WireError(f"{kind}: field {name!r} must be a list of at most {MAX_ID_LIST} non-negative ints")
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            raise WireError(f"{kind}: field {name!r} must have str keys")


def _check_tensor_descs(kind: str, schema: Schema, descs: object) -> list[tuple[str, list[int]]]:
    if not isinstance(descs, list):
        raise WireError(f"{kind}: 'tensors' must be a list of {{dtype, shape}}, got {type(descs).__name__}")
    counts = schema.tensor_counts
    if len(descs) not in counts:
        allowed = str(schema.tensors) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
        raise WireError(f"{kind}: carries {allowed} tensor(s), header declares {len(descs)}")
    specs = []
    for i, desc in enumerate(descs):
        if not isinstance(desc, dict) or desc.keys() != {"dtype", "shape"}:
            raise WireError(f"{kind}: tensor {i} descriptor must be a map with exactly 'dtype' and 'shape'")
        dtype, shape = desc["dtype"], desc["shape"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise WireError(f"{kind}: tensor {i} has dtype {reprlib.repr(dtype)}, expected one of {list(DTYPES)}")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_NDIM
            and all(_type_ok(d, int) and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise WireError(
                f"{kind}: tensor {i} shape {reprlib.repr(shape)} must be a list of "
                f"at most {MAX_NDIM} ints in [0, {MAX_DIM}]"
            )
        if schema.check_tensor and (problem := schema.check_tensor(i, dtype, shape)):
            raise WireError(f"{kind}: tensor {i}: {problem}")
        specs.append((dtype, shape))
    return specs


def _buffers(frames: object) -> list[memoryview]:
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(frames, Sequence):
        raise WireError(f"expected a sequence of frames, got {type(frames).__name__}")
    if not frames:
        raise WireError("empty message: expected a msgpack header frame")
    buffers = []
    for i, frame in enumerate(frames):
        try:
            buf = memoryview(frame)
        except TypeError:
            raise WireError(f"frame {i} is a {type(frame).__name__}, expected bytes-like") from None
        if not buf.c_contiguous:
            raise WireError(f"frame {i} is not a contiguous buffer")
        buffers.append(buf)
    return buffers


def _unpack_header(buf: memoryview) -> dict:
    if buf.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header is {buf.nbytes} bytes, limit {MAX_HEADER_BYTES}")
    try:
        head = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=MAX_HEADER_BYTES,
            max_array_len=MAX_HEADER_BYTES,
            max_map_len=MAX_HEADER_BYTES // 2,
            max_ext_len=0,
        )
    except (
        ValueError,
        TypeError,
    ) as exc:  # msgpack's errors, bad UTF-8, unhashable keys
        raise WireError(f"header is not valid msgpack: {type(exc).__name__} {exc}") from None
    if not isinstance(head, dict):
        raise WireError(f"header must be a msgpack map, got {type(head).__name__}")
    if not all(isinstance(k, str) for k in head):
        raise WireError("header map keys must be str")
    return head


def _check_envelope(head: dict) -> str:
    if "v" not in head:
        raise WireError("header has no protocol version 'v'")
    v = head["v"]
    if not _type_ok(v, int) or v != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version {reprlib.repr(v)} received, "
            f"this side speaks {PROTOCOL_VERSION}: "
            "run the same kimizmq version on every machine"
        )
    kind = head.get("kind")
    _schema(kind)
    return kind


def _tensor_frame(a: mx.array) -> memoryview:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    arr = np.ascontiguousarray(np.array(a, copy=False))  # copies only if strided
    return memoryview(arr.reshape(-1).view(np.uint8))


def _tensor(buf: memoryview, dtype: str, shape: list[int]) -> mx.array:
    mx_dtype, np_dtype = DTYPES[dtype]
    a = mx.array(np.frombuffer(buf, np_dtype).reshape(shape))
    return a.view(mx.bfloat16) if mx_dtype == mx.bfloat16 else a
