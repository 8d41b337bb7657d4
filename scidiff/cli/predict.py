"""``scidiff predict``: perturbation responses of control cells, for one target or a screen of
many (one model load), by the model or by a baseline."""
from __future__ import annotations

import warnings

from ..textfiles import encoding_error
from .common import (SEPARATOR_HELP, add_expression_source, check_out, device_name, finite_float, parse_conditions,
                     positive_float, positive_int, sampling_settings, seed_value, separator_text, split, user_error)

MODEL_METHODS = ("counterfactual", "population")
# scidiff.evaluation.perturbation.BASELINES (not imported here: --help stays light; a test checks they agree)
BASELINE_METHODS = ("no-change", "mean-shift", "cell-mean", "additive", "linear")
BASELINE_FLAGS = ("train", "perturbation_key", "context_key", "control_labels", "time_key", "linear_features",
                  "linear_alpha")
CONTEXT_COLUMN = "scidiff_context"


def add(sub):
    p = sub.add_parser("predict", help="predict perturbation responses of control cells",
                       description="Predict how the control cells of --data respond to each target and write one "
                                   ".h5ad: X = predicted log1p expression, layers['control'] = the input cells, "
                                   "obs['scidiff_target'] = which target a row is (the target covariates and "
                                   "the obs columns that describe the perturbation set from it), "
                                   "obs['scidiff_confidence'] and obs['scidiff_route'], and the settings in "
                                   "uns['scidiff_prediction']. Many targets: repeat --target or give "
                                   "--targets-file. The baselines (--method no-change|mean-shift|cell-mean|"
                                   "additive|linear) predict from --train without a model.")
    p.add_argument("--model", default=None, help="run folder or model.pt (required by counterfactual/population)")
    p.add_argument("--data", required=True, help="control cells (.h5ad)")
    add_expression_source(p, "--data (and --train)")
    p.add_argument("--target", action="append", default=None,
                   help="key=value[,key=value], e.g. condition=stimulated or drug=A+B,dose=10; repeat for a screen")
    p.add_argument("--targets-file", default=None,
                   help="a file of targets, one key=value[,key=value] per line (# starts a comment)")
    p.add_argument("--method", default="counterfactual", choices=list(MODEL_METHODS + BASELINE_METHODS),
                   help="counterfactual (each input cell moved), population (fresh cells of the input cells' "
                        "conditions, moved), or a baseline computed from --train: no-change, mean-shift "
                        "(+ the target's mean change in the other contexts), cell-mean (+ the mean change of all "
                        "other perturbations), additive (+ the sum of the singles' changes), linear (ridge on "
                        "the singles' multi-hot; with --time-key, interpolation between the flanking times)")
    p.add_argument("--train", default=None, help="baselines: the training cells (.h5ad) they are computed from")
    p.add_argument("--perturbation-key", default=None,
                   help="baselines: obs column of the perturbation (default: the model's, or the targets' one key)")
    p.add_argument("--context-key", default=None,
                   help="baselines: obs column of the context, e.g. cell_type (default: the model's other "
                        "covariates; none without a model)")
    p.add_argument("--control-labels", default=None,
                   help="baselines: comma-separated labels of the control cells (default: the model's, else "
                        "those of control,ctrl that the cells carry); one no cell carries is warned about")
    p.add_argument("--separator", type=separator_text, default=None,
                   help="baselines: " + SEPARATOR_HELP.replace("(default: +", "(default: the model's, else +"))
    p.add_argument("--linear-features", default=None, choices=["multi-hot", "gene-pca"],
                   help="baselines: what --method linear regresses the changes on: multi-hot (default: the "
                        "singles seen in --train) or gene-pca (the target gene's loadings on the top 10 principal "
                        "components of --train, Ahlmann-Eltze et al. 2025: predicts knockouts never seen, of "
                        "genes measured in --train)")
    p.add_argument("--linear-alpha", type=positive_float, default=None,
                   help="baselines: the ridge penalty of --method linear (default: chosen from 1e-4 to 1e3 by "
                        "leave-one-group-out cross-validation over the training groups; the penalty used is "
                        "recorded in uns['scidiff_prediction'])")
    p.add_argument("--time-key", default=None,
                   help="baselines: a numeric obs column (time) for --method linear (interpolation in time; "
                        "default: the model's time named in the targets, or the targets' one key where it is a "
                        "numeric column of --train)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM inversion and decoding steps")
    p.add_argument("--config", default=None,
                   help="YAML whose sampling section gives the default of --guidance (default: the run's config.yaml)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: sampling.guidance_scale of the config, else 1)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--batch-size", type=positive_int, default=4096, help="cells per model call")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--observed", action="store_true",
                      help="measured cells: each input cell's measurement carried to its predicted state through "
                           "the model's detection model (sparse as the data; the default where the model has one)")
    kind.add_argument("--shifted", action="store_true",
                      help="each input cell shifted by the predicted change in log1p expression instead (lifts "
                           "every zero of a gene the change raises)")
    p.add_argument("--out", required=True, help="output .h5ad")


