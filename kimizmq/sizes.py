"""Per-layer byte sizes of a checkpoint, what the planner places: exact from
the safetensors headers (no tensor data read), or estimated from config.json
and its quantization block alone; and what a request's caches take per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import (
    EMBED_PREFIX,
    HEAD_PREFIXES,
    LM_HEAD_PREFIX,
    QUANT_SCALE_BYTES,
    TORCH_DTYPE_BYTES,
    CheckpointError,
    check_layer_count,
    int_field,
    layer_of,
    loaded_nbytes,
    mlx_quantization,
    ranges,
    read_config,
    routed_experts_only,
    tensor_index,
    text_config,
    text_name,
    weight_files,
)


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


def sizes_from_tensors(tensors: dict[str, int], num_layers: int) -> LayerSizes:
    """Per-layer bytes from each tensor's loaded size: a layer's tensors to its
    layer (those past `num_layers`, multi-token prediction, mlx-lm drops), the
    embedding and the head (a VLM's language_model prefix aside) to theirs."""
    layers = [0] * num_layers
    embed = head = 0
    tied = True
    for name, nbytes in tensors.items():
        layer, stripped = layer_of(name), text_name(name)
        if layer is not None:
            if layer < num_layers:
                layers[layer] += nbytes
        elif stripped.startswith(EMBED_PREFIX):
            embed += nbytes
        elif stripped.startswith(HEAD_PREFIXES):
            head += nbytes
            tied = tied and not stripped.startswith(LM_HEAD_PREFIX)
    return LayerSizes(tuple(layers), embed, head, estimated=False, tied_embeddings=tied)


def layer_sizes(model_dir: str | Path) -> LayerSizes:
    """Per-layer bytes: exact from the safetensors headers, else estimated from config.json."""
    config = read_config(model_dir)
    num_layers = int_field(text_config(config), "num_hidden_layers", model_dir)
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
            f"no tensors for layer(s) {ranges(missing)} (an incomplete download?)"
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
    num_layers = int_field(config, "num_hidden_layers", "config.json")
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
