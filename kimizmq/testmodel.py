"""A tiny, deterministic model with Kimi-K2's exact layout, for tests.

``make_test_model`` writes a directory that looks like a converted Kimi-K2
checkpoint: ``config.json`` with ``model_type: kimi_k2`` (MLA attention, a
dense first layer, noaux_tc sigmoid MoE routing, yarn rope), mixed-bit
quantized weights named as mlx-lm names them after ``sanitize`` and split over
several safetensors files with an index, and Kimi's tokenizer files
(``tiktoken.model``, ``tokenizer_config.json`` with the real special tokens and
chat template, ``generation_config.json``). Its ``tokenization_kimi.py`` is a
tripwire: executing it writes ``TRIPWIRE_NAME`` next to it and raises.

Quantization per module (group size 64 everywhere):

| modules                                      | bits | named in config.json  |
|----------------------------------------------|------|-----------------------|
| ``model.embed_tokens``                       | 3    | yes                   |
| attention projections, MLPs, routed experts | 4    | as the default        |
| ``self_attn.o_proj``                         | 5    | no (inferred)         |
| ``lm_head``                                  | 6    | yes                   |
| ``mlp.shared_experts.*``                     | 8    | no (inferred)         |

Greedy decoding in float32 gives varied tokens and is stable under chunked
prefill. A random network amplifies rounding noise, so bfloat16 output (and,
in bfloat16, one-token-at-a-time versus batched prefill, which take different
MLA paths) diverges from float32 within a few tokens: compare like with like.
"""

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import zlib
from base64 import b64encode
from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes, get_total_parameters

STAMP_NAME = "kimizmq-testmodel.json"
TRIPWIRE_NAME = "TOKENIZATION_KIMI_WAS_EXECUTED"

NUM_SHARDS = 4
BASE_VOCAB = 1024
NUM_RESERVED_SPECIAL_TOKENS = 256
GROUP_SIZE = 64

# Kimi-K2-Instruct's added tokens, as offsets from its first special id (163584).
SPECIAL_TOKEN_OFFSETS = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
    "[UNK]": 254,
    "[PAD]": 255,
}
# In the real file the tool-call markers are added tokens but not "special".
NOT_SPECIAL = {
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
}
ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
]

# Kimi-K2-Instruct's chat template, verbatim.
CHAT_TEMPLATE = """\
{% macro render_content(msg) -%}
    {%- set c = msg.get('content') -%}
    {%- if c is string -%}
      {{ c }}
    {%- elif c is not none -%}
      {% for content in c -%}
        {% if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
          <|media_start|>image<|media_content|><|media_pad|><|media_end|>
        {% else -%}
          {{ content['text'] }}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
{%- endmacro %}

{%- set tool_response_queue = namespace(ids=[]) -%}
{%- set tool_call_counter = namespace(value=1) -%}

{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{% for message in messages %}
  {%- if loop.first and messages[0]['role'] != 'system' -%}
  <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {% endif %}

  {%- set role_name =  message.get('name') or  message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>{{role_name}}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{role_name}}<|im_middle|>
  {%- else -%}
    <|im_system|>{{role_name}}<|im_middle|>
  {%- endif -%}

  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {{render_content(message)}}<|tool_calls_section_begin|>
    {%- for tool_call in message['tool_calls'] -%}
      {%- if tool_call['id'] is defined -%}
        {%- set formatted_id = tool_call['id'] -%}
      {%- else -%}
        {%- set formatted_id = 'functions.' + tool_call['function']['name'] + ':' + (tool_call_counter.value | string) -%}
        {%- set tool_call_counter.value = tool_call_counter.value + 1 -%}
      {%- endif -%}
      {%- set _ = tool_response_queue.ids.append(formatted_id) -%}
      <|tool_call_begin|>{{ formatted_id }}<|tool_call_argument_begin|>{% if tool_call['function']['arguments'] is string %}{{ tool_call['function']['arguments'] }}{% else %}{{ tool_call['function']['arguments'] | tojson }}{% endif %}<|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message['role'] == 'tool' -%}
    {%- if tool_response_queue.ids -%}
      {%- set tool_call_id = tool_response_queue.ids.pop(0) -%}
    {%- else -%}
      {%- set tool_call_id = 'functions.' + message.get('name', 'unknown') + ':' + (tool_call_counter.value | string) -%}
    {%- endif -%}
    ## Return of {{ tool_call_id }}
{{render_content(message)}}
  {%- elif message['content'] is not none -%}
    {{render_content(message)}}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""

TRIPWIRE_SOURCE = f'''\
"""Tripwire standing in for Kimi's remote-code tokenizer.

