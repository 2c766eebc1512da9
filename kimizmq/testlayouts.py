"""Tiny models in the layouts Moonshot publishes, for tests (see testmodel.py
for the MLX-converted Kimi-K2 layout these sit beside).

| layout | as published by                  | config.json                            | weights                                           |
|--------|----------------------------------|----------------------------------------|---------------------------------------------------|
| kvb    | older MLX conversions of Kimi-K2 | kimi_k2, MLX quantization block        | MLX-quantized, with a quantized kv_b_proj         |
| fp8    | Kimi-K2-Instruct (0711, 0905)    | kimi_k2, FP8 e4m3 blocks of 128        | Linear weights F8_E4M3 + weight_scale_inv, bf16   |
| int4   | Kimi-K2-Thinking                 | kimi_k2, compressed-tensors int4 (g32) | routed experts packed per expert, the rest bf16   |
| k25    | Kimi-K2.5 / K2.6                 | kimi_k25, nested text_config (int4)    | the same under `language_model.`, a vision tower  |
| k3     | Kimi K3                          | kimi_k3, nested kimi_linear, MXFP4     | KDA and MLA layers, attention residuals, vision   |

Weights carry the names and dtypes of the Hugging Face files (kv_b_proj,
`experts.N.*.weight_packed`/`weight_scale`, K3's q/k/v convolutions and
`*_res.proj_weight`), so that loading them runs mlx-lm's own sanitize and
quantization mapping, as loading a real checkpoint does. The K3 model keeps
its real layer pattern (every fourth layer MLA, the last one too, the rest
Kimi Delta Attention) and its real attn_res_block_size of 12.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from . import testmodel as tm

LAYOUTS = ("kvb", "fp8", "int4", "k25", "k3")
FP8_BLOCK = 128  # Kimi-K2-Instruct's weight_block_size
FP8_MAX = 448.0  # the largest e4m3 value
# Kimi-K2-Instruct's quantization_config (../shared/reference/kimi-k2-instruct/config.json).
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
INT4_GROUP = 32  # compressed-tensors pack-quantized, as K2-Thinking and K2.5 store it
K3_BLOCK_SIZE = 12  # Kimi K3's attn_res_block_size
TEXT_PREFIX = "language_model."
FLOAT32_KEPT = ("e_score_correction_bias", "A_log", "dt_bias")  # mlx-lm never casts these


def _quantization_config(fmt: str, ignore: list[str], weights: dict, group: dict, top: dict) -> dict:
    """A compressed-tensors quantization_config: one group of 4-bit Linear weights
    quantized per group (`weights`, `group`, `top`: what a format adds)."""
    return {
        "config_groups": {
            "group_0": {
                **group,
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": False,
                    "num_bits": 4,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": "group",
                    "symmetric": True,
                    **weights,
                },
            }
        },
        "format": fmt,
        **top,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


# Kimi-K2.5's text_config quantization_config (../shared/reference/kimi-k2.5/config.json),
# also Kimi-K2-Thinking's.
INT4_QUANTIZATION_CONFIG = _quantization_config(
    "pack-quantized",
    ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    weights={"group_size": INT4_GROUP, "type": "int"},
    group={},
    top={},
)

# Kimi K3's text_config quantization_config (../shared/reference/kimi-k3/config.json).
MXFP4_QUANTIZATION_CONFIG = _quantization_config(
    "mxfp4-pack-quantized",
    [
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
        "re:.*lm_head.*",
        "re:.*vision_tower.*",
        "re:.*mm_projector.*",
    ],
    weights={"group_size": 32, "scale_dtype": "torch.uint8", "type": "float", "zp_dtype": None},
    group={"format": "mxfp4-pack-quantized"},
    top={"global_compression_ratio": None},
)

# A vision tower and projector no stage may read (names as K2.5 and K3 store them).
DUMMY_VISION = {
    "vision_tower.patch_embed.proj.weight": (256, 3, 14, 14),
    "vision_tower.encoder.blocks.0.wqkv.weight": (768, 256),
    "vision_tower.encoder.blocks.0.wo.weight": (256, 256),
    "mm_projector.proj.0.weight": (1024, 1024),
}


# Kimi K3's added tokens, as offsets from its first special id (163584), from
# its tokenizer's published ids (../shared/reference/kimi-k3/NOTES.md); the K2
# chat tokens (<|im_user|>, ...) are gone.
K3_SPECIAL_TOKEN_OFFSETS = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|end_of_msg|>": 2,
    "<|open|>": 3,
    "<|close|>": 4,
    "<|sep|>": 5,
    "<|media_pad|>": 21,
    "[UNK]": 254,
    "[PAD]": 255,
}


def k3_tokenizer_config() -> dict:
    """tokenizer_config.json with K3's special tokens (its chat template is a
    separate chat_template.jinja, see make_layout_model)."""
    config = tm.tokenizer_config()
    config["added_tokens_decoder"] = {
        str(tm.BASE_VOCAB + offset): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, offset in K3_SPECIAL_TOKEN_OFFSETS.items()
    }
    config["additional_special_tokens"] = ["<|end_of_msg|>", "<|open|>", "<|close|>", "<|sep|>", "<|media_pad|>"]
    del config["chat_template"]
    return config


def k2_text_config(num_layers: int) -> dict:
    """The tiny Kimi-K2 text model with K2-Thinking's int4 block in place of an MLX one."""
    config = tm.model_config(num_layers)
    del config["quantization"]
    config["quantization_config"] = INT4_QUANTIZATION_CONFIG
    return config


