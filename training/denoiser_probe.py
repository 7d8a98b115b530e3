"""Where the demo family loses what its autoencoder keeps: four probes of its decoder, UNet and RetriNet.

    python -m training.denoiser_probe --work WORK [--out assets/demo-zoo] [--base DIR] [--pipeline DIR] [--json F]

Each probe is judged as the report judges (the shipped judge, the build's held-out test pictures, the
attributes hair, eye and outfit colour and pattern):

- ``decoder``: the test pictures' latents plus Gaussian noise of standard deviation sigma (in the diffusion's
  scaled units), decoded: how exact a denoiser's latent must be for the decoder to keep each attribute;
- ``img2img``: the base redraws the test pictures from their latents noised to a strength (diffusers'
  ``StableDiffusionImg2ImgPipeline``, their full tag prompts, the report's sampler and guidance): what the UNet
  keeps of what its noisy input still shows;
- ``x0``: the base UNet's one-step estimate of the clean latent at timestep t (its prediction turned into x0 by
  the scheduler's parametrisation): its RMS error against that of the noisy latent itself (``noisy_rms``, the
  error of doing nothing), and the judge's reading of it decoded;
- ``self_reference``: the same for RetriNet, on reconstruction targets (neutral prompts), with the target itself
  as its only reference, with 4 other pictures of its cluster (the report's reconstruction) and with none
  (retrieval scale 0). A RetriNet that can copy where things lie in its references does better with the target
  itself than with other pictures; one that reads only what all pictures of a character share does not.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch

from training.data.retribooru import open_record, prompt_from_tags, read_annotations

ATTRIBUTES = ("hair_color", "eye_color", "cloth_color", "pattern")
SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5)
STRENGTHS = (0.1, 0.2, 0.4)
TIMESTEPS = (50, 150, 300, 500, 700)


def _read(judge, pixels_or_images, truths) -> dict[str, float]:
    from training.demo_report import per_attribute

    return per_attribute(judge.predict(pixels_or_images), truths, ATTRIBUTES)


def _x0(scheduler, sample: torch.Tensor, output: torch.Tensor, t: int) -> torch.Tensor:
    """The clean-latent estimate of a model output under the scheduler's parametrisation."""
    a = scheduler.alphas_cumprod[t]
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * output
    if kind == "epsilon":
        return (sample - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "sample":
        return output
    raise ValueError(f"unknown prediction type {kind!r}")


@torch.no_grad()
def decoder_under_noise(vae, judge, pixels: torch.Tensor, truths: list[dict], sigmas=SIGMAS,
                        seed: int = 0) -> dict[str, dict[str, float]]:
    sf = vae.config.scaling_factor
    z = vae.encode(pixels).latent_dist.mode() * sf
    g = torch.Generator().manual_seed(seed)
    out = {}
    for sigma in sigmas:
        noisy = z + sigma * torch.randn(z.shape, generator=g)
        out[str(sigma)] = _read(judge, vae.decode(noisy / sf).sample.clamp(-1, 1), truths)
    return out


@torch.no_grad()
def img2img(base, judge, images, prompts: list[str], truths: list[dict], strengths=STRENGTHS,
            seed: int = 0) -> dict[str, dict[str, float]]:
    from diffusers import StableDiffusionImg2ImgPipeline

    from training.demo_report import GUIDANCE, STEPS

    redraw = StableDiffusionImg2ImgPipeline(**{k: v for k, v in base.components.items()
                                               if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    redraw.set_progress_bar_config(disable=True)
    out = {}
    for strength in strengths:
        drawn = []
        for s in range(0, len(images), 16):
            drawn += redraw(prompts[s:s + 16], image=images[s:s + 16], strength=strength, num_inference_steps=STEPS,
                            guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed + s)).images
        out[str(strength)] = _read(judge, drawn, truths)
    return out


@torch.no_grad()
def one_step_x0(denoise, vae, scheduler, judge, latents: torch.Tensor, truths: list[dict], timesteps=TIMESTEPS,
                seed: int = 0) -> dict[str, dict[str, float]]:
    """``denoise(noisy, t)`` -> the model's output; per timestep the x0 estimate's RMS error, the noisy latent's
    own (``noisy_rms``: its error as an estimate of x0 once divided by sqrt(alpha_bar)) and the judge's reading."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        a = scheduler.alphas_cumprod[t]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(latents.shape, generator=g)
        x0 = _x0(scheduler, noisy, denoise(noisy, t), t)
        out[str(t)] = {"rms": float((x0 - latents).pow(2).mean().sqrt()),
                       "noisy_rms": float((noisy / a.sqrt() - latents).pow(2).mean().sqrt()),
                       **_read(judge, vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1), truths)}
    return out


def _retrinet_denoiser(pipe, groups: list[list] | None, text: torch.Tensor, size: int, device: torch.device):
    """``denoise(noisy, t)`` of RetriNet's UNet reading ``groups`` of references drawn at ``size`` pixels, as the
    pipeline reads them for a target of that size (None: reading none)."""
    if groups is None:
        return lambda z, t: pipe.unet(z, t, encoder_hidden_states=text).sample
    with torch.no_grad():
        latents, concepts, _ = pipe.encode_references(groups, size, device)
    regions = pipe.reference_regions(groups, device)

    def denoise(z: torch.Tensor, t: int) -> torch.Tensor:
        features = pipe.retrinet(latents, torch.tensor(t), concepts, len(groups[0]), reference_regions=regions)
        with pipe.retrinet.inject(pipe.unet, features):
            return pipe.unet(z, t, encoder_hidden_states=text).sample
    return denoise


def probe(out: Path, work: Path, base_dir: Path | None = None, pipeline_dir: Path | None = None, samples: int = 96,
          seed: int = 0) -> dict[str, Any]:
    """All four probes on ``samples`` test pictures (the same for the first three)."""
    from diffusers import StableDiffusionPipeline

    from pipelines.metrics.attributes import AttributeClassifier
    from pipelines.retrinet import RetriNetPipeline
    from training.demo_report import SIZE, base_folder, neutral_prompt, reconstruction_draw, reference, test_pixels

    out, work = Path(out), Path(work)
    root = work / "toybooru"
    if not (root / "annotations.jsonl").is_file():
        raise ValueError(f"no Toybooru in {root}: run the build's data stage first")
    if not (out / "judge").is_dir():
        raise ValueError(f"no judge in {out / 'judge'}")
    if samples < 2:
        raise ValueError(f"samples must be at least 2, got {samples}")
    records, _ = read_annotations(root)
    test = [r for r in records if r["split"] == "test"]
    if len(test) < samples:
        raise ValueError(f"{len(test)} test pictures in {root}, fewer than {samples} samples")
    judge = AttributeClassifier.from_pretrained(out / "judge").eval()
    rng = random.Random(f"denoiser-probe/{seed}")
    chosen = rng.sample(test, samples)
    truths = [r["truth"] for r in chosen]
    base = StableDiffusionPipeline.from_pretrained(base_dir or base_folder(out, work), safety_checker=None)
    base.set_progress_bar_config(disable=True)
    pixels = test_pixels(root, chosen)
    figures: dict[str, Any] = {"pictures": samples, "real": _read(judge, pixels, truths)}
    figures["decoder"] = decoder_under_noise(base.vae, judge, pixels, truths, seed=seed)
    images = [open_record(root, r)[0].resize((SIZE, SIZE)) for r in chosen]
    figures["img2img"] = img2img(base, judge, images, [prompt_from_tags(r["tags"]) for r in chosen], truths, seed=seed)
    with torch.no_grad():
        latents = base.vae.encode(pixels).latent_dist.mode() * base.vae.config.scaling_factor
        text = base.encode_prompt([prompt_from_tags(r["tags"]) for r in chosen], "cpu", 1, False)[0]
    figures["x0"] = one_step_x0(lambda z, t: base.unet(z, t, encoder_hidden_states=text).sample, base.vae,
                                base.scheduler, judge, latents, truths, seed=seed)

    # RetriNet on reconstruction targets drawn as the report draws them
    pipe = RetriNetPipeline.from_pretrained(pipeline_dir or out / "retrinet")
    drawn = reconstruction_draw(test, rng, samples)
    chosen = [r for r, _ in drawn]
    truths = [r["truth"] for r in chosen]
    groups = {"self": [[reference(root, r, "figure")] for r in chosen],
              "others": [[reference(root, o, "figure") for o in others] for _, others in drawn]}
    device = torch.device("cpu")
    with torch.no_grad():
        pixels = test_pixels(root, chosen)
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        text = pipe.encode_prompt([neutral_prompt(r) for r in chosen], device, 1, False)[0]
    figures["self_reference"] = {"pictures": len(chosen)}
    for name in ("self", "others", "none"):
        denoise = _retrinet_denoiser(pipe, groups.get(name), text, SIZE, device)
        figures["self_reference"][name] = one_step_x0(denoise, pipe.vae, pipe.scheduler, judge, latents, truths,
                                                      seed=seed)
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m training.denoiser_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "demo-zoo"),
                   help="the shipped folder (its judge, base and RetriNet)")
    p.add_argument("--work", required=True, help="the build's work folder (its toybooru/)")
    p.add_argument("--base", default=None, help="a base text-to-image pipeline folder (default: the shipped base)")
    p.add_argument("--pipeline", default=None, help="a RetriNetPipeline folder (default: the shipped one)")
    p.add_argument("--samples", type=int, default=96, help="test pictures per probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args(argv)
    from training.demo_report import print_figures

    try:
        figures = probe(Path(args.out), Path(args.work), args.base and Path(args.base),
                        args.pipeline and Path(args.pipeline), args.samples, args.seed)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    return print_figures(figures, args.json)


if __name__ == "__main__":
    main()
