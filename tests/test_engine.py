"""The sampling engine gives the plain sampler's samples (same seed) on CPU, in fp32 to float
rounding and in bf16 to a stated tolerance; it streams chunks to an .h5ad; on a GPU it captures
the loop in a CUDA graph."""
import os

import numpy as np
import pytest
import torch

from scidiff.models import ScIDiffModel
from scidiff.diffusion.samplers import SAMPLERS
from scidiff.engine import SamplingEngine
from scidiff.tasks.generate import generate_to_file


def random_model(**kwargs):
    """A small model with every weight random (the zero init would hide most of the network)."""
    torch.manual_seed(0)
    kw = dict(gene_dim=40, hidden_dim=64, num_layers=2, num_timesteps=200, covariates={"c": 3})
    kw.update(kwargs)
    model = ScIDiffModel(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    if model.latent_dim:
        model.fit_latent(torch.randn(200, kw["gene_dim"]) * torch.linspace(0.2, 2, kw["gene_dim"]))
    return model


def plain_chunks(model, cond, sizes, seed, **kw):
    """model.sample on consecutive chunks with one generator, as scidiff.generate does."""
    gen, out, start = torch.Generator().manual_seed(seed), [], 0
    for b in sizes:
        out.append(model.sample(b, {k: v[start:start + b] for k, v in cond.items()}, generator=gen, **kw))
        start += b
    return torch.cat(out)


MIXED = {"c": torch.tensor([0, 1, 2, 1, 0, 2, 2])}  # three distinct conditions
SAME = {"c": torch.tensor([1] * 7)}  # one condition: modulations computed once and broadcast


@pytest.mark.parametrize("sampler,steps", [("ddim", 12), ("ddpm", 12), ("dpmpp_2m", 10), ("heun", 6),
                                           ("euler_maruyama", 15)])
@pytest.mark.parametrize("cond", [MIXED, SAME], ids=["mixed", "same"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_fp32_engine_reproduces_model_sample(sampler, steps, cond, guidance):
    model = random_model()
    engine = SamplingEngine(model, sampler, steps, guidance_scale=guidance, dtype=torch.float32, chunk_size=4)
    out = engine.sample(7, cond, seed=3)
    ref = plain_chunks(model, cond, [4, 3], 3, sampler=sampler, steps=steps, guidance_scale=guidance)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_fp32_engine_reproduces_a_latent_model_with_ddim_eta():
    model = random_model(latent_dim=8)
    engine = SamplingEngine(model, "ddim", 10, eta=0.5, dtype=torch.float32)
    torch.testing.assert_close(engine.sample(6, {"c": 2}, seed=4),
                               model.sample(6, {"c": 2}, sampler="ddim", steps=10, eta=0.5, seed=4),
                               atol=2e-5, rtol=2e-5)


def test_fp32_engine_reproduces_a_perturbation_model():
    """The additive perturbation response (and its dose) enters the engine as in the model."""
    model = random_model(gene_dim=30, hidden_dim=32, num_timesteps=100, covariates={"ct": 2},
                         continuous_covariates=["dose"], perturbations={"drug": 3}, dose_key="dose")
    cond = {"ct": torch.tensor([0, 1, 1, 0]), "drug": torch.tensor([0, 1, 2, -1]),
            "dose": torch.tensor([1.0, 10.0, 100.0, 0.0])}
    for guidance in (1.0, 2.0):
        out = SamplingEngine(model, "dpmpp_2m", 8, guidance_scale=guidance, dtype=torch.float32).sample(4, cond, seed=1)
        ref = model.sample(4, cond, sampler="dpmpp_2m", steps=8, guidance_scale=guidance, seed=1)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_bf16_engine_stays_within_one_percent_of_fp32(sampler):
    """bf16 rounds the network's activations (8 bits of mantissa); the samples move by about
    0.1-0.2% of their norm on this model, the stated tolerance is 1%."""
    model = random_model()
    steps = 12 if sampler != "heun" else 6
    cond = {"c": MIXED["c"].repeat(10)[:64]}
    ref = model.sample(64, cond, sampler=sampler, steps=steps, seed=5)
    out = SamplingEngine(model, sampler, steps, dtype=torch.bfloat16).sample(64, cond, seed=5)
    assert float((out - ref).norm() / ref.norm()) < 0.01


@pytest.mark.parametrize("cond,guidance,folded", [({"c": torch.tensor([0, 2, 2])}, 1.5, 0), ({"c": 1}, 1.0, 1),
                                                  ({"c": 1}, 1.5, 2)],
                         ids=["modulation-per-row", "shared-modulation", "guided-shared-modulation"])
def test_engine_with_the_triton_kernels_matches_the_reference_path(monkeypatch, cond, guidance, folded):
    """Both kernels inside the real loop (the Triton interpreter on CPU, small shapes); one
    condition takes the folded network (with guidance: one folded block per half of the rows)."""
    pytest.importorskip("triton", reason="needs triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU kernels need TRITON_INTERPRET=1")
    model = random_model(gene_dim=24, hidden_dim=32)
    ref = SamplingEngine(model, "ddpm", 4, guidance_scale=guidance, dtype=torch.float32).sample(3, cond, seed=2)
    monkeypatch.setenv("SCIDIFF_KERNELS", "triton")
    engine = SamplingEngine(model, "ddpm", 4, guidance_scale=guidance, dtype=torch.float32)
    calls = []
    forward_folded = engine.score.forward_folded
    monkeypatch.setattr(engine.score, "forward_folded",
                        lambda x, *a, **k: calls.append(len(x)) or forward_folded(x, *a, **k))
    out = engine.sample(3, cond, seed=2, to_cpu=False)  # the engine's device (here the CPU)
    assert out.device == engine.device
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert calls == [3] * (folded * 4)  # rows per folded block, per block and step


def test_folded_network_equals_the_network_for_shared_modulations():
    """``ScoreNetwork.forward_folded`` (LayerNorm folded into each weight, per plan step) gives
    the plain forward's output for every step row, in float64 on the reference path."""
    score = random_model(hidden_dim=48, num_layers=3).score.double()
    emb = torch.randn(5, score.emb_dim, dtype=torch.float64)  # five "steps", shared by all cells
    folded = score.fold(score.modulations(emb))
    x = torch.randn(7, score.gene_dim, dtype=torch.float64)
    for row in range(5):
        expected = score(x, emb[row:row + 1].expand(7, -1))
        torch.testing.assert_close(score.forward_folded(x, folded, row), expected, rtol=1e-9, atol=1e-9)
    # with a perturbation response as the second input
    model = random_model(gene_dim=30, hidden_dim=32, covariates={"ct": 2}, perturbations={"drug": 3})
    score = model.score.double()
    response = torch.randn(7, score.response_input.in_features, dtype=torch.float64)
    folded = score.fold(score.modulations(emb[:, :score.emb_dim]))
    x = torch.randn(7, score.gene_dim, dtype=torch.float64)
    torch.testing.assert_close(score.forward_folded(x, folded, 2, response),
                               score(x, emb[2:3, :score.emb_dim].expand(7, -1), response), rtol=1e-9, atol=1e-9)


def test_engine_streams_chunks_into_an_h5ad(tmp_path, kang_small):
    import anndata as ad

    import scidiff

    data = scidiff.setup_anndata(kang_small, n_top_genes=30, condition_keys=["cell_type", "condition"])
    model = ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100, latent_dim=8)
    engine = SamplingEngine(model, "dpmpp_2m", 6, dtype=torch.float32, chunk_size=16)
    groups = [{"cell_type": "B", "condition": "stimulated"}, {"cell_type": "NK", "condition": "control"}]
    out = tmp_path / "gen.h5ad"
    cells, genes = generate_to_file(engine, 40, out, groups, seed=7, progress=False, observed=False)
    assert (cells, genes) == (80, 30) and sorted(os.listdir(tmp_path)) == ["gen.h5ad"]
    read = ad.read_h5ad(out)
    assert list(read.var_names) == list(data.spec.gene_names)
    assert read.obs["cell_type"].tolist() == ["B"] * 40 + ["NK"] * 40
    assert read.obs_names[0] == "generated_0-0" and read.uns["scidiff"]["sampler"] == "dpmpp_2m"
    assert not read.uns["scidiff"]["observed"] and read.uns["scidiff"]["expression"].endswith(", smooth")
    for i, g in enumerate(groups):  # each group is what engine.sample gives with seed + i
        np.testing.assert_allclose(read.X[40 * i:40 * (i + 1)], engine.sample(40, g, seed=7 + i, observed=False).numpy(),
                                   atol=1e-6)
    # and, chunk for chunk, what model.sample gives (as generate_to_file without the engine would write)
    np.testing.assert_allclose(read.X[:40], plain_chunks_expr(model, groups[0], 40, 16, 7), atol=2e-5)
    with pytest.raises(ValueError, match="no such type"):
        generate_to_file(engine, 5, tmp_path / "bad.h5ad", [{"cell_type": "no such type"}], progress=False)
    assert not (tmp_path / "bad.h5ad").exists()


def plain_chunks_expr(model, cond, n, chunk, seed):
    gen, parts = torch.Generator().manual_seed(seed), []
    for start in range(0, n, chunk):
        parts.append(model.sample(min(chunk, n - start), cond, sampler="dpmpp_2m", steps=6, generator=gen,
                                  observed=False))
    return torch.cat(parts).numpy()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_engine_matches_model_sample_and_replays():
    model = random_model().cuda()
    cond = {"c": torch.tensor([0, 1, 2, 1] * 64)}
    ref = model.sample(256, cond, sampler="dpmpp_2m", steps=10, seed=1)
    engine = SamplingEngine(model, "dpmpp_2m", 10)
    assert engine.cuda_graph and engine.dtype == torch.bfloat16
    out = engine.sample(256, cond, seed=1)  # captures, then replays
    again = engine.sample(256, cond, seed=1)  # replays the captured graph
    assert len(engine._graphs) == 1
    torch.testing.assert_close(again, out)
    assert float((out - ref.cpu()).norm() / ref.norm()) < 0.01
    # a stochastic sampler draws its noise in the kernel, keyed per batch
    ddpm = SamplingEngine(model, "ddpm", 10)
    a, b = ddpm.sample(256, cond, seed=1), ddpm.sample(256, cond, seed=2)
    torch.testing.assert_close(a, ddpm.sample(256, cond, seed=1))
    assert not torch.allclose(a, b)
    # one condition with guidance: the folded network on each half of the rows
    guided = SamplingEngine(model, "dpmpp_2m", 10, guidance_scale=2.0)
    ref_guided = model.sample(256, {"c": 1}, sampler="dpmpp_2m", steps=10, guidance_scale=2.0, seed=4)
    assert float((guided.sample(256, {"c": 1}, seed=4) - ref_guided.cpu()).norm() / ref_guided.norm()) < 0.01
    plain = SamplingEngine(model, "ddpm", 10, dtype=torch.float32, cuda_graph=False)
    ref_ddpm = plain.sample(4096, {"c": 1}, seed=3)
    got = ddpm.sample(4096, {"c": 1}, seed=3)
    assert abs(float(got.mean() - ref_ddpm.mean())) < 0.05 and abs(float(got.std() / ref_ddpm.std()) - 1) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_engine_samples_the_distilled_student():
    """The student through the CUDA-graph path: the same cells as ``model.sample(sampler="distilled")``
    to bf16 rounding, the student's own parameters (not the teacher's: another student gives
    other cells), and the graph replayed."""
    from scidiff.diffusion.distillation import Student  # lazy: only this test builds students by hand

    model = random_model().cuda()
    g = torch.Generator().manual_seed(3)
    params = {k: (v + 0.05 * torch.randn(v.shape, generator=g).to(v)).detach() for k, v in model.named_parameters()}
    model.student = Student(4, params)
    cond = {"c": torch.tensor([0, 1, 2, 1] * 64)}
    ref = model.sample(256, cond, sampler="distilled", seed=1)
    engine = SamplingEngine(model, "distilled")
    assert engine.cuda_graph and len(engine.plan) == 4
    out, again = engine.sample(256, cond, seed=1), engine.sample(256, cond, seed=1)
    torch.testing.assert_close(again, out)
    assert float((out - ref.cpu()).norm() / ref.norm()) < 0.01
    model.student = Student(4, {k: v.detach().clone() for k, v in model.named_parameters()})
    own = SamplingEngine(model, "distilled").sample(256, cond, seed=1)
    assert float((own - out).norm() / out.norm()) > 0.01


def test_cli_sample_with_the_engine(tmp_path, kang_small):
    import anndata as ad

    import scidiff
    from scidiff.cli import main

    data = scidiff.setup_anndata(kang_small, n_top_genes=30, condition_keys=["cell_type", "condition"])
    model = ScIDiffModel.from_data(data, hidden_dim=32, num_layers=2, num_timesteps=100, latent_dim=8)
    with torch.no_grad():
        for p in model.score.parameters():
            p.normal_(0, 0.1)
    scidiff.save_model(model, tmp_path / "model.pt")
    outs = {}
    for flag in ([], ["--engine"]):
        out = tmp_path / f"gen{len(flag)}.h5ad"
        assert main(["sample", "--model", str(tmp_path / "model.pt"), "-n", "30", "--condition", "cell_type=B",
                     "--condition", "cell_type=NK", "--sampler", "dpmpp_2m", "--steps", "8", "--seed", "4",
                     "--smooth", "--out", str(out), *flag]) == 0
        outs[len(flag)] = ad.read_h5ad(out)
    plain, fast = outs[0], outs[1]
    assert list(fast.obs_names) == list(plain.obs_names) and list(fast.var_names) == list(plain.var_names)
    assert fast.obs["cell_type"].tolist() == plain.obs["cell_type"].tolist()
    # the same cells up to the engine's bf16 network (fp32 where the CPU has no bf16 units)
    assert np.linalg.norm(fast.X - plain.X) / np.linalg.norm(plain.X) < 0.01


@pytest.mark.parametrize("sampler,steps", [("ddim", 12), ("dpmpp_2m", 10), ("heun", 6)])
def test_the_engine_ends_where_the_model_does(sampler, steps):
    """A model whose generation ends above clean data (``final_sigma``): the engine walks the same
    plan as ``model.sample`` and gives the same cells; ``final_sigma=0`` asks for clean data."""
    model = random_model(latent_dim=8)
    model.final_sigma.fill_(0.3)
    engine = SamplingEngine(model, sampler, steps, dtype=torch.float32)
    out = engine.sample(6, {"c": 2}, seed=4)
    torch.testing.assert_close(out, model.sample(6, {"c": 2}, sampler=sampler, steps=steps, seed=4),
                               atol=2e-5, rtol=2e-5)
    clean = model.sample(6, {"c": 2}, sampler=sampler, steps=steps, seed=4, final_sigma=0.0)
    assert float((out - clean).abs().max()) > 1e-3