def read_targets_file(path: str) -> list[tuple[str, str]]:
    """``(where, text)`` per target line of ``path``: ``key=value[,key=value]``; ``#`` starts a
    comment, blank lines are skipped (a byte-order mark, as spreadsheet programs write, too)."""
    try:
        wrong = encoding_error(path, "--targets-file")  # Excel's "Unicode Text": UTF-16
        if wrong is not None:
            raise wrong
        with open(path, encoding="utf-8-sig") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--targets-file {path!r} is not a UTF-8 text file") from None
    except FileNotFoundError:
        raise ValueError(f"--targets-file {path!r}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--targets-file {path!r} is a folder; give a text file of targets") from None
    out = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            out.append((f"--targets-file {path!r} line {number}", text))
    if not out:
        raise ValueError(f"--targets-file {path!r} holds no target (one key=value[,key=value] per line)")
    return out


def _target_texts(args) -> list[tuple[str, str]]:
    texts = [("--target", t) for t in (args.target or [])]
    if args.targets_file:
        texts += read_targets_file(args.targets_file)
    if not texts:
        raise ValueError("no target: give --target key=value[,key=value] (repeatable) or --targets-file FILE")
    return texts


def _parse(where: str, text: str, check=None, numeric=(), spec=None) -> dict:
    """One target: ``key=value`` pairs, the ``numeric`` keys as numbers (with a model's ``spec``,
    also a label that names a measured time: Klein's ``day_num=d2``), then ``check(target)``; any
    error names ``where`` and the text."""
    try:
        target = parse_conditions(text)
        if not target:
            raise ValueError("no key=value in it")
        for key in [k for k in target if k in set(numeric)]:
            if spec is not None:
                from ..tasks.perturb import numeric_value  # lazy: keeps --help light (torch)

                target[key] = numeric_value(spec, key, target[key])
                continue
            try:
                target[key] = float(target[key])
            except ValueError:
                raise ValueError(f"{key} must be a number, got {target[key]!r}") from None
        if check is not None:
            check(target)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{where} {text!r}: {user_error(exc) or exc}") from None
    return target


def _model_check(model):
    """Refuse a target the model cannot predict, before any work: unknown keys and labels (an
    unseen perturbation only where the model has no prior that describes it)."""
    from ..tasks.perturb import numeric_target, split_target  # lazy: keeps --help light (torch)

    def check(target):
        numeric_target(model.data_spec, target)  # a negative dose, refused by name
        known, _ = split_target(model, target)
        with warnings.catch_warnings():  # a dose beyond the measured ones: said once, by the prediction
            warnings.simplefilter("ignore")
            model.data_spec.encode_conditions(known, 1)
        model.data_spec.with_dose(target)

    return check


def _device(name: str):
    import torch  # lazy: keeps --help light (torch)

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available to torch here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def run(args):
    import torch  # lazy: keeps --help light (torch)

    from ..training import load_model  # lazy: keeps --help light (torch, anndata)

    baseline = args.method in BASELINE_METHODS
    if not baseline:
        given = [f"--{f.replace('_', '-')}" for f in BASELINE_FLAGS if getattr(args, f) is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} {verb} to the baseline methods (--method "
                             f"{'|'.join(BASELINE_METHODS)}), not to --method {args.method}")
        if args.model is None:
            raise ValueError(f"--method {args.method} needs --model (a run folder or model.pt); the baselines "
                             f"({', '.join(BASELINE_METHODS)}) predict without one")
    elif args.observed or args.shifted:
        raise ValueError(f"--{'observed' if args.observed else 'shifted'} applies to the model's methods "
                         f"(counterfactual, population), not to the baseline --method {args.method}")
    elif args.train is None and args.method != "no-change":
        raise ValueError(f"--method {args.method} needs --train TRAIN.h5ad (the cells the baseline is computed from)")
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = _target_texts(args)
    guidance = sampling_settings(args)["guidance_scale"] if not baseline else None
    device = _device(args.device) if not baseline else None
    check_out(args.out, reads={"--data": args.data, "--train": args.train, "--targets-file": args.targets_file,
                               "--model": args.model})
    model = load_model(args.model, map_location=str(device or "cpu")) if args.model is not None else None
    if baseline:
        n_cells, n_genes = _baselines(args, model, texts)
    else:
        from ..tasks.screen import predict_screen_to_file  # lazy: keeps --help light (torch, anndata)

        spec = model.data_spec
        if spec is None:
            raise ValueError(f"--model {args.model!r} carries no gene list; train it through scidiff train")
        targets = [_parse(w, t, _model_check(model), spec.continuous, spec) for w, t in texts]
        observed = model.resolve_observed(True if args.observed else False if args.shifted else None)
        # target by target into the file: memory holds one target's prediction, however many targets
        n_cells, n_genes = predict_screen_to_file(model, args.data, targets, args.out, method=args.method,
                                                  steps=args.steps, guidance_scale=guidance, seed=args.seed,
                                                  batch_size=args.batch_size, device=device, observed=observed,
                                                  layer=args.layer, use_raw=True if args.use_raw else None)
    n_targets = len(texts)
    per = f" ({n_targets} targets x {n_cells // n_targets} cells)" if n_targets > 1 else ""
    kind = "" if baseline else " (measured cells)" if observed else " (shifted cells, --shifted)"
    print(f"wrote {n_cells} predicted cells{per} x {n_genes} genes to {args.out}{kind}")
    if not baseline:
        print("\n".join(what_predictions_rest_on(args.out)))


