"""The torch-free ONNX runtime (``scidiff.export.runtime.OnnxSampler``) called as a user calls it,
with the odd inputs a user brings: each is refused with a ValueError (or KeyError) naming the
argument, or gives the cells the torch model gives."""
import json
import shutil
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import scidiff  # noqa: E402
from scidiff.export import runtime  # noqa: E402
from scidiff.export.onnx import export_onnx  # noqa: E402
from scidiff.export.runtime import OnnxSampler  # noqa: E402
from scidiff.models import ScIDiffModel  # noqa: E402

T = 50  # the model's timesteps


@pytest.fixture(scope="module")
def exported(tmp_path_factory, kang_path):
    """A tiny principal-axes model (labels, a fitted detection model) on 300 real Kang cells,
    exported once: ``(model, path to model.onnx, OnnxSampler)``."""
    import anndata as ad

    kang = ad.read_h5ad(kang_path, backed="r")
    idx = np.sort(np.random.default_rng(0).choice(kang.n_obs, 300, replace=False))
    cells = kang[idx].to_memory()
    torch.manual_seed(0)
    data = scidiff.setup_anndata(cells, n_top_genes=40, condition_keys=["cell_type", "condition"])
    model = ScIDiffModel.from_data(data, hidden_dim=16, num_layers=1, num_timesteps=T, latent_dim=8).eval()
    assert model.detection is not None and model.detection.fitted
    out = tmp_path_factory.mktemp("runtime") / "model.onnx"
    export_onnx(model, out, sampler="ddim", steps=3)
    return model, out, OnnxSampler(out, threads=1)


def _x_T(n, seed=7):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def _torch(model, n, condition, seed=7, **kwargs):
    return model.sample(n, condition, observed=False, generator=torch.Generator().manual_seed(seed), **kwargs).numpy()


# -- numbers: n, seed, steps, eta, guidance, threads, budgets ------------------------------------
@pytest.mark.parametrize("n", [0, -1, 2.5, 2.0, "10", True, None, float("nan")])
def test_n_must_be_an_integer_of_at_least_one(exported, n):
    """2.5 and 2.0 were cut to 2 cells, '10' gave 10, True one cell; None and NaN crashed in int()."""
    with pytest.raises(ValueError, match=r"^n must be"):
        exported[2].sample(n, seed=0, output="latent")


def test_n_as_a_numpy_integer(exported):
    assert exported[2].sample(np.int64(3), seed=0, output="latent").shape == (3, 8)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, np.uint64(2**63), 1.5, "3", True])
def test_seed_must_be_an_integer_in_the_servers_range(exported, seed):
    """-1 failed inside numpy ('expected non-negative integer'); 1.5 ran as seed 1 and was recorded
    as 1, '3' and True ran; 2**64 ran and its AnnData could not be written to h5ad."""
    with pytest.raises(ValueError, match=r"^seed must"):
        exported[2].sample(2, seed=seed, output="latent")


def test_a_numpy_seed_is_the_same_seed(exported):
    sampler = exported[2]
    a = sampler.sample(4, {"cell_type": "B"}, seed=np.int64(5), output="arrays")
    b = sampler.sample(4, {"cell_type": "B"}, seed=5, output="arrays")
    np.testing.assert_array_equal(a["X"], b["X"])
    assert a["seed"] == 5 and type(a["seed"]) is int


@pytest.mark.parametrize("steps,message", [(0, r"lie in \[1, 50\], got 0"), (T + 1, r"lie in \[1, 50\], got 51"),
                                           (2.5, "be an integer, got 2.5"), (3.0, "be an integer"),
                                           ("3", "be an integer"), (True, "be an integer")])
def test_steps_must_be_an_integer_within_the_timesteps(exported, steps, message):
    """2.5 ran 2 steps and True one; '3' ran."""
    with pytest.raises(ValueError, match=f"^steps must {message}"):
        exported[2].sample(2, seed=0, steps=steps, output="latent")


@pytest.mark.parametrize("sampler,eta,message", [
    ("dpmpp_2m", 0.5, "eta applies to the ddim sampler only"),
    ("ddim", -0.1, r"eta must lie in \[0, 1\]"), ("ddim", 1.5, r"eta must lie in \[0, 1\]"),
    ("ddim", float("nan"), r"eta must lie in \[0, 1\]"),
    ("ddim", "x", "eta must be a number, got 'x'"), ("ddim", "0.5", "eta must be a number"),
    ("ddim", True, "eta must be a number")])
