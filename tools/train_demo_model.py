"""Train the demo model (kimizmq/demo_model) from scratch on this machine's CPU.

    python tools/train_demo_model.py --out kimizmq/demo_model

Kimi-K2's exact layout (``kimi_k2``: MLA attention, a dense first layer,
sigmoid-routed MoE with the correction bias, yarn rope), shrunk; a byte-level
BPE vocabulary of its own in Kimi's ``tiktoken.model`` format with Kimi's
special tokens after it; Kimi-K2-Instruct's chat template (tool calls) and
Kimi-K2-Thinking's as a named variant. Trained in float32 with MLX, then
quantized with mixed per-module bit widths and saved as mlx-lm saves a
converted checkpoint. Fixed seeds; no network. The data: generated chats
(tools/demo_data.py) and the English text of Python's own documentation
(``pydoc_data.topics``, PSF licence). ``TRAINING.json`` in the output records
the run: sizes, the loss curve, the wall time and sample answers.

Needs kimizmq importable (``pip install -e .``) and the ``tokenizers`` package
(installed with mlx-lm's transformers).
"""

import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from base64 import b64encode
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics

import click
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import regex
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.deepseek_v3 import DeepseekV3MoE
from mlx_lm.utils import _get_classes, get_total_parameters
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_data import conversation  # noqa: E402

from kimizmq import testmodel  # noqa: E402
from kimizmq.demomodel import SAMPLE_CONVERSATIONS, chat_template_source, compile_template, encode_chat  # noqa: E402
from kimizmq.tokenizer import KIMI_PAT_STR, TiktokenTokenizer, load_tokenizer  # noqa: E402

THINKING_TEMPLATE_FILE = Path(__file__).resolve().parent / "kimi_k2_thinking.chat_template.jinja"
SEED = 0
BASE_VOCAB = 1024
GROUP_SIZE = 64
N_CONVERSATIONS = 12000
PLAIN_TEXT_REPEATS = 1
SEQ_LEN = 256
BATCH = 8
PEAK_LR = 3e-3
WARMUP_STEPS = 20
BIAS_UPDATE_RATE = 1e-3  # aux-loss-free balancing: nudge each expert's routing bias toward equal load
BIAS_UPDATE_EVERY = 8
SAMPLE_PROMPTS = 6


def model_config(num_layers: int) -> dict:
    """Kimi-K2's architecture shrunk (the test model's, over this vocabulary)."""
    config = testmodel.model_config(num_layers)
    config.update(
        vocab_size=BASE_VOCAB + testmodel.NUM_RESERVED_SPECIAL_TOKENS,
        bos_token_id=BASE_VOCAB + testmodel.SPECIAL_TOKEN_OFFSETS["[BOS]"],
        eos_token_id=BASE_VOCAB + testmodel.SPECIAL_TOKEN_OFFSETS["[EOS]"],
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=64,
        kv_lora_rank=64,
        max_position_embeddings=4096,
        quantization={
            "group_size": GROUP_SIZE,
            "bits": 4,
            "model.embed_tokens": {"group_size": GROUP_SIZE, "bits": 6},
            "lm_head": {"group_size": GROUP_SIZE, "bits": 8},
        },
    )
    config["rope_scaling"] = {**config["rope_scaling"], "original_max_position_embeddings": 128}
    return config


def quant_params(path: str, module: nn.Module) -> dict | bool:
    """Bits per module; embed_tokens and lm_head are named in config.json,
    attention (8) and shared experts (6) are not (loaders infer them from
    the shapes), the rest take the default 4."""
    if not hasattr(module, "to_quantized"):
        return False
    if path == "model.embed_tokens":
        bits = 6
    elif path == "lm_head" or ".self_attn." in path:
        bits = 8
    elif ".shared_experts." in path:
        bits = 6
    else:
        bits = 4
    return {"group_size": GROUP_SIZE, "bits": bits}


def tokenizer_config(chat_template: str, thinking_template: str) -> dict:
    """tokenizer_config.json: Kimi's special tokens after this vocabulary."""
    config = testmodel.tokenizer_config()
    config["added_tokens_decoder"] = {
        str(BASE_VOCAB + offset): {**entry, "content": token}
        for (token, offset), entry in zip(
            testmodel.SPECIAL_TOKEN_OFFSETS.items(), config["added_tokens_decoder"].values(), strict=True
        )
    }
    del config["auto_map"]  # no remote code ships with this model
    config["chat_template"] = [
        {"name": "default", "template": chat_template},
        {"name": "thinking", "template": thinking_template},
    ]
    return config


def plain_text() -> list[str]:
    """Python's documentation topics (pydoc_data, shipped with Python), by paragraph groups."""
    return [pydoc_topics[k].strip() for k in sorted(pydoc_topics)]


def render_text(template, convo: dict) -> str:
    """A conversation as the chat template writes it, for BPE training."""
    return template.render(messages=convo["messages"], tools=convo["tools"], add_generation_prompt=False)


