"""Progressive distillation (Salimans & Ho 2022): the student's target is exactly two teacher DDIM
steps; a distilled 4-step student follows the teacher's many-step sampler much more closely than
the teacher's own 4 steps do; the student survives a checkpoint bit for bit; misuse fails clearly."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scidiff.cli import main
from scidiff.data import CellData, setup_anndata
from scidiff.data.spec import DataSpec
from scidiff.diffusion.distillation import Student, TeacherGrid, ddim_step, student_target, two_teacher_steps, x0_target
from scidiff.diffusion.plans import alphas_cumprod_of, ddim_plan, halving_timesteps, sampler_plan, walk
from scidiff.diffusion.samplers import predictor, run_plan
from scidiff.models import ScIDiffModel
from scidiff.training import ScIDiffTrainer, load_model, read_checkpoint, save_model
from scidiff.training.checkpoint import save_student
from scidiff.training.distillation import distil, halving_rounds

T = 100


def two_groups(n: int = 256, genes: int = 10, seed: int = 0) -> CellData:
    """Two Gaussian groups ``A`` (all genes at 0) and ``B`` (genes at -1 and +1 in turn), sd 0.4."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(n) % 2
    centers = torch.stack([torch.zeros(genes), torch.ones(genes)])
    centers[1, ::2] = -1.0
    x = centers[groups] + 0.4 * torch.randn(n, genes, generator=g)
    labels = ["A", "B"]
    spec = DataSpec(gene_names=[f"g{i}" for i in range(genes)], categorical={"group": labels})
    obs = pd.DataFrame({"group": [labels[int(k)] for k in groups]}, index=[f"c{i}" for i in range(n)])
    return CellData(x.float(), {"group": groups}, spec, obs)


def tiny_model(data: CellData) -> ScIDiffModel:
    torch.manual_seed(0)
    return ScIDiffModel.from_data(data, latent_dim=4, hidden_dim=32, num_layers=2, num_timesteps=T,
                                  conditioning_dim=16)