def what_predictions_rest_on(path: str, shown: int = 20) -> list[str]:
    """Lines for the terminal: per target of the prediction file at ``path``, its route(s) and
    mean stated confidence (``obs['scidiff_route']``, ``obs['scidiff_confidence']``) and, for a
    transferred one, how far its cells lie inside each context read (:func:`_inside`), the first
    ``shown`` targets, then a count of targets per route."""
    import anndata as ad  # lazy: keeps --help light (anndata)

    backed = ad.read_h5ad(path, backed="r")
    obs = backed.obs[["scidiff_target", "scidiff_route", "scidiff_confidence"]].copy()
    record = dict(backed.uns.get("scidiff_prediction", {}))
    backed.file.close()
    per_target = record.get("per_target")
    records = {t: per_target[str(i)] for i, t in enumerate(record.get("targets", []))} if per_target else None
    lines, per_route, n = ["what each prediction rests on (route, mean confidence 0-1):"], {}, 0
    for n, (target, rows) in enumerate(obs.groupby("scidiff_target", observed=True, sort=False), 1):
        routes = rows["scidiff_route"].astype(str).value_counts()
        for route in routes.index:
            per_route[route] = per_route.get(route, 0) + 1
        if n <= shown:
            route = routes.index[0] if len(routes) == 1 else \
                ", ".join(f"{r} ({cells} cells)" for r, cells in routes.items())
            conf = rows["scidiff_confidence"].astype(float)
            said = "not assessed" if conf.isna().all() else f"{conf.mean():.2f}"
            inside = _inside(records.get(target, {}) if records is not None else record)
            lines.append(f"  {target}: {route}, confidence {said}"
                         + (f"; inside the contexts read: {inside}" if inside else ""))
    if n > shown:
        lines.append(f"  ... {n - shown} more; targets per route: "
                     + ", ".join(f"{r} {k}" for r, k in sorted(per_route.items())))
    return lines


def _inside(record: dict, shown: int = 4) -> str:
    """A transferred target's mean share of the predicted cells inside each context read
    (``transferred_inside``, averaged over the contexts predicted), as ``"line=A 0.97, ..."``; ``""``
    for other routes."""
    from ..tasks.cells import h5_mapping  # lazy: keeps --help light (torch, anndata)

    shares = {}
    for read in h5_mapping(record.get("transferred_inside")).values():
        for name, share in h5_mapping(read).items():
            shares.setdefault(str(name), []).append(float(share))
    said = [f"{name} {sum(v) / len(v):.2f}" for name, v in shares.items()]
    return ", ".join(said[:shown]) + (f", ... {len(said) - shown} more" if len(said) > shown else "")


