"""Bad input, tried and counted ([12]): through gradio_client against a served studio on the shipped
demo family, and through the engine's Python API. Every case must end in a clear message naming
the problem (or, for odd but valid pictures, in a result), and the server must keep serving.

The suite prints how many cases it tried and how many broke something; the goal is 0.
"""

from __future__ import annotations

import io
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import serve
from PIL import Image

from studio.engine import ComposeRequest, CropRequest, Engine, VaryRequest
from studio.sweep import SweepRequest, plan

STEPS = 2
OK = None  # the case must succeed


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (0 x 0 cannot be saved by Pillow)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, toybooru, toybooru_records) -> dict[str, str]:
    """Files named by what is wrong (or odd) with them."""
    folder = tmp_path_factory.mktemp("bad-pictures")
    good = next(toybooru / r["file"] for r in toybooru_records if r["face_bbox"][3] < r["height"] / 2)
    rgb = Image.open(good).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    wide = rgb.resize((96, 64))
    frames = [rgb.quantize(16), rgb.rotate(10).quantize(16)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    png = _save(rgb, "PNG")
    files = {
        "good.png": png,
        "text.png": b"this is not a picture, whatever its name says\n" * 20,
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": _save(rgb, "JPEG")[:400],
        "bomb.png": _save(Image.new("1", (20000, 20000)), "PNG"),  # 400 megapixels in ~50 KB
        "large.png": _save(Image.new("RGB", (5000, 4000), (200, 180, 160)), "PNG"),  # 20 MP, beyond the limit
        "zero.png": _png_with_size(0, 0),
        "rgba.png": _save(rgb.convert("RGBA"), "PNG"),
        "palette.png": _save(rgb.quantize(32), "PNG"),
        "sixteen.png": _save(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257), "PNG"),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "rotated.jpg": _save(wide, "JPEG", exif=exif.tobytes()),
        "animated.gif": gif.getvalue(),
        "blank.png": _save(Image.new("RGB", (96, 96), (255, 255, 255)), "PNG"),  # no figure at all
    }
    out = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out[name] = str(folder / name)
    return out


@dataclass
class Case:
    name: str
    endpoint: str  # /crop, /compose, /vary, /sweep
    args: dict[str, Any]
    expect: str | None  # a regex the error message must match, or OK