@pytest.fixture(scope="module")
def distilled():
    """A tiny teacher trained for 30 epochs (~2 s) and distilled 64 -> 4 steps (~4 s), on one thread
    (tensors this small gain nothing from more, and lose much when other jobs hold the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = two_groups()
        model = tiny_model(data)
        ScIDiffTrainer(model, data.loader(batch_size=64, seed=0), device="cpu", learning_rate=3e-3, warmup_steps=5,
                       ema_decay=0.99, early_stopping_patience=None, progress=False, seed=0).train(num_epochs=30)
        model.eval()
        model.student = distil(model, data, steps=4, start_steps=64, iterations_per_round=150, batch_size=128,
                               learning_rate=1e-3, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, data


# -- (a) the target --------------------------------------------------------------------------------
def test_the_grids_of_the_rounds_nest():
    for steps in (64, 32, 16, 8, 4, 2):
        assert halving_timesteps(1000, steps)[::2] == halving_timesteps(1000, steps // 2)
        assert halving_timesteps(T, steps)[::2] == halving_timesteps(T, steps // 2)
    assert halving_timesteps(1000, 1) == [999] and halving_timesteps(1000, 4) == [999, 749, 499, 249]
    assert halving_rounds(4, 64, 1000) == [32, 16, 8, 4] and halving_rounds(1, 2, 1000) == [1]


@pytest.mark.parametrize("i", [0, 1, 3])  # the first, a middle and the last student step (onto clean data)
def test_one_student_step_to_the_target_lands_where_two_teacher_steps_do(i):
    """Closed form: the x0-target of Salimans & Ho (Alg. 2) makes one DDIM step from ``z_t`` equal
    the teacher's two DDIM steps, each computed here by the package's own DDIM plan and walker."""
    data = two_groups(64)
    model = tiny_model(data).eval()
    ab = alphas_cumprod_of(model.scheduler)
    teacher_ts = halving_timesteps(T, 8)
    grid = TeacherGrid.of(model.scheduler, 8)
    g = torch.Generator().manual_seed(i)
    z_t = torch.randn(64, model.diffusion_dim, generator=g)
    cond = {"group": data.covariates["group"]}
    rows = torch.full((64,), i)

    with torch.no_grad():
        two_steps = walk(ddim_plan(ab, teacher_ts[2 * i:2 * i + 3])[:2], z_t, predictor(model, cond))
        assert torch.allclose(two_teacher_steps(model, z_t, rows, grid, cond), two_steps, atol=1e-5)
        target = student_target(model, z_t, rows, grid, cond)
        one_step = walk(ddim_plan(ab, teacher_ts[2 * i:2 * i + 3:2])[:1], z_t, lambda x, t, k: target)
        assert torch.allclose(one_step, two_steps, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(target, model(z_t, torch.full((64,), teacher_ts[2 * i]), cond), atol=1e-3)


def test_x0_target_inverts_the_ddim_step():
    g = torch.Generator().manual_seed(0)
    z_t, x0 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    ab_t, ab_s = torch.full((5, 1), 0.3, dtype=torch.float64), torch.full((5, 1), 0.9, dtype=torch.float64)
    assert torch.allclose(x0_target(z_t, ddim_step(z_t, x0, ab_t, ab_s), ab_t, ab_s), x0, atol=1e-5)


# -- (b) the distilled student ---------------------------------------------------------------------
def _group_samples(model, sampler_kwargs, group: str, n: int, seed: int) -> torch.Tensor:
    return model.sample(n, {"group": group}, seed=seed, return_expression=False, observed=False, **sampler_kwargs)


def test_the_student_follows_the_many_step_teacher_better_than_its_own_few_steps(distilled):
    """Same noise, same condition: the student's 4 steps land much nearer the teacher's 64-step
    DDIM (what was distilled) than the teacher's own 4 DDIM steps do, on the student's grid or
    on the default one; and each group's mean matches the teacher's to within half the standard
    error of a group mean of these cells (sd / sqrt(n) per gene), so no comparison of n cells
    could tell them apart, while the teacher's own 4 steps miss by more than that."""
    model, data = distilled
    ab = alphas_cumprod_of(model.scheduler)
    n = 256
    for code, group in enumerate(["A", "B"]):
        cond = {"group": torch.full((n,), code)}
        x_T = torch.randn(n, model.diffusion_dim, generator=torch.Generator().manual_seed(code))
        with torch.no_grad():
            many = model.decode(run_plan(model, x_T, ddim_plan(ab, halving_timesteps(T, 64)), cond=cond))
            own_grid = model.decode(run_plan(model, x_T, ddim_plan(ab, halving_timesteps(T, 4)), cond=cond))
        student = _group_samples(model, {"sampler": "distilled"}, group, n, code)
        default_grid = _group_samples(model, {"sampler": "ddim", "steps": 4}, group, n, code)
        mse = {k: float(((v - many) ** 2).mean())
               for k, v in {"student": student, "own": own_grid, "default": default_grid}.items()}
        assert mse["student"] < 0.25 * min(mse["own"], mse["default"]), mse
        half_se = 0.5 * data.x[data.covariates["group"] == code].std(0) / n ** 0.5
        assert ((student.mean(0) - many.mean(0)).abs() < half_se).all(), (student.mean(0) - many.mean(0), half_se)
        assert ((own_grid.mean(0) - many.mean(0)).abs() > half_se).any()


def test_guided_and_unconditional_sampling_work_with_the_student(distilled):
    model, _ = distilled
    guided = model.sample(64, {"group": "B"}, sampler="distilled", guidance_scale=2.0, seed=0,
                          return_expression=False, observed=False)
    free = model.sample(64, sampler="distilled", seed=0, return_expression=False, observed=False)
    assert torch.isfinite(guided).all() and torch.isfinite(free).all()
    assert not torch.allclose(guided, free)


def test_the_report_has_one_row_per_round(distilled):
    model, _ = distilled
    rounds = model.student.rounds
    assert [r["steps"] for r in rounds] == [32, 16, 8, 4] and [r["teacher_steps"] for r in rounds] == [64, 32, 16, 8]
    assert all(r["iterations"] == 150 and np.isfinite(r["final_loss"]) and r["seconds"] > 0 for r in rounds)


def test_going_on_from_a_student_is_the_same_as_distilling_through_it(distilled):
    """``initial``: the 4-step student halved to 2 runs exactly the rounds a 64 -> 2 distillation
    runs after its 4-step round, from the same parameters: one round, teacher = the student."""
    model, data = distilled
    kw = dict(iterations_per_round=3, batch_size=32, progress=False, seed=1)
    two = distil(model, data, steps=2, initial=model.student, **kw)
    assert two.steps == 2 and [r["steps"] for r in two.rounds] == [32, 16, 8, 4, 2]
    from_scratch_of_the_round = distil_round_from(model, model.student, data, kw)
    assert all(torch.equal(two.parameters[k], v) for k, v in from_scratch_of_the_round.items())


