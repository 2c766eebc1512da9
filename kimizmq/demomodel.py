"""The small trained model of Kimi-K2's layout that ships with kimizmq.

``DEMO_MODEL`` is a converted-checkpoint directory (config.json with
``model_type: kimi_k2``, mixed-bit safetensors with an index,
``tiktoken.model``, ``tokenizer_config.json`` with Kimi's special tokens and
two chat templates: ``default``, Kimi-K2-Instruct's, and ``thinking``,
Kimi-K2-Thinking's). ``tools/train_demo_model.py`` made it; its
``TRAINING.json`` records how. It greets and answers in short English
sentences (knowing few facts), calls the tools below in Kimi-K2's format when
tools are declared, and opens its answer with ``<think>...</think>`` under
``THINK_SYSTEM``.
"""

import functools
import json
import re
from pathlib import Path
from typing import Any

import jinja2.ext
from jinja2.sandbox import SandboxedEnvironment

from .tokenizer import Tokenizer, raise_exception, strftime_now, tojson

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO_MODEL_NAME = "kimi-k2-demo"

# With this system prompt the model reasons in <think>...</think> first.
THINK_SYSTEM = "You are Kimi. Think step by step before you answer."

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The name of the city."}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The name of the city."}},
            "required": ["city"],
        },
    },
}
TOOLS = {t["function"]["name"]: t for t in (WEATHER_TOOL, TIME_TOOL)}

# Prompts whose greedy answers the training tool records in TRAINING.json;
# [1] and [5] get a tool call, [2] the sentence after the tool's result.
SAMPLE_CONVERSATIONS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Tell me about pipelines of Macs."}]},
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER_TOOL]},
    {
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "functions.get_weather:0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "functions.get_weather:0",
                "name": "get_weather",
                "content": '{"city": "Paris", "temperature": 18, "condition": "sunny"}',
            },
        ],
        "tools": [WEATHER_TOOL],
    },
    {
        "messages": [
            {"role": "system", "content": THINK_SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
        ]
    },
    {"messages": [{"role": "user", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "What time is it in Tokyo?"}], "tools": [TIME_TOOL, WEATHER_TOOL]},
]

# Around request strings while rendering, so they are encoded as plain text.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_PLAIN_KEYS = frozenset({"role", "type"})


def chat_template_source(model_dir: Path, name: str) -> str:
    """The chat template called ``name`` in the model's tokenizer_config.json."""
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    templates = {t["name"]: t["template"] for t in config["chat_template"]}
    return templates[name]


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """A chat template in a sandbox that lets it append to its own lists
    (Kimi-K2-Instruct's template queues tool-call ids that way)."""
    env = SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _mark(value: Any, key: str | None, every_string: bool) -> Any:
    if isinstance(value, str):
        return value if key in _PLAIN_KEYS or not value else f"{_OPEN}{value}{_CLOSE}"
    if isinstance(value, dict):
        return {k: _mark(v, k, every_string) if every_string or k == "content" else v for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v, key, every_string) for v in value]
    return value


def encode_chat(
    tokenizer: Tokenizer,
    template: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    every_string_plain: bool = False,
) -> list[int]:
    """Token ids of ``messages`` (and ``tools``) rendered by the Jinja chat
    ``template``, as the coordinator builds a prompt: special tokens the
    template writes are special, message contents are encoded on their own as
    plain text; with ``every_string_plain`` every string of the messages and
    tools is (names, ids, arguments, descriptions), not only contents."""
    marked = _mark(messages, None, every_string_plain)
    shown_tools = _mark(tools, None, True) if tools and every_string_plain else tools
    text = compile_template(template).render(
        messages=marked,
        tools=shown_tools,
        add_generation_prompt=add_generation_prompt,
        **tokenizer.special_tokens_map(),
    )
    ids: list[int] = []
    plain = False
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", text):
        if piece in (_OPEN, _CLOSE):
            plain = piece == _OPEN
        elif piece:
            ids += tokenizer.encode(piece, allow_special=not plain)
    return ids