def cases(p: dict[str, str]) -> list[Case]:
    """Every bad input of [12] and a few odd but valid pictures, as endpoint calls."""
    good = p["good.png"]

    def compose(**kw):
        args = {"prompt": "1girl, standing", "files": [good, good], "concepts": ["face", "clothes"], "steps": STEPS,
                "guidance": 3.0, "retrieval_scale": 1.0, "seed": 1, "num_images": 1}
        return {**args, **kw}

    def vary(**kw):
        return {"picture": good, "num_images": 1, "guidance": 0.5, "steps": STEPS, "seed": 1, **kw}

    out = []
    for name, message in (("text.png", "not a picture"), ("empty.png", "not a picture|no picture"),
                          ("truncated.png", "not a picture"), ("truncated.jpg", "not a picture"),
                          ("bomb.png", "too large|larger than the limit"), ("large.png", "larger than the limit"),
                          ("zero.png", "not a picture|empty picture")):
        out.append(Case(f"crop {name}", "/crop", {"picture": p[name]}, message))
        out.append(Case(f"compose with {name}", "/compose", compose(files=[p[name]], concepts=["figure"]),
                        rf"reference 1: .*({message})"))
        out.append(Case(f"vary {name}", "/vary", vary(picture=p[name]), message))
    for name in ("rgba.png", "palette.png", "sixteen.png", "cmyk.jpg", "rotated.jpg", "animated.gif", "blank.png"):
        out.append(Case(f"crop {name}", "/crop", {"picture": p[name]}, OK))
        out.append(Case(f"compose with {name} (whole)", "/compose", compose(files=[p[name]], concepts=["whole"]), OK))
    out += [
        Case("no figure, face asked", "/compose", compose(files=[p["blank.png"]], concepts=["face"]),
             r"reference 1: no face can be cut"),
        Case("zero references", "/compose", compose(files=[], concepts=[]), "no reference given"),
        Case("nine references", "/compose", compose(files=[good] * 9, concepts=["figure"]),
             "9 references given, at most 8"),
        Case("concepts do not match files", "/compose", compose(concepts=["face"] * 3), "one concept per file"),
        Case("unknown concept", "/compose", compose(concepts=["face", "hat"]), "unknown concept 'hat'"),
        Case("empty prompt", "/compose", compose(prompt=""), OK),
        Case("10,000-character prompt", "/compose", compose(prompt="a" * 10_000), "10000 characters, at most 1000"),
        Case("10,000-character negative prompt", "/compose", compose(negative="b" * 10_000),
             "negative prompt has 10000 characters"),
        Case("NaN guidance", "/compose", compose(guidance=float("nan")), "guidance.*(finite|number)"),
        Case("negative guidance", "/compose", compose(guidance=-1.0), "guidance.*(outside|less than|minimum)"),
        Case("huge guidance", "/compose", compose(guidance=1e30), "guidance.*(outside|greater than|maximum)"),
        Case("NaN retrieval scale", "/compose", compose(retrieval_scale=float("nan")), "retrieval.*(finite|number)"),
        Case("negative retrieval scale", "/compose", compose(retrieval_scale=-0.5),
             "retrieval.*(outside|less than|minimum)"),
        Case("huge retrieval scale", "/compose", compose(retrieval_scale=1e9),
             "retrieval.*(outside|greater than|maximum)"),
        Case("seed 2**33", "/compose", compose(seed=2**33), r"seed 8589934592 is outside 0\.\.4294967295"),
        Case("seed -5", "/compose", compose(seed=-5), "seed -5 is outside"),
        Case("fractional seed", "/compose", compose(seed=1.5), "seed.*whole number"),
        Case("zero steps", "/compose", compose(steps=0), "steps.*(outside|less than|minimum)"),
        Case("a million steps", "/compose", compose(steps=10**6), "steps.*(outside|greater than|maximum)"),
        Case("zero pictures", "/compose", compose(num_images=0), "(number of pictures|num_images).*(outside|less than|minimum)"),
        Case("width not a multiple of 8", "/compose", compose(width=100), "width 100 is not a multiple of 8"),
        Case("width 100,000", "/compose", compose(width=100_000), "width 100000 is outside"),
        Case("vary: no picture", "/vary", vary(picture=None), "no picture"),
        Case("vary: NaN guidance", "/vary", vary(guidance=float("nan")), "guidance.*(finite|number)"),
        Case("vary: negative guidance", "/vary", vary(guidance=-2.0), "guidance.*(outside|less than|minimum)"),
        Case("vary: seed 2**40", "/vary", vary(seed=2**40), "seed .* is outside"),
        Case("sweep: letters for guidance", "/sweep",
             {"model": "retrinet", "prompt": "1girl", "files": [good], "concepts": ["face"], "picture": None,
              "guidance": "3, lots", "scales": "1", "seeds": 1, "steps": STEPS, "seed": 0}, "'lots' is not a number"),
        Case("sweep: 81 cells", "/sweep",
             {"model": "retrinet", "prompt": "1girl", "files": [good], "concepts": ["face"], "picture": None,
              "guidance": "1 2 3 4 5 6 7 8", "scales": "0 1 2 3 4 5 6 7", "seeds": 1, "steps": STEPS, "seed": 0},
             "64 cells, at most 36"),
        Case("sweep: NaN scale", "/sweep",
             {"model": "retrinet", "prompt": "1girl", "files": [good], "concepts": ["face"], "picture": None,
              "guidance": "3", "scales": "nan", "seeds": 1, "steps": STEPS, "seed": 0}, "retrieval scale.*finite"),
    ]
    return out


def _message(e: BaseException) -> str:
    return str(e)


def _alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status == 200
    except OSError:
        return False


def _judge(case: Case, error: BaseException | None) -> str | None:
    """None when the outcome is what the case expects, else what went wrong."""
    import re

    if case.expect is OK:
        return None if error is None else f"failed: {_message(error)[:200]}"
    if error is None:
        return "accepted"
    if not re.search(case.expect, _message(error), re.IGNORECASE):
        return f"unclear message: {_message(error)[:200]!r}"
    return None


@pytest.fixture(scope="module")
def served(toybooru, tmp_path_factory):
    """The studio on the shipped demo family, served on a free port."""
    engine = Engine(data=str(toybooru), workspace=tmp_path_factory.mktemp("workspace"))
    with serve(engine) as url:
        yield engine, url


