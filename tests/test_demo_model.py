"""The trained demo model through real workers and a coordinator: the oracle
still holds on trained weights, and the behaviour only a trained model has (a
tool call of its own, a <think> block, stop strings on real words, sampling
that changes what is said) comes through the pipeline intact, and the agent
loop runs on the model's own tool calls with the openai, anthropic and
langchain-openai SDKs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import anthropic
import numpy as np
import openai
import pytest

from kimizmq.demomodel import (
    DEMO_MODEL,
    DEMO_MODEL_NAME,
    SAMPLE_CONVERSATIONS,
    THINK_SYSTEM,
    TIME_TOOL,
    WEATHER_TOOL,
    chat_template_source,
    encode_chat,
)
from kimizmq.local import LocalCluster, write_config
from kimizmq.tokenizer import load_tokenizer
from kimizmq.toolcalls import TOOL_MARKERS
from tests.support import complete_ids, post_json, running_cluster, streamed_tool_calls
from tests.test_pipeline import reference_greedy

N_TOKENS = 48
HELLO = "Hello!"
HELLO_ANSWER = "Hello! I am Kimi, an AI assistant. How can I help you today?"
THINK_MESSAGES = [
    {"role": "system", "content": THINK_SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
]
TOOL_CALL = re.compile(
    r"<\|tool_calls_section_begin\|><\|tool_call_begin\|>functions\.(\w+):0<\|tool_call_argument_begin\|>"
    r"(\{.*?\})<\|tool_call_end\|><\|tool_calls_section_end\|>"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_MODEL)


@pytest.fixture(scope="module")
def template():
    return chat_template_source(DEMO_MODEL, "default")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory.mktemp("demo"), DEMO_MODEL, 2, model_name=DEMO_MODEL_NAME)


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.api + "/v1", api_key="none", max_retries=0, timeout=120)


def chat(cluster, messages: list[dict], **params) -> dict:
    body = {"model": DEMO_MODEL_NAME, "messages": messages, "max_tokens": 96, "temperature": 0, **params}
    status, out = post_json(cluster.api, "/v1/chat/completions", body)
    assert status == 200, out
    return out["choices"][0]


@pytest.fixture(scope="module")
def hello_prompt(tok, template):
    return encode_chat(tok, template, [{"role": "user", "content": HELLO}])


@pytest.fixture(scope="module")
def hello_reference(hello_prompt):
    return reference_greedy(DEMO_MODEL, hello_prompt, N_TOKENS)


@pytest.mark.parametrize(
    "n_workers,layers", [(1, None), (2, None), (3, [(0, 1), (1, 3), (3, 4)])], ids=["1-stage", "2-stages", "3-stages"]
)
def test_trained_model_over_stages_equals_mlx_lm(hello_prompt, hello_reference, tok, tmp_path, n_workers, layers):
    """Past the end of its answer too (ignore_eos): every token and logprob."""
    ref_tokens, ref_logprobs = hello_reference
    assert tok.decode(ref_tokens).startswith(HELLO_ANSWER + "<|im_end|>"), "the oracle must run the trained model"
    cfg = write_config(tmp_path / "kimi.toml", DEMO_MODEL, n_workers, layers=layers, model_name=DEMO_MODEL_NAME)
    with LocalCluster(cfg) as cluster:
        lp = complete_ids(cluster.api, hello_prompt, N_TOKENS)["logprobs"]
    assert lp["token_ids"] == ref_tokens
    np.testing.assert_allclose(lp["token_logprobs"], ref_logprobs, rtol=1e-4, atol=1e-6)


def test_chat_answers_in_readable_english(cluster):
    choice = chat(cluster, [{"role": "user", "content": HELLO}])
    assert choice["message"]["content"] == HELLO_ANSWER
    assert choice["finish_reason"] == "stop"


def test_a_second_chat_turn_prefills_only_what_is_new(cluster, tok, template):
    """A chat client sends the whole conversation again: the first turn's
    prompt and answer come from the prefix cache, and the answer is still the
    one single-process mlx-lm gives for the whole second prompt."""
    first = [{"role": "user", "content": HELLO}]
    answer = chat(cluster, first)["message"]["content"]
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "What can you do?"}]
    body = {"model": DEMO_MODEL_NAME, "messages": second, "max_tokens": 48, "temperature": 0}
    status, out = post_json(cluster.api, "/v1/chat/completions", body)
    assert status == 200, out
    prompt = encode_chat(tok, template, second)
    assert out["usage"]["prompt_tokens"] == len(prompt)
    cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert len(encode_chat(tok, template, first)) <= cached < len(prompt)
    ref_tokens, _ = reference_greedy(DEMO_MODEL, prompt, out["usage"]["completion_tokens"])
    assert tok.decode(ref_tokens).removesuffix("<|im_end|>") == out["choices"][0]["message"]["content"]


def test_a_tool_call_prompt_yields_the_models_own_kimi_tool_call(cluster, tok, template):
    """The prompt declares get_weather; the model answers with a tool call in
    Kimi-K2's format, its own tokens as single-process mlx-lm gives them, and
    ends its turn there."""
    convo = SAMPLE_CONVERSATIONS[1]
    prompt = encode_chat(tok, template, convo["messages"], tools=convo["tools"])
    choice = complete_ids(cluster.api, prompt, 40, ignore_eos=False)
    call = TOOL_CALL.fullmatch(choice["text"])
    assert call, choice["text"]
    assert call[1] == "get_weather"
    assert set(json.loads(call[2])) == {"city"}
    assert choice["finish_reason"] == "stop"
    ref_tokens, _ = reference_greedy(DEMO_MODEL, prompt, len(choice["logprobs"]["token_ids"]))
    assert choice["logprobs"]["token_ids"] == ref_tokens


def test_the_answer_after_a_tool_result_is_a_sentence_about_the_weather(cluster, tok, template):
    convo = SAMPLE_CONVERSATIONS[2]
    assert convo["tools"] == [WEATHER_TOOL]
    prompt = encode_chat(tok, template, convo["messages"], tools=convo["tools"])
    choice = complete_ids(cluster.api, prompt, 60, ignore_eos=False)
    assert re.fullmatch(
        r"It is \w+ in [A-Z]\w+ right now, and the temperature is -?\d+ degrees Celsius\.", choice["text"]
    )
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_a_thinking_system_prompt_gives_reasoning_content_then_the_answer(client, streamed):
    """The model serves Kimi-K2-Instruct's template and ships Kimi-K2-Thinking's
    too: the <think> block it opens with under THINK_SYSTEM is reasoning_content."""
    kw = dict(model=DEMO_MODEL_NAME, messages=THINK_MESSAGES, temperature=0, max_tokens=96)
    if streamed:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        (finish,) = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        reasoning, content, finish = choice.message.reasoning_content, choice.message.content, choice.finish_reason
    assert reasoning.startswith("The user ") and content.endswith("."), (reasoning, content)
    assert not any(m in reasoning + content for m in ("<think>", "</think>"))
    assert finish == "stop"


def test_the_anthropic_sdk_gets_the_think_block_as_a_thinking_block(cluster):
    claude = anthropic.Anthropic(base_url=cluster.api, api_key="none", max_retries=0, timeout=120)
    answer = claude.messages.create(
        model=DEMO_MODEL_NAME,
        max_tokens=96,
        system=THINK_SYSTEM,
        messages=THINK_MESSAGES[1:],
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_body={"temperature": 0},
    )
    assert [b.type for b in answer.content] == ["thinking", "text"]
    assert answer.content[0].thinking.startswith("The user ") and answer.content[1].text.endswith(".")
    assert "<think>" not in answer.content[1].text and answer.stop_reason == "end_turn"


def test_the_thinking_template_variant_gives_a_think_block_too(cluster, tok):
    """Kimi-K2-Thinking's template, shipped as the named template `thinking`."""
    messages = [{"role": "system", "content": THINK_SYSTEM}, {"role": "user", "content": HELLO}]
    prompt = encode_chat(tok, chat_template_source(DEMO_MODEL, "thinking"), messages)
    choice = complete_ids(cluster.api, prompt, 80, ignore_eos=False)
    assert re.fullmatch(r"<think>The user [^<]+</think>[^<]+\.", choice["text"]), choice["text"]
    assert choice["finish_reason"] == "stop"