def k3_layer_pattern(num_layers: int) -> tuple[list[int], list[int]]:
    """(full_attn_layers, kda_layers), 1-based as K3's config.json has them:
    every fourth layer and the last one MLA, the others Kimi Delta Attention."""
    full = sorted({*range(4, num_layers + 1, 4), num_layers})
    return full, [i for i in range(1, num_layers + 1) if i not in full]


def k3_text_config(num_layers: int) -> dict:
    full, kda = k3_layer_pattern(num_layers)
    special = tm.BASE_VOCAB
    return {
        "model_type": "kimi_linear",
        "architectures": ["KimiLinearForCausalLM"],
        "activation_situ_beta": 4.0,
        "activation_situ_linear_beta": 25.0,
        "attn_res_block_size": K3_BLOCK_SIZE,
        "bos_token_id": special,
        "eos_token_id": special + 2,
        "dtype": "bfloat16",
        "first_k_dense_replace": 1,
        "hidden_act": "situ",
        "hidden_size": 128,
        "intermediate_size": 256,
        "kv_lora_rank": 64,
        "latent_moe_use_norm": True,
        "linear_attn_config": {
            "full_attn_layers": full,
            "gate_lower_bound": -5.0,
            "head_dim": 32,
            "kda_layers": kda,
            "num_heads": 2,
            "short_conv_kernel_size": 4,
            "use_full_rank_gate": True,
        },
        "max_position_embeddings": 1048576,
        "mla_use_nope": True,
        "mla_use_output_gate": True,
        "moe_intermediate_size": 64,
        "moe_layer_freq": 1,
        "moe_renormalize": True,
        "moe_router_activation_func": "sigmoid",
        "num_attention_heads": 2,
        "num_expert_group": 1,
        "num_experts": 8,
        "num_experts_per_token": 2,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 2,
        "num_nextn_predict_layers": 0,
        "num_shared_experts": 2,
        "q_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "quantization_config": MXFP4_QUANTIZATION_CONFIG,
        "rms_norm_eps": 1e-05,
        "routed_expert_hidden_size": 64,
        "routed_scaling_factor": 1.0,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "use_grouped_topk": True,
        "v_head_dim": 32,
        "vocab_size": tm.BASE_VOCAB + tm.NUM_RESERVED_SPECIAL_TOKENS,
    }


def model_config(layout: str, num_layers: int) -> dict:
    if layout == "kvb":
        return tm.model_config(num_layers)
    if layout == "fp8":
        config = tm.model_config(num_layers)
        del config["quantization"]
        config["quantization_config"] = FP8_QUANTIZATION_CONFIG
        return config
    if layout == "int4":
        return k2_text_config(num_layers)
    text = k2_text_config(num_layers) if layout == "k25" else k3_text_config(num_layers)
    return {
        "architectures": ["KimiK25ForConditionalGeneration" if layout == "k25" else "KimiK3ForConditionalGeneration"],
        "model_type": "kimi_k25" if layout == "k25" else "kimi_k3",
        "bos_token_id": text["bos_token_id"],
        "eos_token_id": text["eos_token_id"],
        "dtype": "bfloat16",
        "tie_word_embeddings": False,
        "text_config": text,
        "vision_config": {"patch_size": 14, "vt_hidden_size": 256, "vt_num_hidden_layers": 1},
    }


