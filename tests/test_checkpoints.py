"""Every Kimi layout as published loads unedited and passes the oracle: over
1, 2 and 3 real worker processes the greedy tokens equal single-process
mlx-lm's on the same files, logprobs within 1e-4.

Layouts (kimizmq/testlayouts.py): Kimi-K2-Thinking's compressed-tensors int4,
Kimi-K2.5's nested `kimi_k25` with a vision tower, Kimi K3's hybrid linear /
MLA attention with attention residuals and MXFP4 experts."""

from __future__ import annotations

import os
import threading

import mlx.core as mx
import numpy as np
import pytest

from kimizmq.checkpoint import stage_tensor_names, tensor_index
from kimizmq.local import LocalCluster, write_config
from kimizmq.shard import load_shard
from kimizmq.stage import Stage, StageError, Step
from kimizmq.testlayouts import make_layout_model
from tests.conftest import REPO
from tests.support import complete_ids, worker_stats
from tests.test_pipeline import reference_greedy

N_TOKENS = 24
PROMPT = [5, 17, 99, 230, 41, 7, 300, 12, 64, 8, 150, 77, 3, 201, 45, 11, 90, 33, 120, 6, 250, 19, 88, 140]
K3_LAYERS = 14  # two attention-residual blocks of 12; MLA at 0-based 3, 7, 11, 13


@pytest.fixture(scope="module")
def int4_model():
    return make_layout_model(REPO / "models" / "test-layout-int4-layers7", "int4", num_layers=7)


@pytest.fixture(scope="module")
def k25_model():
    return make_layout_model(REPO / "models" / "test-layout-k25-layers7", "k25", num_layers=7)


@pytest.fixture(scope="module")
def k3_model():
    return make_layout_model(REPO / "models" / f"test-layout-k3-layers{K3_LAYERS}", "k3", num_layers=K3_LAYERS)


def _oracle(model, tmp_path, n_workers, layers):
    ref_tokens, ref_logprobs = reference_greedy(model, PROMPT, N_TOKENS)
    assert len(set(ref_tokens)) >= 6, "the test model must give varied tokens for this oracle to bite"
    cfg = write_config(tmp_path / "kimi.toml", model, n_workers, layers=layers)
    with LocalCluster(cfg) as cluster:
        health = cluster.health()[1]
        if layers:
            assert [(s["start"], s["end"]) for s in health["stages"]] == layers
        lp = complete_ids(cluster.api, PROMPT, N_TOKENS)["logprobs"]
    assert lp["token_ids"] == ref_tokens
    np.testing.assert_allclose(lp["token_logprobs"], ref_logprobs, rtol=1e-4, atol=1e-6)


SPLITS_7 = [(1, None), (2, None), (3, [(0, 1), (1, 5), (5, 7)])]


@pytest.mark.parametrize("n_workers,layers", SPLITS_7, ids=["1-stage", "2-stages", "3-stages"])
def test_k2_thinking_int4_compressed_tensors_equals_mlx_lm(int4_model, tmp_path, n_workers, layers):
    _oracle(int4_model, tmp_path, n_workers, layers)


@pytest.mark.parametrize("n_workers,layers", SPLITS_7, ids=["1-stage", "2-stages", "3-stages"])
def test_k25_nested_text_model_equals_mlx_lm(k25_model, tmp_path, n_workers, layers):
    _oracle(k25_model, tmp_path, n_workers, layers)


@pytest.mark.parametrize(
    "n_workers,layers",
    [
        (1, None),
        # after MLA layer 3, before linear layer 4, inside the first residual block
        (2, [(0, 4), (4, K3_LAYERS)]),
        # and after linear layer 12, before the last (MLA) layer, inside the second block
        (3, [(0, 4), (4, 13), (13, K3_LAYERS)]),
    ],
    ids=["1-stage", "2-stages-inside-a-block", "3-stages-inside-both-blocks"],
)
def test_k3_hybrid_attention_residuals_equal_mlx_lm(k3_model, tmp_path, n_workers, layers):
    _oracle(k3_model, tmp_path, n_workers, layers)


def test_k3_concurrent_requests_batch_recurrent_states_exactly(k3_model, tmp_path):
    """Requests decoding together at a K3 stage run as one batched pass over
    batched KV caches and ArraysCache states (kept between steps), and each
    gets exactly its own tokens; every state is freed at the end."""
    prompts = [PROMPT[i : i + 6 + i] for i in range(4)]
    refs = [reference_greedy(k3_model, p, 16)[0] for p in prompts]
    cfg = write_config(tmp_path / "kimi.toml", k3_model, 2, layers=[(0, 4), (4, K3_LAYERS)])
    with LocalCluster(cfg) as cluster:
        before = worker_stats(cluster.cfg)
        got: dict[int, list[int]] = {}

        def run(i: int) -> None:
            got[i] = complete_ids(cluster.api, prompts[i], 16)["logprobs"]["token_ids"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after = worker_stats(cluster.cfg)
    assert [got.get(i) for i in range(len(prompts))] == refs
    batched = {n: s["batched_forwards"] - before[n]["batched_forwards"] for n, s in after.items()}
    assert any(b > 0 for b in batched.values()), f"no step was batched: {batched}"
    assert all(s["active_requests"] == [] and s["cache_bytes"] == 0 for s in after.values()), after


def test_k3_stage_refuses_missing_or_misshapen_residual_blocks(k3_model):
    """A K3 stage inside a residual block needs the blocks beside the hidden
    state, exactly (blocks begun before its first layer, 1, L, hidden); a
    message without them, or with the wrong count, is refused by name and
    opens no request."""
    stage = Stage(load_shard(k3_model, 4, 13), max_requests=4, max_context=256)
    h = mx.zeros((1, 3, 128))
    bad = {
        "missing": (),
        "two blocks": (mx.zeros((2, 1, 3, 128)),),
        "other length": (mx.zeros((1, 1, 2, 128)),),
        "ints": (mx.zeros((1, 1, 3, 128), dtype=mx.int32),),
    }
    for what, extra in bad.items():
        (result,) = stage.forward_many([Step(what, 0, h, False, {}, extra)])
        assert isinstance(result, StageError) and ("tensor" in str(result) or "blocks" in str(result)), (what, result)
    assert stage.requests == {}
    (ok,) = stage.forward_many([Step("r", 0, h, False, {}, (mx.zeros((1, 1, 3, 128)),))])
    assert ok.activations.shape == (1, 3, 128) and ok.extra[0].shape == (2, 1, 3, 128)


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("fixture", ["k25_model", "k3_model"])
def test_vision_weights_are_never_read(fixture, request):
    """The whole text model loaded on one stage reads its own bytes and not
    one of the vision tower's (a file of its own, as the published K3 keeps it)."""
    model = request.getfixturevalue(fixture)
    index = tensor_index(model)
    vision = sum(i.nbytes for n, i in index.items() if n.startswith(("vision_tower.", "mm_projector.")))
    n_layers = K3_LAYERS if fixture == "k3_model" else 7
    text = sum(index[n].nbytes for n in stage_tensor_names(index, 0, n_layers, first=True, last=True))
    assert vision > 0.2 * text, "reading the vision file must show past the 10 % slack below"

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    before = rchar()
    load_shard(model, 0, n_layers)
    assert rchar() - before <= 1.1 * text