def _raw_call(client, url: str, case: Case):
    """Post the call as JSON with NaN written out (gradio_client refuses to send NaN; a browser or a
    script can): files are left out, so only the numbers are under test."""
    import json
    import math

    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"][case.endpoint]["parameters"]
    data = []
    for p in info:
        value = case.args.get(p["parameter_name"], p.get("parameter_default"))
        data.append(None if p["parameter_name"] in ("files", "concepts", "picture") else value)
    name = case.endpoint.strip("/")
    req = urllib.request.Request(f"{url}gradio_api/call/{name}", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        event = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{name}/{event}", timeout=120) as r:
        stream = r.read().decode()
    assert any(isinstance(v, float) and math.isnan(v) for v in data)
    if "event: error" in stream:
        raise RuntimeError(stream.split("event: error", 1)[1])
    return stream


def _call(client, case: Case, url: str = ""):
    import math

    from gradio_client import handle_file

    if any(isinstance(v, float) and math.isnan(v) for v in case.args.values()):
        return _raw_call(client, url, case)
    args = dict(case.args)
    for key in ("picture",):
        if args.get(key):
            args[key] = handle_file(args[key])
    if "files" in args:
        args["files"] = [handle_file(f) for f in args["files"]]
    return client.predict(**args, api_name=case.endpoint)


def test_bad_input_through_the_served_studio(served, pictures, capsys):
    from gradio_client import Client

    _, url = served
    client = Client(url, verbose=False)
    broken = {}
    all_cases = cases(pictures)
    for case in all_cases:
        error = None
        try:
            _call(client, case, url)
        except Exception as e:  # noqa: BLE001 (the client raises what the server said)
            error = e
        problem = _judge(case, error)
        if problem is None and not _alive(url):
            problem = "the server stopped serving"
        if problem:
            broken[case.name] = problem
    with capsys.disabled():
        print(f"\nbad input through gradio_client: {len(all_cases)} cases tried, {len(broken)} broke something")
        for name, problem in broken.items():
            print(f"  {name}: {problem}")
    assert not broken, broken
    # and the server still composes
    good = {"prompt": "1girl", "files": [pictures["good.png"]], "concepts": ["face"], "steps": STEPS, "guidance": 3.0,
            "retrieval_scale": 1.0, "seed": 1, "num_images": 1}
    assert len(_call(client, Case("good", "/compose", good, OK), url)) == 1


def _engine_call(engine: Engine, case: Case):
    a = case.args
    if case.endpoint == "/crop":
        return engine.crop(CropRequest(a["picture"]))
    if case.endpoint == "/vary":
        return engine.vary(VaryRequest(a["picture"], a["num_images"], a["guidance"], a["steps"], a["seed"]))
    if case.endpoint == "/compose":
        files, concepts = a["files"], a["concepts"]
        if len(concepts) == 1 and len(files) > 1:
            concepts = concepts * len(files)
        if len(concepts) != len(files):
            raise ValueError("give one concept per file")
        return engine.compose(ComposeRequest(a["prompt"], list(zip(files, concepts)), a.get("negative", ""), a["steps"],
                                             a["guidance"], a["retrieval_scale"], a["seed"], a["num_images"],
                                             a.get("width"), a.get("height")))
    refs = list(zip(a["files"], a["concepts"]))
    _, runner = plan(engine, SweepRequest(a["model"], a["guidance"], a["scales"], a["seeds"], a["seed"],
                                              a["steps"], a["prompt"], references=refs))
    return list(runner())


def test_bad_input_through_the_python_api(served, pictures, capsys):
    engine, _ = served
    broken = {}
    all_cases = cases(pictures)
    for case in all_cases:
        error = None
        try:
            _engine_call(engine, case)
        except ValueError as e:
            error = e
        except Exception as e:  # noqa: BLE001 (anything but a ValueError is a broken promise)
            broken[case.name] = f"{type(e).__name__}: {e}"
            continue
        problem = _judge(case, error)
        if problem:
            broken[case.name] = problem
    with capsys.disabled():
        print(f"\nbad input through the Python API: {len(all_cases)} cases tried, {len(broken)} broke something")
        for name, problem in broken.items():
            print(f"  {name}: {problem}")
    assert not broken, broken


def test_odd_pictures_are_read_as_they_look(pictures):
    from pipelines.concepts import load_image

    assert load_image(pictures["rotated.jpg"]).size == (64, 96)  # EXIF orientation applied
    sixteen = np.asarray(load_image(pictures["sixteen.png"]), np.float64)
    good = np.asarray(load_image(pictures["good.png"]).convert("L").convert("RGB"), np.float64)
    assert np.abs(sixteen - good).mean() < 1.0  # 16 bits scaled to 8, not clipped to white
    assert load_image(pictures["rgba.png"]).mode == "RGB"
    assert load_image(pictures["animated.gif"]).size == Image.open(pictures["good.png"]).size


def test_the_file_route_serves_no_path_outside_gradio_folders(served, pictures, tmp_path):
    from gradio_client import Client, handle_file

    engine, url = served
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")
    root = Path(__file__).resolve().parents[2]
    tries = ["/etc/passwd", str(secret), str(root / "README.md"), str(root / "app.py"),
             "../../../../../../etc/passwd", "..%2f..%2f..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
             str(engine.library()), str(pictures["good.png"])]
    served_paths = []
    for path in tries:
        for route in ("gradio_api/file=", "file="):
            try:
                with urllib.request.urlopen(url + route + path, timeout=30) as r:
                    if r.status == 200:
                        served_paths.append(route + path)
            except OSError:  # 403 / 404
                pass
    assert served_paths == []
    # the route itself works: a picture the studio made is served
    client = Client(url, verbose=False)
    _, overlay, _ = client.predict(handle_file(pictures["good.png"]), api_name="/crop")
    with urllib.request.urlopen(url + "gradio_api/file=" + overlay, timeout=30) as r:
        assert r.status == 200 and r.read(8) == b"\x89PNG\r\n\x1a\n"