def test_a_stop_string_fires_on_real_words(cluster):
    choice = chat(cluster, [{"role": "user", "content": HELLO}], stop=["AI assistant"])
    assert choice["message"]["content"] == HELLO_ANSWER[: HELLO_ANSWER.index("AI assistant")]
    assert choice["finish_reason"] == "stop"


def test_temperature_top_p_and_seed_change_the_text_and_a_seed_reproduces_it(cluster):
    messages = [{"role": "user", "content": "Tell me about the moon."}]
    greedy = chat(cluster, messages)["message"]["content"]

    def sampled(seed: int, top_p: float = 1.0) -> str:
        return chat(cluster, messages, temperature=1.5, top_p=top_p, seed=seed)["message"]["content"]

    first = sampled(7)
    assert sampled(7) == first
    assert {sampled(8), sampled(9), first} != {first}, "other seeds must say something else"
    assert first != greedy
    # top_p keeps only the likeliest token of each step here: greedy again.
    assert sampled(7, top_p=1e-6) == greedy


# -- the agent loop, the model choosing the tool itself (tool_choice auto, greedy) --------

TIME_QUESTION = [{"role": "user", "content": "What time is it in Tokyo?"}]
AGENT_TOOLS = [TIME_TOOL, WEATHER_TOOL]
# The model reads few facts back from a tool's result: its answer after one is
# a sentence of the shape it learnt (the city and time it names may be others).
TIME_ANSWER = re.compile(r"The local time in [A-Za-z :0-9]+\.")


