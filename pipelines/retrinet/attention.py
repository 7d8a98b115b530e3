"""``ControlCrossAttention``: the layer that lets the UNet read the references (seed 002, A.4, Code 1).

The UNet's skip feature is the query; the retrieval encoder's features of all N references of
the same sample, concatenated along the token axis, are key and value. Parameter names and the
computation are the seed's, so a state dict saved from the paper's code loads here unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ControlCrossAttention(nn.Module):
    """Cross-attention from UNet tokens ``hs`` (B, L_q, C) to reference tokens ``control``
    (B * N, L, C), batch-major (the N references of sample 0 first)."""

    def __init__(self, in_channels: int, num_heads: int):
        super().__init__()
        if in_channels % num_heads:
            raise ValueError(f"{in_channels} channels cannot be split into {num_heads} heads")
        self.norm0 = nn.LayerNorm(in_channels)
        self.norm1 = nn.LayerNorm(in_channels)
        self.norm2 = nn.LayerNorm(in_channels)
        self.gelu = nn.GELU()
        self.cross_attention = nn.MultiheadAttention(in_channels, num_heads, batch_first=True)
        self.linear = nn.Linear(in_channels, in_channels)

    def forward(self, hs: torch.Tensor, control: torch.Tensor, group_index: torch.Tensor | None = None,
                num_references: int | None = None, query_pos: torch.Tensor | None = None,
                key_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``hs`` (B, L_q, C) -> (B, L_q, C).

        Without ``group_index``, ``control`` is (B * N, L, C), the references of every sample in
        turn: the seed's computation, line for line. With ``group_index`` (B,), ``control`` is
        (G * N, L, C), the references of G groups that the B samples share (sample b reads group
        ``group_index[b]``; ``num_references`` = N): the same result, but ``norm1`` and the key
        and value projections run once per group instead of once per sample.

        ``query_pos`` (L_q, C) and ``key_pos`` (L, C), or (rows of ``control``, L, C) for a place
        of each reference's own, both or neither, are added to the
        normalised tokens that make the queries and the keys (of every reference alike), not to
        the values nor the residual (not in the seed's code: ``RetriNetModel``'s
        ``retrieval_positions``).
        """
        if (query_pos is None) != (key_pos is None):
            raise ValueError("query_pos and key_pos go together")
        if query_pos is not None and (query_pos.shape != hs.shape[1:]
                                      or key_pos.shape not in (control.shape[1:], control.shape)):
            raise ValueError(f"position embeddings {tuple(query_pos.shape)} and {tuple(key_pos.shape)} do not fit "
                             f"queries {tuple(hs.shape[1:])} and reference tokens {tuple(control.shape[1:])}")
        if group_index is None:
            if control.shape[0] % hs.shape[0]:
                raise ValueError(f"{control.shape[0]} reference rows do not split evenly over {hs.shape[0]} samples")
            n = control.shape[0] // hs.shape[0]
            # (B * N, L, C) -> (B, N * L, C): each sample attends to all of its own references
            control = control.reshape(hs.shape[0], n * control.shape[1], control.shape[2])
            hs = self.norm0(hs)
            control = self.norm1(control)
            if key_pos is not None:
                key_pos = key_pos.reshape(control.shape) if key_pos.ndim == 3 else key_pos.repeat(n, 1)
            query, key = (hs, control) if query_pos is None else (hs + query_pos, control + key_pos)
            hs = self.cross_attention(query, key, control, need_weights=False)[0] + hs  # (B, L_q, C)
            hs = self.gelu(self.linear(self.norm2(hs))) + hs
            return hs
        if num_references is None or control.shape[0] % num_references:
            raise ValueError(f"{control.shape[0]} reference rows do not make groups of {num_references}")
        mha = self.cross_attention
        b, lq, c = hs.shape
        g, heads = control.shape[0] // num_references, mha.num_heads
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        hs = self.norm0(hs)
        control = self.norm1(control)
        key = control if key_pos is None else control + key_pos
        control, key = control.reshape(g, -1, c), key.reshape(g, -1, c)  # (G, N * L, C)
        query = hs if query_pos is None else hs + query_pos
        q = F.linear(query, w_q, b_q).view(b, lq, heads, c // heads).transpose(1, 2)  # (B, h, L_q, d)
        k = F.linear(key, w_k, b_k).view(g, -1, heads, c // heads).transpose(1, 2)  # (G, h, N * L, d)
        v = F.linear(control, w_v, b_v).view(g, -1, heads, c // heads).transpose(1, 2)
        k, v = (k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) if g == 1 else (k[group_index], v[group_index])
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, h, L_q, d)
        attn = F.linear(attn.transpose(1, 2).reshape(b, lq, c), mha.out_proj.weight, mha.out_proj.bias)
        hs = attn + hs
        hs = self.gelu(self.linear(self.norm2(hs))) + hs
        return hs
