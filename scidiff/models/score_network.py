"""The score network: a residual MLP over genes whose blocks are modulated by the timestep and
condition embedding (adaptive LayerNorm with zero-initialised gates, "adaLN-Zero", Peebles & Xie
2023, applied to an MLP as in scDiffusion/Squidiff-style backbones)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import ops


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t [B]`` (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# ``h + gate * SiLU(Linear(LayerNorm(h) * (1 + scale) + shift))``: the pure-torch reference of the
# fused block, kept here under its first name; ResidualBlock calls scidiff.ops, which runs the
# Triton kernel where it can (see scidiff/ops/modulated_block.py, kernels/modulated_block.py).
modulated_block = ops.modulated_block_reference


class ResidualBlock(nn.Module):
    """One adaLN-Zero residual block of width ``hidden_dim``."""

    def __init__(self, hidden_dim: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.modulation = nn.Linear(emb_dim, 3 * hidden_dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.linear = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None, *,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        """``emb``: the (SiLU-activated) embedding ``[B, emb_dim]``; or ``modulation``, this block's
        ``self.modulation(emb)`` computed beforehand (``[B, 3H]``, or ``[1, 3H]`` for all rows)."""
        shift, scale, gate = (self.modulation(emb) if modulation is None else modulation).chunk(3, dim=-1)
        if self.dropout and self.training:
            gate = F.dropout(gate, self.dropout)
        return ops.modulated_block(h, shift, scale, gate, self.linear.weight, self.linear.bias)


class ScoreNetwork(nn.Module):
    """Residual MLP ``genes -> hidden -> (blocks) -> genes`` conditioned on ``emb [B, emb_dim]``.

    The output is the raw network prediction (x0, eps or v, as the model facade declares).
    ``gradient_checkpointing = True`` recomputes each block's activations in the backward pass
    instead of storing them (less memory, about one more forward of compute; training only).
    """

    gradient_checkpointing = False

    def __init__(self, gene_dim: int, hidden_dim: int = 512, num_layers: int = 6, emb_dim: int = 128,
                 dropout: float = 0.0, response_dim: int = 0):
        super().__init__()
        self.gene_dim, self.hidden_dim, self.num_layers, self.emb_dim = gene_dim, hidden_dim, num_layers, emb_dim
        self.input = nn.Linear(gene_dim, hidden_dim)
        # the additive perturbation response (see ConditionEncoder.response), read as a second input
        self.response_input = nn.Linear(response_dim, hidden_dim, bias=False) if response_dim else None
        if self.response_input is not None:
            nn.init.zeros_(self.response_input.weight)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_dim, emb_dim, dropout) for _ in range(num_layers))
        self.final_modulation = nn.Linear(emb_dim, 2 * hidden_dim)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        self.output = nn.Linear(hidden_dim, gene_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def modulations(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """Everything the embedding ``emb [B, emb_dim]`` contributes: each block's
        ``[shift, scale, gate]`` and the final ``[shift, scale]``. Rows sharing an embedding share
        these, so a sampler computes them once per distinct condition and timestep."""
        emb = F.silu(emb)
        return [block.modulation(emb) for block in self.blocks] + [self.final_modulation(emb)]

    def fold(self, modulations: list[torch.Tensor]) -> list[tuple]:
        """Each block's and the final layer's weights with their LayerNorm and modulation folded
        in (:func:`scidiff.ops.fold_layer_norm`), for modulation rows ``[S, .]`` that all cells
        share (a sampler: one row per timestep). Per layer ``(W' [S, K, N], u [S, N], v [S, N],
        gate [S, N] or None for the output layer)``, for :meth:`forward_folded`."""
        folded = []
        for block, mod in zip(self.blocks, modulations):
            shift, scale, gate = mod.chunk(3, dim=-1)
            folded.append((*ops.fold_layer_norm(block.linear.weight, block.linear.bias, shift, scale),
                           gate.contiguous()))
        shift, scale = modulations[-1].chunk(2, dim=-1)
        return folded + [(*ops.fold_layer_norm(self.output.weight, self.output.bias, shift, scale), None)]

    def forward_folded(self, x: torch.Tensor, folded: list[tuple], row: int, response: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`forward` with every cell on modulation row ``row`` of :meth:`fold`'s output: per
        layer one GEMM with the LayerNorm in its epilogue (:func:`scidiff.ops.folded_linear`),
        which also gives the next layer's row statistics, so no normalised activation is
        written."""
        h = self.input(x)
        if response is not None and self.response_input is not None:
            h = h + self.response_input(response)
        mean, rstd = ops.row_stats(h)
        for weight_t, u, v, gate in folded[:-1]:  # each block also gives the next one's statistics
            h, mean, rstd = ops.folded_linear(h, mean, rstd, weight_t[row], u[row], v[row], gate[row], stats_out=True)
        weight_t, u, v, _ = folded[-1]
        return ops.folded_linear(h, mean, rstd, weight_t[row], u[row], v[row], out_dtype=out_dtype)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, response: torch.Tensor | None = None, *,
                modulations: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``emb`` or its precomputed ``modulations`` (from :meth:`modulations`; rows broadcast)."""
        h = self.input(x)
        if response is not None and self.response_input is not None:
            h = h + self.response_input(response)
        mods = self.modulations(emb) if modulations is None else modulations
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block, mod in zip(self.blocks, mods):
            if recompute:  # keep only block inputs; recompute activations in the backward pass
                h = torch.utils.checkpoint.checkpoint(block, h, modulation=mod, use_reentrant=False)
            else:
                h = block(h, modulation=mod)
        shift, scale = mods[-1].chunk(2, dim=-1)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale) + shift
        return self.output(h)