def train_bpe(texts: list[str], specials: list[str]) -> dict[bytes, int]:
    """Byte-level BPE ranks (HF tokenizers' trainer) over Kimi's pre-tokenizer
    splits: the 256 bytes first, then every merge in the trainer's order."""
    split_special = regex.compile("|".join(regex.escape(s) for s in specials))
    pattern = regex.compile(KIMI_PAT_STR, flags=regex.V1)

    def words():
        for text in texts:
            for part in split_special.split(text):
                yield from pattern.findall(part)

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(words(), trainer=trainer)
    byte_of = byte_level_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        ranks.setdefault(bytes(byte_of[c] for c in token), len(ranks))
    if len(ranks) != BASE_VOCAB:
        raise RuntimeError(f"BPE gave {len(ranks)} tokens, expected {BASE_VOCAB}")
    return ranks


def byte_level_decoder() -> dict[str, int]:
    """Character -> byte, the inverse of the byte-level BPE alphabet mapping."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def write_tokenizer(out: Path, ranks: dict[bytes, int], chat_template: str, thinking_template: str) -> None:
    lines = [b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (out / "tiktoken.model").write_bytes(b"".join(lines))
    testmodel.write_json(out / "tokenizer_config.json", tokenizer_config(chat_template, thinking_template))
    im_end = BASE_VOCAB + testmodel.SPECIAL_TOKEN_OFFSETS["<|im_end|>"]
    testmodel.write_json(out / "generation_config.json", {"eos_token_id": im_end})


def encode_conversation(
    tok: TiktokenTokenizer, templates: dict[str, str], convo: dict, rng: random.Random
) -> list[int]:
    """Token ids as the coordinator builds a prompt, plus the answer.

    Half the conversations encode every request string on its own (names,
    ids, tool definitions), half only message contents, so the model reads
    both ways a server may tokenize a chat. A thinking conversation is
    rendered by either template up to the last answer, which follows as
    ``<think>reasoning</think>answer<|im_end|>``."""
    every_string_plain = rng.random() < 0.5
    if convo["thought"] is None:
        return encode_chat(
            tok,
            templates["default"],
            convo["messages"],
            tools=convo["tools"],
            add_generation_prompt=False,
            every_string_plain=every_string_plain,
        )
    prompt = encode_chat(
        tok,
        templates[rng.choice(["default", "thinking"])],
        convo["messages"][:-1],
        tools=convo["tools"],
        every_string_plain=every_string_plain,
    )
    answer = f"<think>{convo['thought']}</think>{convo['messages'][-1]['content']}"
    return prompt + tok.encode(answer) + tok.encode("<|im_end|>", allow_special=True)


def build_stream(out: Path, rng: random.Random) -> tuple[np.ndarray, dict]:
    """Write the tokenizer into ``out`` and return all training tokens, shuffled by document."""
    chat_template = testmodel.CHAT_TEMPLATE
    thinking_template = THINKING_TEMPLATE_FILE.read_text()
    convos = [conversation(rng) for _ in range(N_CONVERSATIONS)]
    plain = plain_text()
    specials = list(testmodel.SPECIAL_TOKEN_OFFSETS)
    default_t, thinking_t = compile_template(chat_template), compile_template(thinking_template)
    bpe_texts = [render_text(thinking_t if c["thought"] else default_t, c) for c in convos] + plain
    write_tokenizer(out, train_bpe(bpe_texts, specials), chat_template, thinking_template)
    config = json.loads((out / "tokenizer_config.json").read_text())
    tok = TiktokenTokenizer(out, {}, config)
    templates = {"default": chat_template, "thinking": thinking_template}
    eos = tok.encode("[EOS]", allow_special=True)
    docs = [encode_conversation(tok, templates, c, rng) for c in convos]
    n_chat = sum(map(len, docs))
    docs += [tok.encode(t) + eos for t in plain] * PLAIN_TEXT_REPEATS
    rng.shuffle(docs)
    stream = np.array([t for d in docs for t in d], dtype=np.int32)
    stats = {"conversations": len(convos), "chat_tokens": n_chat, "plain_text_tokens": int(stream.size - n_chat)}
    return stream, stats


def init_params(model: nn.Module) -> None:
    """mlx-lm's default init, with small random router weights (zeros would
    tie every expert) and a zero routing-correction bias, which no gradient
    touches (it is moved by ``update_routing_bias``)."""
    for _, module in model.named_modules():
        if hasattr(module, "e_score_correction_bias"):
            module.weight = 0.02 * mx.random.normal(module.weight.shape)
            module.freeze(keys=["e_score_correction_bias"], recurse=False)


def update_routing_bias(model: nn.Module, x: mx.array) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of experts
    that got fewer tokens than the mean on this batch, lower the others."""
    h = model.model.embed_tokens(x)
    mask = create_attention_mask(h, None, return_array=True)
    for layer in model.model.layers:
        if isinstance(layer.mlp, DeepseekV3MoE):
            a = h + layer.self_attn(layer.input_layernorm(h), mask)
            inds, _ = layer.mlp.gate(layer.post_attention_layernorm(a))
            gate = layer.mlp.gate
            n = gate.e_score_correction_bias.shape[0]
            load = (inds.reshape(-1, 1) == mx.arange(n)).sum(axis=0).astype(mx.float32)
            gate.e_score_correction_bias = gate.e_score_correction_bias + BIAS_UPDATE_RATE * mx.sign(load.mean() - load)
        h = layer(h, mask)
    mx.eval(model.parameters())