def test_eta_is_a_number_in_0_1_for_ddim_only(exported, sampler, eta, message):
    """'x' failed in float() without naming eta; '0.5' ran, True ran as eta=1."""
    with pytest.raises(ValueError, match=message):
        exported[2].sample(2, seed=0, sampler=sampler, eta=eta, output="latent")


@pytest.mark.parametrize("guidance,message", [(float("nan"), "a finite"), (float("inf"), "a finite"),
                                              (-float("inf"), "a finite"), (1e39, "a finite"),
                                              ("x", "a number, got 'x'"), ("2", "a number"), (True, "a number")])
def test_guidance_is_a_finite_number(exported, guidance, message):
    """'x' failed in float() without naming guidance; '2' and True ran; 1e39 (beyond float32, the
    graph's type) gave NaN cells."""
    with pytest.raises(ValueError, match=f"^guidance must be {message}"):
        exported[2].sample(2, seed=0, guidance=guidance, output="latent")


def test_negative_and_strong_guidance_agree_with_torch(exported):
    """A negative guidance scale is taken, as the torch model takes it, and gives its cells."""
    model, _, sampler = exported
    condition = {"cell_type": "B", "condition": "stimulated"}
    for w in (-0.5, 3.0):
        got = sampler.sample(20, condition, x_T=_x_T(20).numpy(), guidance=w, steps=3, observed=False,
                             output="arrays")["X"]
        np.testing.assert_allclose(got, _torch(model, 20, condition, guidance_scale=w, sampler="ddim", steps=3),
                                   atol=2e-4, rtol=0)


@pytest.mark.parametrize("threads", [-1, 2.5, "2", True])
def test_threads_must_be_a_whole_number(exported, threads):
    """-1 and True reached onnxruntime's options; 2.5 and '2' were cut or parsed."""
    with pytest.raises(ValueError, match="^threads must"):
        OnnxSampler(exported[1], threads=threads)


def test_threads_0_is_onnxruntimes_choice_and_devices_are_named(exported):
    assert OnnxSampler(exported[1], threads=0).device_type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda', got 'gpu'"):
        OnnxSampler(exported[1], device="gpu")
    if runtime.cuda_device_count() == 0:
        with pytest.raises(RuntimeError, match="device='cuda' requested but"):
            OnnxSampler(exported[1], device="cuda", threads=1)


@pytest.mark.parametrize("budget", [0, -1, 2.5, "3"])
def test_advance_budget_must_be_a_positive_integer(exported, budget):
    """0 and -1 ran one cell as if 1, 2.5 ran two, '3' failed comparing an int with a str."""
    sampler = exported[2]
    trajectory = sampler.trajectory(sampler.prepare(5, {"cell_type": "B"}, seed=0), "ddim", 3)
    with pytest.raises(ValueError, match="^budget must"):
        trajectory.advance(budget)
    assert trajectory.step == 0 and trajectory.first == 0 and trajectory.calls == 0


@pytest.mark.parametrize("steps", [0, -1, T + 1, 2.5])
def test_trajectory_steps_within_the_timesteps(exported, steps):
    """T + 1 steps walked T (sample() refuses them); 2.5 walked 2."""
    sampler = exported[2]
    with pytest.raises(ValueError, match=r"^steps must"):
        sampler.trajectory(sampler.prepare(2, seed=0), "ddim", steps)


def test_a_sliced_trajectory_gives_the_whole_walk(exported):
    sampler = exported[2]
    batch = sampler.prepare(7, {"cell_type": ["B", "NK"] * 3 + ["B"]}, seed=1)
    trajectory = sampler.trajectory(batch, "dpmpp_2m", 4)
    while not trajectory.done:
        assert trajectory.advance(3) >= 1
    np.testing.assert_array_equal(trajectory.x, sampler.run(batch, "dpmpp_2m", 4))


