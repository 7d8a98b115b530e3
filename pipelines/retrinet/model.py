"""``RetriNetModel``: the retrieval encoder, per-layer cross-attentions and zero convolutions.

RetriNet (seed 000, Sec. 3 and Fig. 2; seed 001, Sec. 5.1; DESIGN.md "RetriNet, precisely"):

1. the frozen base encoder (conv_in, down blocks, mid block of a text-to-image UNet) runs on the
   noisy target latent and yields the skip features ``h_i`` and the mid feature ``h_mid``;
2. the retrieval encoder, a trainable copy of conv_in + time embedding + down blocks + mid block
   (no hint embedding), runs on the clean VAE latent of every reference with the text embedding
   of its concept word ("face", "clothes", "figure") and the timestep, and yields ``c_i``;
3. for every skip and for the mid block, ``h_i + retrieval_scale * zero_conv_i(CCA_i(h_i, c_i))``
   where ``CCA_i`` is a ``ControlCrossAttention`` over all N references of the sample;
   ``retrieval_positions`` (off by default; not in the seeds' code) adds a fixed 2D sin-cos
   embedding of each token's place to the queries and keys, so that a query can find its own
   place in the references even when the noisy target shows nothing there; ``retrieval_regions``
   (off by default; not in the seeds' code, needs ``retrieval_positions``) places each reference's
   keys where the reference was cut from in its own picture (a face crop's keys where the head is,
   not over the whole frame), given as ``reference_regions``; ``retrieval_max_keys``
   (off by default; not in the seeds' code) average-pools each reference's features, by halves, to
   at most that many places before they are attended to, as PixArt-Sigma compresses its keys and
   values: a skip of H x W queries over N references of H x W keys costs N (HW)^2, so the largest
   skips of a UNet on a larger latent cost the most, and pooled keys cut that by 4 per halving;
4. the base decoder reads the injected features.

The zero convolutions make RetriNet exactly the base model at initialisation.

The base UNet is diffusers' own ``UNet2DConditionModel``, run by its own ``forward``: the
injection is done by hooks on its conv_in, down blocks and mid block (to read the skips) and on
its up blocks (to hand the decoder the injected skips), active only inside
``RetriNetModel.inject(...)`` and only in the thread that entered it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import zero_module
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from pipelines.retrinet.attention import ControlCrossAttention

TRAINING_MODES = ("default", "lock_decoder", "lock_both")


@dataclass
class RetrievalFeatures:
    """What the retrieval encoder makes of G groups of N references at one timestep.

    ``down[i]`` is (G * N, C_i, h_i, w_i) for every skip of the UNet encoder (conv_in's first),
    ``mid`` is (G * N, C_mid, h, w); rows are group-major.
    """

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor
    num_references: int
    # (G * N, 4): where each reference lies in its own picture (``retrieval_regions``), or None (every reference
    # fills the frame)
    regions: torch.Tensor | None = None
    # the key positions of ``regions``, by grid and channels: computed once for every skip of that size and every
    # call of the UNet that reads these features
    key_positions: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_groups(self) -> int:
        return self.mid.shape[0] // self.num_references

    def nbytes(self, key_positions: bool = True) -> int:
        """The bytes of the features, and of the key positions computed so far unless ``key_positions`` is False
        (they are shared by the features of every timestep of one call)."""
        tensors = (*self.down, self.mid, *(self.key_positions.values() if key_positions else ()))
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Injection:
    """Per-call state of the UNet hooks."""

    model: RetriNetModel
    features: RetrievalFeatures
    group_index: torch.Tensor  # (B,) which reference group each UNet row reads
    scale: float
    skips: list[torch.Tensor] = field(default_factory=list)
    injected: list[torch.Tensor] | None = None


_ACTIVE: contextvars.ContextVar[_Injection | None] = contextvars.ContextVar("retrinet_injection", default=None)
_HOOKED = "_retrinet_hooks"


@functools.lru_cache(maxsize=32)
def _positions(height: int, width: int, channels: int) -> torch.Tensor:
    """(height * width, channels): diffusers' 2D sin-cos embedding of a height x width grid, its
    coordinates scaled to [0, 16) whatever the grid's size, so that one place of a picture has one
    embedding on a target and on references of another size."""
    return get_2d_sincos_pos_embed(channels, (height, width), base_size=16, output_type="pt").float()


FULL_FRAME = (0.0, 0.0, 1.0, 1.0)


def check_regions(regions: torch.Tensor, rows: int) -> torch.Tensor:
    """``regions`` as a float (rows, 4) tensor of boxes ``[x0, y0, x1, y1]`` in units of their picture's square
    frame, or ``ValueError``."""
    regions = torch.as_tensor(regions, dtype=torch.float32)
    if regions.shape != (rows, 4):
        raise ValueError(f"reference regions must be ({rows}, 4) boxes [x0, y0, x1, y1], got {tuple(regions.shape)}")
    if not torch.isfinite(regions).all() or (regions[:, 2] <= regions[:, 0]).any() or \
            (regions[:, 3] <= regions[:, 1]).any():
        raise ValueError("every reference region needs finite corners with x1 > x0 and y1 > y0")
    return regions


def _region_positions(regions: torch.Tensor, height: int, width: int, channels: int) -> torch.Tensor:
    """(R, height * width, channels): ``_positions``' embedding of a height x width grid laid over each of the R
    ``regions`` of the frame (boxes in frame units); the region (0, 0, 1, 1) gives ``_positions`` exactly."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    r = regions.to(torch.float32)
    u = torch.arange(width, dtype=torch.float32, device=r.device) / width  # (w,) each place's left edge
    v = torch.arange(height, dtype=torch.float32, device=r.device) / height
    x = 16 * (r[:, 0, None] + u * (r[:, 2] - r[:, 0])[:, None])  # (R, w), in _positions' [0, 16) units
    y = 16 * (r[:, 1, None] + v * (r[:, 3] - r[:, 1])[:, None])  # (R, h)
    grid = torch.stack([x[:, None, :].expand(-1, height, -1), y[:, :, None].expand(-1, -1, width)])
    emb = get_2d_sincos_pos_embed_from_grid(channels, grid.reshape(2, -1), output_type="pt")
    return emb.reshape(r.shape[0], height * width, channels).float()


def _pool_to(features: torch.Tensor, places: int) -> torch.Tensor:
    """``features`` (R, C, h, w) average-pooled by halves until h * w is at most ``places`` (or a side is odd)."""
    while features.shape[-2] * features.shape[-1] > places and features.shape[-2] % 2 == 0 \
            and features.shape[-1] % 2 == 0:
        features = F.avg_pool2d(features, 2)
    return features


def _heads(channels: int, wanted: int) -> int:
    """The largest number of heads not above ``wanted`` that divides ``channels``."""
    return max(h for h in range(1, max(1, wanted) + 1) if channels % h == 0)


class RetriNetModel(ModelMixin, ConfigMixin):
    """The trainable part of RetriNet; the base UNet stays a separate, ordinary diffusers model.

    Build it with ``RetriNetModel.from_unet(unet)``; run the retrieval encoder with
    ``encode_references`` (or ``forward``), and the UNet with the features injected inside
    ``with retrinet.inject(unet, features, group_index, scale): unet(...)``, or in one call with
    ``denoise(...)``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                             "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type: str = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        retrieval_attention_heads: int = 8,  # heads of each ControlCrossAttention (fewer if C is not divisible)
        max_references: int = 8,  # references one sample may carry
        retrieval_positions: bool = False,  # a 2D position embedding on the cross-attentions' queries and keys
        retrieval_max_keys: int | None = None,  # each reference's places per skip, average-pooled down to at most this
        retrieval_regions: bool = False,  # keys placed where each reference was cut from (needs retrieval_positions)
    ):
        super().__init__()
        n_blocks = len(down_block_types)
        if len(block_out_channels) != n_blocks:
            raise ValueError(f"{len(block_out_channels)} block_out_channels for {n_blocks} down blocks")
        if mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"mid_block_type {mid_block_type!r} is not supported; RetriNet needs "
                             f"'UNetMidBlock2DCrossAttn' (Stable Diffusion 1.x / 2.x UNets)")
        if max_references < 1:
            raise ValueError(f"max_references must be at least 1, got {max_references}")
        if retrieval_max_keys is not None and retrieval_max_keys < 1:
            raise ValueError(f"retrieval_max_keys must be at least 1 (or None: every place), got {retrieval_max_keys}")
        if retrieval_regions and not retrieval_positions:
            raise ValueError("retrieval_regions places the references' position embeddings: it needs retrieval_positions")
        if retrieval_positions and any(c % 4 for c in block_out_channels):
            raise ValueError(f"retrieval_positions needs channel counts divisible by 4 (a sine and a cosine per axis), "
                             f"got {tuple(block_out_channels)}")
        num_attention_heads = num_attention_heads or attention_head_dim
        as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n_blocks  # noqa: E731
        only_cross_attention = as_tuple(only_cross_attention)
        attention_head_dim = as_tuple(attention_head_dim)
        num_attention_heads = as_tuple(num_attention_heads)
        transformer_layers_per_block = as_tuple(transformer_layers_per_block)

        # the retrieval encoder: a copy of the UNet's encoder half (as ControlNetModel, minus the hint)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)
        self.down_blocks = nn.ModuleList()
        skip_channels = [block_out_channels[0]]
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final = i == n_blocks - 1
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, transformer_layers_per_block=transformer_layers_per_block[i],
                in_channels=input_channel, out_channels=output_channel, temb_channels=time_embed_dim,
                add_downsample=not is_final, resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim, num_attention_heads=num_attention_heads[i],
                attention_head_dim=attention_head_dim[i] if attention_head_dim[i] is not None else output_channel,
                downsample_padding=downsample_padding, use_linear_projection=use_linear_projection,
                only_cross_attention=only_cross_attention[i], upcast_attention=upcast_attention,
                resnet_time_scale_shift=resnet_time_scale_shift,
            ))
            skip_channels += [output_channel] * (layers_per_block + (0 if is_final else 1))
        self.mid_block = UNetMidBlock2DCrossAttn(
            transformer_layers_per_block=transformer_layers_per_block[-1], in_channels=block_out_channels[-1],
            temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
            output_scale_factor=mid_block_scale_factor, resnet_time_scale_shift=resnet_time_scale_shift,
            cross_attention_dim=cross_attention_dim, num_attention_heads=num_attention_heads[-1],
            resnet_groups=norm_num_groups, use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )

        # the bridge: one cross-attention and one zero convolution per skip, and for the mid block
        self.cross_attentions = nn.ModuleList(
            ControlCrossAttention(c, _heads(c, retrieval_attention_heads)) for c in skip_channels)
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, kernel_size=1)) for c in skip_channels)
        c_mid = block_out_channels[-1]
        self.mid_cross_attention = ControlCrossAttention(c_mid, _heads(c_mid, retrieval_attention_heads))
        self.mid_zero_conv = zero_module(nn.Conv2d(c_mid, c_mid, kernel_size=1))
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, load_weights_from_unet: bool = True,
                  retrieval_attention_heads: int = 8, max_references: int = 8,
                  retrieval_positions: bool = False, retrieval_max_keys: int | None = None,
                  retrieval_regions: bool = False) -> RetriNetModel:
        """A RetriNet for ``unet``: the retrieval encoder copies its encoder half (weights too, by
        default), the cross-attentions are fresh and the zero convolutions are zero."""
        c = unet.config
        unsupported = {k: c.get(k) for k in ("class_embed_type", "num_class_embeds", "addition_embed_type",
                                             "encoder_hid_dim", "time_cond_proj_dim") if c.get(k) is not None}
        if unsupported:
            raise ValueError(f"RetriNet supports Stable Diffusion 1.x / 2.x UNets; this one has {unsupported}")
        if c.get("conv_in_kernel", 3) != 3:
            raise ValueError(f"conv_in_kernel {c.conv_in_kernel} is not supported (3 is)")
        if isinstance(c.layers_per_block, (list, tuple)):
            raise ValueError("a different number of layers per block is not supported")
        model = cls(
            in_channels=c.in_channels, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift,
            down_block_types=tuple(c.down_block_types), mid_block_type=c.mid_block_type,
            only_cross_attention=c.only_cross_attention, block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block, downsample_padding=c.downsample_padding,
            mid_block_scale_factor=c.mid_block_scale_factor, act_fn=c.act_fn, norm_num_groups=c.norm_num_groups,
            norm_eps=c.norm_eps, cross_attention_dim=c.cross_attention_dim,
            transformer_layers_per_block=c.get("transformer_layers_per_block", 1),
            attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
            use_linear_projection=c.use_linear_projection, upcast_attention=c.upcast_attention,
            resnet_time_scale_shift=c.resnet_time_scale_shift,
            retrieval_attention_heads=retrieval_attention_heads, max_references=max_references,
            retrieval_positions=retrieval_positions, retrieval_max_keys=retrieval_max_keys,
            retrieval_regions=retrieval_regions,
        )
        if load_weights_from_unet:
            for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"):
                getattr(model, name).load_state_dict(getattr(unet, name).state_dict())
        if model.dtype != unet.dtype or model.device != unet.device:
            model = model.to(device=unet.device, dtype=unet.dtype)
        return model

    @property
    def num_skips(self) -> int:
        return len(self.zero_convs)

    # ------------------------------------------------------------------ retrieval encoder

    def encode_references(self, reference_latents: torch.Tensor, timestep: torch.Tensor | float | int,
                          concept_embeds: torch.Tensor, num_references: int,
                          reference_regions: torch.Tensor | None = None,
                          key_positions: dict | None = None) -> RetrievalFeatures:
        """Run the retrieval encoder on G groups of ``num_references`` references.

        ``reference_latents`` (G * N, C, h, w): clean VAE latents, group-major; ``concept_embeds``
        (G * N, L, D): text embeddings of each reference's concept word; ``timestep``: a number,
        or (G,) one per group, or (G * N,). ``reference_regions`` (G * N, 4): where each reference
        was cut from, a box ``[x0, y0, x1, y1]`` in units of its picture's square frame (the
        picture padded to a square, as the target is; ``reference_region`` in
        ``training.data.retribooru`` computes it); read only by a model with ``retrieval_regions``,
        which without them takes every reference to fill the frame. ``key_positions``: where the
        features keep the regions' key positions once computed; a caller that encodes the same
        references and regions at several timesteps passes one dict to all of them, so that the
        positions are computed once (the features' own dict when None).
        """
        n = num_references
        if not 1 <= n <= self.config.max_references:
            raise ValueError(f"{n} references given, between 1 and {self.config.max_references} are supported")
        rows = reference_latents.shape[0]
        if rows % n:
            raise ValueError(f"{rows} reference latents do not make groups of {n}")
        if concept_embeds.shape[0] != rows:
            raise ValueError(f"{concept_embeds.shape[0]} concept embeddings for {rows} references")
        t = torch.as_tensor(timestep, device=reference_latents.device)
        if t.ndim == 0:
            t = t.expand(rows)
        elif t.shape[0] == rows // n:
            t = t.repeat_interleave(n)
        elif t.shape[0] != rows:
            raise ValueError(f"{t.shape[0]} timesteps for {rows // n} groups of references")
        regions = None
        if reference_regions is not None and self.config.get("retrieval_regions", False):
            regions = check_regions(reference_regions, rows).to(reference_latents.device)

        emb = self.time_embedding(self.time_proj(t).to(dtype=reference_latents.dtype))  # (G*N, 4 C0)
        sample = self.conv_in(reference_latents)
        down = [sample]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=concept_embeds)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            down.extend(res)
        mid = self.mid_block(sample, emb, encoder_hidden_states=concept_embeds)
        limit = self.config.retrieval_max_keys
        if limit:
            down = [_pool_to(d, limit) for d in down]
        return RetrievalFeatures(tuple(down), mid, n, regions, {} if key_positions is None else key_positions)

    def forward(self, reference_latents: torch.Tensor, timestep, concept_embeds: torch.Tensor, num_references: int,
                unet: UNet2DConditionModel | None = None, sample: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, group_index: torch.Tensor | None = None,
                retrieval_scale: float = 1.0, reference_regions: torch.Tensor | None = None,
                key_positions: dict | None = None):
        """Without ``unet``: the retrieval features (``encode_references``). With ``unet``, ``sample``
        and ``encoder_hidden_states``: the noise prediction of ``unet`` with the references injected,
        in one call, so that a ``DistributedDataParallel`` wrapper sees every parameter used."""
        features = self.encode_references(reference_latents, timestep, concept_embeds, num_references,
                                          reference_regions, key_positions)
        if unet is None:
            return features
        if sample is None or encoder_hidden_states is None:
            raise ValueError("sample and encoder_hidden_states are needed with unet")
        return self.denoise(unet, sample, timestep, encoder_hidden_states, features, group_index, retrieval_scale)

    # ------------------------------------------------------------------ injection

    def _inject(self, index: int | None, h: torch.Tensor, state: _Injection) -> torch.Tensor:
        """``h + scale * zero_conv(CCA(h, features))`` for skip ``index`` (None: the mid block)."""
        if index is None:
            feats, attn, zero = state.features.mid, self.mid_cross_attention, self.mid_zero_conv
        else:
            feats, attn, zero = state.features.down[index], self.cross_attentions[index], self.zero_convs[index]
        if state.scale == 0:
            return h
        b, c, hh, ww = h.shape
        rows, _, fh, fw = feats.shape
        control = feats.reshape(rows, c, fh * fw).transpose(1, 2).to(h.dtype)  # (G*N, hw, C)
        tokens = h.reshape(b, c, hh * ww).transpose(1, 2)  # (B, HW, C)
        pos = {}
        if self.config.retrieval_positions:
            features = state.features
            if features.regions is None:
                key_pos = _positions(fh, fw, c).to(h.device, h.dtype)
            else:
                key_pos = features.key_positions.get((fh, fw, c, h.dtype))
                if key_pos is None:
                    key_pos = _region_positions(features.regions, fh, fw, c).to(h.device, h.dtype)
                    features.key_positions[(fh, fw, c, h.dtype)] = key_pos
            pos = {"query_pos": _positions(hh, ww, c).to(h.device, h.dtype), "key_pos": key_pos}
        out = attn(tokens, control, state.group_index, state.features.num_references, **pos)  # (B, HW, C)
        out = out.transpose(1, 2).reshape(b, c, hh, ww)
        return h + state.scale * zero(out)

    @contextlib.contextmanager
    def inject(self, unet: UNet2DConditionModel, features: RetrievalFeatures,
               group_index: torch.Tensor | None = None, retrieval_scale: float = 1.0):
        """Within this block, calls of ``unet`` in this thread read ``features``.

        ``group_index`` (B,) says which reference group each row of the UNet batch reads
        (default: row i reads group i); with classifier-free guidance both halves of the batch
        point at the same groups, so the features are computed once and shared.
        """
        unet = getattr(unet, "module", unet)  # the model inside a DistributedDataParallel wrapper
        if len(unet.down_blocks) != len(self.down_blocks):
            raise ValueError("this RetriNet was not built for this UNet (different down blocks)")
        if group_index is None:
            group_index = torch.arange(features.num_groups, device=features.mid.device)
        if group_index.device.type != "meta" and group_index.numel() and int(group_index.max()) >= features.num_groups:
            raise ValueError(f"group index {int(group_index.max())} for {features.num_groups} reference groups")
        _install_hooks(unet)
        token = _ACTIVE.set(_Injection(self, features, group_index.to(features.mid.device), float(retrieval_scale)))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def denoise(self, unet: UNet2DConditionModel, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                features: RetrievalFeatures, group_index: torch.Tensor | None = None,
                retrieval_scale: float = 1.0) -> torch.Tensor:
        """The base UNet's noise prediction with the references' features injected; ``unet`` may be
        wrapped (DistributedDataParallel): it is called as given."""
        with self.inject(unet, features, group_index, retrieval_scale):
            return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    # ------------------------------------------------------------------ what trains

    def set_training_mode(self, unet: UNet2DConditionModel, mode: str = "default") -> list[nn.Parameter]:
        """Set ``requires_grad`` for the paper's settings and return the trainable parameters.

        ``default``: the retrieval encoder, cross-attentions, zero convolutions and the base
        decoder train; the base encoder (conv_in, time embedding, down blocks, mid block) is
        frozen (seed 001, Sec. 5.2). ``lock_decoder``: the base UNet is frozen. ``lock_both``:
        the base UNet and the retrieval encoder are frozen; only the bridge trains.
        """
        if mode not in TRAINING_MODES:
            raise ValueError(f"unknown training mode {mode!r}; expected one of {', '.join(TRAINING_MODES)}")
        unet.requires_grad_(False)
        self.requires_grad_(True)
        if mode == "default":
            for name in ("up_blocks", "conv_norm_out", "conv_out"):
                module = getattr(unet, name, None)
                if module is not None:
                    module.requires_grad_(True)
        if mode == "lock_both":
            for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"):
                getattr(self, name).requires_grad_(False)
        return [p for m in (self, unet) for p in m.parameters() if p.requires_grad]


# ---------------------------------------------------------------------- UNet hooks

def _install_hooks(unet: UNet2DConditionModel) -> None:
    """Hook ``unet`` once; the hooks do nothing unless an injection is active in this thread."""
    if getattr(unet, _HOOKED, False):
        return

    def capture_conv_in(module, args, output):
        state = _ACTIVE.get()
        if state is not None:
            state.skips = [output]
            state.injected = None

    def capture_down(module, args, output):
        state = _ACTIVE.get()
        if state is not None:
            state.skips.extend(output[1])

    def inject_mid(module, args, output):
        state = _ACTIVE.get()
        if state is None:
            return None
        if len(state.skips) != state.model.num_skips:
            raise RuntimeError(f"RetriNet saw {len(state.skips)} UNet skips, expected {state.model.num_skips}")
        state.injected = [state.model._inject(i, h, state) for i, h in enumerate(state.skips)]
        return state.model._inject(None, output, state)

    def inject_up(module, args, kwargs):
        state = _ACTIVE.get()
        if state is None:
            return None
        res = kwargs.get("res_hidden_states_tuple")
        if res is None or state.injected is None:
            raise RuntimeError("RetriNet could not find the skips of a UNet up block; unsupported diffusers version?")
        swapped = []
        for h in res:
            k = next((i for i, s in enumerate(state.skips) if s is h), None)
            if k is None:
                raise RuntimeError("an up block read a skip RetriNet did not see")
            swapped.append(state.injected[k])
        return args, {**kwargs, "res_hidden_states_tuple": tuple(swapped)}

    unet.conv_in.register_forward_hook(capture_conv_in)
    for block in unet.down_blocks:
        block.register_forward_hook(capture_down)
    unet.mid_block.register_forward_hook(inject_mid)
    for block in unet.up_blocks:
        block.register_forward_pre_hook(inject_up, with_kwargs=True)
    setattr(unet, _HOOKED, True)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
