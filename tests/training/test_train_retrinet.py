import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from pipelines.retrinet import RetriNetModel
from helpers import kill_when
from training.core import list_checkpoints, read_metrics, resolve_checkpoint
from training.train_retrinet import RetriNetObjective, load_base, main, parse_args, reference_gap
from training.data.retribooru import RetriBooruDataset, collate

ROOT = Path(__file__).resolve().parents[2]


def argv(tiny_sd, data, out, *extra):
    return ["--pretrained", str(tiny_sd), "--data", str(data), "--output-dir", str(out), "--resolution", "32",
            "--num-references", "2", "--train-batch-size", "2", "--gradient-accumulation-steps", "1",
            "--checkpointing-steps", "100", *map(str, extra)]


def losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl")}


@pytest.mark.parametrize("task", ["recon", "compose", "multitask"])
@pytest.mark.parametrize("setting", ["a", "b"])
def test_runs_for_each_task_and_setting(tiny_sd, toybooru, tmp_path, task, setting):
    result = main(parse_args(argv(tiny_sd, toybooru, tmp_path, "--task", task, "--setting", setting,
                                  "--max-train-steps", 4)))
    assert result["global_step"] == 4
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert all(set(r) >= {"loss", "lr", "seconds", "samples_per_second"} and r["loss"] > 0 for r in m)
    loaded = RetriNetModel.from_pretrained(tmp_path / "retrinet")
    assert loaded.num_skips == 4
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # the decoder trained
    card = (tmp_path / "README.md").read_text()
    assert f"task `{task}`, setting `{setting}`" in card and "--max-train-steps 4" in card


def test_loss_halves_on_one_fixed_batch(tiny_sd, toybooru):
    args = parse_args(argv(tiny_sd, toybooru, "/unused", "--task", "compose", "--prompt-dropout", "0"))
    vae, text_encoder, tokenizer, unet, noise_scheduler = load_base(str(tiny_sd))
    retrinet = RetriNetModel.from_unet(unet)
    params = retrinet.set_training_mode(unet, "default")

    class Acc:  # the objective needs only a device
        device = torch.device("cpu")

    objective = RetriNetObjective(args, Acc(), vae, text_encoder, tokenizer, unet, retrinet, noise_scheduler,
                                  torch.float32)
    ds = RetriBooruDataset(toybooru, "train", task="compose", num_references=2, resolution=32)
    batch = collate([ds[0], ds[1]])
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    curve = []
    for _ in range(50):
        torch.manual_seed(0)  # the same noise and timesteps: one fixed batch
        loss = objective(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    assert curve[-1] <= 0.5 * curve[0], curve[::10]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_timestep_weights(prediction):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from training.core import timestep_weights

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction)
    t = torch.tensor([0, 100, 500, 900, 999])
    snr = compute_snr(sched, t)
    assert torch.equal(timestep_weights(sched, t, "uniform"), torch.ones(5))
    minsnr = timestep_weights(sched, t, "min-snr", 5.0)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction == "v_prediction" else snr)
    assert torch.allclose(minsnr, expected)
    # the SNR of SD's scaled-linear schedule, computed here from its betas
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    own_snr = (alpha_bar / (1 - alpha_bar))[t].float()
    assert torch.allclose(snr, own_snr, rtol=1e-4)
    if prediction == "epsilon":
        assert minsnr[0] < 0.01 and torch.allclose(minsnr[2:], torch.ones(3))  # only the low-noise steps count less
        assert minsnr[1].item() == pytest.approx(5.0 / own_snr[1].item(), rel=1e-4)  # SNR(100) is about 9.6
    else:
        assert minsnr[3].item() == pytest.approx(own_snr[3].item() / (own_snr[3].item() + 1), rel=1e-4)
    every = torch.arange(1000)
    p2 = timestep_weights(sched, every, "p2")
    assert p2.mean().item() == pytest.approx(1.0, rel=1e-5)
    every_snr = (alpha_bar / (1 - alpha_bar)).float()
    raw = (every_snr / (every_snr + 1) if prediction == "v_prediction" else torch.ones(1000)) / (1 + every_snr)
    assert torch.allclose(p2, raw / raw.mean(), rtol=1e-3)
    if prediction == "epsilon":
        assert torch.all(p2[1:] >= p2[:-1]) and p2[900] > 50 * p2[0]  # more noise, more weight
    zero_terminal = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction, rescale_betas_zero_snr=True)
    last = timestep_weights(zero_terminal, torch.tensor([999]), "min-snr", 5.0)
    assert torch.isfinite(last).all() and last.item() == (1.0 if prediction == "epsilon" else 0.0)
    with pytest.raises(ValueError, match="unknown weighting"):
        timestep_weights(sched, t, "snr")
    with pytest.raises(ValueError, match="snr_gamma"):
        timestep_weights(sched, t, "min-snr", 0.0)