def _float_params(config: dict, seed: int) -> dict[str, mx.array]:
    """Every parameter of mlx-lm's model for `config`, named as mlx-lm names
    it, float32; values as the Kimi-K2 test model draws them."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    params = {}
    for name, v in tree_flatten(model.parameters()):
        text_name = name.removeprefix(TEXT_PREFIX)
        params[name] = tm.init_weight(text_name, v.shape, seed)
        if text_name.endswith("A_log"):  # decay rates exp(A_log) in [1, 16), as mlx-lm initializes them
            params[name] = mx.log(1.0 + 15.0 * mx.sigmoid(params[name]))
    return params


def _int4(w: mx.array) -> dict[str, mx.array]:
    """compressed-tensors pack-quantized: symmetric int4 per group of 32, the
    values + 8 packed eight to an int32 (lowest bits first), bf16 scales."""
    out_dims, in_dims = w.shape
    groups = w.reshape(out_dims, in_dims // INT4_GROUP, INT4_GROUP)
    scale = (mx.abs(groups).max(axis=-1, keepdims=True) / 7).astype(mx.bfloat16)
    q = mx.clip(mx.round(groups / scale.astype(mx.float32)), -8, 7).astype(mx.uint32) + 8
    q = q.reshape(out_dims, in_dims // 8, 8) << (mx.arange(8, dtype=mx.uint32) * 4)
    return {
        "weight_packed": q.sum(axis=-1).astype(mx.uint32).view(mx.int32),
        "weight_scale": scale.squeeze(-1),
        "weight_shape": mx.array([out_dims, in_dims], dtype=mx.int32),
    }


def _fp8(w: mx.array) -> dict[str, mx.array]:
    """FP8 e4m3 with one float32 scale per 128 x 128 block (`weight_scale_inv`:
    the factor mlx-lm's sanitize multiplies each block by)."""
    out_dims, in_dims = w.shape
    rows, cols = -(-out_dims // FP8_BLOCK), -(-in_dims // FP8_BLOCK)
    padded = mx.pad(w, ((0, rows * FP8_BLOCK - out_dims), (0, cols * FP8_BLOCK - in_dims)))
    blocks = padded.reshape(rows, FP8_BLOCK, cols, FP8_BLOCK)
    scale = mx.maximum(mx.abs(blocks).max(axis=(1, 3)), 1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:out_dims, :in_dims]
    return {"weight": mx.to_fp8(q), "weight_scale_inv": scale.astype(mx.float32)}


FP8_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _experts_one_by_one(params: dict, p: str) -> Iterator[tuple[str, mx.array]]:
    """Layer `p`'s routed experts as the published files hold them, one by one:
    (f"{p}.mlp.experts.{e}.{proj}", weight), popped from mlx-lm's stacked switch_mlp."""
    for proj in ("gate_proj", "up_proj", "down_proj"):
        stacked = params.pop(f"{p}.mlp.switch_mlp.{proj}.weight", None)
        for e in range(0 if stacked is None else stacked.shape[0]):
            yield f"{p}.mlp.experts.{e}.{proj}", stacked[e]


def _published_fp8(params: dict, config: dict) -> dict[str, mx.array]:
    """Kimi-K2-Instruct's FP8 files: every Linear of the decoder layers in
    e4m3 blocks, experts one by one; router, norms, embeddings, lm_head bf16."""
    out = {}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        params[f"{p}.self_attn.kv_b_proj.weight"] = _kv_b_proj(params, f"{p}.self_attn")
        for base, w in list(_experts_one_by_one(params, p)):
            params[f"{base}.weight"] = w
    for name in [n for n in params if n.startswith("model.layers.") and n.endswith(".weight")]:
        if name.rsplit(".", 2)[-2] in FP8_LINEARS:
            base = name.removesuffix(".weight")
            out.update({f"{base}.{k}": v for k, v in _fp8(params.pop(name)).items()})
    return out


def _mark_fp8(path: Path) -> None:
    """mx.save_safetensors writes FP8 bytes as U8; mark them F8_E4M3, as the
    published files have them (same bytes, a rewritten header)."""
    names = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for file in sorted(path.glob("model*.safetensors")):
        raw = file.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + size])
        for name, entry in header.items():
            if name != "__metadata__" and f"{name.removesuffix('.weight')}.weight_scale_inv" in names:
                entry["dtype"] = "F8_E4M3"
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])


