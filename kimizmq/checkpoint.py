"""What a model directory holds, read without loading a single weight: its
config.json (a VLM's text part), its safetensors headers (an 8-byte
little-endian length, then a JSON header naming every tensor's dtype, shape
and data offsets; only those bytes are read), its quantization, and which
tensors a stage loads. sizes.py turns this into per-layer byte sizes.
"""

from __future__ import annotations

import json
import math
import re
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
    declared = int_field(config, "num_hidden_layers", model_dir)
    extra = config.get("num_nextn_predict_layers", 0)
    allowed = declared + (extra if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0 else 0)
    found = sorted({layer for name in index if (layer := layer_of(name)) is not None})
    beyond = [i for i in found if i >= allowed]
    if beyond:
        raise CheckpointError(
            f"{model_dir}: config.json says num_hidden_layers = {declared} but the safetensors hold "
            f"layer(s) {ranges(beyond)} too ({len(found)} layers in all); fix num_hidden_layers"
        )


def text_name(name: str) -> str:
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
    tied = not any(text_name(n).startswith(LM_HEAD_PREFIX) for n in index)
    names = []
    for name in index:
        layer = layer_of(name)
        if layer is not None:
            keep = start <= layer < end
        elif text_name(name).startswith(EMBED_PREFIX):
            keep = first or (last and tied)
        else:
            keep = last and text_name(name).startswith(HEAD_PREFIXES)
        if keep:
            names.append(name)
    return names


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


def int_field(config: dict, key: str, where: Any) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: config.json needs an integer {key}, got {value!r}")
    return value


def ranges(indices: list[int]) -> str:
    out, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        out.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ", ".join(out)