def test_weighted_loss_is_eq3_with_unit_weights_and_runs_in_training(tiny_sd, toybooru, tmp_path):
    from training.train_retrinet import retrinet_loss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    valid, face = (torch.rand(3, 1, 4, 4, generator=g) > 0.5).float(), (torch.rand(3, 1, 4, 4, generator=g) > 0.8).float()
    plain = retrinet_loss(pred, target, valid, face, 0.1)
    assert retrinet_loss(pred, target, valid, face, 0.1, torch.ones(3)).item() == pytest.approx(plain.item(), rel=1e-6)
    only_first = retrinet_loss(pred, target, valid, face, 0.1, torch.tensor([3.0, 0.0, 0.0]))
    assert only_first.item() == pytest.approx(retrinet_loss(pred[:1], target[:1], valid[:1], face[:1], 0.1).item(),
                                              rel=1e-6)
    result = main(parse_args(argv(tiny_sd, toybooru, tmp_path, "--max-train-steps", 2, "--timestep-weighting", "p2")))
    assert result["global_step"] == 2 and all(r["loss"] > 0 for r in read_metrics(tmp_path / "metrics.jsonl"))
    assert "--timestep-weighting p2" in (tmp_path / "README.md").read_text()
    with pytest.raises(SystemExit):
        parse_args(argv(tiny_sd, toybooru, tmp_path, "--timestep-weighting", "snr"))