def time_result(arguments: str) -> str:
    return json.dumps({"city": json.loads(arguments)["city"], "time": "14:05"})


def check_answer_text(text: str) -> None:
    assert TIME_ANSWER.fullmatch(text), text
    assert not any(m in text for m in TOOL_MARKERS)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_agent_loop_with_the_openai_sdk_on_the_models_own_tool_call(client, streamed):
    kw = dict(model=DEMO_MODEL_NAME, messages=TIME_QUESTION, tools=AGENT_TOOLS, temperature=0, max_tokens=60)
    if streamed:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        ((call_id, name, arguments),) = streamed_tool_calls(chunks)
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        (finish,) = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
        }
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        (call,) = choice.message.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
        content, finish = choice.message.content or "", choice.finish_reason
        assert choice.message.content is None
        assistant = choice.message.model_dump(exclude_none=True)
    assert finish == "tool_calls" and not content
    assert name == "get_time" and call_id == "functions.get_time:0"
    assert set(json.loads(arguments)) == {"city"}

    messages = [*TIME_QUESTION, assistant, {"role": "tool", "tool_call_id": call_id, "content": time_result(arguments)}]
    kw["messages"] = messages
    if streamed:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
        (finish,) = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    else:
        answer = client.chat.completions.create(**kw).choices[0]
        assert answer.message.tool_calls is None
        text, finish = answer.message.content, answer.finish_reason
    assert finish == "stop"
    check_answer_text(text)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_agent_loop_with_the_anthropic_sdk_on_the_models_own_tool_use(cluster, streamed):
    claude = anthropic.Anthropic(base_url=cluster.api, api_key="none", max_retries=0, timeout=120)
    tools = [
        {
            "name": t["function"]["name"],
            "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"],
        }
        for t in AGENT_TOOLS
    ]
    kw = dict(model=DEMO_MODEL_NAME, max_tokens=60, messages=TIME_QUESTION, tools=tools, extra_body={"temperature": 0})

    def ask() -> anthropic.types.Message:
        if streamed:
            with claude.messages.stream(**kw) as s:
                return s.get_final_message()
        return claude.messages.create(**kw)

    first = ask()
    assert first.stop_reason == "tool_use" and [b.type for b in first.content] == ["tool_use"]
    (use,) = first.content
    assert use.name == "get_time" and set(use.input) == {"city"}

    kw["messages"] = [
        *TIME_QUESTION,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": time_result(json.dumps(use.input))}],
        },
    ]
    answer = ask()
    assert answer.stop_reason == "end_turn" and [b.type for b in answer.content] == ["text"]
    check_answer_text(answer.content[0].text)


def test_agent_loop_with_langchain_bind_tools_on_the_models_own_tool_call(cluster):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = langchain_openai.ChatOpenAI(
        model=DEMO_MODEL_NAME, base_url=cluster.api + "/v1", api_key="none", max_retries=0, temperature=0, max_tokens=60
    )
    agent = llm.bind_tools(AGENT_TOOLS)
    question = HumanMessage(TIME_QUESTION[0]["content"])
    first = agent.invoke([question])
    (call,) = first.tool_calls
    assert call["name"] == "get_time" and set(call["args"]) == {"city"} and not first.content
    result = ToolMessage(time_result(json.dumps(call["args"])), tool_call_id=call["id"])
    answer = agent.invoke([question, first, result])
    assert not answer.tool_calls
    check_answer_text(answer.content)


def test_kimi_demo_streams_a_readable_answer_from_two_workers(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kimizmq.cli", "demo", "--dir", str(tmp_path / "demo"), HELLO],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == HELLO_ANSWER, out.stdout
    assert "w0: layers [0, " in out.stderr and "w1: layers [" in out.stderr, out.stderr
    assert "tokens/s after the first" in out.stderr and "through 2 workers" in out.stderr, out.stderr
