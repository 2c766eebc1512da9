"""Shared fixtures."""

import signal
from pathlib import Path

import openai
import pytest

from kimizmq.testmodel import make_test_model

REPO = Path(__file__).resolve().parent.parent

# A shell that starts a command in the background (`cmd &`, nohup) sets SIGINT
# to "ignore", and every child inherits that, so Python would not turn Ctrl-C
# into KeyboardInterrupt in the `kimi chat` / `kimi logs -f` the tests
# interrupt. Restore the default here; exec then gives children the default too.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The 7-layer Kimi-K2-layout test model, cached under models/ (git-ignored).

    make_test_model rebuilds it when its parameters or its generator change.
    """
    return make_test_model(REPO / "models" / "test-kimi-k2-tiny-seed0-layers7", seed=0, num_layers=7)


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    """The official openai client on the module's `cluster` fixture."""
    return openai.OpenAI(base_url=cluster.api + "/v1", api_key="unused", max_retries=0, timeout=120)