def test_pyramid_noise_moves_energy_to_low_frequencies():
    import torch.nn.functional as F

    from training.core import pyramid_noise

    white = pyramid_noise((8, 4, 16, 16), 0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(white, torch.randn((8, 4, 16, 16), generator=torch.Generator().manual_seed(3)))
    noise = pyramid_noise((64, 4, 16, 16), 0.8, generator=torch.Generator().manual_seed(0))
    again = pyramid_noise((64, 4, 16, 16), 0.8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise, again) and noise.shape == (64, 4, 16, 16)
    assert torch.allclose(noise.flatten(1).std(dim=1), torch.ones(64), atol=1e-5)  # each sample at unit variance
    plain = torch.randn((64, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    # the noise of a 4x4 blob: about 1/4 for white noise, more than twice that here
    assert F.avg_pool2d(plain, 4).std() < 0.3 and F.avg_pool2d(noise, 4).std() > 0.5
    odd = pyramid_noise((2, 3, 5, 7), 0.5, dtype=torch.float64)
    assert odd.shape == (2, 3, 5, 7) and odd.dtype == torch.float64
    with pytest.raises(ValueError, match="discount"):
        pyramid_noise((1, 4, 8, 8), 1.0)
    with pytest.raises(ValueError, match="shape"):
        pyramid_noise((4, 8, 8), 0.5)


def test_unweighted_last_step_flags_v_weightings_on_a_zero_terminal_snr_schedule():
    from diffusers import DDPMScheduler

    from training.core import WEIGHTINGS, unweighted_last_step

    zsnr = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert unweighted_last_step(zsnr, "min-snr") and unweighted_last_step(zsnr, "p2")
    assert not unweighted_last_step(zsnr, "uniform")
    for sd in (DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # SD 1.5's
               DDPMScheduler(prediction_type="epsilon", rescale_betas_zero_snr=True)):  # epsilon: min(1, gamma / 0)
        assert not any(unweighted_last_step(sd, w) for w in WEIGHTINGS)


def test_pyramid_noise_is_drawn_on_the_device(monkeypatch):
    """Without a generator every draw happens on the target device (no host-to-device copy per
    training step); with one, where the generator lives, so a CPU generator stays reproducible."""
    from training.core import pyramid_noise

    devices, real = [], torch.randn

    def recording(*args, **kw):
        devices.append(str(kw.get("device")))
        return real(*args, **kw)

    monkeypatch.setattr(torch, "randn", recording)
    on_meta = pyramid_noise((2, 4, 8, 8), 0.5, device="meta")
    assert on_meta.device.type == "meta" and devices == ["meta"] * 4  # 8x8, then 4x4, 2x2 and 1x1
    devices.clear()
    seeded = pyramid_noise((2, 4, 8, 8), 0.5, generator=torch.Generator().manual_seed(0), device="meta")
    assert seeded.device.type == "meta" and devices == ["cpu"] * 4


def test_multires_noise_discount_reaches_the_objective(tiny_sd, toybooru, tmp_path, monkeypatch):
    from training import train_retrinet

    seen = []
    real = train_retrinet.pyramid_noise

    def recording(shape, discount, **kw):
        seen.append((shape, discount))
        return real(shape, discount, **kw)

    monkeypatch.setattr(train_retrinet, "pyramid_noise", recording)
    main(parse_args(argv(tiny_sd, toybooru, tmp_path / "white", "--max-train-steps", 1)))
    assert seen == []
    main(parse_args(argv(tiny_sd, toybooru, tmp_path / "pyramid", "--max-train-steps", 2,
                         "--multires-noise-discount", 0.8)))
    assert [d for _, d in seen] == [0.8, 0.8] and seen[0][0][0] == 2  # one call per batch of 2
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit):
            parse_args(argv(tiny_sd, toybooru, tmp_path, "--multires-noise-discount", bad))


def _gap_parts(tiny_sd, toybooru):
    vae, text_encoder, tokenizer, unet, noise_scheduler = load_base(str(tiny_sd))
    torch.manual_seed(0)
    retrinet = RetriNetModel.from_unet(unet)
    ds = RetriBooruDataset(toybooru, "test", task="multitask", num_references=2, resolution=32)
    return (vae, text_encoder, tokenizer, unet, retrinet, noise_scheduler), ds


def test_reference_gap_compares_own_other_and_no_references(tiny_sd, toybooru):
    parts, ds = _gap_parts(tiny_sd, toybooru)
    retrinet = parts[4]
    batch = collate([ds[0], ds[len(ds) // 2]])
    assert batch["reference_ids"][0] != batch["reference_ids"][1]
    fresh = reference_gap(*parts, batch, timesteps=(100, 900))
    assert fresh["samples"] == 2 and fresh["timesteps"] == [100, 900]
    # zero convolutions: RetriNet is exactly the base model, whatever it is shown
    assert fresh["own"] == fresh["other"] == fresh["none"] and fresh["gap"] == 0.0
    with torch.no_grad():
        for conv in [*retrinet.zero_convs, retrinet.mid_zero_conv]:
            conv.weight.normal_(0, 0.3)
    opened = reference_gap(*parts, batch, timesteps=(100, 900))
    assert opened["own"] != opened["none"] and opened["own"] != opened["other"]
    assert opened["gap"] == pytest.approx(sum(1 - o / x for o, x in zip(opened["own"], opened["other"])) / 2)
    assert reference_gap(*parts, batch, timesteps=(100, 900)) == opened  # fixed noise: repeatable
    # when every sample is shown the same references, "another sample's" are its own: no gap
    same = collate([ds[0], ds[0]])
    twin = reference_gap(*parts, same, timesteps=(100, 900))
    assert twin["own"] == pytest.approx(twin["other"], rel=1e-5) and twin["own"] != twin["none"]
    assert twin["gap"] == pytest.approx(0.0, abs=1e-5)
    # "other" pairs sample i with sample i - 1's references and concept words: the own loss of a batch
    # rolled by hand; and chunks give the same losses
    three = collate([ds[0], ds[len(ds) // 3], ds[2 * len(ds) // 3]])
    rolled = dict(three, reference_pixel_values=three["reference_pixel_values"].roll(1, 0),
                  concepts=three["concepts"][-1:] + three["concepts"][:-1],
                  reference_regions=three["reference_regions"].roll(1, 0))
    gap3 = reference_gap(*parts, three, timesteps=(100, 900))
    assert reference_gap(*parts, rolled, timesteps=(100, 900))["own"] == pytest.approx(gap3["other"], rel=1e-5)
    assert gap3["other"] != pytest.approx(reference_gap(*parts, dict(three, reference_pixel_values=three[
        "reference_pixel_values"].roll(-1, 0), concepts=three["concepts"][1:] + three["concepts"][:1]),
        timesteps=(100, 900))["own"], rel=1e-5)  # the other direction differs with 3 samples
    chunked = reference_gap(*parts, three, timesteps=(100, 900), chunk_size=1)
    for key in ("own", "other", "none"):
        assert chunked[key] == pytest.approx(gap3[key], rel=1e-5)
    # mixed precision: the frozen VAE and text encoder in half precision, the trained models in float32
    vae, text_encoder = parts[0].to(torch.bfloat16), parts[1].to(torch.bfloat16)
    half = reference_gap(vae, text_encoder, *parts[2:], batch, timesteps=(100, 900))
    assert half["own"] == pytest.approx(opened["own"], rel=0.05) and half["own"] != half["other"]


def test_reference_gap_rejects_bad_input(tiny_sd, toybooru):
    parts, ds = _gap_parts(tiny_sd, toybooru)
    with pytest.raises(ValueError, match="at least 2 samples"):
        reference_gap(*parts, collate([ds[0]]))
    batch = collate([ds[0], ds[1]])
    with pytest.raises(ValueError, match="no timesteps"):
        reference_gap(*parts, batch, timesteps=())
    with pytest.raises(ValueError, match=r"0\.\.999"):
        reference_gap(*parts, batch, timesteps=(500, 1000))
    with pytest.raises(ValueError, match="chunk_size"):
        reference_gap(*parts, batch, chunk_size=0)
    from diffusers import DDPMScheduler

    from training.train_retrinet import gap_timesteps

    short = DDPMScheduler(num_train_timesteps=100)
    assert gap_timesteps(short) == (30, 50, 70, 90) and gap_timesteps(parts[5]) == (300, 500, 700, 900)
    with pytest.raises(ValueError, match="prediction type 'sample'"):
        reference_gap(*parts[:5], DDPMScheduler(prediction_type="sample"), batch)


def test_resume_reproduces_the_uninterrupted_losses(tiny_sd, toybooru, tmp_path):
    full = tmp_path / "full"
    main(parse_args(argv(tiny_sd, toybooru, full, "--max-train-steps", 7, "--checkpointing-steps", 3,
                         "--gradient-accumulation-steps", 2, "--task", "multitask")))
    part = tmp_path / "part"
    main(parse_args(argv(tiny_sd, toybooru, part, "--max-train-steps", 3, "--checkpointing-steps", 3,
                         "--gradient-accumulation-steps", 2, "--task", "multitask")))
    # a crash after step 3 leaves lines for steps 4 and 5 and half a line; resume drops them
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + json.dumps({"step": 5, "loss": 9.0}) + "\n{\"step\": 6, ")
    main(parse_args(argv(tiny_sd, toybooru, part, "--max-train-steps", 7, "--checkpointing-steps", 3,
                         "--gradient-accumulation-steps", 2, "--task", "multitask", "--resume-from-checkpoint",
                         "latest")))
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 8))
    for step in range(1, 8):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    fa = RetriNetModel.from_pretrained(full / "retrinet").state_dict()
    fb = RetriNetModel.from_pretrained(part / "retrinet").state_dict()
    assert all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)


def test_sigkill_and_resume_from_latest(tiny_sd, toybooru, tmp_path):
    common = ["--max-train-steps", 8, "--checkpointing-steps", 1, "--task", "compose"]
    full = tmp_path / "full"
    main(parse_args(argv(tiny_sd, toybooru, full, *common)))
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "training.train_retrinet", *argv(tiny_sd, toybooru, killed, *common)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, killed / "checkpoint-3")
    k, latest = list_checkpoints(killed)[-1]
    assert 3 <= k < 8
    # a folder killed mid-write is never "latest": neither a temporary one nor one without its state file
    (killed / f".checkpoint-{k + 1}.tmp").mkdir(exist_ok=True)
    shutil.copytree(latest, killed / "checkpoint-99")
    (killed / "checkpoint-99" / "trainer_state.json").unlink()
    assert resolve_checkpoint(killed, "latest") == latest
    main(parse_args(argv(tiny_sd, toybooru, killed, *common, "--resume-from-checkpoint", "latest")))
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    assert not list(killed.glob(".checkpoint-*.tmp"))  # cleaned at start


@pytest.mark.parametrize("lock", ["none", "decoder", "both"])
def test_locks_freeze_exactly_the_intended_parameters(tiny_sd, toybooru, tmp_path, lock):
    main(parse_args(argv(tiny_sd, toybooru, tmp_path, "--max-train-steps", 2, "--lock", lock)))
    unet0 = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    rn0 = RetriNetModel.from_unet(unet0).state_dict()
    rn1 = RetriNetModel.from_pretrained(tmp_path / "retrinet").state_dict()
    changed = {k for k in rn0 if not torch.equal(rn0[k], rn1[k])}
    bridge = {k for k in rn0 if k.startswith(("cross_attentions", "zero_convs", "mid_cross_attention", "mid_zero_conv"))}
    encoder = set(rn0) - bridge - {k for k in rn0 if k.startswith("time_proj")}
    assert bridge <= changed
    assert (encoder <= changed) if lock != "both" else not (encoder & changed)
    if lock == "none":
        u0 = unet0.state_dict()
        u1 = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
        moved = {k for k in u0 if not torch.equal(u0[k], u1[k])}
        decoder = {k for k in u0 if k.startswith(("up_blocks", "conv_norm_out", "conv_out"))}
        assert moved == decoder
        n = sum(u0[k].numel() for k in decoder) + sum(rn0[k].numel() for k in rn0)
        print(f"lock none trains {n} parameters")
    else:
        assert not (tmp_path / "unet").exists()


def test_gradient_checkpointing_gives_the_same_losses(tiny_sd, toybooru, tmp_path):
    main(parse_args(argv(tiny_sd, toybooru, tmp_path / "plain", "--max-train-steps", 2)))
    main(parse_args(argv(tiny_sd, toybooru, tmp_path / "ckpt", "--max-train-steps", 2, "--gradient-checkpointing")))
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_checkpoint_limit_keeps_the_newest(tiny_sd, toybooru, tmp_path):
    main(parse_args(argv(tiny_sd, toybooru, tmp_path, "--max-train-steps", 5, "--checkpointing-steps", 1,
                         "--checkpoints-total-limit", 2)))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]


def test_two_processes_write_one_set_of_outputs(tiny_sd, toybooru, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "training.train_retrinet", *argv(tiny_sd, toybooru, out, "--max-train-steps", 3,
                                                  "--checkpointing-steps", 2)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 process(es)" in run.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]
    RetriNetModel.from_pretrained(out / "retrinet")
    assert not list(out.glob(".checkpoint-*"))


def test_a_second_run_continues_the_first_runs_retrinet_and_unet(tiny_sd, toybooru, tmp_path):
    from safetensors.torch import load_file

    def weights(folder):
        return load_file(str(folder / "diffusion_pytorch_model.safetensors"))

    first = tmp_path / "first"
    main(parse_args(argv(tiny_sd, toybooru, first, "--max-train-steps", 2, "--learning-rate", "1e-2")))
    base_unet = weights(tiny_sd / "unet")
    assert any(not torch.equal(v, base_unet[k]) for k, v in weights(first / "unet").items())  # the decoder trained
    # learning rate 0: what the second run saves is what it started from
    second = tmp_path / "second"
    main(parse_args(argv(tiny_sd, toybooru, second, "--max-train-steps", 1, "--learning-rate", 0,
                         "--retrinet", first / "retrinet", "--unet", first / "unet")))
    for name in ("unet", "retrinet"):
        start, end = weights(first / name), weights(second / name)
        assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start), name
    # with the UNet locked its checkpoints do not hold it: the export takes it from the run's --unet
    from training.export import export_retrinet

    locked = tmp_path / "locked"
    main(parse_args(argv(tiny_sd, toybooru, locked, "--max-train-steps", 1, "--checkpointing-steps", 1,
                         "--lock", "decoder", "--retrinet", first / "retrinet", "--unet", first / "unet")))
    export_retrinet(locked / "checkpoint-1", str(tiny_sd), tmp_path / "exported", unet=str(first / "unet"))
    exported = weights(tmp_path / "exported" / "unet")
    assert all(torch.equal(v, exported[k]) for k, v in weights(first / "unet").items())
    with pytest.raises(ValueError, match="cannot load the UNet"):
        export_retrinet(locked / "checkpoint-1", str(tiny_sd), tmp_path / "nowhere", unet=str(tmp_path / "no-unet"))
    with pytest.raises(ValueError, match="cannot load the UNet"):
        main(parse_args(argv(tiny_sd, toybooru, tmp_path / "third", "--max-train-steps", 1,
                             "--unet", tmp_path / "no-unet")))


def test_clear_errors_before_training(tiny_sd, toybooru, tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations.jsonl"):
        main(parse_args(argv(tiny_sd, tmp_path / "nothing", tmp_path / "o1", "--max-train-steps", 1)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "annotations.jsonl").write_text("")
    with pytest.raises(ValueError, match="no usable record"):
        main(parse_args(argv(tiny_sd, empty, tmp_path / "o2", "--max-train-steps", 1)))
    # every record alone in its cluster: nothing to train on under setting b
    lonely = tmp_path / "lonely"
    shutil.copytree(toybooru, lonely)
    recs = [json.loads(x) for x in (lonely / "annotations.jsonl").read_text().splitlines()]
    (lonely / "annotations.jsonl").write_text("".join(json.dumps({**r, "similar": []}) + "\n" for r in recs))
    with pytest.raises(ValueError, match="no usable record"):
        main(parse_args(argv(tiny_sd, lonely, tmp_path / "o3", "--max-train-steps", 1, "--setting", "b")))
    with pytest.raises(ValueError, match="cannot load the base model"):
        main(parse_args(argv(tmp_path / "no-model", toybooru, tmp_path / "o4", "--max-train-steps", 1)))
    # an incompatible checkpoint: other cross-attention heads, or another lock
    main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o5", "--max-train-steps", 1, "--checkpointing-steps", 1)))
    with pytest.raises(ValueError, match="does not fit this run"):
        main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o5", "--max-train-steps", 2, "--retrieval-attention-heads",
                             2, "--resume-from-checkpoint", "latest")))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o5", "--max-train-steps", 2, "--resume-from-checkpoint",
                             tmp_path / "o5" / "retrinet")))
    # positions asked of a RetriNet trained without them; and a checkpoint without them does not resume with them
    with pytest.raises(ValueError, match="trained without them"):
        main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o7", "--max-train-steps", 1, "--retrinet",
                             tmp_path / "o5" / "retrinet", "--unet", tmp_path / "o5" / "unet", "--retrieval-positions")))
    with pytest.raises(ValueError, match="does not fit this run"):
        main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o5", "--max-train-steps", 2, "--retrieval-positions",
                             "--resume-from-checkpoint", "latest")))
    # pooled keys: saved in the RetriNet's config; asked of a RetriNet trained without them, an error; and a checkpoint
    # without them does not resume with them
    main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o9", "--max-train-steps", 1, "--retrieval-max-keys", 16)))
    assert RetriNetModel.from_pretrained(tmp_path / "o9" / "retrinet").config.retrieval_max_keys == 16
    with pytest.raises(ValueError, match="trained with None"):
        main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o8", "--max-train-steps", 1, "--retrinet",
                             tmp_path / "o5" / "retrinet", "--unet", tmp_path / "o5" / "unet", "--retrieval-max-keys",
                             16)))
    with pytest.raises(ValueError, match="does not fit this run"):
        main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o5", "--max-train-steps", 2, "--retrieval-max-keys", 16,
                             "--resume-from-checkpoint", "latest")))
    # regions: saved in the RetriNet's config; asked of a RetriNet trained without them, an error
    main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o10", "--max-train-steps", 1, "--retrieval-positions",
                         "--retrieval-regions", "--task", "compose")))
    assert RetriNetModel.from_pretrained(tmp_path / "o10" / "retrinet").config.retrieval_regions is True
    with pytest.raises(ValueError, match="trained without them"):
        main(parse_args(argv(tiny_sd, toybooru, tmp_path / "o11", "--max-train-steps", 1, "--retrinet",
                             tmp_path / "o5" / "retrinet", "--unet", tmp_path / "o5" / "unet", "--retrieval-positions",
                             "--retrieval-regions")))
    for bad in (["--task", "paint"], ["--lock", "all"], ["--setting", "c"], ["--mixed-precision", "fp8"],
                ["--num-references", "0"], ["--prompt-dropout", "1.5"], ["--retrieval-max-keys", "0"],
                ["--retrieval-regions"]):
        with pytest.raises(SystemExit):
            parse_args(argv(tiny_sd, toybooru, tmp_path / "o6", *bad))


