"""Where a design starts: source cells (resampled to the batch) with their own covariates, and
the condition the cells are decoded under. Shared by the designer and the screen."""
from __future__ import annotations

import numpy as np
import torch

from ...data import CellData, transform_like
from ..cells import own_codes


def source_cells(model, source, n: int, rng: np.random.Generator):
    """Source cells -> ``(model-space x [n, G], their own condition codes or {})``, resampled to
    ``n`` cells (``None, {}`` without a source). ``source``: an AnnData in the data's genes, a
    :class:`scidiff.data.CellData`, or model-space rows."""
    spec = model.data_spec
    if source is None:
        return None, {}
    if not isinstance(source, (CellData, torch.Tensor, np.ndarray)):
        source = transform_like(spec, source)
    if isinstance(source, CellData):
        x, codes = source.x, own_codes(model, source)
    else:
        x = torch.as_tensor(np.asarray(source) if isinstance(source, np.ndarray) else source, dtype=torch.float32)
        if x.ndim != 2 or x.shape[1] != spec.n_genes:
            raise ValueError(f"source cells must be [cells, {spec.n_genes}] in the model's space; got {tuple(x.shape)}")
        codes = {}
    if len(x) == 0:
        raise ValueError("the source has no cells")
    pick = np.arange(len(x))
    if n != len(x):
        pick = rng.choice(len(x), n, replace=n > len(x))
    pick = torch.as_tensor(pick, dtype=torch.long)
    return x[pick], {k: v[pick] for k, v in codes.items()}


def decoding_condition(model, condition, source_codes: dict, n: int) -> dict[str, torch.Tensor]:
    """Decoding condition: the source's own non-perturbation covariates (perturbations at null,
    so the prior spans every condition), overridden by ``condition``'s labels."""
    spec = model.data_spec
    cond = {k: v for k, v in source_codes.items() if k not in spec.perturbation_keys and k != spec.dose_key}
    cond.update(model.encode_conditioning(condition, n) if condition else {})
    return cond
