"""What a model directory holds, read without loading a single weight.

Byte sizes come from the safetensors headers: an 8-byte little-endian length,
then a JSON header naming every tensor's dtype, shape and data offsets. Only
those bytes are read. A directory with only `config.json` gets sizes estimated
from the architecture and its `quantization` block, laid out the way mlx-lm
stores a converted `deepseek_v3`/`kimi_k2` (or a plain dense) model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

INDEX_FILE = "model.safetensors.index.json"
# Every safetensors header of a checkpoint, written by `kimi sync` next to
# the files it copies: a machine holding only its workers' files still plans
# and indexes the whole model. {file: {tensor: [dtype, shape, nbytes]}}
HEADERS_FILE = "kimizmq-headers.json"
WEIGHT_GLOB = "model*.safetensors"  # what mlx-lm's loader reads
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

EMBED_PREFIX = "model.embed_tokens."
# The final norm and lm_head, and Kimi K3's output attention-residual weights.
HEAD_PREFIXES = ("model.norm.", "lm_head.", "model.output_attn_res")
LM_HEAD_PREFIX = "lm_head."
# kimi_k25 and kimi_k3 keep the text model under this prefix, next to vision
# weights (vision_tower.*, mm_projector.*) that no stage ever reads.
TEXT_PREFIX = "language_model."

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Storage of a quantized weight's per-group scales (and biases) by mode; the
# affine mode stores both in the model's dtype.
QUANT_SCALE_BYTES = {"mxfp4": 1, "mxfp8": 1, "nvfp4": 1}

_LAYER_RE = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A model directory that cannot be used; the message names the file and the fault."""


class TensorInfo(NamedTuple):
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class LayerSizes:
    """Bytes each part of the model occupies once loaded."""

    layers: tuple[int, ...]  # decoder layer i -> bytes
    embed_bytes: int  # model.embed_tokens.*: first stage
    head_bytes: int  # model.norm.* + lm_head.*: last stage
    estimated: bool  # True: from config.json only, no safetensors read
    tied_embeddings: bool = False  # no lm_head: the last stage also holds embed_tokens

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_bytes(self) -> int:
        """The checkpoint's size: every tensor once."""
        return sum(self.layers) + self.embed_bytes + self.head_bytes

    def stage_bytes(self, start: int, end: int, *, first: bool, last: bool) -> int:
        """Weights a stage holding layers [start, end) loads."""
        total = sum(self.layers[start:end])
        if first or (last and self.tied_embeddings):
            total += self.embed_bytes
        if last:
            total += self.head_bytes
        return total


def read_config(model_dir: str | Path) -> dict:
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    return read_config_file(Path(model_dir) / "config.json")