# -- start points, observed, output ---------------------------------------------------------------
def test_x_T_of_another_dtype_shape_or_with_nan(exported):
    """NaN in x_T gave NaN cells; complex values were cast with a warning; strings failed in numpy."""
    model, _, sampler = exported
    x = _x_T(6).numpy()
    a = sampler.sample(6, {"cell_type": "B"}, x_T=x, steps=3, observed=False, output="arrays")["X"]
    b = sampler.sample(6, {"cell_type": "B"}, x_T=x.astype(np.float64), steps=3, observed=False, output="arrays")["X"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, _torch(model, 6, {"cell_type": "B"}, sampler="ddim", steps=3), atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match=r"x_T must have shape \(6, 8\).*got \(6, 7\)"):
        sampler.sample(6, x_T=x[:, :7])
    with pytest.raises(ValueError, match=r"x_T must have shape \(5, 8\)"):
        sampler.sample(5, x_T=x)
    bad = x.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="x_T must be finite"):
        sampler.sample(6, x_T=bad)
    with pytest.raises(ValueError, match="x_T must be finite"):
        sampler.sample(6, x_T=np.full((6, 8), 1e39))  # beyond float32
    with pytest.raises(ValueError, match="x_T must be an array of real numbers, got dtype complex128"):
        sampler.sample(6, x_T=x.astype(complex))
    with pytest.raises(ValueError, match="x_T must be an array of real numbers"):
        sampler.sample(6, x_T=np.full((6, 8), "a"))


@pytest.mark.parametrize("observed", [1, 0, "true", "false", np.float64(1.0)])
def test_observed_is_a_boolean(exported, observed):
    """observed='false' (or 0, 1, 'true') was read by truth value: 'false' gave measured cells."""
    with pytest.raises(ValueError, match="^observed must be True, False or None"):
        exported[2].sample(2, seed=0, observed=observed, output="arrays")


