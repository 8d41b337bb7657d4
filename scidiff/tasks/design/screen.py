"""The in-silico screen: what perturbation could produce a designed phenotype.

Every perturbation condition the model knows (control, each single perturbation, the
combinations seen in training, a grid of doses) is applied to the source cells (DDIM inversion
under their own condition, decoding under the candidate, as :func:`scidiff.perturb`), and the
conditions are ranked by the fraction of cells that meet every target, then by the mean
objective.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ...checks import condition_mapping, refuse_one_condition, whole_number, yes_no
from ...data.spec import canonical_label
from ...diffusion.samplers import ddim, ddim_invert
from ...models.cell_draws import check_seed
from .sources import decoding_condition, source_cells
from .targets import PhenotypeTarget, met_every_target

def condition_label(condition: dict) -> str:
    """``{'drug': 'A', 'dose': 10.0}`` -> ``'drug=A,dose=10'`` (the screen's row names)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in condition.items())


def candidate_conditions(model, combinations=None, doses=None) -> list[dict]:
    """Every perturbation condition of ``model``: per perturbation key, control, each single and
    each label in ``combinations`` (e.g. the ``A+B`` labels seen in training); with a dose key,
    each of those at every dose in ``doses`` (default: 5 log-spaced doses over the training
    range). Returns condition dicts of labels, e.g. ``{'drug': 'A', 'dose': 10.0}``."""
    spec = model.data_spec
    if not spec.perturbation_keys:
        raise ValueError("the model has no perturbation covariates to screen (train it with perturbation_keys)")
    if isinstance(combinations, str):  # one label: its characters were read as labels and the combination dropped
        combinations = [combinations]
    stray = sorted(set(combinations) - set(spec.perturbation_keys)) if isinstance(combinations, dict) else []
    if stray:  # they were silently left out of the screen
        raise ValueError(f"combinations name perturbation key(s) {stray} the model does not have; its perturbation "
                         f"keys: {spec.perturbation_keys}")
    out = []
    for key in spec.perturbation_keys:
        labels = [spec.control_labels[0]] + list(spec.categorical[key])
        combos = combinations.get(key, []) if isinstance(combinations, dict) else (combinations or [])
        combos = [combos] if isinstance(combos, str) else combos
        for combo in combos:
            spec.perturbation_singles(key, combo)  # a clear error for an unknown single
            combo = canonical_label(combo, spec.separator, spec.control_labels)  # B+A as A+B, A+ctrl as A
            if combo not in labels:
                labels.append(combo)
        if spec.dose_key:
            grid = doses
            if grid is None:
                lo, hi = spec.continuous_range.get(spec.dose_key, (0.0, 1.0))
                lo = max(lo, hi * 1e-3, 1e-6) if hi > 0 else 0.0
                grid = sorted(set(np.round(np.geomspace(lo, hi, 5), 6).tolist())) if hi > 0 else [0.0]
            for label in labels:
                if spec.is_control(label):
                    out.append({key: label})
                else:
                    out.extend({key: label, spec.dose_key: float(d)} for d in grid)
        else:
            out.extend({key: label} for label in labels)
    return out


def seen_combinations(model, adata) -> dict[str, list[str]]:
    """The combinations of two or more singles (``A+B``, canonical: ``B+A`` and GEARS' ``A+B`` read
    alike, ``A+ctrl`` is the single ``A``) of each perturbation key present in ``adata.obs``."""
    spec, out = model.data_spec, {}
    for key in spec.perturbation_keys:
        if key in adata.obs:
            labels = {canonical_label(lab, spec.separator, spec.control_labels)
                      for lab in set(adata.obs[key].astype(str))}
            out[key] = sorted(lab for lab in labels if spec.separator in lab)
    return out


@torch.no_grad()
def screen_perturbations(designer, target: PhenotypeTarget, source=None, *, condition=None,
                         candidates=None, combinations=None, doses=None, n_cells: int = 128, steps: int = 50,
                         seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Rank perturbation conditions by how well cells generated under each meet ``target`` (no
    guidance: the model's own prediction).

    ``source``: an AnnData (in the data's genes) or :class:`scidiff.data.CellData` of starting
    cells with their covariates, each inverted under its own condition and decoded under every
    candidate (counterfactuals); without it, ``n_cells`` cells are sampled from the same noise
    under every candidate. ``condition``: labels of the covariates a candidate does not set (e.g.
    the cell type, or a knockout the drugs are screened on);
    ``candidates``: condition dicts (default :func:`candidate_conditions`). Columns:
    ``condition``, ``fraction_met`` (all targets), ``fraction_met[<target>]`` per target,
    ``mean_objective``, ``rank`` (1 = best)."""
    from tqdm.auto import tqdm

    progress = yes_no("progress", progress)  # 'no' showed the bar: any non-empty text is true
    designer.check(target)
    model = designer.model
    # n_cells=8.0 and True failed in torch.randn, seed=-1 as "expected non-negative integer" (True ran as 1)
    n_cells = whole_number("n_cells", n_cells, 1, what="an integer >= 1", integral_floats=False)
    seed = check_seed(seed)
    if condition is not None:  # 'K1' was refused as "conditioning", a name the screen does not take
        condition = condition_mapping(condition)
    refuse_one_condition(candidates, "candidates", "{'drug': 'A'}")
    candidates = candidates if candidates is not None else candidate_conditions(model, combinations, doses)
    if not candidates:
        raise ValueError("no candidate conditions to screen")
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    model.eval()
    x, src_codes = source_cells(model, source, n_cells, rng)
    if x is not None:
        src = {k: v.to(device) for k, v in src_codes.items()}
        z_T = ddim_invert(model, model.encode(x.to(device)), model.scheduler, steps, cond=src)
    else:
        gen = torch.Generator(device=device).manual_seed(int(seed))
        z_T = torch.randn(n_cells, model.diffusion_dim, generator=gen, device=device)
    n = len(z_T)
    keep = {k: v.to(device) for k, v in decoding_condition(model, condition, src_codes, n).items()}
    loss_fn = designer.loss_fn(target, include_constraints=False)
    measure = torch.Generator(device=device).manual_seed(int(seed) + 1)  # observed designers' measurements
    rows = []
    for cand in tqdm(candidates, desc="screen", disable=not progress):
        cond = {**keep, **{k: v.to(device) for k, v in model.encode_conditioning(cand, n).items()}}  # cand's keys win
        z = ddim(model, z_T, model.scheduler, steps, cond=cond)
        expr = designer.designed_expression(z, generator=measure)
        loss = loss_fn(expr, cond).cpu().numpy()
        met = designer.hits(expr.cpu().numpy(), target)
        all_met = met_every_target(met, len(loss))
        row = {"condition": condition_label(cand),
               "fraction_met": float(all_met.mean()), "mean_objective": float(loss.mean())}
        row.update({f"fraction_met[{k}]": float(v.mean()) for k, v in met.items()})
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["fraction_met", "mean_objective"], ascending=[False, True],
                                           kind="mergesort").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table