def _mxfp4(w: mx.array) -> dict[str, mx.array]:
    """compressed-tensors mxfp4-pack-quantized: two E2M1 values a byte, an
    E8M0 scale a group of 32 (MLX's mxfp4, stored as bytes)."""
    packed, scales = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
    return {"weight_packed": packed.view(mx.uint8), "weight_scale": scales}


def _kv_b_proj(params: dict, prefix: str) -> mx.array:
    """kv_b_proj as Hugging Face stores it; mlx-lm's sanitize splits it into
    embed_q and unembed_out."""
    wk = params.pop(f"{prefix}.embed_q.weight")  # (heads, kv_rank, nope)
    wv = params.pop(f"{prefix}.unembed_out.weight")  # (heads, v, kv_rank)
    v = mx.concatenate([wk.swapaxes(-1, -2), wv], axis=1)
    return v.reshape(-1, v.shape[-1])


def _published_k2(params: dict, config: dict, prefix: str) -> dict[str, mx.array]:
    text = config.get("text_config", config)
    out = {}
    for layer in range(text["num_hidden_layers"]):
        p = f"{prefix}model.layers.{layer}"
        out[f"{p}.self_attn.kv_b_proj.weight"] = _kv_b_proj(params, f"{p}.self_attn")
        for base, w in _experts_one_by_one(params, p):
            out.update({f"{base}.{k}": v for k, v in _int4(w).items()})
    return out


K3_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _published_k3(params: dict, config: dict) -> dict[str, mx.array]:
    text = config["text_config"]
    out = {}
    for name in [n for n in params if n.endswith(("_res_proj.weight", "_res_norm.weight"))]:
        stem, kind = name.removesuffix(".weight").rsplit("_", 1)  # x_res_proj.weight -> x_res.proj_weight
        out[f"{stem}.{kind}_weight"] = params.pop(name)
    for layer in range(text["num_hidden_layers"]):
        p = f"{TEXT_PREFIX}model.layers.{layer}"
        a = f"{p}.self_attn"
        if f"{a}.qkv_proj.weight" in params:
            for part, w in zip("qkv", mx.split(params.pop(f"{a}.qkv_proj.weight"), 3, axis=0)):
                out[f"{a}.{part}_proj.weight"] = w
            for part, w in zip("qkv", mx.split(params.pop(f"{a}.qkv_conv.conv.weight"), 3, axis=0)):
                out[f"{a}.{part}_conv1d.weight"] = w.moveaxis(1, 2)  # (C, 1, kernel) as torch stores it
        else:
            out[f"{a}.kv_b_proj.weight"] = _kv_b_proj(params, a)
        if f"{p}.mlp.switch_mlp.gate_proj.weight" not in params:
            continue
        moe = f"{p}.block_sparse_moe"
        for proj, w_name in K3_EXPERT_NAMES.items():
            stacked = params.pop(f"{p}.mlp.switch_mlp.{proj}.weight")
            for e in range(stacked.shape[0]):
                for k, v in _mxfp4(stacked[e]).items():
                    out[f"{moe}.experts.{e}.{w_name}.{k}"] = v
        for name in [n for n in params if n.startswith(f"{p}.mlp.")]:
            rest = name.removeprefix(f"{p}.mlp.")
            key = f"{moe}.gate.e_score_correction_bias" if rest == "e_score_correction_bias" else f"{moe}.{rest}"
            out[key] = params.pop(name)
    return out


def _quantized_kv_b_proj(config: dict, seed: int) -> dict[str, mx.array]:
    """The Kimi-K2 test model as older mlx-lm conversions stored it: embed_q
    and unembed_out joined back into one kv_b_proj, quantized like the rest."""
    weights, _ = tm.build_weights(config, seed)
    for layer in range(config["num_hidden_layers"]):
        a = f"model.layers.{layer}.self_attn"
        parts = {}
        for name in ("embed_q", "unembed_out"):
            w, scales, biases = (weights.pop(f"{a}.{name}.{k}") for k in ("weight", "scales", "biases"))
            bits = w.shape[-1] * 32 // (scales.shape[-1] * tm.GROUP_SIZE)
            parts[name] = mx.dequantize(w, scales, biases, group_size=tm.GROUP_SIZE, bits=bits)
        params = {f"{a}.embed_q.weight": parts["embed_q"], f"{a}.unembed_out.weight": parts["unembed_out"]}
        kv_b = _kv_b_proj(params, a)
        q = mx.quantize(kv_b, group_size=tm.GROUP_SIZE, bits=4)
        weights.update({f"{a}.kv_b_proj.{k}": v for k, v in zip(("weight", "scales", "biases"), q)})
    mx.eval(weights)
    return dict(sorted(weights.items()))