def test_observed_numpy_bool_and_an_export_without_detection(exported, tmp_path):
    _, path, sampler = exported
    assert sampler.sample(2, seed=0, observed=np.bool_(False), output="arrays")["observed"] is False
    for name in ("model.onnx", "model.json", "model.decoder.npz"):
        shutil.copy(path.parent / name, tmp_path / name)
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["detection"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    old = OnnxSampler(tmp_path / "model.onnx", threads=1)
    with pytest.raises(ValueError, match="need a detection model, and the export 'model.json' has none"):
        old.sample(2, seed=0, observed=True)
    assert old.sample(2, seed=0, output="arrays")["observed"] is False


@pytest.mark.parametrize("output", ["bogus", None, "LATENT", "h5ad"])
def test_an_unknown_output_is_refused_before_sampling(exported, output, monkeypatch):
    """It was refused only after the whole walk (and measurement) had run."""
    sampler = exported[2]
    monkeypatch.setattr(sampler, "run", lambda *a, **k: pytest.fail("sampled before refusing the output"))
    with pytest.raises(ValueError, match="output must be 'anndata', 'arrays' or 'latent'"):
        sampler.sample(2, seed=0, output=output)


def test_outputs_hold_the_same_cells(exported):
    sampler = exported[2]
    kwargs = dict(seed=3, observed=False)
    z = sampler.sample(4, {"cell_type": "NK"}, output="latent", **kwargs)
    arrays = sampler.sample(4, {"cell_type": "NK"}, output="arrays", **kwargs)
    adata = sampler.sample(4, {"cell_type": "NK"}, output="anndata", **kwargs)
    assert z.shape == (4, 8)
    np.testing.assert_array_equal(arrays["X"], sampler.to_expression(sampler.decode(z)))
    np.testing.assert_array_equal(adata.X, arrays["X"])
    assert list(adata.obs["cell_type"]) == ["NK"] * 4 and adata.uns["scidiff"]["seed"] == 3


def test_the_anndata_carries_the_symbols_and_log1p_record_that_generate_writes(exported, tmp_path):
    """``scidiff.generate`` writes the training file's gene symbols in ``var`` and scanpy's
    ``uns['log1p']``; the runtime's AnnData had bare gene IDs and no record (``sc.pp.log1p`` on
    served cells then logged them twice without a warning)."""
    import pandas as pd

    model, _, sampler = exported
    adata = sampler.sample(3, {"cell_type": "NK"}, seed=3, observed=False)
    assert adata.var.equals(model.data_spec.var_frame()) and adata.uns["log1p"] == {"base": None}
    spec = model.data_spec  # the same model as trained on a file indexed by Ensembl IDs, symbols in a column
    ids = [f"ENSG{i:011d}" for i in range(spec.n_genes)]
    spec.gene_symbol_column, spec.gene_symbols, spec.gene_names = "gene_symbol", list(spec.gene_names), ids
    try:
        export_onnx(model, tmp_path / "ids.onnx", sampler="ddim", steps=3)
    finally:
        spec.gene_names, spec.gene_symbols, spec.gene_symbol_column = spec.gene_symbols, [], None
    served = OnnxSampler(tmp_path / "ids.onnx", threads=1).sample(3, {"cell_type": "NK"}, seed=3, observed=False)
    assert served.var.equals(pd.DataFrame({"gene_symbol": list(spec.gene_names)}, index=pd.Index(ids)))
    np.testing.assert_array_equal(served.X, adata.X)


# -- conditions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("condition", ["B", ["B"], ("cell_type", "B"), 3])
def test_condition_must_be_a_dict(exported, condition):
    """A bare label or list failed with 'dictionary update sequence element #0 has length 1'."""
    with pytest.raises(ValueError, match=r"^condition must be a dict of covariate -> label"):
        exported[2].sample(2, condition, seed=0)


def test_condition_errors_name_the_key_and_the_label(exported):
    sampler = exported[2]
    with pytest.raises(KeyError, match="unknown condition key 'tissue'.*cell_type"):
        sampler.sample(2, {"tissue": "lung"}, seed=0)
    with pytest.raises(ValueError, match="unknown value 'b' for condition 'cell_type'; did you mean 'B'"):
        sampler.sample(2, {"cell_type": "b"}, seed=0)
    with pytest.raises(ValueError, match="unknown value 'cd4t' for condition 'cell_type'; did you mean 'CD4T'"):
        sampler.sample(2, {"cell_type": "cd4t"}, seed=0)
    with pytest.raises(ValueError, match="unknown value 'Neuron' for condition 'cell_type'; known values"):
        sampler.sample(2, {"cell_type": "Neuron"}, seed=0)
    with pytest.raises(ValueError, match="condition 'cell_type' has 3 values for 2 cells"):
        sampler.sample(2, {"cell_type": ["B", "NK", "B"]}, seed=0)
    with pytest.raises(ValueError, match="condition 'cell_type' has 3 values for 2 cells"):
        sampler.sample(2, {"cell_type": np.array(["B", "NK", "B"])}, seed=0)
    with pytest.raises(ValueError, match="code 7 is out of range for condition 'cell_type'"):
        sampler.sample(2, {"cell_type": 7}, seed=0)
    with pytest.raises(ValueError, match="condition 'cell_type' must be one label or a list.*shape \\(1, 2\\)"):
        sampler.sample(2, {"cell_type": np.array([["B", "NK"]])}, seed=0)


def test_labels_codes_arrays_and_series_give_the_same_cells_as_torch(exported):
    """A 0-d array failed ('iteration over a 0-d array'); a pandas Series (a column of obs) was
    read as one label and refused with its whole repr."""
    import pandas as pd

    model, _, sampler = exported
    labels = model.data_spec.categorical["cell_type"]
    x = _x_T(4).numpy()
    want = ["B", "NK", "B", "CD8T"]
    expected = _torch(model, 4, {"cell_type": want, "condition": "control"}, sampler="ddim", steps=3)
    codes = [labels.index(v) for v in want]
    for given in (want, np.array(want), pd.Series(want), pd.Categorical(want), codes, np.array(codes)):
        got = sampler.sample(4, {"cell_type": given, "condition": "control"}, x_T=x, steps=3, observed=False,
                             output="arrays")
        np.testing.assert_allclose(got["X"], expected, atol=2e-4, rtol=0)
        assert got["obs"]["cell_type"] == want
    one = _torch(model, 4, {"cell_type": "NK", "condition": "control"}, sampler="ddim", steps=3)
    for given in ("NK", np.array("NK"), np.str_("NK"), labels.index("NK"), np.int64(labels.index("NK"))):
        got = sampler.sample(4, {"cell_type": given, "condition": "control"}, x_T=x, steps=3, observed=False,
                             output="arrays")
        np.testing.assert_allclose(got["X"], one, atol=2e-4, rtol=0)
        assert got["obs"]["cell_type"] == ["NK"] * 4


def test_none_is_the_null_condition(exported):
    sampler = exported[2]
    null = sampler.null_value("cell_type")
    table, index, _ = sampler.condition_table({"cell_type": [None, "B", None]}, 3)
    assert table["cell_type"][index[0]] == null and table["cell_type"][index[1]] != null
    assert list(index) == [0, 1, 0]


# -- the sidecar -------------------------------------------------------------------------------
def _edit(path, tmp_path, edit):
    for name in ("model.onnx", "model.decoder.npz"):
        shutil.copy(path.parent / name, tmp_path / name)
    meta = json.loads((path.parent / "model.json").read_text())
    edit(meta)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    return tmp_path / "model.onnx"


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("diffusion_dim"), "lacks the key 'diffusion_dim'"),
    (lambda m: m["normalisation"].pop("gene_offset"), "lacks the key normalisation.gene_offset"),
    (lambda m: m["schedule"].pop("alphas_cumprod"), "lacks the key schedule.alphas_cumprod"),
    (lambda m: m["inputs"].pop("x_t"), "lacks the key inputs.x_t"),
    (lambda m: m["covariates"][0].pop("labels"), r"covariates\[0\] \('cell_type'\) lacks the key 'labels'"),
    (lambda m: m["covariates"][0].pop("kind"), r"covariates\[0\] \('cell_type'\) lacks the key 'kind'"),
    (lambda m: m["covariates"][1].pop("input"), r"covariates\[1\] \('condition'\) lacks the key 'input'"),
    (lambda m: m["covariates"][0].__setitem__("size", 99), r"covariates\[0\] \('cell_type'\) must have 99 labels"),
    (lambda m: m["latent"].pop("file"), "lacks the key latent.file"),
    (lambda m: m.__setitem__("normalisation", None), "'normalisation' must be an object"),
    (lambda m: m.__setitem__("covariates", "cell_type"), "'covariates' must be a list"),
    (lambda m: m.__setitem__("genes", m["genes"][:-1]), "normalisation.gene_offset must hold one value per gene"),
    (lambda m: m["normalisation"].__setitem__("gene_scale", [1.0]), "gene_scale must hold one value per gene"),
    (lambda m: m.__setitem__("diffusion_dim", 9), r"has a basis of shape \(8, 40\), not \(9, 40\)"),
])
def test_a_hand_edited_sidecar_is_refused_naming_the_key(exported, tmp_path, edit, message):
    """Each failed with a bare KeyError ('diffusion_dim', 'x_t', 'labels', ...) or a TypeError at load,
    or a broadcast error at the first sample."""
    path = _edit(exported[1], tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        OnnxSampler(path, threads=1).sample(2, {"cell_type": "B"}, seed=0, output="arrays")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["sampling"].__setitem__("sampler", "euler"), "the default sampler 'euler' in 'model.json'"),
    (lambda m: m["sampling"].__setitem__("steps", 0), "the default steps in 'model.json' are unusable"),
])
def test_unusable_sidecar_defaults_are_named(exported, tmp_path, edit, message):
    """A bad default sampler was reported as \"unknown sampler 'None'\"; bad steps as the caller's."""
    sampler = OnnxSampler(_edit(exported[1], tmp_path, edit), threads=1)
    with pytest.raises(ValueError, match=message):
        sampler.sample(2, seed=0)
    assert sampler.sample(2, seed=0, sampler="ddim", steps=2, output="latent").shape == (2, 8)


