"""Helpers shared by tests (importable as `helpers`: conftest puts tests/ on the path)."""

import contextlib
from pathlib import Path


def kill_when(proc, path: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (it must appear before the process ends)."""
    import signal
    import time

    deadline = time.time() + timeout
    try:
        while not path.exists():
            assert proc.poll() is None, f"the process ended before {path.name} appeared"
            assert time.time() < deadline, f"{path.name} did not appear within {timeout} s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Progress:
    """A stand-in for ``gr.Progress`` that records what it is told."""

    def __init__(self):
        self.calls = []

    def __call__(self, value, desc=None, **kw):
        self.calls.append(value)


def upright_pictures(toybooru: Path, records: list[dict], n: int) -> list[str]:
    """The first ``n`` Toybooru pictures whose head lies in the upper half: each gives face, clothes and figure."""
    high = [r for r in records if r["face_bbox"][3] < r["height"] / 2][:n]
    assert len(high) == n, f"only {len(high)} such pictures"
    return [str(toybooru / r["file"]) for r in high]


@contextlib.contextmanager
def serve(engine):
    """``engine``'s studio served on a free port: gives its URL, and closes it after."""
    from studio.app import build_studio, launch

    demo = build_studio(engine)
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