def build_weights(layout: str, config: dict, seed: int) -> dict[str, mx.array]:
    if layout == "kvb":
        return _quantized_kv_b_proj(config, seed)
    params = _float_params(config, seed)
    if layout == "fp8":
        published = _published_fp8(params, config)
    elif layout == "k3":
        published = _published_k3(params, config)
    else:
        published = _published_k2(params, config, TEXT_PREFIX if layout == "k25" else "")
    published.update(params)  # what is left is stored unquantized
    for name, v in published.items():  # in bfloat16, as the originals store it
        if v.dtype == mx.float32 and not any(k in name for k in (*FLOAT32_KEPT, "weight_scale_inv")):
            published[name] = v.astype(mx.bfloat16)
    if layout in ("k25", "k3"):
        for i, (name, shape) in enumerate(DUMMY_VISION.items()):
            published[name] = tm.init_weight(name, shape, seed + i).astype(mx.bfloat16)
    mx.eval(published)
    return dict(sorted(published.items()))


def write_layout_model(path: Path, layout: str, seed: int, num_layers: int, chat_template: Path | None) -> None:
    config = model_config(layout, num_layers)
    weights = build_weights(layout, config, seed)
    vision = {k: v for k, v in weights.items() if k.startswith(("vision_tower.", "mm_projector."))}
    text = {k: v for k, v in weights.items() if k not in vision}
    tm.save_shards(path, text, sum(v.size for v in text.values()))
    if layout == "fp8":
        _mark_fp8(path)
    if vision:  # in a file of its own, as K3's shard 96 holds its vision tower
        index = json.loads((path / "model.safetensors.index.json").read_text())
        name = "model-vision.safetensors"
        mx.save_safetensors(str(path / name), vision, metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(vision, name))
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        tm.write_json(path / "model.safetensors.index.json", index)
    tm.write_json(path / "config.json", config)
    ranks = tm.train_bpe(tm.CORPUS, tm.BASE_VOCAB)
    lines = [b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (path / "tiktoken.model").write_bytes(b"".join(lines))
    tm.write_json(path / "tokenizer_config.json", k3_tokenizer_config() if layout == "k3" else tm.tokenizer_config())
    (path / "tokenization_kimi.py").write_text(tm.TRIPWIRE_SOURCE)
    if chat_template is not None:  # as K2-Thinking and K3 publish theirs, beside tokenizer_config.json
        shutil.copyfile(chat_template, path / "chat_template.jinja")


def make_layout_model(
    path: str | Path, layout: str, *, seed: int = 0, num_layers: int = 7, chat_template: Path | None = None
) -> Path:
    """Write a tiny model in `layout` (one of LAYOUTS) to `path`; like
    testmodel.make_test_model, left alone when already there, never half-written.

    `chat_template`: a published chat_template.jinja to ship with it (read
    from ../shared/reference by the tests); without one the int4 and k25
    models keep the Kimi-K2 template in tokenizer_config.json and the k3
    model has none."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if num_layers < 2:
        raise ValueError(f"num_layers must be at least 2 (got {num_layers})")
    path = Path(path)
    want = {**tm.stamp(seed, num_layers), "layout": layout, "layouts_sha256": _source_hash()}
    if chat_template is not None:
        want["chat_template_sha256"] = hashlib.sha256(Path(chat_template).read_bytes()).hexdigest()
    if tm.read_stamp(path) == want:
        return path
    if path.exists() and tm.read_stamp(path) is None and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a kimizmq test model; choose an empty path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    try:
        with mx.stream(mx.cpu):
            write_layout_model(tmp, layout, seed, num_layers, chat_template)
        tm.write_json(tmp / tm.STAMP_NAME, want)
        tm.replace_dir(tmp, path, want)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
