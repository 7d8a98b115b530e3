"""Load ([12]): 8 concurrent gradio_client users x 3 compositions each against one studio on the
shipped demo family. Every call completes, and each result equals the same call made alone (no
cross-talk between users); the queue keeps memory bounded. Prints the counts and the peak memory."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import serve, upright_pictures
from PIL import Image

from studio.app import QUEUE_SIZE
from studio.engine import Engine

CLIENTS, CALLS, STEPS = 8, 3, 4
PROMPTS = ("1girl, standing", "1girl, smiling, outdoors", "1girl, sitting, simple background")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.fixture(scope="module")
def served(toybooru, tmp_path_factory):
    engine = Engine(data=str(toybooru), workspace=tmp_path_factory.mktemp("workspace"))
    with serve(engine) as url:
        yield url


@pytest.fixture(scope="module")
def references(toybooru, toybooru_records) -> list[str]:
    return upright_pictures(toybooru, toybooru_records, 4)


def _call(url: str, references: list[str], user: int, k: int) -> np.ndarray:
    """User ``user``'s ``k``-th composition: its own references, prompt and seed."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    refs = [handle_file(references[user % 4]), handle_file(references[(user + 1) % 4])]
    out = client.predict(PROMPTS[k], refs, ["face", "clothes"], STEPS, 3.0, 1.0 + 0.25 * k, 1000 * user + k, 1,
                         api_name="/compose")
    return np.asarray(Image.open(out[0]["image"]).convert("RGB"))


def test_eight_users_get_what_they_would_get_alone(served, references, capsys):
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()

    def user(u: int) -> list[np.ndarray]:
        return [_call(served, references, u, k) for k in range(CALLS)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        together = list(pool.map(user, range(CLIENTS)))
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()

    alone = [[_call(served, references, u, k) for k in range(CALLS)] for u in range(CLIENTS)]
    completed = sum(len(r) for r in together)
    different = sum(not np.array_equal(a, b) for ra, rb in zip(together, alone) for a, b in zip(ra, rb))
    distinct = len({r.tobytes() for rs in alone for r in rs})
    with capsys.disabled():
        print(f"\nload: {CLIENTS} clients x {CALLS} compositions: {completed} completed in {seconds:.1f} s, "
              f"{different} differ from the same call alone; peak resident memory {peak[0]:.0f} MB "
              f"({peak[0] - before:+.0f} MB during the load); queue limit {QUEUE_SIZE}")
    assert completed == CLIENTS * CALLS and different == 0
    assert distinct == CLIENTS * CALLS  # the users asked for different pictures and got them
    assert peak[0] - before < 1024  # requests queue; they do not pile up models or activations
