"""`tandem up --autoscale` end to end: a burst of requests raises the decode queue and the pool
grows; once the burst is over the pool shrinks back after the stabilisation window, draining
the workers it removes. Every request of the burst and of the trickle that keeps running
through both changes gets the engine's exact greedy text.

Queue depth is made visible on purpose: `--max-num-seqs 1` lets a decode worker run one
sequence at a time, so a burst of 24 long requests leaves about 23 waiting for many seconds
(the tiny model decodes about a thousand tokens a second), well above
`--decode-target-waiting 2`, and longer than a worker heartbeat (which publishes the load).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from pathlib import Path

import pytest
import redis

from tandem.common.cluster_state import ClusterState
from tandem.common.workers import WorkerRole
from tests.conftest import random_prompts
from tests.e2e.test_up import UpProcess, started, stop_and_check_no_orphans, wait_until  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

NUM_BURST = 24
PROMPT_LEN = 60
MAX_TOKENS = 600
GROW_TIMEOUT_S = 90.0
SHRINK_TIMEOUT_S = 90.0
AUTOSCALE_FLAGS = (
    "--autoscale",
    "--prefill",
    "1",
    "--decode",
    "1",
    "--prefill-min",
    "1",
    "--prefill-max",
    "3",
    "--decode-min",
    "1",
    "--decode-max",
    "3",
    "--max-num-seqs",
    "1",
    "--decode-target-waiting",
    "2",
    "--prefill-target-queued-tokens",
    "4096",
    "--interval-s",
    "0.5",
    "--stabilisation-window-s",
    "8",
    "--up-cooldown-s",
    "3",
    "--down-cooldown-s",
    "3",
    "--max-signal-age-s",
    "10",
    "--local-prefill-max-tokens",
    "0",
    # the burst must queue (the autoscaler scales on queue depth) and be served, not refused:
    # the gateway's admission is widened past anything this test waits
    "--ttft-budget-s",
    "600",
    "--no-adaptive-limit",
)


@pytest.fixture(scope="module")
def prompts_and_texts(tiny_model_dir: Path) -> tuple[list[list[int]], list[str]]:
    """The burst's prompts and the in-process engine's greedy text for each."""
    from tandem.engine import Engine, SamplingParams
    from tandem.engine.tokenizer import Tokenizer

    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=512)
    prompts = random_prompts([PROMPT_LEN] * NUM_BURST, engine.model_config.vocab_size, seed=61)
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    return prompts, [tokenizer.decode(list(o.token_ids), skip_special_tokens=True) for o in outs]


def complete(endpoint: str, model: str, prompt: list[int]) -> tuple[int, dict]:
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    )
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


class Traffic:
    """Requests sent from threads; every answer is kept with the index of its prompt."""

    def __init__(self, endpoint: str, model: str, prompts: list[list[int]]) -> None:
        self.endpoint, self.model, self.prompts = endpoint, model, prompts
        self.answers: list[tuple[int, int, dict]] = []  # (prompt index, status, body)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _send(self, index: int) -> None:
        status, body = complete(self.endpoint, self.model, self.prompts[index])
        with self._lock:
            self.answers.append((index, status, body))

    def burst(self) -> None:
        for i in range(len(self.prompts)):
            self._threads.append(threading.Thread(target=self._send, args=(i,), daemon=True))
            self._threads[-1].start()

    def trickle(self) -> None:
        """One request at a time, cycling through the prompts, until `stop()`."""

        def run() -> None:
            i = 0
            while not self._stop.is_set():
                self._send(i % len(self.prompts))
                i += 1

        self._threads.append(threading.Thread(target=run, daemon=True))
        self._threads[-1].start()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        assert not any(thread.is_alive() for thread in self._threads)


def pool_sizes(state: ClusterState) -> dict[WorkerRole, int]:
    workers = state.list_workers()
    return {role: sum(1 for w in workers if w.role is role) for role in WorkerRole}


def test_autoscale_grows_on_a_burst_and_shrinks_after_the_window(
    tmp_path: Path, tiny_model_dir: Path, prompts_and_texts, started: list[UpProcess]
) -> None:
    prompts, texts = prompts_and_texts
    up = UpProcess.start(tmp_path, tiny_model_dir, *AUTOSCALE_FLAGS)
    started.append(up)
    state = ClusterState(redis.Redis.from_url(up.state["redis_url"]), up.cluster)
    assert pool_sizes(state) == {WorkerRole.PREFILL: 1, WorkerRole.DECODE: 1}
    model = up.banner_value("model")
    traffic = Traffic(up.state["endpoint"], model, prompts)

    traffic.trickle()
    traffic.burst()
    largest = {WorkerRole.PREFILL: 1, WorkerRole.DECODE: 1}

    def grown() -> bool:
        for role, count in pool_sizes(state).items():
            largest[role] = max(largest[role], count)
        return largest[WorkerRole.DECODE] >= 2

    assert wait_until(grown, GROW_TIMEOUT_S, 0.2), up.stderr_tail()
    assert wait_until(lambda: len([a for a in traffic.answers]) >= NUM_BURST, GROW_TIMEOUT_S, 0.2)
    # The burst is over; only the trickle runs. The pools go back to their minimum.
    assert wait_until(
        lambda: (
            grown()
            and pool_sizes(state) == {WorkerRole.PREFILL: 1, WorkerRole.DECODE: 1}
            and len(up.state["children"]) == 4
        ),
        SHRINK_TIMEOUT_S,
        0.2,
    ), up.stderr_tail()
    traffic.stop(timeout_s=120.0)

    assert 2 <= largest[WorkerRole.DECODE] <= 3 and 1 <= largest[WorkerRole.PREFILL] <= 3
    failures = [(i, status, body) for i, status, body in traffic.answers if status != 200]
    assert failures == []
    wrong = [i for i, _, body in traffic.answers if body["choices"][0]["text"] != texts[i]]
    assert wrong == []
    assert len(traffic.answers) > NUM_BURST  # the trickle kept going through both changes
    log = "".join(up.stderr)
    changes = "".join(line for line in up.stderr if "direction=up" in line or "direction=down" in line)
    # Up on the queue; `above_max` when the queue asked for more than --decode-max.
    assert re.search(
        r"pool=decode current=1 desired=[23] direction=up reason=(queue_above_target|above_max) "
        r"signals=fresh workers=1 ",
        log,
    ), changes
    assert re.search(r"pool=decode current=[23] desired=[12] direction=down reason=scale_down", log), changes
    assert re.search(r"local actuator: retiring decode-[12]", log)
    stop_and_check_no_orphans(up)