kimizmq must never import or execute code from a model directory. Running this
file leaves a marker next to it and fails loudly.
"""

from pathlib import Path

(Path(__file__).resolve().parent / "{TRIPWIRE_NAME}").write_text(
    "tokenization_kimi.py was executed\\n"
)
raise RuntimeError("tokenization_kimi.py from a model directory was executed")
'''

# Training text for the byte-level BPE: several scripts, so that é, ß, 中, ж
# and emoji appear both as whole merged tokens and split across tokens.
CORPUS = """\
You are Kimi, an AI assistant created by Moonshot AI. The user asks a question
and the assistant answers it. The system prompt says what the assistant should
do. user assistant system tool user assistant system
A pipeline splits the layers of one large model across several machines. The
first stage holds the embeddings, the last stage holds the final norm and the
head that turns hidden states into logits. Every stage keeps its own cache for
each request, and activations travel from one stage to the next over sockets.
When the last stage has sampled a token, the token goes back to the coordinator,
which decides whether to stop: at the end of a message, at a stop string, or
when the client has gone away. Then it streams the text out, one piece at a time.
Tokens are not characters. A single character may need several bytes, and a
token may end in the middle of one, so a streaming decoder must wait for the
rest of the bytes before it prints anything.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor
jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 65536 3.14159 2.71828
Code: def add(a, b): return a + b; for i in range(10): print(i, i * i)
{"role": "user", "content": "Hello!"} [1, 2, 3] (x, y) <a href="#">link</a>
Le café est très chaud, mais le thé est déjà froid. Où est la bibliothèque ?
Élève, étudiant, été, hôtel, forêt, naïve, Noël, garçon, façade, crème brûlée.
Die Straße ist groß und die Bäume sind grün. Über den Wolken muss die Freiheit
wohl grenzenlos sein. Schöne Grüße aus München, Köln und Düsseldorf.
El niño pequeño comió una manzana. ¿Dónde está la estación? ¡Qué bueno!
Mañana vamos a la montaña con nuestros amigos españoles.
Привет, мир! Как дела? Жизнь прекрасна, и всё будет хорошо. Москва, Санкт-Петербург.
Γειά σου κόσμε. Η γλώσσα είναι όμορφη. Αθήνα, Θεσσαλονίκη.
你好，世界！中文文本用于测试分词器。我们今天去公园散步，天气很好。
中国的首都是北京。人工智能正在改变世界。模型在多台机器上运行。
日本語のテキストです。東京は大きな都市です。ありがとうございます。
한국어 텍스트입니다. 안녕하세요. 감사합니다.
Emoji: 😀 😃 😄 😁 🙂 🚀 🔥 👍 🎉 ❤️ 🌍 ✨ 🤖 🧠 📦 ✅ ❌ ⚡ 🐍 🍵
Symbols: → ← ↑ ↓ ≤ ≥ ≠ ∞ ∑ √ π ° € £ ¥ © ® ™ § ¶ • … “quotes” ‘single’ — –
Once upon a time there was a small model that lived on many machines at once.
It learned to count, to greet people in many languages, and to tell stories
about foxes, dogs, zebras and sphinxes. Every morning it said: good morning!
Every evening it said: good night, see you tomorrow. It was never in a hurry.
Questions and answers: What is the capital of France? Paris. What is two plus
two? Four. Which planet is the largest? Jupiter. Who wrote Hamlet? Shakespeare.
Weather: sunny, cloudy, rainy, windy, snowy, stormy, foggy, warm, cold, humid.
Colours: red, orange, yellow, green, blue, indigo, violet, black, white, grey.
Animals: cat, dog, horse, mouse, bird, fish, whale, tiger, lion, elephant, bear.
Kitchen: bread, butter, cheese, milk, coffee, tea, sugar, salt, pepper, rice.
Travel: train, plane, ship, bicycle, station, airport, harbour, ticket, map.
"""

# Split like Kimi's pattern, closely enough for training: Han runs, words with
# an optional leading space, short digit runs, punctuation runs, whitespace.
PRETOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+")


def train_bpe(text: str, vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then merges in training order."""
    words = Counter(m.group().encode() for m in PRETOKEN.finditer(text))
    pieces = {w: [bytes([b]) for b in w] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    pairs: Counter = Counter()
    for w, n in words.items():
        for pair in itertools.pairwise(pieces[w]):
            pairs[pair] += n
    while len(ranks) < vocab_size:
        pairs = +pairs
        if not pairs:
            raise ValueError(f"corpus too small for {vocab_size} tokens")
        a, b = max(pairs, key=lambda p: (pairs[p], p))
        merged = a + b
        ranks.setdefault(merged, len(ranks))
        for w, n in words.items():
            if merged not in w:
                continue
            old = pieces[w]
            for pair in itertools.pairwise(old):
                pairs[pair] -= n
            new, i = [], 0
            while i < len(old):
                if i + 1 < len(old) and old[i] == a and old[i + 1] == b:
                    new.append(merged)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            pieces[w] = new
            for pair in itertools.pairwise(new):
                pairs[pair] += n
    return ranks


# Geometry a caller may change (`make_test_model(geometry=...)`); everything
# else (routing, rope, quantization layout, tokenizer) stays the test model's.
GEOMETRY_KEYS = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "num_attention_heads",
        "num_key_value_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    }
)