def distil_round_from(model, student, data, kw):
    """The one round 4 -> 2 with the student as the teacher, written out (what ``initial`` must run)."""
    from scidiff.training.distillation import _batches, distil_round  # lazy: internals of this one check

    generator = torch.Generator().manual_seed(kw["seed"])
    params, _ = distil_round(model, student.parameters, _batches(data, kw["batch_size"], kw["seed"]), 2,
                             iterations=kw["iterations_per_round"], learning_rate=1e-4, gradient_clip_val=1.0,
                             generator=generator)
    return params


def test_distillation_leaves_the_teacher_unchanged():
    data = two_groups(64)
    model = tiny_model(data).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student = distil(model, data, steps=2, start_steps=4, iterations_per_round=3, batch_size=32, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(student.parameters[k], p) for k, p in model.named_parameters())


# -- (c) checkpoints -------------------------------------------------------------------------------
def test_the_student_survives_a_checkpoint_bit_for_bit(distilled, tmp_path):
    model, _ = distilled
    path = save_model(model, tmp_path / "model.pt")
    loaded = load_model(path)
    assert loaded.student.steps == 4 and loaded.student.rounds == model.student.rounds
    assert loaded.student.parameters.keys() == model.student.parameters.keys()
    assert all(torch.equal(v, model.student.parameters[k]) for k, v in loaded.student.parameters.items())
    kw = dict(sampler="distilled", seed=3, return_expression=False, observed=False)
    assert torch.equal(loaded.sample(32, {"group": "A"}, **kw), model.sample(32, {"group": "A"}, **kw))


def test_a_checkpoint_without_a_student_loads_as_before_and_gains_one_in_place(distilled, tmp_path):
    model, _ = distilled
    student, model.student = model.student, None
    try:
        path = save_model(model, tmp_path / "model.pt", training={"epoch": 7})
    finally:
        model.student = student
    assert "student" not in read_checkpoint(path) and load_model(path).student is None
    assert save_student(path, student) == path
    payload = read_checkpoint(path)  # the digest is checked on reading
    assert payload["training"] == {"epoch": 7}
    assert all(torch.equal(v, student.parameters[k]) for k, v in load_model(path).student.parameters.items())


def test_a_student_that_does_not_fit_its_model_is_refused(distilled, tmp_path):
    model, _ = distilled
    bad = Student(4, {k: v for k, v in model.student.parameters.items() if not k.startswith("score.")})
    path = save_student(save_model(model, tmp_path / "m.pt"), bad)  # replaces the student there
    with pytest.raises(ValueError, match="holds a distilled student this scidiff cannot use.*missing"):
        load_model(path)


# -- (d) errors ------------------------------------------------------------------------------------
def test_sampling_without_a_student_says_how_to_distil():
    model = tiny_model(two_groups(32))
    with pytest.raises(ValueError, match="no distilled student for sampler='distilled': distil one with `scidiff distil"):
        model.sample(4, sampler="distilled")


def test_sampling_in_other_steps_names_the_students(distilled):
    model, _ = distilled
    kw = dict(seed=0, return_expression=False, observed=False)
    own = model.sample(4, sampler="distilled", **kw)  # the default steps stand for the student's own
    assert torch.equal(own, model.sample(4, sampler="distilled", steps=4, **kw))
    assert torch.equal(own, model.sample(4, sampler="distilled", steps=None, **kw))
    with pytest.raises(ValueError, match=r"exactly 4 steps, not 8: leave steps at its default or pass 4"):
        model.sample(4, sampler="distilled", steps=8)
    with pytest.raises(ValueError, match="deterministic DDIM"):
        model.sample(4, sampler="distilled", eta=1.0)
    with pytest.raises(ValueError, match="halving grid"):
        sampler_plan("distilled", model.scheduler, 4, spacing="trailing")


@pytest.mark.parametrize("steps,start,match", [(4, 48, "power of two"), (4, 4, "power of two"),
                                                (3, 64, "power of two"), (4, 128, "exceeds the schedule's 100")])
def test_rounds_that_do_not_halve_to_the_steps_are_refused(steps, start, match):
    data = two_groups(32)
    with pytest.raises(ValueError, match=match):
        distil(tiny_model(data), data, steps=steps, start_steps=start, progress=False)


