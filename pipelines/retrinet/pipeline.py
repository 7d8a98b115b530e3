"""``RetriNetPipeline``: text-to-image with references, Stable Diffusion + RetriNet.

Each reference is a picture and a concept word ("face", "clothes" or "figure"): the picture goes
through the VAE (clean latent, scaled by the VAE's scaling factor), the word through the text
encoder, both into the retrieval encoder once per denoising step; its features are injected into
the UNet (see ``pipelines.retrinet.model``). Classifier-free guidance keeps the references in both
branches and drops only the prompt, as prompt dropout does in training (seed 001, Sec. 5.2).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (AsymmetricAutoencoderKL, AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPTokenizer

from pipelines.concepts import CONCEPTS, resize_and_pad
from pipelines.retrinet.model import FULL_FRAME, RetriNetModel, RetrievalFeatures, check_regions


@dataclass(frozen=True)
class Reference:
    """A reference picture and the concept to take from it; ``region``, where the picture was cut from in its
    source picture's square frame (``pipelines.concepts.concept_region``), is read by a RetriNet trained with
    ``retrieval_regions`` (None: the picture fills the frame, as a "figure" does)."""

    image: PIL.Image.Image
    concept: str
    region: tuple[float, float, float, float] | None = None


@dataclass
class RetriNetPipelineOutput(BaseOutput):
    """``images``: PIL pictures, a numpy array (N, H, W, 3) or latents, as ``output_type`` asks."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class _FeatureCache:
    """A bounded LRU cache of retrieval features, keyed by (references, concepts, timestep, model). The features of
    one call's timesteps share one dict of key positions (``RetrievalFeatures.key_positions``), filled as the call
    runs: it is counted once, at its size when the cache last changed."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, RetrievalFeatures] = OrderedDict()
        self._own = 0  # the entries' own tensors
        self._shared: dict[int, tuple[dict, int]] = {}  # id of a key-positions dict -> (it, entries holding it)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def nbytes(self) -> int:
        """The bytes held: every entry's features, and each key-positions dict once."""
        return self._own + sum(t.numel() * t.element_size() for d, _ in self._shared.values() for t in d.values())

    def get(self, key: tuple) -> RetrievalFeatures | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple, value: RetrievalFeatures) -> None:
        if value.nbytes() > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._own += value.nbytes(key_positions=False)
            shared, held = self._shared.get(id(value.key_positions), (value.key_positions, 0))
            self._shared[id(shared)] = (shared, held + 1)
            while self.nbytes() > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._own -= old.nbytes(key_positions=False)
                shared, held = self._shared[id(old.key_positions)]
                if held == 1:
                    del self._shared[id(shared)]
                else:
                    self._shared[id(shared)] = (shared, held - 1)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._shared.clear()
            self._own = 0

    def __len__(self) -> int:
        return len(self._items)