def read_config_file(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a model directory needs its config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_exactly(f, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = f.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor name -> info from one file's header; no tensor data is read.

    Not `safetensors.safe_open`: it reads the whole file (measured: 3 MB of
    rchar for a 0.9 MB file), which for a 500 GB checkpoint is the load itself."""
    path = Path(path)
    try:
        size = path.stat().st_size
        # Unbuffered: a buffered reader would read ahead into the tensor data.
        with open(path, "rb", buffering=0) as f:
            raw = _read_exactly(f, 8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file")
            header_len = int.from_bytes(raw, "little")
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise CheckpointError(
                    f"{path}: corrupt header: it claims {header_len} header bytes in a {size}-byte file"
                )
            header_raw = _read_exactly(f, header_len)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a safetensors file") from None
    try:
        header = json.loads(header_raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header: not a JSON object")

    data_size = size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(x) for x in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: corrupt header: entry {name!r} needs dtype, shape and data_offsets"
            ) from None
        if not 0 <= begin <= end or any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: corrupt header: bad offsets or shape for {name!r}")
        nbytes = end - begin
        if dtype in DTYPE_BYTES and nbytes != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: corrupt header: {name!r} is {dtype}{list(shape)} but spans {nbytes} bytes")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: {name!r} ends at byte {end} of the data section, "
                f"which holds only {data_size} bytes (an incomplete download? fetch it again)"
            )
        tensors[name] = TensorInfo(path, dtype, shape, nbytes)
    return tensors


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files a checkpoint consists of (empty: config only)."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        return sorted({model_dir / f for f in _weight_map(index_path).values()})
    return sorted(model_dir.glob(WEIGHT_GLOB))


def _weight_map(index_path: Path) -> dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: not valid JSON: {e}") from None
    except (KeyError, TypeError):
        raise CheckpointError(f'{index_path}: needs a "weight_map" object') from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to file names")
    return weight_map


def tensor_index(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, from the safetensors headers only.

    With `model.safetensors.index.json` its weight_map decides which file holds
    what (each named file must exist and hold its tensors); without one, every
    `model*.safetensors` file is read, as mlx-lm's loader does.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        weight_map = _weight_map(index_path)
        headers = {}
        recorded = None
        for file in sorted(set(weight_map.values())):
            if (model_dir / file).is_file():
                headers[file] = read_safetensors_header(model_dir / file)
                continue
            if recorded is None:
                recorded = read_headers_file(model_dir)
            if file not in recorded:
                raise CheckpointError(f"{index_path} names {file}, which is missing from {model_dir}")
            headers[file] = recorded[file]
        index = {}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise CheckpointError(f"{index_path} puts {name!r} in {file}, which lacks it")
            index[name] = headers[file][name]
        return index

    files = sorted(model_dir.glob(WEIGHT_GLOB))
    if not files:
        raise CheckpointError(f"{model_dir} holds no {WEIGHT_GLOB} files and no {INDEX_FILE}")
    index = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in index:
                raise CheckpointError(f"tensor {name!r} is in both {index[name].file.name} and {file.name}")
            index[name] = info
    return index


def headers_json(index: dict[str, TensorInfo]) -> bytes:
    """HEADERS_FILE's content for a checkpoint's tensor index (the same bytes for the same index)."""
    files: dict[str, dict] = {}
    for name, t in index.items():
        files.setdefault(t.file.name, {})[name] = [t.dtype, list(t.shape), t.nbytes]
    return json.dumps(files, sort_keys=True).encode()


def read_headers_file(model_dir: Path) -> dict[str, dict[str, TensorInfo]]:
    """HEADERS_FILE of `model_dir` as {file: {tensor: TensorInfo}}; empty when there is none."""
    path = model_dir / HEADERS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            file: {n: TensorInfo(model_dir / file, d, tuple(shape), int(nb)) for n, (d, shape, nb) in tensors.items()}
            for file, tensors in data.items()
        }
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a header table kimi sync wrote: {e}") from None


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def check_layer_count(index: dict[str, Any], config: dict, model_dir: str | Path) -> None:
    """Refuse a checkpoint whose weights hold more layers than config.json
    declares (beyond its multi-token-prediction layers, which mlx-lm drops):
    serving fewer layers than the weights have would be a wrong model, silently."""
    declared = _int_field(config, "num_hidden_layers", model_dir)
    extra = config.get("num_nextn_predict_layers", 0)
    allowed = declared + (extra if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0 else 0)
    found = sorted({layer for name in index if (layer := layer_of(name)) is not None})
    beyond = [i for i in found if i >= allowed]
    if beyond:
        raise CheckpointError(
            f"{model_dir}: config.json says num_hidden_layers = {declared} but the safetensors hold "
            f"layer(s) {_ranges(beyond)} too ({len(found)} layers in all); fix num_hidden_layers"
        )


def _text_name(name: str) -> str:
    return name[len(TEXT_PREFIX) :] if name.startswith(TEXT_PREFIX) else name


def text_config(config: dict) -> dict:
    """The language model's config: kimi_k25's and kimi_k3's `text_config`
    (with a quantization block found at either level, as mlx-lm reads it),
    else `config` itself."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    out = dict(text)
    for key in ("quantization", "quantization_config"):
        if key in config:
            out.setdefault(key, config[key])
    return out


def loaded_nbytes(name: str, info: TensorInfo, index: dict[str, TensorInfo]) -> int:
    """Bytes `name` occupies once mlx-lm has loaded it, which is not always
    what it takes on disk: FP8 weights are dequantized to bfloat16 (their
    `weight_scale_inv` goes), compressed-tensors int4 gains a bias per group
    next to each scale (`weight_shape` goes)."""
    base, _, leaf = name.rpartition(".")
    if leaf == "weight_scale_inv" or leaf == "weight_shape":
        return 0
    if info.dtype in ("F8_E4M3", "F8_E5M2") and f"{base}.weight_scale_inv" in index:
        return 2 * info.nbytes
    if leaf == "weight_scale" and f"{base}.weight_shape" in index:
        return 2 * info.nbytes
    return info.nbytes


def stage_tensor_names(index: dict[str, Any], start: int, end: int, *, first: bool, last: bool) -> list[str]:
    """Tensors a stage holding layers [start, end) loads, in index order.

    The first stage adds embed_tokens, the last the final norm and lm_head;
    a checkpoint without lm_head ties it to embed_tokens, so its last stage
    needs embed_tokens too.
    """
    tied = not any(_text_name(n).startswith(LM_HEAD_PREFIX) for n in index)
    names = []
    for name in index:
        layer = layer_of(name)
        if layer is not None:
            keep = start <= layer < end
        elif _text_name(name).startswith(EMBED_PREFIX):
            keep = first or (last and tied)
        else:
            keep = last and _text_name(name).startswith(HEAD_PREFIXES)
        if keep:
            names.append(name)
    return names


def sizes_from_tensors(tensors: dict[str, int], num_layers: int) -> LayerSizes:
    """Per-layer bytes from each tensor's loaded size: a layer's tensors to its
    layer (those past `num_layers`, multi-token prediction, mlx-lm drops), the
    embedding and the head (a VLM's language_model prefix aside) to theirs."""
    layers = [0] * num_layers
    embed = head = 0
    tied = True
    for name, nbytes in tensors.items():
        layer, text_name = layer_of(name), _text_name(name)
        if layer is not None:
            if layer < num_layers:
                layers[layer] += nbytes
        elif text_name.startswith(EMBED_PREFIX):
            embed += nbytes
        elif text_name.startswith(HEAD_PREFIXES):
            head += nbytes
            tied = tied and not text_name.startswith(LM_HEAD_PREFIX)
    return LayerSizes(tuple(layers), embed, head, estimated=False, tied_embeddings=tied)


def layer_sizes(model_dir: str | Path) -> LayerSizes:
    """Per-layer bytes: exact from the safetensors headers, else estimated from config.json."""
    config = read_config(model_dir)
    num_layers = _int_field(text_config(config), "num_hidden_layers", model_dir)
    if not weight_files(model_dir):
        return estimate_layer_sizes(config)

    index = tensor_index(model_dir)
    check_layer_count(index, text_config(config), model_dir)
    sizes = sizes_from_tensors({name: loaded_nbytes(name, info, index) for name, info in index.items()}, num_layers)
    layers, embed = sizes.layers, sizes.embed_bytes
    missing = [i for i, n in enumerate(layers) if n == 0]
    if missing:
        raise CheckpointError(
            f"{model_dir}: config.json says {num_layers} layers but the safetensors hold "
            f"no tensors for layer(s) {_ranges(missing)} (an incomplete download?)"
        )
    if embed == 0:
        raise CheckpointError(f"{model_dir}: the safetensors hold no model.embed_tokens")
    return sizes


def kv_bytes_per_token_per_layer(config: dict, dtype_bytes: int) -> int:
    """KV cache bytes one token adds to one layer.

    MLA models (deepseek_v3, kimi_k2) cache in mlx-lm the compressed latent and
    the rotary key: kv_lora_rank + qk_rope_head_dim values. Others cache a key
    and a value per KV head.
    """
    config = text_config(config)
    try:
        if config.get("kv_lora_rank"):
            return (config["kv_lora_rank"] + config.get("qk_rope_head_dim", 0)) * dtype_bytes
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
    except KeyError as e:
        raise CheckpointError(f"config.json needs {e.args[0]} to size the KV cache") from None
    return 2 * kv_heads * head_dim * dtype_bytes


def recurrent_state_bytes(config: dict, dtype_bytes: int) -> int:
    """The fixed-size state one request keeps in one Kimi Delta Attention
    layer, as mlx-lm's ArraysCache holds it: the short convolution's last
    kernel - 1 inputs (activation dtype) and the float32 delta-rule state,
    one head_dim x head_dim matrix per head."""
    lin = text_config(config).get("linear_attn_config") or {}
    try:
        heads, head_dim, kernel = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
    except KeyError as e:
        raise CheckpointError(
            f"config.json: linear_attn_config needs {e.args[0]} to size the recurrent state"
        ) from None
    return (kernel - 1) * 3 * heads * head_dim * dtype_bytes + heads * head_dim * head_dim * 4


def cache_bytes_per_layer(
    config: dict, num_layers: int, dtype_bytes: int, max_context: int, max_concurrent: int
) -> list[int]:
    """What each layer's per-request state takes at most: a KV cache of
    max_context tokens, or for a linear-attention layer its fixed recurrent
    state, for each of max_concurrent requests."""
    text = text_config(config)
    linear = [is_linear_layer(text, i) for i in range(num_layers)]
    kv = 0 if all(linear) else kv_bytes_per_token_per_layer(text, dtype_bytes)
    state = recurrent_state_bytes(text, dtype_bytes) if any(linear) else 0
    return [(state if lin else kv * max_context) * max_concurrent for lin in linear]


def config_dtype_bytes(config: dict) -> int:
    """Bytes per value of the checkpoint's unquantized dtype (torch_dtype, or
    `dtype` as newer transformers write it)."""
    config = text_config(config)
    return TORCH_DTYPE_BYTES.get(str(config.get("torch_dtype", config.get("dtype", "bfloat16"))), 2)


HF_QUANT_CONFIG = "hf_quant_config.json"  # NVIDIA ModelOpt exports keep their quantization here
COMPRESSED_TENSORS = "compressed-tensors"


def mlx_quantization(config: dict, model_dir: str | Path | None = None) -> dict | None:
    """The quantization mlx-lm's `load_model` gives a checkpoint: its MLX
    `quantization` block, else what mlx-lm maps its `quantization_config` to
    (also when nested in text_config or kept in hf_quant_config.json). None:
    unquantized; FP8 originals too, which mlx-lm dequantizes to bfloat16."""
    text = text_config(config)
    quant = text.get("quantization")
    if quant is not None:
        if not isinstance(quant, dict):
            raise CheckpointError("config.json: quantization must be an object")
        return quant
    qc = text.get("quantization_config")
    if qc is None and model_dir is not None and (Path(model_dir) / HF_QUANT_CONFIG).is_file():
        qc = read_config_file(Path(model_dir) / HF_QUANT_CONFIG)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError("config.json: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "mxfp4":
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    if method == "mxfp8" or (
        method == "fp8" and qc.get("scale_fmt") == "ue8m0" and list(qc.get("weight_block_size", ())) == [32, 32]
    ):
        return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    if method == "fp8":
        return None
    if method == COMPRESSED_TENSORS:
        from mlx_lm.utils import _compressed_tensors_quantization

        try:
            return _compressed_tensors_quantization(qc)
        except ValueError as e:
            raise CheckpointError(f"config.json: quantization_config: {e}") from None
    if method == "modelopt":
        settings = qc.get("quantization", qc)
        if not isinstance(settings, dict) or settings.get("quant_algo") != "NVFP4":
            raise CheckpointError("config.json: modelopt quantization other than NVFP4 is not supported")
        return {"group_size": settings.get("group_size", 16), "bits": 4, "mode": "nvfp4"}
    raise CheckpointError(
        f"config.json: quantization_config quant_method {method!r} is not supported "
        f"(supported: mxfp4, mxfp8, fp8, {COMPRESSED_TENSORS}, modelopt NVFP4, or an MLX "
        "quantization block); convert the checkpoint with `mlx_lm.convert -q`"
    )


def routed_experts_only(config: dict) -> bool:
    """A compressed-tensors checkpoint as Moonshot publishes one (or NVIDIA's
    ModelOpt NVFP4 one): only the routed experts are packed; its `ignore`
    list keeps attention, shared experts, dense MLPs and lm_head in
    bfloat16, and the router and embeddings are no Linear it targets."""
    qc = text_config(config).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") in (COMPRESSED_TENSORS, "modelopt")


def is_fp8(config: dict) -> bool:
    """An FP8 original that mlx-lm dequantizes to bfloat16 on load: twice its size on disk."""
    qc = text_config(config).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8" and mlx_quantization(config) is None


# --- estimation from config.json ----------------------------------------------


def _int_field(config: dict, key: str, where: Any) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: config.json needs an integer {key}, got {value!r}")
    return value


def _ranges(indices: list[int]) -> str:
    out, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        out.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ", ".join(out)


class _Estimator:
    """Byte sizes of modules as mlx-lm stores them after quantization."""

    def __init__(self, config: dict, prefix: str = ""):
        self.dtype_bytes = config_dtype_bytes(config)
        self.quant = mlx_quantization(config)
        self.experts_only = routed_experts_only(config)
        self.prefix = prefix  # of the MLX module paths a quantization block names

    def _params_for(self, path: str, in_dims: int) -> dict | None:
        """Quantization parameters of one module (None: stored unquantized)."""
        q = self.quant
        if q is None or (self.experts_only and ".switch_mlp." not in path):
            return None
        path = self.prefix + path
        if path in q:  # a per-module override, as mlx-lm's loader reads it
            return q[path] if isinstance(q[path], dict) else None
        if in_dims % q.get("group_size", 64) != 0:  # mlx-lm convert skips these
            return None
        return q

    def quantizable(self, path: str, shape: tuple[int, ...], bias: bool = False) -> int:
        """A Linear/Embedding/SwitchLinear/MultiLinear weight of `shape` (..., out, in)."""
        *lead, out_dims, in_dims = shape
        rows = math.prod(lead) * out_dims
        bias_bytes = rows * self.dtype_bytes if bias else 0
        params = self._params_for(path, in_dims)
        if params is None:
            return rows * in_dims * self.dtype_bytes + bias_bytes
        bits = params.get("bits", self.quant.get("bits", 4))
        group_size = params.get("group_size", self.quant.get("group_size", 64))
        mode = params.get("mode", self.quant.get("mode", "affine"))
        weight = rows * math.ceil(in_dims * bits / 32) * 4
        groups = rows * math.ceil(in_dims / group_size)
        if mode in QUANT_SCALE_BYTES:
            scales = groups * QUANT_SCALE_BYTES[mode]
        else:  # affine: scales and biases in the model dtype
            scales = 2 * groups * self.dtype_bytes
        return weight + scales + bias_bytes

    def plain(self, *shape: int, dtype_bytes: int | None = None) -> int:
        return math.prod(shape) * (dtype_bytes or self.dtype_bytes)


def _mlp(est: _Estimator, prefix: str, hidden: int, inter: int, *, experts: int = 0) -> int:
    lead = (experts,) if experts else ()
    return (
        est.quantizable(f"{prefix}.gate_proj", (*lead, inter, hidden))
        + est.quantizable(f"{prefix}.up_proj", (*lead, inter, hidden))
        + est.quantizable(f"{prefix}.down_proj", (*lead, hidden, inter))
    )


def _deepseek_layer(est: _Estimator, c: dict, i: int) -> int:
    p = f"model.layers.{i}"
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v_dim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    kv_rank, q_rank = c["kv_lora_rank"], c.get("q_lora_rank")
    bias = bool(c.get("attention_bias", False))
    q_head = nope + rope
    a = f"{p}.self_attn"
    if q_rank is None:
        size = est.quantizable(f"{a}.q_proj", (heads * q_head, hidden))
    else:
        size = (
            est.quantizable(f"{a}.q_a_proj", (q_rank, hidden), bias)
            + est.plain(q_rank)
            + est.quantizable(f"{a}.q_b_proj", (heads * q_head, q_rank))
        )
    size += (
        est.quantizable(f"{a}.kv_a_proj_with_mqa", (kv_rank + rope, hidden), bias)
        + est.plain(kv_rank)
        + est.quantizable(f"{a}.embed_q", (heads, kv_rank, nope))
        + est.quantizable(f"{a}.unembed_out", (heads, v_dim, kv_rank))
        + est.quantizable(f"{a}.o_proj", (hidden, heads * v_dim), bias)
        + 2 * est.plain(hidden)  # input and post-attention RMSNorms
    )
    experts = c.get("n_routed_experts")
    moe = experts is not None and i >= c.get("first_k_dense_replace", 0) and i % c.get("moe_layer_freq", 1) == 0
    if not moe:
        return size + _mlp(est, f"{p}.mlp", hidden, c["intermediate_size"])
    moe_inter = c["moe_intermediate_size"]
    size += _mlp(est, f"{p}.mlp.switch_mlp", hidden, moe_inter, experts=experts)
    size += est.plain(experts, hidden)  # router (MoEGate) weight, never quantized
    size += est.plain(experts, dtype_bytes=4)  # e_score_correction_bias stays float32
    if c.get("n_shared_experts") is not None:
        size += _mlp(est, f"{p}.mlp.shared_experts", hidden, moe_inter * c["n_shared_experts"])
    return size


def _dense_layer(est: _Estimator, c: dict, i: int) -> int:
    p = f"model.layers.{i}"
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    bias = bool(c.get("attention_bias", False))
    a = f"{p}.self_attn"
    return (
        est.quantizable(f"{a}.q_proj", (heads * head_dim, hidden), bias)
        + est.quantizable(f"{a}.k_proj", (kv_heads * head_dim, hidden), bias)
        + est.quantizable(f"{a}.v_proj", (kv_heads * head_dim, hidden), bias)
        + est.quantizable(f"{a}.o_proj", (hidden, heads * head_dim))
        + _mlp(est, f"{p}.mlp", hidden, c["intermediate_size"])
        + 2 * est.plain(hidden)
    )


def _k3_attention(est: _Estimator, c: dict, i: int) -> int:
    """Kimi K3 layer i's attention: Kimi Delta Attention or gated MLA."""
    a, hidden = f"model.layers.{i}.self_attn", c["hidden_size"]
    lin = c["linear_attn_config"]
    if is_linear_layer(c, i):
        heads, head_dim, kernel = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
        proj = heads * head_dim
        if lin.get("use_full_rank_gate", False):
            gate = est.quantizable(f"{a}.g_proj", (proj, hidden))
        else:
            gate = est.quantizable(f"{a}.g_a_proj", (head_dim, hidden)) + est.quantizable(
                f"{a}.g_b_proj", (proj, head_dim)
            )
        return (
            gate
            + est.quantizable(f"{a}.qkv_proj", (3 * proj, hidden))
            + est.plain(3 * proj, kernel)  # depthwise short convolution
            + est.quantizable(f"{a}.f_a_proj", (head_dim, hidden))
            + est.quantizable(f"{a}.f_b_proj", (proj, head_dim))
            + est.quantizable(f"{a}.b_proj", (heads, hidden))
            + est.plain(heads + proj, dtype_bytes=4)  # A_log and dt_bias stay float32
            + est.plain(head_dim)
            + est.quantizable(f"{a}.o_proj", (hidden, proj))
        )
    heads, nope, rope, v_dim = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    kv_rank, q_rank = c["kv_lora_rank"], c.get("q_lora_rank")
    if q_rank is None:
        size = est.quantizable(f"{a}.q_proj", (heads * (nope + rope), hidden))
    else:
        size = (
            est.quantizable(f"{a}.q_a_proj", (q_rank, hidden))
            + est.plain(q_rank)
            + est.quantizable(f"{a}.q_b_proj", (heads * (nope + rope), q_rank))
        )
    if c.get("mla_use_output_gate", False):
        size += est.quantizable(f"{a}.g_proj", (heads * v_dim, hidden))
    return size + (
        est.quantizable(f"{a}.kv_a_proj_with_mqa", (kv_rank + rope, hidden))
        + est.plain(kv_rank)
        + est.quantizable(f"{a}.embed_q", (heads, kv_rank, nope))
        + est.quantizable(f"{a}.unembed_out", (heads, v_dim, kv_rank))
        + est.quantizable(f"{a}.o_proj", (hidden, heads * v_dim))
    )


def _k3_layer(est: _Estimator, c: dict, i: int) -> int:
    p, hidden = f"model.layers.{i}", c["hidden_size"]
    size = _k3_attention(est, c, i) + 2 * est.plain(hidden)  # + input and post-attention RMSNorms
    if c.get("attn_res_block_size") is not None:
        size += 4 * est.plain(hidden)  # attention and MLP residual projections (never quantized) and norms
    experts = c.get("num_experts") or 0
    if not (experts > 0 and i >= c.get("first_k_dense_replace", 0) and i % c.get("moe_layer_freq", 1) == 0):
        return size + _mlp(est, f"{p}.mlp", hidden, c["intermediate_size"])
    inter, latent = c["moe_intermediate_size"], c.get("routed_expert_hidden_size")
    size += _mlp(est, f"{p}.mlp.switch_mlp", latent or hidden, inter, experts=experts)
    size += est.quantizable(f"{p}.mlp.gate", (experts, hidden)) + est.plain(experts, dtype_bytes=4)
    if latent is not None:
        size += est.quantizable(f"{p}.mlp.routed_expert_down_proj", (latent, hidden))
        size += est.quantizable(f"{p}.mlp.routed_expert_up_proj", (hidden, latent))
        if c.get("latent_moe_use_norm", False):
            size += est.plain(latent)
    if c.get("num_shared_experts"):
        size += _mlp(est, f"{p}.mlp.shared_experts", hidden, inter * c["num_shared_experts"])
    return size


def is_linear_layer(config: dict, i: int) -> bool:
    """Whether Kimi K3 layer i (0-based) is a linear-attention (KDA) layer;
    `kda_layers` counts from 1, as mlx-lm reads it."""
    lin = config.get("linear_attn_config") or {}
    return (i + 1) in lin.get("kda_layers", ())


MLA_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
NESTED_MODEL_TYPES = {"kimi_k25": "language_model.", "kimi_k3": "language_model."}
_MOE_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def estimate_layer_sizes(config: dict) -> LayerSizes:
    """Sizes from the architecture and its quantization block, no weights needed."""
    model_type = config.get("model_type")
    prefix = NESTED_MODEL_TYPES.get(model_type, "")
    est = _Estimator(config, prefix)
    config = text_config(config)
    if model_type == "kimi_k3":
        layer_fn = _k3_layer
    elif model_type == "kimi_k25" or model_type in MLA_MODEL_TYPES:
        layer_fn = _deepseek_layer
    elif not any(config.get(k) for k in _MOE_KEYS) and not config.get("kv_lora_rank"):
        layer_fn = _dense_layer
    else:
        raise CheckpointError(
            f"config.json: cannot estimate sizes of model_type {model_type!r} without "
            f"its safetensors (known: {', '.join(MLA_MODEL_TYPES + tuple(NESTED_MODEL_TYPES))} and dense "
            "transformers); download the weights so the sizes can be read from their headers"
        )
    num_layers = _int_field(config, "num_hidden_layers", "config.json")
    try:
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        layers = tuple(layer_fn(est, config, i) for i in range(num_layers))
    except KeyError as e:
        raise CheckpointError(f"config.json: {model_type} needs {e.args[0]}") from None
    tied = bool(config.get("tie_word_embeddings", False))
    embed = est.quantizable("model.embed_tokens", (vocab, hidden))
    head = est.plain(hidden)
    if model_type == "kimi_k3" and config.get("attn_res_block_size") is not None:
        head += 2 * est.plain(hidden)  # the output attention-residual projection and norm
    if not tied:
        head += est.quantizable("lm_head", (vocab, hidden))
    return LayerSizes(layers, embed, head, estimated=True, tied_embeddings=tied)
