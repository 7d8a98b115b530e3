"""The project's promises about itself: quick start, CI, requirements, layering."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_AND_RUN = "pip install -r requirements.txt && python app.py"
INSTALL_AND_TEST = "pip install -r requirements.txt -r requirements-test.txt && pytest"


def test_readme_quick_start_is_exactly_two_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S)
    lines = [ln.strip() for block in commands for ln in block.strip().splitlines() if not ln.startswith("#")]
    assert lines == [INSTALL_AND_RUN, INSTALL_AND_TEST]


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    assert INSTALL_AND_TEST in ci
    assert "set -euo pipefail" in ci and "python3 -m venv" in ci


def test_requirements_list_the_mission_packages():
    names = {re.split(r"[<>=!~ ;\[]", ln.strip(), maxsplit=1)[0].lower().replace("_", "-")
             for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert {"gradio", "torch", "torchvision", "diffusers", "transformers", "accelerate", "ultralytics",
            "segment-anything", "pillow", "huggingface-hub", "safetensors"} <= names


def imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_dependencies_point_one_way():
    for path in (ROOT / "pipelines").rglob("*.py"):
        bad = [m for m in imports(path) if m.split(".")[0] in ("studio", "training", "gradio")]
        assert not bad, f"{path} imports {bad}"
    for path in (ROOT / "training").rglob("*.py"):
        bad = [m for m in imports(path) if m.split(".")[0] in ("studio", "gradio")]
        assert not bad, f"{path} imports {bad}"


def test_app_lets_idle_openmp_threads_sleep_unless_a_policy_was_chosen():
    import app

    env = {}
    app.quiet_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    app.quiet_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    # it must run before torch is loaded: importing app loads neither torch nor the studio
    code = "import sys, app; print(sorted(m for m in ('torch', 'studio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_app_defaults_match_the_public_surface():
    import app

    args = app.parse_args([])
    assert (args.host, args.port, args.zoo) == ("127.0.0.1", 7860, "demo")


def test_app_runs_the_demo_family_on_one_cpu_thread_unless_told_otherwise():
    import app

    assert app.cpu_threads(app.parse_args([])) == 1
    assert app.cpu_threads(app.parse_args(["--zoo", "sd15"])) is None  # torch's own choice
    assert app.cpu_threads(app.parse_args(["--threads", "4"])) == 4
    with pytest.raises(SystemExit, match="--threads must be at least 1, got 0"):
        app.cpu_threads(app.parse_args(["--threads", "0"]))


@pytest.mark.parametrize("module", ["train_vae", "train_clip", "train_text_to_image", "train_retrinet",
                                    "train_semantica", "train_judge", "train_detector", "demo_zoo", "build_dataset"])
def test_every_training_command_prints_its_help(module, capsys):
    """argparse formats help texts with %: a bare "5 %" in one breaks --help of the whole command."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"training.{module}").parse_args(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