def test_a_sidecar_without_defaults_samples_as_the_torch_side_does(exported, tmp_path):
    """A sidecar without ``sampling.sampler`` / ``sampling.steps`` (hand-written, or older) sampled
    with DDIM in 50 steps, where generation, the engine and the exporter default to
    DPM-Solver++(2M) in 25 (:data:`scidiff.diffusion.plans.DEFAULT_STEPS`)."""
    from scidiff.diffusion.plans import DEFAULT_SAMPLER, DEFAULT_STEPS

    def drop(meta):
        meta["sampling"].pop("sampler")
        meta["sampling"].pop("steps")

    sampler = OnnxSampler(_edit(exported[1], tmp_path, drop), threads=1)
    resolved = sampler.resolve()
    assert (resolved["sampler"], resolved["steps"]) == (DEFAULT_SAMPLER, DEFAULT_STEPS) == ("dpmpp_2m", 25)
    got = sampler.sample(3, {"cell_type": "B"}, seed=4, output="latent")
    want = sampler.sample(3, {"cell_type": "B"}, seed=4, output="latent", sampler="dpmpp_2m", steps=25)
    np.testing.assert_array_equal(got, want)


# -- threads -----------------------------------------------------------------------------------
def test_one_sampler_from_several_threads(exported):
    sampler = exported[2]
    condition = {"cell_type": "B"}
    expected = {s: sampler.sample(8, condition, seed=s, output="arrays")["X"] for s in range(4)}
    got, errors = {}, []

    def work(s):
        try:
            for _ in range(3):
                got.setdefault(s, []).append(sampler.sample(8, condition, seed=s, output="arrays")["X"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    workers = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    for s, xs in got.items():
        for x in xs:
            np.testing.assert_array_equal(x, expected[s])


def test_the_groups_cache_cleared_by_another_thread(exported, monkeypatch):
    """The training-groups cache is cleared when full, possibly by another thread between one
    thread's write and its read: the entry was read back from the cache (a KeyError then)."""
    sampler = exported[2]

    class Cleared(dict):  # every entry gone as soon as written, as if another thread cleared the cache
        def __setitem__(self, key, value):
            pass

    monkeypatch.setattr(sampler, "_carrying", Cleared())
    expected = OnnxSampler(exported[1], threads=1).sample(6, {"condition": "control"}, seed=4, output="arrays")
    got = sampler.sample(6, {"condition": "control"}, seed=4, output="arrays")
    np.testing.assert_array_equal(got["X"], expected["X"])
    assert got["obs"] == expected["obs"]


# -- numeric covariates and codes that are also labels (encoding alone, no graph) ----------------
@pytest.fixture
def encoder():
    """An OnnxSampler's condition encoding for a vocabulary with a numeric covariate and a label
    that reads as a number (the encoding needs no graph)."""
    sampler = OnnxSampler.__new__(OnnxSampler)
    sampler.covariates = [{"key": "cell_type", "kind": "categorical", "size": 3, "input": "cond_cell_type",
                           "labels": ["T", "B", "3"]},
                          {"key": "time", "kind": "continuous", "size": 1, "input": "cond_time"}]
    sampler.by_key = {c["key"]: c for c in sampler.covariates}
    sampler.control_labels, sampler.separator = ["control", "ctrl"], "+"
    return sampler


@pytest.mark.parametrize("value", [True, "1.5", "x", float("inf"), -float("inf"), 1e39])
def test_a_numeric_covariate_takes_finite_numbers(encoder, value):
    """True and '1.5' were read as 1.0 and 1.5 (obs kept True and the string); inf and 1e39 (inf
    in float32) went into the graph."""
    with pytest.raises(ValueError, match="condition 'time' (is numeric|must be a finite number)"):
        encoder.condition_table({"time": value}, 2)


def test_a_numeric_covariate_records_numbers_and_nulls(encoder):
    table, index, obs = encoder.condition_table({"time": [np.float64(2.0), None, 2]}, 3)
    assert obs["time"] == [2.0, None, 2.0] and all(type(v) is float for v in (obs["time"][0], obs["time"][2]))
    assert list(index) == [0, 1, 0] and table["time"][0] == 2.0 and np.isnan(table["time"][1])


def test_a_number_past_the_codes_that_is_a_label_says_so(encoder):
    """3 (the label '3', no code among 3 labels) was called 'the code of another label'."""
    with pytest.raises(ValueError, match="3 is no code for condition 'cell_type' \\(3 values\\) but its label '3'"):
        encoder.condition_table({"cell_type": 3}, 1)
    # 2 is the code of '3' and no label: taken as that code
    assert encoder.encode_value("cell_type", 2) == 2 and encoder.encode_value("cell_type", "3") == 2
