"""The score network: a residual MLP over genes whose blocks are modulated by the timestep and
condition embedding (adaptive LayerNorm with zero-initialised gates, "adaLN-Zero", Peebles & Xie
2023, applied to an MLP as in scDiffusion/Squidiff-style backbones)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t [B]`` (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def modulated_block(h, shift, scale, gate, weight, bias, eps: float = 1e-6):
    """``h + gate * SiLU(Linear(LayerNorm(h) * (1 + scale) + shift))``: one residual block.

    The pure-torch reference of the fused block; every argument but ``weight``/``bias`` is ``[B, H]``.
    """
    z = F.layer_norm(h, h.shape[-1:], eps=eps) * (1 + scale) + shift
    return h + gate * F.silu(F.linear(z, weight, bias))


class ResidualBlock(nn.Module):
    """One adaLN-Zero residual block of width ``hidden_dim``."""

    def __init__(self, hidden_dim: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.modulation = nn.Linear(emb_dim, 3 * hidden_dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.linear = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(emb).chunk(3, dim=-1)
        if self.dropout and self.training:
            gate = F.dropout(gate, self.dropout)
        return modulated_block(h, shift, scale, gate, self.linear.weight, self.linear.bias)


class ScoreNetwork(nn.Module):
    """Residual MLP ``genes -> hidden -> (blocks) -> genes`` conditioned on ``emb [B, emb_dim]``.

    The output is the raw network prediction (x0, eps or v, as the model facade declares).
    """

    def __init__(self, gene_dim: int, hidden_dim: int = 512, num_layers: int = 6, emb_dim: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        self.gene_dim, self.hidden_dim, self.num_layers, self.emb_dim = gene_dim, hidden_dim, num_layers, emb_dim
        self.input = nn.Linear(gene_dim, hidden_dim)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_dim, emb_dim, dropout) for _ in range(num_layers))
        self.final_modulation = nn.Linear(emb_dim, 2 * hidden_dim)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        self.output = nn.Linear(hidden_dim, gene_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.input(x)
        emb = F.silu(emb)
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.final_modulation(emb).chunk(2, dim=-1)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale) + shift
        return self.output(h)