# -- the command line ------------------------------------------------------------------------------
def test_the_distil_command_writes_the_student_into_the_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(0)
    counts = rng.poisson(np.r_[np.full(20, 2.0), np.full(20, 6.0)][:, None] * np.ones(12), size=(40, 12))
    adata = ad.AnnData(counts.astype(np.float32), obs=pd.DataFrame({"group": ["A"] * 20 + ["B"] * 20},
                                                                   index=[f"c{i}" for i in range(40)]))
    adata.var_names = [f"g{i}" for i in range(12)]
    adata.write_h5ad(tmp_path / "train.h5ad")
    torch.manual_seed(0)
    model = ScIDiffModel.from_data(setup_anndata(adata, condition_keys=["group"], n_top_genes=None), latent_dim=4,
                                   hidden_dim=16, num_layers=1, num_timesteps=T, conditioning_dim=8)
    path = save_model(model, tmp_path / "run")
    assert main(["distil", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "train.h5ad"), "--steps", "2",
                 "--start-steps", "8", "--iterations", "3", "--batch-size", "16", "--device", "cpu"]) == 0
    assert f"wrote a 2-step student into {path}" in capsys.readouterr().out
    loaded = load_model(path)
    assert loaded.student.steps == 2 and [r["steps"] for r in loaded.student.rounds] == [4, 2]
    assert loaded.sample(3, {"group": "B"}, sampler="distilled", seed=0).shape == (3, 12)
    out = tmp_path / "other" / "model.pt"
    assert main(["distil", "--model", path, "--data", str(tmp_path / "train.h5ad"), "--steps", "1",
                 "--start-steps", "2", "--iterations", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert load_model(out).student.steps == 1 and load_model(path).student.steps == 2
    halved = tmp_path / "halved.pt"  # going on from the 2-step student: one more round, the report continued
    assert main(["distil", "--model", path, "--data", str(tmp_path / "train.h5ad"), "--steps", "1", "--from-student",
                 "--iterations", "2", "--device", "cpu", "--out", str(halved)]) == 0
    assert [r["steps"] for r in load_model(halved).student.rounds] == [4, 2, 1]
    assert main(["distil", "--model", path, "--data", str(tmp_path / "train.h5ad"), "--steps", "4",
                 "--start-steps", "6", "--device", "cpu"]) == 2
    assert "power of two" in capsys.readouterr().err


# -- the student everywhere cells are sampled: engine, generation, ONNX, server ---------------------
@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    """A run folder whose checkpoint holds a 2-step student, trained on counts of two groups."""
    folder = tmp_path_factory.mktemp("distilled_run")
    rng = np.random.default_rng(0)
    means = np.r_[np.full(60, 2.0), np.full(60, 8.0)][:, None] * np.linspace(0.5, 1.5, 12)
    adata = ad.AnnData(rng.poisson(means).astype(np.float32),
                       obs=pd.DataFrame({"group": ["A"] * 60 + ["B"] * 60}, index=[f"c{i}" for i in range(120)]))
    adata.var_names = [f"g{i}" for i in range(12)]
    adata.write_h5ad(folder / "train.h5ad")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = setup_anndata(adata, condition_keys=["group"], n_top_genes=None)
        torch.manual_seed(0)
        model = ScIDiffModel.from_data(data, latent_dim=4, hidden_dim=16, num_layers=1, num_timesteps=T,
                                       conditioning_dim=8)
        ScIDiffTrainer(model, data.loader(batch_size=40, seed=0), device="cpu", learning_rate=3e-3,
                       early_stopping_patience=None, progress=False, seed=0).train(num_epochs=5)
        model.eval()
        model.student = distil(model, data, steps=2, start_steps=8, iterations_per_round=20, batch_size=40,
                               progress=False)
    finally:
        torch.set_num_threads(threads)
    save_model(model, folder / "run")
    return folder, load_model(folder / "run")


def test_the_engine_samples_the_student_as_model_sample_does(distilled_run):
    """fp32 on the CPU: the engine's distilled sampler walks the student's plan with the student's
    parameters, so it reproduces ``model.sample(sampler="distilled")`` to float rounding, and not
    the teacher's cells on the same grid."""
    from scidiff.engine import SamplingEngine  # lazy: the engine module is only needed here

    _, model = distilled_run
    kw = dict(seed=5, return_expression=False, observed=False)
    engine = SamplingEngine(model, "distilled", dtype=torch.float32, chunk_size=16)
    assert engine.steps == 2 and len(engine.plan) == 2 and [st.t for st in engine.plan] == halving_timesteps(T, 2)
    fast = engine.sample(40, {"group": "B"}, **kw)
    assert torch.allclose(fast, model.sample(40, {"group": "B"}, sampler="distilled", **kw), atol=1e-5)
    teacher = SamplingEngine(model, "ddim", 2, spacing="halving", dtype=torch.float32, chunk_size=16)
    assert (teacher.sample(40, {"group": "B"}, **kw) - fast).abs().max() > 1e-3
    with pytest.raises(ValueError, match="exactly 2 steps, not 3"):
        SamplingEngine(model, "distilled", 3)


@pytest.mark.parametrize("engine", [False, True])
def test_scidiff_sample_with_the_distilled_sampler_records_it(distilled_run, tmp_path, engine, capsys):
    folder, model = distilled_run
    out = tmp_path / "cells.h5ad"
    args = ["sample", "--model", str(folder / "run"), "-n", "7", "--condition", "group=B", "--sampler", "distilled",
            "--seed", "2", "--smooth", "--out", str(out)] + (["--engine"] if engine else [])
    assert main(args) == 0, capsys.readouterr().err
    cells = ad.read_h5ad(out)
    info = cells.uns["scidiff"]
    assert cells.shape == (7, 12) and info["sampler"] == "distilled" and int(info["steps"]) == 2
    if not engine:  # the plain writer: exactly model.sample's cells for that seed
        expected = model.sample(7, {"group": "B"}, sampler="distilled", observed=False,
                                generator=torch.Generator().manual_seed(2))
        np.testing.assert_allclose(np.asarray(cells.X), expected.numpy(), atol=1e-6)
    assert main(args[:-2 - engine] + ["--steps", "8", "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "exactly 2 steps, not 8" in capsys.readouterr().err


def test_the_student_exports_to_onnx_and_serves(distilled_run, tmp_path):
    """``export_onnx(sampler="distilled")``: the graph carries the student, onnxruntime's distilled
    run from the same x_T lands on torch's, the export offers the distilled sampler alone (and a
    teacher's export not at all), and the server generates with it."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from scidiff.export.onnx import export_onnx  # lazy: onnx is an optional extra
    from scidiff.export.runtime import OnnxSampler  # lazy: onnxruntime is an optional extra

    _, model = distilled_run
    result = export_onnx(model, tmp_path / "student.onnx", sampler="distilled")
    assert result["max_abs_error"] < 1e-4
    runtime = OnnxSampler(tmp_path / "student.onnx", threads=1)
    assert runtime.samplers == ["distilled"] and runtime.describe()["defaults"]["steps"] == 2
    x_T = np.random.default_rng(0).standard_normal((9, model.diffusion_dim)).astype(np.float32)
    z = runtime.sample(9, {"group": "A"}, seed=0, x_T=x_T, output="latent")
    cond = {"group": torch.zeros(9, dtype=torch.long)}
    with torch.no_grad():
        ref = run_plan(model.student.denoiser(model), torch.from_numpy(x_T), model.student.plan(model.scheduler),
                       cond=cond)
    np.testing.assert_allclose(z, ref.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="samples with 'distilled' only"):
        runtime.sample(2, sampler="ddim")
    with pytest.raises(ValueError, match="exactly 2 steps, not 4"):
        runtime.sample(2, steps=4)
    export_onnx(model, tmp_path / "teacher.onnx", check=False)
    with pytest.raises(ValueError, match="has no distilled student"):
        OnnxSampler(tmp_path / "teacher.onnx", threads=1).sample(2, sampler="distilled")

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient  # lazy: fastapi is an optional extra
    from scidiff.export.server import create_app  # lazy: fastapi is an optional extra

    with TestClient(create_app(runtime, max_cells=20)) as client:
        r = client.post("/generate", json={"n": 3, "condition": {"group": "B"}, "seed": 1})
        assert r.status_code == 200 and r.json()["sampler"] == "distilled" and r.json()["steps"] == 2
        assert np.asarray(r.json()["X"]).shape == (3, 12)
        r = client.post("/generate", json={"n": 3, "sampler": "dpmpp_2m"})
        assert r.status_code == 400 and "samples with 'distilled' only" in r.json()["detail"]
