"""A cache of VAE posteriors for pictures that are the same every time a run draws them.

The VAE of a latent-diffusion run is frozen, so a picture that the data set always delivers the
same way (a Toybooru picture, mirrored or not; a RetriBooru target, or a reference cut to one
concept under setting b) has the same posterior at every epoch. ``LatentCache`` encodes such a
picture the first time a batch brings it and keeps its posterior's mean and standard deviation
(float32, on the CPU); later batches skip the encoder. Sampling from the cached posterior draws
its noise as ``DiagonalGaussianDistribution.sample`` does, from the same generator.

A picture's cached posterior is encoded inside whatever batch first brought it, so a run with
the cache (and a resumed one, whose cache starts empty) equals one without it up to the CPU
kernels' rounding, not to the last bit; that is why the trainers take it only when asked
(``--cache-latents``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


class LatentCache:
    """Posterior means and standard deviations of a frozen VAE, by a key per picture."""

    def __init__(self, vae, max_items: int = 200_000):
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.vae, self.max_items = vae, max_items
        self._mean: dict[Hashable, torch.Tensor] = {}
        self._std: dict[Hashable, torch.Tensor] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._mean)

    @torch.no_grad()
    def posterior(self, keys: Sequence[Hashable], pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of each picture of ``pixels`` (B, 3, H, W), on the VAE's device and dtype;
        ``keys`` (B) name the pictures, and a key names the same picture every time."""
        if len(keys) != pixels.shape[0]:
            raise ValueError(f"{len(keys)} keys for {pixels.shape[0]} pictures")
        vae = self.vae
        missing: dict[Hashable, int] = {}
        for i, k in enumerate(keys):
            if k not in self._mean and k not in missing:
                missing[k] = i
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        fresh: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            rows = list(missing.values())
            dist = vae.encode(pixels[rows].to(vae.device, vae.dtype)).latent_dist
            mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
            for j, k in enumerate(missing):
                if len(self._mean) < self.max_items:
                    self._mean[k], self._std[k] = mean[j], std[j]
                else:  # full: used for this batch only
                    fresh[k] = (mean[j], std[j])
        mean = torch.stack([fresh[k][0] if k in fresh else self._mean[k] for k in keys])
        std = torch.stack([fresh[k][1] if k in fresh else self._std[k] for k in keys])
        return mean.to(vae.device, vae.dtype), std.to(vae.device, vae.dtype)

    def sample(self, keys: Sequence[Hashable], pixels: torch.Tensor) -> torch.Tensor:
        """A draw from each picture's posterior (as ``latent_dist.sample()``)."""
        mean, std = self.posterior(keys, pixels)
        return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)

    def mode(self, keys: Sequence[Hashable], pixels: torch.Tensor) -> torch.Tensor:
        """Each picture's posterior mean (as ``latent_dist.mode()``)."""
        return self.posterior(keys, pixels)[0]