# Kimi-K2-Instruct's per-layer geometry (../shared/reference), with 16 routed
# experts instead of 384 so that a few layers fit one GPU: a decode step does
# the same work per layer as Kimi-K2 (8 active experts of 2048, one shared).
KIMI_K2_GEOMETRY = {
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
}


def model_config(num_layers: int, geometry: dict | None = None) -> dict:
    """config.json: Kimi-K2's architecture, shrunk (or with `geometry`'s sizes)."""
    config = _base_config(num_layers)
    if geometry:
        unknown = set(geometry) - GEOMETRY_KEYS
        if unknown:
            raise ValueError(f"unknown geometry keys {sorted(unknown)}; expected some of {sorted(GEOMETRY_KEYS)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in geometry.values()):
            raise ValueError(f"geometry values must be positive integers, got {geometry}")
        config.update(geometry)
    return config


def _base_config(num_layers: int) -> dict:
    first_special = BASE_VOCAB
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": BASE_VOCAB + NUM_RESERVED_SPECIAL_TOKENS,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 64,
        "num_hidden_layers": num_layers,
        "num_nextn_predict_layers": 0,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.827,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-06,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "bos_token_id": first_special + SPECIAL_TOKEN_OFFSETS["[BOS]"],
        "eos_token_id": first_special + SPECIAL_TOKEN_OFFSETS["[EOS]"],
        "torch_dtype": "bfloat16",
        "quantization": {
            "group_size": GROUP_SIZE,
            "bits": 4,
            "model.embed_tokens": {"group_size": GROUP_SIZE, "bits": 3},
            "lm_head": {"group_size": GROUP_SIZE, "bits": 6},
        },
    }


def quant_params(path: str, module: nn.Module) -> dict | bool:
    """Bits for each quantizable module; see the module docstring."""
    if not hasattr(module, "to_quantized"):
        return False
    if path == "model.embed_tokens":
        bits = 3
    elif path == "lm_head":
        bits = 6
    elif path.endswith("self_attn.o_proj"):
        bits = 5
    elif ".shared_experts." in path:
        bits = 8
    else:
        bits = 4
    return {"group_size": GROUP_SIZE, "bits": bits}


def init_weight(name: str, shape: tuple[int, ...], seed: int) -> mx.array:
    """A deterministic float32 value for one parameter.

    Projections are unit-gain (std 1/sqrt(fan_in)) so that context keeps
    moving the output; the head is four times that, which gives logits a
    spread of a few nats (greedy tokens vary, their log-probabilities are far
    from 0); and the head's special-token rows are damped so that a random
    model neither stops early nor prints reserved tokens.
    """
    key = mx.random.key(zlib.crc32(f"{seed}:{name}".encode()))
    if name.endswith("e_score_correction_bias"):
        return 0.1 * mx.random.normal(shape, key=key)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * mx.random.normal(shape, key=key)
    if name == "model.embed_tokens.weight":
        return mx.random.normal(shape, key=key)
    w = mx.random.normal(shape, key=key) * shape[-1] ** -0.5
    if name == "lm_head.weight":
        damp = mx.where(mx.arange(shape[0]) < BASE_VOCAB, 4.0, 0.2)
        return w * damp[:, None]
    return w