def embed_texts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, texts: Sequence[str],
                device: torch.device | str) -> torch.Tensor:
    """(len(texts), L, D) text-encoder states of ``texts`` padded to the tokenizer's length: how
    concept words are encoded, at inference here and in training (``training.train_retrinet``)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def embed_words(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, words: Sequence[str],
                device: torch.device | str) -> torch.Tensor:
    """(len(words), L, D) ``embed_texts`` of ``words`` with each distinct word encoded once: concept
    words are few and repeat in every sample."""
    words = list(words)
    if not words:
        raise ValueError("no words given")
    distinct = sorted(set(words))
    table = dict(zip(distinct, embed_texts(tokenizer, text_encoder, distinct, device)))
    return torch.stack([table[w] for w in words])


def _is_reference(ref) -> bool:
    return isinstance(ref, Reference) or (isinstance(ref, (tuple, list)) and len(ref) == 2 and isinstance(ref[1], str))


def _as_reference(ref) -> Reference:
    if isinstance(ref, Reference):
        return ref
    if isinstance(ref, (tuple, list)) and len(ref) == 2:
        return Reference(*ref)
    raise ValueError(f"a reference is a Reference(image, concept) or an (image, concept) pair, got {type(ref).__name__}")


class RetriNetPipeline(DiffusionPipeline, StableDiffusionMixin, TextualInversionLoaderMixin,
                       StableDiffusionLoraLoaderMixin):
    """Generate pictures from a prompt and reference concepts with RetriNet.

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``retrinet`` and any diffusers
    ``scheduler``. The folder round-trips through ``save_pretrained`` / ``from_pretrained``.
    """

    # RetriNet's cross-attentions and zero convolutions run inside the UNet's forward (hooks), and
    # cached features skip RetriNet's own forward: an offload hook would leave them on the CPU while
    # the UNet runs on the GPU. So RetriNet stays on the execution device (ControlNet's pipelines keep
    # theirs out of the chain for the same reason) and the other models are offloaded one at a time.
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _exclude_from_cpu_offload = ["retrinet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    # the prompt side is Stable Diffusion's, reused as is (textual inversion and LoRA included)
    encode_prompt = StableDiffusionPipeline.encode_prompt
    prepare_latents = StableDiffusionPipeline.prepare_latents
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs

    def __init__(self, vae: AutoencoderKL | AsymmetricAutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, unet: UNet2DConditionModel, retrinet: RetriNetModel,
                 scheduler: KarrasDiffusionSchedulers):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, retrinet=retrinet,
                              scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.retrieval_cache = _FeatureCache(max_bytes=1 << 30)
        self._concept_embeds: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, prompt, references, height: int, width: int, num_inference_steps: int,
                     guidance_scale: float, retrieval_scale: float, num_images_per_prompt: int,
                     negative_prompt) -> tuple[list[str], list[list[Reference]]]:
        """Normalise ``prompt`` and ``references``; raise ``ValueError`` on anything malformed."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != len(prompts):
            raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        if references is None or len(references) == 0:
            raise ValueError("no reference given; RetriNet needs at least one (image, concept)")
        nested = all(isinstance(r, (list, tuple)) and not _is_reference(r) for r in references)
        groups = [[_as_reference(r) for r in g] for g in references] if nested else [[_as_reference(r) for r in references]]
        if len(groups) not in (1, len(prompts)):
            raise ValueError(f"{len(groups)} lists of references for {len(prompts)} prompts; give one list, "
                             f"or one per prompt")
        n, most = len(groups[0]), self.retrinet.config.max_references
        for g in groups:
            if not 1 <= len(g) <= most:
                raise ValueError(f"{len(g)} references given, between 1 and {most} are supported")
            if len(g) != n:
                raise ValueError(f"every prompt needs the same number of references ({n} and {len(g)} given)")
            for r in g:
                if r.concept not in CONCEPTS:
                    raise ValueError(f"unknown concept {r.concept!r}; expected one of {', '.join(CONCEPTS)}")
                if not isinstance(r.image, PIL.Image.Image):
                    raise ValueError(f"a reference image must be a PIL image, got {type(r.image).__name__}")
        f = self.vae_scale_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height} x {width}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must not be negative, got {guidance_scale}")
        if retrieval_scale < 0:
            raise ValueError(f"retrieval_scale must not be negative, got {retrieval_scale}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        return prompts, groups

    # ------------------------------------------------------------------ references

    def encode_concepts(self, concepts: Sequence[str], device: torch.device) -> torch.Tensor:
        """Text embeddings (len(concepts), L, D) of concept words, cached per word."""
        key = (id(self.text_encoder), str(device))
        missing = sorted({w for w in concepts if (*key, w) not in self._concept_embeds})
        if missing:
            for word, emb in zip(missing, embed_texts(self.tokenizer, self.text_encoder, missing, device)):
                self._concept_embeds[(*key, word)] = emb
        return torch.stack([self._concept_embeds[(*key, w)] for w in concepts]).to(dtype=self.retrinet.dtype)

    def encode_references(self, groups: list[list[Reference]], size: int, device: torch.device,
                          generator=None, regions: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Clean, scaled VAE latents (G * N, C, s, s) of the references, padded to squares of
        ``size`` pixels, their concept embeddings, and a content key for the feature cache (the
        regions included: ``regions``, or ``reference_regions`` of the groups when None)."""
        pixels = []
        for g in groups:
            for r in g:
                square, _ = resize_and_pad(r.image.convert("RGB"), size)
                pixels.append(square)
        x = self.image_processor.preprocess(pixels, height=size, width=size).to(device=device, dtype=self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor  # (G*N, C, s/f, s/f)
        concepts = [r.concept for g in groups for r in g]
        embeds = self.encode_concepts(concepts, device)
        digest = hashlib.sha1(latents.float().cpu().numpy().tobytes())
        digest.update("|".join(concepts).encode())
        if regions is None:
            regions = self.reference_regions(groups, device)
        digest.update(regions.numpy(force=True).tobytes())
        return latents.to(self.retrinet.dtype), embeds, digest.hexdigest()

    def reference_regions(self, groups: list[list[Reference]], device: torch.device) -> torch.Tensor:
        """(G * N, 4): each reference's ``region``, the whole frame where it has none."""
        regions = [r.region if r.region is not None else FULL_FRAME for g in groups for r in g]
        return check_regions(torch.tensor(regions, dtype=torch.float32), len(regions)).to(device)

    def retrieval_features(self, latents: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor, n: int,
                           key: str, regions: torch.Tensor | None = None,
                           key_positions: dict | None = None) -> RetrievalFeatures:
        """The retrieval encoder's features at timestep ``t``: from the cache, or computed once
        (``key_positions``: shared by the features of every timestep of one call, see the model's
        ``encode_references``)."""
        ck = (key, float(t), id(self.retrinet), str(latents.device), str(latents.dtype))
        feats = self.retrieval_cache.get(ck)
        if feats is None:
            feats = self.retrinet(latents, t, embeds, n, reference_regions=regions, key_positions=key_positions)
            self.retrieval_cache.put(ck, feats)
        return feats

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        references: Sequence[Reference | tuple] | Sequence[Sequence[Reference | tuple]],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.0,
        retrieval_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        reference_size: int | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        return_dict: bool = True,
    ):
        """Generate ``num_images_per_prompt`` pictures per prompt.

        ``references``: one list of ``Reference(image, concept)`` (or ``(image, concept)``) shared
        by every prompt, or one list per prompt, all of the same length. ``reference_size``: the
        square the references are padded to before the VAE (default: the smaller of height and
        width). ``guidance_scale`` > 1 turns on classifier-free guidance, ``retrieval_scale``
        multiplies what RetriNet adds (0 gives the base model). ``guidance_rescale`` in [0, 1]
        rescales the guided prediction toward the conditional one's standard deviation (Lin et al.,
        2024, Sec. 3.4, as ``StableDiffusionPipeline``'s; 0.7 is their choice for a
        zero-terminal-SNR model), against the over-exposure that strong guidance gives such models.
        """
        # 0. Default size: the UNet's
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        reference_size = reference_size or min(height, width)

        # 1. Check inputs
        prompts, groups = self.check_inputs(prompt, references, height, width, num_inference_steps, guidance_scale,
                                            retrieval_scale, num_images_per_prompt, negative_prompt)
        if reference_size % self.vae_scale_factor:
            raise ValueError(f"reference_size must be a multiple of {self.vae_scale_factor}, got {reference_size}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(bad)} are not among {self._callback_tensor_inputs}")
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        batch = len(prompts) * num_images_per_prompt

        # 2. Encode prompt
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompts, device, num_images_per_prompt, do_cfg, negatives)
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, L, D)

        # 3. Encode references; row r of the UNet batch reads reference group group_index[r]
        n = len(groups[0])
        ref_regions = self.reference_regions(groups, device)
        ref_latents, concept_embeds, ref_key = self.encode_references(groups, reference_size, device,
                                                                      regions=ref_regions)
        key_positions: dict = {}  # the regions' key positions, computed at the first step for all of them
        group_index = torch.arange(batch, device=device) // num_images_per_prompt if len(groups) > 1 else \
            torch.zeros(batch, dtype=torch.long, device=device)
        if do_cfg:
            group_index = group_index.repeat(2)  # both branches see the references

        # 4. Prepare timesteps
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)

        # 5. Prepare latent variables
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, prompt_embeds.dtype,
                                       device, generator, latents)

        # 6. Prepare extra step kwargs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Denoising loop
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                features = self.retrieval_features(ref_latents, concept_embeds, t, n, ref_key, ref_regions,
                                                   key_positions)
                noise_pred = self.retrinet.denoise(self.unet, latent_model_input, t, prompt_embeds, features,
                                                   group_index, retrieval_scale)
                if do_cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                    if guidance_rescale > 0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = (out or {}).get("latents", latents)
                progress_bar.update()

        # 8. Decode
        if output_type == "latent":
            images = latents
        else:
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                     generator=generator)[0]
            images = self.image_processor.postprocess(images, output_type=output_type,
                                                      do_denormalize=[True] * images.shape[0])
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return RetriNetPipelineOutput(images=images)