def train(model: nn.Module, stream: np.ndarray, steps: int, log) -> list[dict]:
    schedule = optim.join_schedules(
        [optim.linear_schedule(PEAK_LR / 20, PEAK_LR, WARMUP_STEPS), optim.cosine_decay(PEAK_LR, steps, PEAK_LR / 10)],
        [WARMUP_STEPS],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    data_rng = np.random.default_rng(SEED)
    curve, losses, t0 = [], [], time.monotonic()
    for i in range(1, steps + 1):
        starts = data_rng.integers(0, stream.size - SEQ_LEN - 1, BATCH)
        window = np.stack([stream[s : s + SEQ_LEN + 1] for s in starts])
        x, y = mx.array(window[:, :-1]), mx.array(window[:, 1:])
        loss = step(x, y)
        mx.eval(loss, state)
        losses.append(loss.item())
        if i % BIAS_UPDATE_EVERY == 0:
            update_routing_bias(model, x)
        if i % 25 == 0 or i == steps:
            entry = {"step": i, "loss": round(sum(losses) / len(losses), 4), "seconds": round(time.monotonic() - t0, 1)}
            curve.append(entry)
            log(f"step {i}/{steps} loss {entry['loss']:.3f} ({entry['seconds']:.0f} s)")
            losses = []
    return curve


def greedy(model: nn.Module, tok: TiktokenTokenizer, prompt: list[int], max_tokens: int = 80) -> str:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
    out = []
    for _ in range(max_tokens):
        t = int(mx.argmax(logits, axis=-1).item())
        if t in tok.eos_token_ids:
            break
        out.append(t)
        logits = model(mx.array([[t]]), cache=cache)[:, -1, :]
    return tok.decode(out)


def samples(model: nn.Module, out: Path) -> list[dict]:
    """Greedy answers of the quantized model to a few prompts (float32, as the CPU workers run)."""
    tok = load_tokenizer(out)
    template = chat_template_source(out, "default")
    results = []
    for convo in SAMPLE_CONVERSATIONS[:SAMPLE_PROMPTS]:
        ids = encode_chat(tok, template, convo["messages"], tools=convo.get("tools"))
        results.append({"messages": convo["messages"], "answer": greedy(model, tok, ids)})
    return results


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--out", default="kimizmq/demo_model", show_default=True, type=click.Path(file_okay=False, path_type=Path)
)
@click.option("--steps", type=click.IntRange(1), default=320, show_default=True)
@click.option("--layers", type=click.IntRange(3), default=4, show_default=True)
def main(out: Path, steps: int, layers: int) -> None:
    """Train the demo model from scratch and write it to OUT (replacing it)."""
    t0 = time.monotonic()
    random_seed = random.Random(SEED)
    mx.random.seed(SEED)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        with mx.stream(mx.cpu):
            stream, data_stats = build_stream(tmp, random_seed)
            click.echo(f"data: {data_stats} ({time.monotonic() - t0:.0f} s)", err=True)
            config = model_config(layers)
            model_class, args_class = _get_classes(config)
            model = model_class(args_class.from_dict(config))
            init_params(model)
            mx.eval(model.parameters())
            t_train = time.monotonic()
            curve = train(model, stream, steps, lambda m: click.echo(m, err=True))
            train_seconds = time.monotonic() - t_train
            model.unfreeze()
            nn.quantize(model, class_predicate=quant_params)
            weights = dict(tree_flatten(model.parameters()))
            testmodel.save_shards(tmp, weights, get_total_parameters(model))
            testmodel.write_json(tmp / "config.json", dict(sorted(config.items())))
            answers = samples(model, tmp)
        record = {
            "seed": SEED,
            "steps": steps,
            "batch": BATCH,
            "seq_len": SEQ_LEN,
            "tokens_seen": steps * BATCH * SEQ_LEN,
            "data": data_stats,
            "train_seconds": round(train_seconds),
            "total_seconds": round(time.monotonic() - t0),
            "cpu_count": os.cpu_count(),
            "machine": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(),
            "mlx": mx.__version__,
            "loss_curve": curve,
            "greedy_samples": answers,
        }
        testmodel.write_json(tmp / "TRAINING.json", record)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.iterdir())
    click.echo(f"{out}: {size / 1e6:.1f} MB, trained {train_seconds / 60:.1f} min, final loss {curve[-1]['loss']}")
    assert math.isfinite(curve[-1]["loss"])


if __name__ == "__main__":
    main()
