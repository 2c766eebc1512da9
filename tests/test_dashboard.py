"""The coordinator's page in a real browser (Debian's headless Chromium driven
by Selenium) against a real cluster with an API key: the page asks for the key,
draws every worker with its layer range, streams a chat answer equal to the
API's own, stops an answer on the server, and shows a killed worker down and
then back; `kimi demo --keep` leaves a cluster whose page works. Each state's
screenshot is saved under var/screenshots/dashboard/."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kimizmq.config import ConfigError, parse_config
from kimizmq.local import LocalCluster, write_config
from tests.support import post_json, running_cluster, wait_until, worker_stats

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "var" / "screenshots" / "dashboard"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
API_KEY = "page-test-key"
FAST_LIVENESS = {"heartbeat_interval_s": 0.25, "liveness_timeout_s": 2.0, "max_context": 4096}  # down within 2.5 s
PAGE_TIMEOUT_S = 30.0
RECOVERY_TIMEOUT_S = 90.0  # a restarted worker imports MLX and loads its shard on a shared CPU
LONG_ANSWER = 3000  # tokens: still being written when the test presses Stop
DEMO_TIMEOUT_S = 240.0  # a fresh clone's demo first makes its model
STOP_TIMEOUT_S = 30.0


def browser_paths() -> tuple[str | None, str | None]:
    return next((p for n in BROWSERS if (p := shutil.which(n))), None), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[test]'")
    browser, chromedriver = browser_paths()
    if browser is None or chromedriver is None:
        pytest.skip(
            "no headless Chromium with its driver on PATH (chromium, chromedriver): "
            "apt-get install chromium chromium-driver, as .ci/run does"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    # --no-sandbox: CI runs as root, where Chromium's sandbox will not start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=Service(executable_path=chromedriver))
    d.set_script_timeout(PAGE_TIMEOUT_S)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    yield from running_cluster(
        tmp_path_factory.mktemp("dashboard"),
        tiny_model,
        2,
        runtime=FAST_LIVENESS,
        extra=f'\n[security]\napi_key = "{API_KEY}"\n',
    )


def screenshot(driver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    return path


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def worker_boxes(driver) -> dict[str, dict]:
    """Every worker box on the page: its state and the text of its layers row."""
    return js(
        driver,
        """const out = {};
        for (const b of document.querySelectorAll('[data-worker]'))
          out[b.dataset.worker] = {state: b.dataset.state, layers: b.querySelector('.layers b').textContent};
        return out;""",
    )


def badge(driver) -> str:
    return js(driver, "return document.getElementById('cluster-state').textContent")


def open_page(driver, cluster) -> None:
    driver.get(cluster.api + "/")
    wait_until(lambda: worker_boxes(driver), "the page to draw the workers", PAGE_TIMEOUT_S)


def with_key(driver, cluster) -> None:
    """The page, with the API key given (once per tab: it stays in sessionStorage)."""
    open_page(driver, cluster)
    if js(driver, "return sessionStorage.getItem('kimizmq.api_key')") != API_KEY:
        enter_key(driver, API_KEY)
    wait_until(lambda: js(driver, "return document.getElementById('key-form').hidden"), "the key to be taken")


def enter_key(driver, key: str) -> None:
    from selenium.webdriver.common.by import By

    wait_until(lambda: not js(driver, "return document.getElementById('key-form').hidden"), "the page to ask")
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()


def watch_answers(driver) -> None:
    """Record, in the page, every (state, text length) an answer goes through."""
    js(
        driver,
        """window.seen = [];
        new MutationObserver(() => {
          const a = [...document.querySelectorAll('.msg.assistant')].pop();
          if (a) window.seen.push([a.dataset.state, (a.dataset.raw || '').length]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, attributes: true});""",
    )


def ask(driver, text: str, temperature: str, max_tokens: int) -> None:
    from selenium.webdriver.common.by import By

    for field, value in (("temperature", temperature), ("max-tokens", str(max_tokens))):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()


def last_answer(driver) -> dict | None:
    return js(
        driver,
        """const a = [...document.querySelectorAll('.msg.assistant')].pop();
        return a ? {state: a.dataset.state, raw: a.dataset.raw || '', chunks: Number(a.dataset.chunks || 0),
                    meta: a.querySelector('.meta').textContent} : null;""",
    )


def figures(driver, *keys: str) -> list[str]:
    return js(driver, "return arguments[0].map(k => document.querySelector(`[data-figure=${k}] dd`).textContent)", keys)


def finished_answer(driver) -> dict:
    """The last answer once it stops changing (done, stopped or failed)."""
    return wait_until(
        lambda: (a := last_answer(driver)) and a["state"] not in ("waiting", "streaming") and a,
        "the answer to finish",
        PAGE_TIMEOUT_S,
    )


def health(cluster) -> dict:
    return cluster.health()[1]


# -- tests ----------------------------------------------------------------------------


def test_page_asks_for_the_api_key_and_keeps_it_for_the_tab(driver, cluster):
    open_page(driver, cluster)
    enter_key(driver, "not-the-key")
    wait_until(
        lambda: "refused" in js(driver, "return document.getElementById('key-note').textContent"),
        "the page to say the key was refused",
    )
    assert not js(driver, "return document.getElementById('key-form').hidden")
    driver.find_element("id", "api-key").clear()
    enter_key(driver, API_KEY)
    wait_until(lambda: js(driver, "return document.getElementById('key-form').hidden"), "the right key to be taken")
    driver.refresh()
    wait_until(lambda: worker_boxes(driver), "the page to draw the workers again")
    wait_until(lambda: js(driver, "return document.getElementById('key-form').hidden"), "the key kept for the tab")


def test_page_draws_every_worker_with_its_layer_range(driver, cluster):
    with_key(driver, cluster)
    driver.get_log("browser")  # what earlier pages said
    driver.refresh()
    stages = health(cluster)["stages"]
    want = {s["worker"]: {"state": "ready", "layers": f"[{s['start']}, {s['end']})"} for s in stages}
    wait_until(lambda: worker_boxes(driver) == want, f"the page to show {want}", PAGE_TIMEOUT_S)
    assert badge(driver) == "ready"
    # Each box weighs its worker's weights and KV cache, as /health reports them.
    rows = health(cluster)["workers"]
    weights = js(driver, "return [...document.querySelectorAll('[data-worker]')].map(b => b.innerText)")
    for text, s in zip(weights, stages):
        assert rows[s["worker"]]["weight_bytes"] > 0 and "weights –" not in text, text
    # Nothing refused or failed: no script error, no blocked asset (the page's own CSP).
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    # Boxes follow the pipeline's order, after the coordinator's.
    order = js(driver, "return [...document.querySelectorAll('#pipeline .box')].map(b => b.dataset.worker || 'c')")
    assert order == ["c", *(s["worker"] for s in stages)]
    # Every asset came from the coordinator itself: the page works offline.
    urls = js(driver, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(cluster.api + "/") for u in urls), urls
    screenshot(driver, "1-workers-ready")


def test_chat_answer_streams_and_equals_the_api_answer(driver, cluster):
    with_key(driver, cluster)
    question, n = "Tell me about pipelines of Macs.", 64
    watch_answers(driver)
    ask(driver, question, "0", n)
    answer = finished_answer(driver)
    assert answer["state"] == "done", answer
    status, out = post_json(
        cluster.api,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": n},
        api_key=API_KEY,
    )
    assert status == 200, out
    assert answer["raw"] == out["choices"][0]["message"]["content"]
    assert answer["chunks"] > 1
    lengths = [length for state, length in js(driver, "return window.seen") if state == "streaming"]
    assert any(0 < length < len(answer["raw"]) for length in lengths), "the page never showed a partial answer"
    assert f"{out['usage']['completion_tokens']} tokens" in answer["meta"]
    # The figures follow the coordinator's: both requests served, none in flight, a TTFT known.
    served = str(health(cluster)["coordinator"]["requests_total"])
    wait_until(
        lambda: figures(driver, "requests_total", "in_flight") == [served, "0"] and figures(driver, "ttft") != ["–"],
        f"the page to show {served} requests served, none in flight, and a time to first token",
    )
    screenshot(driver, "2-chat-answered")


def test_stop_button_cancels_the_request_on_the_server(driver, cluster):
    from selenium.webdriver.common.by import By

    with_key(driver, cluster)
    ask(driver, "Write a very long story.", "0", LONG_ANSWER)
    wait_until(lambda: len((last_answer(driver) or {}).get("raw", "")) > 0, "the answer to start", PAGE_TIMEOUT_S)
    assert health(cluster)["requests_in_flight"] == 1
    wait_until(
        lambda: figures(driver, "in_flight") == ["1"] and figures(driver, "tokens_now")[0] not in ("–", "0.0"),
        "the live figures to show the answer being written",
    )
    driver.find_element(By.ID, "stop").click()
    wait_until(lambda: health(cluster)["requests_in_flight"] == 0, "the coordinator to drop the request", 10)
    wait_until(
        lambda: all(s["requests"] == 0 for s in worker_stats(cluster.cfg).values()), "every stage to free its cache"
    )
    answer = last_answer(driver)
    assert answer["state"] == "stopped"
    assert len(answer["raw"]) > 0
    assert not js(driver, "return document.getElementById('send').disabled")
    wait_until(lambda: figures(driver, "in_flight") == ["0"], "the page to show no request in flight")
    screenshot(driver, "3-chat-stopped")


def test_chat_settings_out_of_range_are_refused_naming_them(driver, cluster):
    with_key(driver, cluster)
    served = health(cluster)["coordinator"]["requests_total"]
    ask(driver, "Hello", "3", 8)  # the page refuses it: the field's own bounds
    last = wait_until(lambda: js(driver, "return [...document.querySelectorAll('.msg')].pop()?.innerText"), "a reply")
    assert "temperature must be a number from 0 to 2" in last
    ask(driver, "Hello", "0", 100_000)  # the server refuses it: past the context
    answer = finished_answer(driver)
    assert answer["state"] == "error" and "HTTP 400" in answer["meta"] and "max_tokens" in answer["meta"], answer
    assert health(cluster)["coordinator"]["requests_total"] == served


def test_worker_box_shows_loading_progress_and_recovery(driver, cluster):
    """A /health worker row while its shard loads (on the tiny model that takes
    less than a poll), drawn by the page: at start, and while the cluster is
    degraded (a worker coming back)."""
    with_key(driver, cluster)
    row = {
        "up": True,
        "state": "loading",
        "address": "tcp://10.0.0.2:52501",
        "layers": [0, 44],
        "progress": {"done_bytes": 96 << 30, "total_bytes": 384 << 30, "rate_bytes_s": 2.5e9},
        "memory_bytes": 96 << 30,
        "memory_total_bytes": 512 << 30,
    }
    drawn = js(
        driver,
        """return ['loading', 'degraded'].map(c => {
             const b = workerBox('m3-ultra', arguments[0], c);
             return {state: b.dataset.state, text: b.innerText, bars: b.querySelectorAll('.bar').length};
           });""",
        row,
    )
    assert [d["state"] for d in drawn] == ["loading", "recovering"]
    for d in drawn:
        assert "loaded 25% of 384 GiB at 2500 MB/s" in d["text"] and "layers [0, 44)" in d["text"], d
        assert d["bars"] == 2  # memory, and the load's progress


def test_page_renders_markdown_without_letting_markup_through(driver, cluster):
    with_key(driver, cluster)
    html = js(
        driver,
        "return renderMarkdown(arguments[0])",
        "# Title\n\n**bold** and `<b>code</b>` and [a link](https://example.com) and [bad](javascript:alert(1))\n\n"
        "- one\n- two\n\n```python\nprint('<script>')\n```\n\n<img src=x onerror=alert(1)>",
    )
    assert "<h1>Title</h1>" in html
    assert "<strong>bold</strong>" in html
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert '<a href="https://example.com"' in html
    assert "javascript:" not in html.replace("[bad](javascript:alert(1))", "")
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<pre><code class="language-python">print(&#39;&lt;script&gt;&#39;)</code></pre>' in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_page_shows_reasoning_and_tool_calls_as_such(driver, cluster):
    """The deltas an OpenAI stream carries for reasoning and tool calls, given
    to the page's own answer view piece by piece, as a stream delivers them."""
    with_key(driver, cluster)
    shown = js(
        driver,
        """const a = new Answer();
        a.add({reasoning_content: 'The user wants '});
        a.add({reasoning_content: 'the weather.'});
        a.add({tool_calls: [{index: 0, id: 'call_1', type: 'function',
                             function: {name: 'get_weather', arguments: '{"city": '}}]});
        a.add({tool_calls: [{index: 0, function: {arguments: '"Paris"}'}}]});
        a.draw();
        return {reasoning: a.root.querySelector('.reasoning').textContent,
                fn: a.root.querySelector('.tool-call .fn').textContent,
                args: a.root.querySelector('.tool-call pre').textContent,
                message: a.message()};""",
    )
    assert shown["reasoning"] == "reasoningThe user wants the weather."
    assert shown["fn"] == "get_weather"
    assert json.loads(shown["args"]) == {"city": "Paris"}
    assert shown["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]


def test_killed_worker_shows_down_then_recovered(driver, cluster):
    with_key(driver, cluster)
    wait_until(lambda: badge(driver) == "ready", "the cluster to be ready")
    js(
        driver,
        """window.states = [];
        new MutationObserver(() => {
          const b = document.querySelector('[data-worker=w1]');
          const s = b && b.dataset.state;
          if (s && s !== window.states[window.states.length - 1]) window.states.push(s);
        }).observe(document.getElementById('pipeline'), {childList: true});""",
    )
    victim = cluster.workers["w1"]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    wait_until(lambda: worker_boxes(driver)["w1"]["state"] == "down", "the page to show w1 down", PAGE_TIMEOUT_S)
    assert badge(driver) == "degraded"
    screenshot(driver, "4-worker-down")
    cluster.start_worker("w1")
    wait_until(
        lambda: worker_boxes(driver)["w1"]["state"] == "ready" and badge(driver) == "ready",
        "the page to show w1 back",
        RECOVERY_TIMEOUT_S,
    )
    states = js(driver, "return window.states")
    after = states[states.index("down") :]  # before it: ready, as the kill found it
    assert after[-1] == "ready" and set(after) <= {"down", "recovering", "ready"}, states
    screenshot(driver, "5-worker-recovered")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_keep_leaves_a_cluster_whose_page_works(driver, tmp_path):
    """`kimi demo --keep` as a person runs it from the repository, then Ctrl-C
    (SIGINT to its process group, as a terminal sends it)."""
    err = tmp_path / "demo.stderr"
    with open(err, "wb") as f:
        demo = subprocess.Popen(
            [sys.executable, "-c", "from kimizmq.cli import main; main()", "demo", "--keep", "--max-tokens", "4"]
            + ["--dir", str(tmp_path / "demo")],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=f,
            start_new_session=True,
        )
    try:
        url = wait_until(
            lambda: demo.poll() is None and re.search(r"stays up: open (\S+)/ in a browser", err.read_text()),
            "the demo to keep its cluster up",
            DEMO_TIMEOUT_S,
        ).group(1)
        driver.get(url + "/")
        wait_until(
            lambda: {b["state"] for b in worker_boxes(driver).values()} == {"ready"} and len(worker_boxes(driver)) == 2,
            "the demo's page to show its two workers ready",
            PAGE_TIMEOUT_S,
        )
        ask(driver, "Hello", "0", 8)
        assert finished_answer(driver)["state"] == "done"
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(STOP_TIMEOUT_S) == 0, err.read_text()
        assert "stopped." in err.read_text()
        wait_until(lambda: not group_alive(demo.pid), "every process of the demo to end", STOP_TIMEOUT_S)
    finally:
        if group_alive(demo.pid):
            os.killpg(demo.pid, signal.SIGKILL)
        if demo.poll() is None:
            demo.wait()


# -- without a browser ----------------------------------------------------------------


def test_dashboard_off_answers_404_naming_the_setting(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 1, extra="\n[api]\ndashboard = false\n")
    c = LocalCluster(cfg)
    try:
        c.start_coordinator()  # no worker: the API answers while the cluster loads

        def get(path: str) -> tuple[int, bytes] | None:
            try:
                with urllib.request.urlopen(c.api + path, timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
            except (urllib.error.URLError, ConnectionError):
                return None

        status, body = wait_until(lambda: get("/"), "the coordinator's API to answer")
        assert status == 404
        assert "[api] dashboard = false" in json.loads(body)["error"]["message"]
        assert get("/dashboard/app.js")[0] == 404
        status, body = get("/health")
        assert status == 503 and json.loads(body)["workers"]["w0"]["layers"] is not None
    finally:
        c.stop()


def test_api_section_refuses_unknown_keys_and_non_booleans(tmp_path):
    base = {
        "model": {"path": "m"},
        "workers": [{"name": "w", "host": "h", "memory_gb": 1, "control_port": 1, "data_port": 2}],
    }
    assert parse_config(base, tmp_path / "k.toml").api.dashboard is True
    assert parse_config({**base, "api": {"dashboard": False}}, tmp_path / "k.toml").api.dashboard is False
    with pytest.raises(ConfigError, match=r"\[api\]: unknown key 'dashbord'; did you mean 'dashboard'"):
        parse_config({**base, "api": {"dashbord": False}}, tmp_path / "k.toml")
    with pytest.raises(ConfigError, match="dashboard"):
        parse_config({**base, "api": {"dashboard": "no"}}, tmp_path / "k.toml")