def _baselines(args, model, texts):
    """``--method`` a baseline: ``--train`` and ``--data`` in log1p expression (the model's genes
    and normalisation with ``--model``, else ``--train``'s genes, counts normalised to 1e4 + log1p),
    keys from the flags or the model's spec, then :func:`scidiff.tasks.screen.baseline_screen`
    into ``--out``; returns ``(cells, genes)``."""
    import warnings

    from ..data import read_h5ad  # lazy: keeps --help light (torch, anndata)
    from ..data.preprocess import expression_as_x  # lazy: keeps --help light (torch, anndata)
    from ..tasks.screen import baseline_screen, check_control_labels  # lazy: keeps --help light (torch, anndata)

    data = expression_as_x(read_h5ad(args.data), args.layer, args.use_raw)
    train = expression_as_x(read_h5ad(args.train), args.layer, args.use_raw) if args.train is not None else None
    spec = model.data_spec if model is not None else None
    time_key = args.time_key
    if time_key is None and spec is not None and args.method == "linear":
        keys = {k for _, t in texts for k in parse_conditions(t)}
        time_key = next((k for k in spec.continuous if k in keys and k != spec.dose_key), None)
    if time_key is None and args.method == "linear" and args.perturbation_key is None \
            and args.control_labels is None:
        time_key = _numeric_key(texts, train)  # day=4 on a numeric day of --train: interpolation in time
    targets = [_parse(w, t, None, [time_key] if time_key else [], spec) for w, t in texts]
    pert_key = args.perturbation_key
    if pert_key is None and spec is not None:
        pert_key = next((k for k in spec.perturbation_keys if all(k in t for t in targets)), None)
    if pert_key is None:
        keys = {k for t in targets for k in t} - {time_key}
        if len(keys) == 1 and all(len(t) == 1 for t in targets):
            pert_key = keys.pop()
    needs_key = args.method != "no-change" and not (args.method == "linear" and time_key)
    if needs_key and pert_key is None:
        raise ValueError(f"--method {args.method} needs --perturbation-key (the obs column of the perturbation)")
    if pert_key is not None:
        missing = [text for (_, text), t in zip(texts, targets) if pert_key not in t]
        if missing and needs_key:
            raise ValueError(f"targets without the perturbation key {pert_key!r}: {missing[:5]}")
    context_key = args.context_key
    if args.control_labels is not None:
        controls = split(args.control_labels)
        if not controls:
            raise ValueError("--control-labels is empty; give the label(s) of the control cells")
    else:
        controls = list(spec.control_labels) if spec is not None else ["control", "ctrl"]
    if pert_key is not None and (train is not None or args.control_labels is not None):
        files = {f"--train {args.train!r}": train, f"--data {args.data!r}": data}
        required = f"--train {args.train!r}" if train is not None and needs_key else None
        with warnings.catch_warnings():
            if args.control_labels is None:  # only labels the user gave are warned about
                warnings.simplefilter("ignore")
            found = check_control_labels(pert_key, controls, files, required=required)
        controls = [c for c in controls if c in found] or controls
    train, data, context_key = _log1p_pair(train, data, model, context_key, pert_key, time_key)
    if train is not None and context_key is not None and context_key not in train.obs.columns:
        raise KeyError(f"--context-key {context_key!r} is not an obs column of --train {args.train!r}; available "
                       f"obs keys: {list(train.obs.columns)}")
    if context_key is not None and context_key not in data.obs.columns:
        raise KeyError(f"--context-key {context_key!r} is not an obs column of --data {args.data!r}; available "
                       f"obs keys: {list(data.obs.columns)}")
    if time_key is not None and train is not None and time_key not in train.obs.columns:
        raise KeyError(f"--time-key {time_key!r} is not an obs column of --train {args.train!r}; available obs "
                       f"keys: {list(train.obs.columns)}")
    separator = args.separator or (spec.separator if spec is not None else "+")
    features = None
    for flag in ("linear_features", "linear_alpha"):
        if getattr(args, flag) is not None and args.method != "linear":
            raise ValueError(f"--{flag.replace('_', '-')} applies to --method linear, not --method {args.method}")
    if args.linear_features == "gene-pca":
        if time_key is not None:
            raise ValueError("--linear-features gene-pca describes gene targets; with a time (--time-key "
                             f"{time_key!r}) --method linear interpolates in time")
        features = _gene_pca(train, targets, pert_key, controls, separator)
    columns = None
    if spec is not None and (pert_key in spec.perturbation_columns or time_key in spec.perturbation_columns):
        columns = {k: spec.perturbation_columns[k] for k in (pert_key, time_key) if k in spec.perturbation_columns}
    # target by target into the file; the context joined from several covariates is not written
    return baseline_screen(args.method, train, data, targets, perturbation_key=pert_key, context_key=context_key,
                           control_labels=controls, time_key=time_key, columns=columns, out=args.out,
                           separator=separator, exclude_columns=[CONTEXT_COLUMN], drop_obs=[CONTEXT_COLUMN],
                           features=features, alpha=args.linear_alpha)


