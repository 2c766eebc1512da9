"""The oracle: the distributed pipeline gives exactly what single-process
mlx-lm gives on the same model and dtype, over real processes and sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from kimizmq.local import LocalCluster, write_config
from tests.support import complete_ids, greedy_body, log_events, open_stream, wait_until, worker_stats

N_TOKENS = 64
PROMPT = [5, 17, 99, 230, 41, 7, 300, 12, 64, 8, 150, 77, 3, 201, 45, 11, 90, 33, 120, 6, 250, 19, 88, 140]


def reference_greedy(model_dir, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Single-process mlx-lm, float32 as the CPU workers compute."""
    model, _ = load_model(model_dir)
    model.set_dtype(mx.float32)
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
    tokens, logprobs = [], []
    for _ in range(n):
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tok = int(mx.argmax(lp, axis=-1).item())
        tokens.append(tok)
        logprobs.append(float(lp[0, tok].item()))
        logits = model(mx.array([[tok]]), cache=cache)[:, -1, :]
    return tokens, logprobs


@pytest.fixture(scope="module")
def reference(tiny_model):
    return reference_greedy(tiny_model, PROMPT, N_TOKENS)


@pytest.mark.parametrize(
    "n_workers,layers,runtime",
    [
        (1, None, {}),
        (2, None, {}),
        (3, [(0, 1), (1, 5), (5, 7)], {}),
        (2, None, {"decode": "eager", "stream_interval_ms": 0}),
    ],
    ids=["1-stage", "2-stages", "3-stages-uneven", "2-stages-eager-every-token-alone"],
)
def test_distributed_greedy_equals_mlx_lm(tiny_model, reference, tmp_path, n_workers, layers, runtime):
    ref_tokens, ref_logprobs = reference
    assert len(set(ref_tokens)) >= 10, "the test model must give varied tokens for this oracle to bite"
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, n_workers, layers=layers, runtime=runtime)
    with LocalCluster(cfg) as cluster:
        health = cluster.health()[1]
        assert len(health["stages"]) == n_workers
        if layers:
            assert [(s["start"], s["end"]) for s in health["stages"]] == layers
        choice = complete_ids(cluster.api, PROMPT, N_TOKENS)
        last = worker_stats(cluster.cfg)[cluster.cfg.workers[-1].name]
    lp = choice["logprobs"]
    assert lp["token_ids"] == ref_tokens
    np.testing.assert_allclose(lp["token_logprobs"], ref_logprobs, rtol=1e-4, atol=1e-6)
    if runtime.get("stream_interval_ms") == 0:
        assert last["token_messages"] == last["tokens_sampled"] == N_TOKENS


def test_tokens_gathered_into_runs_stream_exactly_mlx_lm(tiny_model, reference, tmp_path):
    """With stream_interval_ms the last stage sends a request's tokens as runs:
    the first at once, the rest a run per interval, the last at once. The
    stream still carries every token, mlx-lm's, and its logprobs, in order."""
    ref_tokens, ref_logprobs = reference
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime={"stream_interval_ms": 1000})
    with LocalCluster(cfg) as cluster:
        before = worker_stats(cluster.cfg)[cluster.cfg.workers[-1].name]
        t0 = time.monotonic()
        with open_stream(cluster.api, greedy_body(PROMPT, N_TOKENS)) as resp:
            chunks = [json.loads(line[6:]) for line in resp if line.startswith(b"data: {")]
        seconds = time.monotonic() - t0
        after = worker_stats(cluster.cfg)[cluster.cfg.workers[-1].name]
    runs = [c["choices"][0]["logprobs"]["token_ids"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [t for run in runs for t in run] == ref_tokens
    streamed_lps = [
        lp for c in chunks if c["choices"][0]["logprobs"] for lp in c["choices"][0]["logprobs"]["token_logprobs"]
    ]
    np.testing.assert_allclose(streamed_lps, ref_logprobs, rtol=1e-4, atol=1e-6)
    assert len(runs[0]) == 1, "a request's first token goes out alone, at once"
    messages = after["token_messages"] - before["token_messages"]
    assert after["tokens_sampled"] - before["tokens_sampled"] == N_TOKENS
    # the first token, then one run per second of decoding, the last token's run
    assert 2 <= messages <= 2 + int(seconds), (messages, seconds)
    assert len(runs) == messages


def test_compiled_decode_over_two_stages_equals_mlx_lm_past_the_cache_growth(tiny_model, tmp_path):
    """The ring's one-token steps go through each stage's compiled segments
    (runtime.decode's default), past the caches' growth at 256 slots, and still
    give mlx-lm's tokens."""
    n = 250
    ref_tokens, ref_logprobs = reference_greedy(tiny_model, PROMPT, n)
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2)
    with LocalCluster(cfg) as cluster:
        lp = complete_ids(cluster.api, PROMPT, n)["logprobs"]
        stats = worker_stats(cluster.cfg)
    assert all(s["compiled_decode"] for s in stats.values())
    assert lp["token_ids"] == ref_tokens
    np.testing.assert_allclose(lp["token_logprobs"], ref_logprobs, rtol=1e-4, atol=1e-5)


def test_sampling_with_seed_is_reproducible_and_seed_matters(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2)
    with LocalCluster(cfg) as cluster:
        runs = [
            complete_ids(cluster.api, PROMPT, 32, temperature=1.0, top_p=0.95, seed=seed)["logprobs"]["token_ids"]
            for seed in (1234, 1234, 99)
        ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_kimi_prompt_raw_streams_the_greedy_completion(tiny_model, reference, tmp_path):
    from kimizmq.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model)
    text = "The quick brown fox"
    ids = tok.encode(text)
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2)
    with LocalCluster(cfg) as cluster:
        expected = complete_ids(cluster.api, ids, 24, ignore_eos=False)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "kimizmq.cli",
                "prompt",
                "--config",
                str(cfg),
                "--raw",
                "--max-tokens",
                "24",
                "--temperature",
                "0",
                text,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == expected["text"]
    ref_model_tokens, _ = reference_greedy(tiny_model, ids, 24)
    assert expected["logprobs"]["token_ids"][: len(ref_model_tokens)] == ref_model_tokens


