"""RetriNet Studio: ``python app.py`` serves the studio on http://127.0.0.1:7860."""

from __future__ import annotations

import argparse
import os
from collections.abc import MutableMapping


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="RetriNet Studio")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to serve on (0.0.0.0 to reach it from other machines)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), help="port")
    p.add_argument("--zoo", choices=("demo", "sd15"), default="demo",
                   help="model family: the tiny CPU demo models, or Stable Diffusion 1.5 on a GPU")
    p.add_argument("--config", default=None, help="model family config file (Hub ids or local folders)")
    p.add_argument("--device", default=None,
                   help="where the models run, e.g. cpu, cuda, cuda:1 (default: CUDA when present, else the CPU)")
    p.add_argument("--data", default=None,
                   help="data set folder for the Data tab (default: a small Toybooru made on first start)")
    p.add_argument("--workspace", default=None,
                   help="folder for the character library (default: ~/.cache/retrinet-studio)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the models (default: 1 with the demo family, torch's own choice with sd15)")
    return p.parse_args(argv)


def cpu_threads(args: argparse.Namespace) -> int | None:
    """The CPU threads the studio's models run with: ``--threads``, else one with the demo family
    (None: torch's own choice). The demo models are too small to gain from a second thread: a
    composition took 1.14 s on one thread and 1.06 s on two spinning ones, but 2.69 s on two that
    sleep when idle, as ``quiet_openmp`` has them (BENCHMARKS.md, "Demo composition"). Training
    jobs started from the Train tab are processes of their own and keep their own setting."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"app.py: --threads must be at least 1, got {args.threads}")
        return args.threads
    return 1 if args.zoo == "demo" else None


def quiet_openmp(env: MutableMapping[str, str] = os.environ) -> None:
    """Let idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless a policy was chosen: with
    OpenMP's default an idle thread spins, and when the cores also run a training job started from
    the Train tab, a composition took 70x as long (BENCHMARKS.md, "Optimisations"). OpenMP reads the
    policy when torch loads it, so this runs before anything imports torch; training jobs inherit it."""
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = cpu_threads(args)
    quiet_openmp()
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from studio.app import build_studio, launch
    from studio.engine import Engine

    try:  # reads the config and picks the device; models load when first asked for
        engine = Engine(zoo=args.zoo, config=args.config, data=args.data, device=args.device,
                        workspace=args.workspace)
    except ValueError as e:
        raise SystemExit(f"app.py: {e}") from e
    engine.ensure_default_dataset()
    launch(build_studio(engine), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