def build_weights(config: dict, seed: int) -> tuple[dict[str, mx.array], int]:
    """The quantized parameters, named as mlx-lm's deepseek_v3 model names them."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    cast = model.cast_predicate
    params = [(name, init_weight(name, v.shape, seed)) for name, v in tree_flatten(model.parameters())]
    params = [(k, v.astype(mx.bfloat16) if cast(k) else v) for k, v in params]
    model.update(tree_unflatten(params))
    del params  # the float32 originals are freed as each part is quantized
    nn.quantize(model, class_predicate=quant_params)
    weights = dict(tree_flatten(model.parameters()))
    # One layer at a time, so a large geometry never holds all of its float32 weights at once.
    parts: dict[str, list[mx.array]] = {}
    for k, v in weights.items():
        parts.setdefault(".".join(k.split(".")[:3]) if k.startswith("model.layers.") else k, []).append(v)
    for arrays in parts.values():
        mx.eval(arrays)
    return weights, get_total_parameters(model)


def save_shards(path: Path, weights: dict[str, mx.array], total_parameters: int) -> None:
    """Byte-balanced shards with an index, as mlx_lm.utils.save_model writes them."""
    total = sum(v.nbytes for v in weights.values())
    shards: list[dict[str, mx.array]] = [{} for _ in range(NUM_SHARDS)]
    seen = 0
    for k, v in weights.items():
        shards[min(seen * NUM_SHARDS // total, NUM_SHARDS - 1)][k] = v
        seen += v.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"
        mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": total, "total_parameters": total_parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(path / "model.safetensors.index.json", index)


def tokenizer_config() -> dict:
    """tokenizer_config.json shaped like Kimi-K2-Instruct's."""
    added = {
        str(BASE_VOCAB + offset): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token not in NOT_SPECIAL,
        }
        for token, offset in SPECIAL_TOKEN_OFFSETS.items()
    }
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=4, ensure_ascii=False) + "\n")


def write_model(path: Path, seed: int, num_layers: int, geometry: dict | None = None) -> None:
    config = model_config(num_layers, geometry)
    weights, total_parameters = build_weights(config, seed)
    save_shards(path, weights, total_parameters)
    write_json(path / "config.json", dict(sorted(config.items())))
    write_json(
        path / "generation_config.json",
        {"eos_token_id": BASE_VOCAB + SPECIAL_TOKEN_OFFSETS["<|im_end|>"]},
    )
    ranks = train_bpe(CORPUS, BASE_VOCAB)
    lines = [b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (path / "tiktoken.model").write_bytes(b"".join(lines))
    write_json(path / "tokenizer_config.json", tokenizer_config())
    (path / "tokenization_kimi.py").write_text(TRIPWIRE_SOURCE)


def stamp(seed: int, num_layers: int, geometry: dict | None = None) -> dict:
    """What a finished model records; a different stamp means rebuild."""
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    out = {"seed": seed, "num_layers": num_layers, "generator_sha256": source}
    if geometry:
        out["geometry"] = dict(sorted(geometry.items()))
    return out


def read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def make_test_model(path: str | Path, *, seed: int = 0, num_layers: int = 7, geometry: dict | None = None) -> Path:
    """Write a tiny Kimi-K2-layout model to ``path`` and return ``path``.

    ``geometry`` overrides sizes named in ``GEOMETRY_KEYS`` (``KIMI_K2_GEOMETRY``:
    Kimi-K2's per-layer sizes, for benchmarks); such a model is built on the
    default device (the GPU where there is one), the tiny one on the CPU.

    The same arguments give byte-identical files. If ``path`` already holds a
    model made with the same arguments (and this same generator), nothing is
    written. The model is built in a temporary sibling directory and renamed
    into place, so ``path`` never holds a half-written model. An existing test
    model with other arguments is replaced; any other non-empty directory is
    refused.
    """
    if num_layers < 2:
        raise ValueError(f"num_layers must be at least 2 (got {num_layers})")
    path = Path(path)
    model_config(num_layers, geometry)  # refuse bad geometry before touching path
    want = stamp(seed, num_layers, geometry)
    if read_stamp(path) == want:
        return path
    if path.exists() and read_stamp(path) is None and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a kimizmq test model; choose an empty path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    try:
        with mx.stream(mx.default_device() if geometry else mx.cpu):
            write_model(tmp, seed, num_layers, geometry)
        write_json(tmp / STAMP_NAME, want)
        replace_dir(tmp, path, want)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def replace_dir(new: Path, path: Path, want: dict) -> None:
    """Move ``new`` to ``path``; tolerate a concurrent builder that got there first."""
    if path.exists() and read_stamp(path) not in (None, want):
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / path.name)
        shutil.rmtree(old, ignore_errors=True)
    elif path.exists() and not any(path.iterdir()):
        path.rmdir()
    try:
        os.replace(new, path)
    except OSError:
        if read_stamp(path) != want:
            raise