def _numeric_key(texts, train) -> str | None:
    """The targets' one key where every cell of ``train`` holds a number in it (a time: ``day=4``;
    numbers stored as text too), else ``None``."""
    import pandas as pd  # lazy: keeps --help light (pandas)

    try:
        keys = {k for _, t in texts for k in parse_conditions(t)}
    except ValueError:  # said with the target's place by _parse
        return None
    key = keys.pop() if len(keys) == 1 else None
    if train is None or key not in train.obs.columns or train.obs[key].dtype == bool:
        return None
    return key if pd.to_numeric(train.obs[key].astype(str), errors="coerce").notna().all() else None


def _gene_pca(train, targets, pert_key, controls, separator) -> dict:
    """``--linear-features gene-pca``: the gene-PCA features of every single of ``train`` and of
    the targets (:func:`scidiff.evaluation.perturbation.gene_pca_features`); a target that is a
    combination or names no gene of ``train`` is refused by name."""
    from ..data.spec import canonical_label  # lazy: keeps --help light (torch, anndata)
    from ..evaluation.perturbation import gene_pca_features, perturbation_labels  # lazy: keeps --help light

    wanted = [canonical_label(t[pert_key], separator, controls) for t in targets]
    wanted = [w for w in wanted if w != controls[0]]
    combos = [w for w in wanted if separator in w]
    if combos:
        raise ValueError(f"--linear-features gene-pca predicts single gene targets; {combos[:3]} are combinations "
                         "(--method additive sums the singles' changes)")
    seen = {s for lab in perturbation_labels(train, pert_key, separator, controls) for s in lab.split(separator)}
    features = gene_pca_features(train, sorted((seen - {controls[0]}) | set(wanted)))
    unknown = [w for w in wanted if w not in features]
    if unknown:
        measured = [w for w in unknown if w in seen]
        hint = f"; {measured[:5]} have cells in --train: --linear-features multi-hot predicts them" if measured else ""
        raise ValueError(f"--linear-features gene-pca: {unknown[:5]} name no gene of --train ({train.n_vars} genes, "
                         f"by name or symbol); the baseline describes a target by its own gene's loadings{hint}")
    if not any(s in features for s in seen):
        raise ValueError("--linear-features gene-pca: no perturbation of --train names one of its genes; the "
                         "ridge learns from seen targets' loadings")
    return features


def _log1p_pair(train, data, model, context_key, pert_key, time_key):
    """``(train, data, context_key)`` in log1p expression on the same genes. With a model: its
    genes and normalisation, and (no --context-key) its covariates other than the perturbation and
    time as the context (several joined into one column)."""
    import anndata as ad  # lazy: keeps --help light (anndata)

    from ..data import transform_like  # lazy: keeps --help light (torch, anndata)
    from ..data.gene_symbols import genes_of_in  # lazy: keeps --help light (pandas)
    from ..tasks.cells import keep_var_columns  # lazy: keeps --help light (torch, anndata)
    from ..tasks.evaluate import log_expression_of  # lazy: keeps --help light (torch, anndata)

    def lean(a, x, genes, names):
        """``a``'s cells as ``x`` on ``genes`` (``names``: theirs in ``a``), its var columns (IDs,
        symbols, feature types) kept, as a model's prediction keeps them."""
        out = ad.AnnData(X=x, obs=a.obs.copy())
        out.var = a.var.set_axis(a.var.index.astype(str)).reindex(list(names)).set_axis(list(genes))
        return out

    if model is not None:
        spec = model.data_spec
        train = None if train is None else transform_like(spec, train, condition_keys=[]).to_anndata()
        read = transform_like(spec, data, condition_keys=[]).to_anndata()
        keep_var_columns(read, data, spec)
        data = read
        if context_key is None:
            keys = [k for k in spec.categorical if k not in spec.perturbation_keys and k not in (pert_key, time_key)]
            keys = [k for k in keys if k in data.obs.columns and (train is None or k in train.obs.columns)]
            if len(keys) == 1:
                context_key = keys[0]
            elif keys:
                for a in (train, data):
                    if a is not None:
                        a.obs[CONTEXT_COLUMN] = a.obs[keys].astype(str).agg("|".join, axis=1).to_numpy()
                context_key = CONTEXT_COLUMN
        return train, data, context_key
    genes = [str(g) for g in (train if train is not None else data).var_names]
    # --data may name the genes the other way (by symbol for IDs, or the reverse)
    in_data = genes if train is None else genes_of_in(train, data, "genes of --train are not in --data")
    if train is not None:
        train = lean(train, log_expression_of(train, genes), genes, genes)
    data = lean(data, log_expression_of(data, in_data), genes, in_data)
    for column in [] if train is None else [c for c in train.var.columns if c not in data.var.columns]:
        data.var[column] = train.var[column].to_numpy()  # --train's gene symbols beside --data's names
    return train, data, context_key