def test_validation_pictures_and_push_to_hub(tiny_sd, toybooru, tmp_path, monkeypatch):
    calls = {}
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, exist_ok, token: type("R", (), {"repo_id": f"user/{repo_id}"})())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.update(kw))
    result = main(parse_args(argv(tiny_sd, toybooru, tmp_path, "--max-train-steps", 2, "--validation-steps", 2,
                                  "--num-validation-images", 2, "--validation-inference-steps", 2, "--push-to-hub",
                                  "--hub-model-id", "retrinet-test")))
    grid = tmp_path / "validation" / "step-000002.png"
    from PIL import Image

    assert Image.open(grid).size == (2 * 32, 2 * 32)
    gap_log = tmp_path / "validation" / "reference_gap.jsonl"
    gaps = [json.loads(line) for line in gap_log.read_text().splitlines()]
    assert [g["step"] for g in gaps] == [2] and gaps[0]["samples"] >= 2
    assert len(gaps[0]["own"]) == len(gaps[0]["other"]) == len(gaps[0]["none"]) == 4 and -1 < gaps[0]["gap"] < 1
    # a fresh start in the same folder (no checkpoint to resume) measures its own gaps, not after the old ones
    main(parse_args(argv(tiny_sd, toybooru, tmp_path, "--max-train-steps", 4, "--validation-steps", 2,
                         "--num-validation-images", 1, "--validation-inference-steps", 2,
                         "--resume-from-checkpoint", "latest")))
    assert [json.loads(line)["step"] for line in gap_log.read_text().splitlines()] == [2, 4]
    assert result["hub_repo"] == "user/retrinet-test"
    assert calls["folder_path"] == str(tmp_path) and "checkpoint-*" in calls["ignore_patterns"]


def test_use_ema_saves_the_average_of_the_retrinet_and_the_decoder(tiny_sd, toybooru, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    main(parse_args(argv(tiny_sd, toybooru, tmp_path, "--max-train-steps", 2, "--checkpointing-steps", 1,
                         "--use-ema", "--ema-decay", "0.5", "--learning-rate", "1e-2")))
    d = min(0.5, 2 / 11)  # diffusers' warm-up at the second step (the first copies the weights)
    for shipped, index in ((RetriNetModel.from_pretrained(tmp_path / "retrinet"), ""),
                           (UNet2DConditionModel.from_pretrained(tmp_path / "unet"), "_1")):
        first, second = (load_file(tmp_path / f"checkpoint-{k}" / f"model{index}.safetensors") for k in (1, 2))
        state = shipped.state_dict()
        assert set(state) == set(second)
        trained = [n for n in second if not torch.equal(first[n], second[n])]
        assert trained  # the decoder and the retrieval encoder both moved
        for name in trained:
            torch.testing.assert_close(state[name], d * first[name] + (1 - d) * second[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        parse_args(argv(tiny_sd, toybooru, tmp_path, "--use-ema", "--ema-decay", "0"))
