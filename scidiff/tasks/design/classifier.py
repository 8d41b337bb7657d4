"""A differentiable cell-type classifier over the model's genes, for cell-type targets."""
from __future__ import annotations

import difflib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data import transform_like


class CellTypeClassifier(nn.Module):
    """Softmax regression (multinomial logistic regression with an L2 penalty) from standardised
    log1p expression to cell-type labels; differentiable, so it can guide sampling. Train it with
    :meth:`fit` (arrays) or :meth:`fit_anndata` (real cells brought into a model's genes)."""

    def __init__(self, gene_names, classes, mean, std):
        super().__init__()
        self.gene_names, self.classes = [str(g) for g in gene_names], [str(c) for c in classes]
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.asarray(std), dtype=torch.float32))
        self.linear = nn.Linear(len(self.gene_names), len(self.classes))
        self.validation_accuracy: float | None = None

    def forward(self, expression: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, n_classes]``."""
        return self.linear((expression - self.mean.to(expression)) / self.std.to(expression))

    def class_index(self, label: str) -> int:
        if str(label) not in self.classes:
            close = difflib.get_close_matches(str(label), self.classes, n=3, cutoff=0.4)
            raise ValueError(f"cell type {label!r} is not a class of the classifier; classes: {self.classes}"
                             + (f" (close: {close})" if close else ""))
        return self.classes.index(str(label))

    @torch.no_grad()
    def predict_proba(self, expression) -> np.ndarray:
        x = torch.as_tensor(np.asarray(expression), dtype=torch.float32)
        return torch.softmax(self(x), -1).numpy()

    def predict(self, expression) -> np.ndarray:
        return np.asarray(self.classes)[self.predict_proba(expression).argmax(1)]

    @classmethod
    def fit(cls, expression, labels, gene_names, *, l2: float = 1e-3, epochs: int = 300, lr: float = 0.05,
            val_fraction: float = 0.2, seed: int = 0) -> "CellTypeClassifier":
        """Fit on real cells ``expression [N, G]`` (log1p, the model's genes) with ``labels [N]``
        by full-batch Adam on the L2-penalised cross-entropy; ``validation_accuracy`` is measured
        on a stratified ``val_fraction`` held out, then the classifier is refitted on all cells."""
        x = np.asarray(expression, dtype=np.float32)
        labels = np.asarray(labels).astype(str)
        if x.ndim != 2 or x.shape[1] != len(gene_names) or len(labels) != len(x):
            raise ValueError(f"expression {x.shape} must be [cells, {len(gene_names)} genes] with one label per cell")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ValueError(f"a cell-type classifier needs at least 2 classes; got {classes}")
        y = np.array([classes.index(v) for v in labels])
        rng = np.random.default_rng(seed)
        val = np.zeros(len(y), bool)
        for c in range(len(classes)):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            val[idx[: int(len(idx) * val_fraction)]] = True
        acc = None
        if val.any() and (~val).any():
            clf = cls._train(x[~val], y[~val], gene_names, classes, l2, epochs, lr, seed)
            acc = float((clf.predict(x[val]) == labels[val]).mean())
        clf = cls._train(x, y, gene_names, classes, l2, epochs, lr, seed)
        clf.validation_accuracy = acc
        return clf

    @classmethod
    def _train(cls, x, y, gene_names, classes, l2, epochs, lr, seed):
        torch.manual_seed(seed)
        std = np.maximum(x.std(0), 0.1)
        clf = cls(gene_names, classes, x.mean(0), std)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
        opt = torch.optim.Adam(clf.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad()
                loss = F.cross_entropy(clf(xt), yt) + l2 * clf.linear.weight.pow(2).sum()
                loss.backward()
                opt.step()
        return clf.eval()

    @classmethod
    def fit_anndata(cls, adata, key: str, model, *, project: bool = True, layer=None, use_raw=None,
                    **fit_kwargs) -> "CellTypeClassifier":
        """Fit on the cells of ``adata`` labelled by ``obs[key]``, in ``model``'s genes and
        normalisation. With ``project`` and a latent model, cells are first projected onto the
        model's latent (``decode(encode(x))``), the same smoothing every generated cell has."""
        if key not in adata.obs:
            raise KeyError(f"obs key {key!r} is not in the data; available: {list(adata.obs.columns)}")
        cells = transform_like(model.data_spec, adata, layer=layer, use_raw=use_raw, condition_keys=[])
        x = cells.x
        if project and getattr(model, "latent_dim", None):
            with torch.no_grad():
                x = model.decode(model.encode(x))
        expr = model.data_spec.to_expression(x, clip=True).numpy()
        return cls.fit(expr, adata.obs[key].astype(str).to_numpy(), model.data_spec.gene_names, **fit_kwargs)