def test_decode_runs_around_the_ring_without_the_coordinator(tiny_model, reference, tmp_path):
    """The last stage feeds each token straight to the first: with the
    coordinator stopped (SIGSTOP) mid-request, the stages keep decoding; the
    ring stops by itself at max_tokens; the answer still equals mlx-lm's."""
    ref_tokens, _ = reference
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2)
    with LocalCluster(cfg) as cluster:
        before = worker_stats(cluster.cfg)["w1"]["tokens_sampled"]
        result: dict = {}
        client = threading.Thread(target=lambda: result.update(complete_ids(cluster.api, PROMPT, N_TOKENS)))
        client.start()
        try:
            wait_until(lambda: worker_stats(cluster.cfg)["w1"]["tokens_sampled"] > before, "the first token")
            cluster.coordinator.send_signal(signal.SIGSTOP)
            try:
                # Every token of the request comes out while the coordinator sleeps.
                wait_until(
                    lambda: worker_stats(cluster.cfg)["w1"]["tokens_sampled"] - before == N_TOKENS,
                    "the stages to finish the request on their own",
                )
            finally:
                cluster.coordinator.send_signal(signal.SIGCONT)
        finally:
            client.join(timeout=120)
        assert result["logprobs"]["token_ids"] == ref_tokens
        after = worker_stats(cluster.cfg)
        assert after["w1"]["tokens_sampled"] - before == N_TOKENS  # not one step past max_tokens
        assert all(s["stage_errors"] == 0 and not s["active_requests"] for s in after.values()), after


def test_steps_on_the_ring_after_a_stop_are_dropped_quietly(tiny_model, tmp_path):
    """A request the coordinator ends early (here: a client gone mid-stream)
    still has a step on the ring; the stages drop it, report no error, and free
    every cache."""
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2)
    with LocalCluster(cfg) as cluster:
        with open_stream(cluster.api, greedy_body(PROMPT, 500)) as stream:
            for _ in range(8):
                stream.readline()
        wait_until(
            lambda: all(not s["active_requests"] for s in worker_stats(cluster.cfg).values()),
            "every stage to free the request",
        )
        stats = worker_stats(cluster.cfg)
        assert all(s["stage_errors"] == 0 and s["cache_bytes"] == 0 for s in stats.values()), stats
        assert stats["w1"]["tokens_sampled"] < 500
        # The stages still serve the next request exactly.
        assert complete_ids(cluster.api, PROMPT, 8)["finish_reason"] == "length"


def test_text_streams_while_the_ring_decodes_and_the_coordinator_stays_live(tiny_model, tmp_path):
    """The stages decode without waiting for the coordinator, so tokens can
    arrive faster than they are streamed. The coordinator must still stream as
    it goes (the client's 10th chunk arrives long before the last token is
    sampled) and keep its liveness watch running (no worker marked down)."""
    n = 1500
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime={"max_context": 2048})
    with LocalCluster(cfg) as cluster:
        before = worker_stats(cluster.cfg)["w1"]["tokens_sampled"]
        with open_stream(cluster.api, greedy_body(PROMPT, n)) as stream:
            chunks = 0
            while chunks < 10:
                if stream.readline().startswith(b"data: "):
                    chunks += 1
            sampled = worker_stats(cluster.cfg)["w1"]["tokens_sampled"] - before
            status, health = cluster.health()
            rest = stream.read()
        assert sampled < n / 2, f"the client got its 10th chunk only after {sampled} of {n} tokens were sampled"
        assert status == 200 and health["status"] == "ready"
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert not log_events(cluster, "coordinator", "workers_down")
