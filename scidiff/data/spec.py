"""The gene space of a model: which genes, how expression was normalised and scaled, and the
covariate vocabularies. It travels inside every checkpoint so that a model needs no other file to
sample, and new data are brought into the same space by :func:`scidiff.data.transform_like`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class DataSpec:
    """Everything that maps between an AnnData and the model's input space.

    ``gene_names``: the model's genes, in order. ``input_kind``: ``"counts"`` (library-size
    normalised to ``target_sum`` then ``log1p``, as ``scanpy.pp.normalize_total`` + ``log1p``) or
    ``"log1p"`` (taken as is). The model sees ``(log1p_expression - gene_offset) / gene_scale``.
    ``categorical``: covariate name -> ordered labels. ``continuous``: names of numeric covariates
    (dose, time). ``source``: where expression was read (layer / raw), for provenance.
    """

    gene_names: list[str]
    input_kind: str = "log1p"
    target_sum: float | None = None
    gene_offset: list[float] = field(default_factory=list)
    gene_scale: list[float] = field(default_factory=list)
    categorical: dict[str, list[str]] = field(default_factory=dict)
    continuous: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.gene_names)
        if not self.gene_offset:
            self.gene_offset = [0.0] * n
        if not self.gene_scale:
            self.gene_scale = [1.0] * n
        if len(self.gene_offset) != n or len(self.gene_scale) != n:
            raise ValueError("gene_offset and gene_scale need one value per gene")

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(**d)

    # -- expression <-> model space -------------------------------------------------------------
    def _vectors(self, like: torch.Tensor):
        off = torch.tensor(self.gene_offset, dtype=like.dtype, device=like.device)
        scale = torch.tensor(self.gene_scale, dtype=like.dtype, device=like.device)
        return off, scale

    def to_model_space(self, log_expression):
        """``(log1p expression - offset) / scale``; numpy in, numpy out; torch in, torch out."""
        if isinstance(log_expression, np.ndarray):
            return ((log_expression - np.asarray(self.gene_offset, np.float32))
                    / np.asarray(self.gene_scale, np.float32)).astype(np.float32)
        off, scale = self._vectors(log_expression)
        return (log_expression - off) / scale

    def to_expression(self, z, clip: bool = True):
        """Back to log1p-normalised expression; negative values are clipped to 0 by default."""
        if isinstance(z, np.ndarray):
            x = z * np.asarray(self.gene_scale, np.float32) + np.asarray(self.gene_offset, np.float32)
            return np.maximum(x, 0.0) if clip else x
        off, scale = self._vectors(z)
        x = z * scale + off
        return x.clamp_min(0.0) if clip else x

    # -- covariates -----------------------------------------------------------------------------
    def encode_label(self, key: str, value) -> int:
        """Index of ``value`` in covariate ``key``'s vocabulary, or a clear error."""
        if key not in self.categorical:
            raise KeyError(f"unknown condition key {key!r}; the model knows "
                           f"{sorted(self.categorical) + list(self.continuous) or 'no covariates'}")
        vocab = self.categorical[key]
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and str(value) not in vocab:
            if 0 <= int(value) < len(vocab):
                return int(value)
            raise ValueError(f"code {value} is out of range for condition {key!r} ({len(vocab)} values)")
        if str(value) not in vocab:
            raise ValueError(f"unknown value {value!r} for condition {key!r}; known values: {vocab}")
        return vocab.index(str(value))

    def encode_conditions(self, conditioning: dict | None, batch_size: int) -> dict[str, torch.Tensor]:
        """Labels, codes or tensors per covariate -> ``{key: LongTensor[B]}`` (categorical) or
        ``FloatTensor[B]`` (continuous), broadcast to ``batch_size``. Missing keys stay absent
        (the model then uses its null condition)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in (conditioning or {}).items():
            if key in self.continuous:
                t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            elif key in self.categorical:
                if isinstance(value, torch.Tensor):
                    t = value.long().reshape(-1)
                    if t.numel() and (t.min() < 0 or t.max() >= len(self.categorical[key])):
                        raise ValueError(f"codes for condition {key!r} must lie in [0, "
                                         f"{len(self.categorical[key])}); got {t.tolist()}")
                else:
                    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
                    t = torch.tensor([self.encode_label(key, v) for v in values], dtype=torch.long)
            else:
                self.encode_label(key, None)  # raises the listing error
            if t.numel() == 1:
                t = t.expand(batch_size).clone()
            elif t.numel() != batch_size:
                raise ValueError(f"condition {key!r} has {t.numel()} values for a batch of {batch_size}")
            out[key] = t
        return out

    def decode_conditions(self, codes: dict[str, torch.Tensor]) -> dict[str, list]:
        """Inverse of :meth:`encode_conditions`: codes -> labels (continuous values kept)."""
        out = {}
        for key, t in codes.items():
            if key in self.categorical:
                vocab = self.categorical[key]
                out[key] = [vocab[i] for i in t.tolist()]
            else:
                out[key] = t.tolist()
        return out

    def check_same_genes(self, other: "DataSpec", what: str = "checkpoint") -> None:
        if list(other.gene_names) != list(self.gene_names):
            missing = [g for g in self.gene_names if g not in set(other.gene_names)][:10]
            raise ValueError(f"{what} was built for a different gene set ({other.n_genes} genes vs "
                             f"{self.n_genes}); first genes not in it: {missing}")
