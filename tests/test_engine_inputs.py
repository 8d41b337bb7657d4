"""The sampling engine's options and inputs as a first-time user passes them: bad values are
clear errors naming the option (never a crash deep in torch, never a silent default), GPU-only
options on a CPU say so, shared labels are encoded once (memory stays at one chunk), and the
kernels' corner cases (a narrow fixed tile with statistics, a NaN under the clamp) match their
references."""
import os
import sys
import types

import pytest
import torch

from scidiff import ops
from scidiff.engine import SamplingEngine, cpu_has_bf16
from test_engine import random_model


def tiny_model(**kwargs):
    return random_model(**{"gene_dim": 12, "hidden_dim": 32, "num_timesteps": 50, **kwargs})


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True, "8"])
def test_engine_refuses_chunk_sizes_that_are_not_positive_integers(chunk_size):
    """0 used to fall back to 1,024 silently, -1 to fail in torch.cat, 2.5 to become 2."""
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        SamplingEngine(tiny_model(), "ddim", 3, chunk_size=chunk_size)
    assert SamplingEngine(tiny_model(), "ddim", 3, chunk_size=4.0).chunk_size == 4


@pytest.mark.parametrize("kwargs,match", [
    ({"threads": 0}, "threads must be a positive integer"), ({"threads": -1}, "threads must be a positive integer"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
    ({"clip": (1.0, 0.0)}, r"min <= max"), ({"clip": 1.0}, "clip must be a pair"),
    ({"dtype": "int8"}, "dtype='int8'"), ({"dtype": torch.int32}, "dtype=torch.int32"),
    ({"device": "gpu"}, "unknown device 'gpu'"),
])
def test_engine_refuses_bad_options_naming_them(kwargs, match):
    """NaN guidance gave NaN cells and clip=(1, 0) all-zero cells, silently."""
    with pytest.raises(ValueError, match=match):
        SamplingEngine(tiny_model(), "ddim", 3, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's messages")
def test_gpu_options_without_cuda_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="CUDA is not available"):  # was an AssertionError from torch
        SamplingEngine(model, "ddim", 3, device="cuda")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        SamplingEngine(model, "ddim", 3, cuda_graph=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's rule")
def test_engine_and_load_model_read_devices_by_one_rule(tmp_path):
    """One resolver (scidiff.ops.device): 'auto' and ' cpu ' are devices to both (the engine refused
    'auto'); a CUDA request without CUDA is refused by the engine (asked to be fast on it) and falls back
    to the CPU with a warning in load_model; an unknown name is the same error in both."""
    from scidiff.training.checkpoint import load_model, save_model
    model = tiny_model()
    assert SamplingEngine(model, "ddim", 3, device="auto").device == torch.device("cpu")
    assert SamplingEngine(model, "ddim", 3, device=" cpu ").device == torch.device("cpu")
    path = save_model(model, tmp_path / "m.pt")
    with pytest.warns(UserWarning, match="CUDA was requested but is not available"):
        assert next(load_model(path, map_location="cuda").parameters()).device == torch.device("cpu")
    for make in (lambda: SamplingEngine(model, "ddim", 3, device="gpu"), lambda: load_model(path, map_location="gpu")):
        with pytest.raises(ValueError, match="unknown device 'gpu'"):
            make()


def test_dtype_names_give_the_same_cells_as_torch_dtypes():
    """``dtype="fp32"`` (or "bf16", "fp16") used to fail with "Invalid device string"."""
    model = tiny_model()
    ref = SamplingEngine(model, "ddim", 3, dtype=torch.float32).sample(5, {"c": 1}, seed=2)
    named = SamplingEngine(model, "ddim", 3, dtype="fp32")
    assert named.dtype == torch.float32 and named.score.input.weight.dtype == torch.float32
    torch.testing.assert_close(named.sample(5, {"c": 1}, seed=2), ref, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="emulated") if not cpu_has_bf16() else _no_warning():
        half = SamplingEngine(model, "ddim", 3, dtype="bf16")
    assert half.dtype == torch.bfloat16 and half.score.input.weight.dtype == torch.bfloat16
    assert float((half.sample(5, {"c": 1}, seed=2) - ref).norm() / ref.norm()) < 0.02


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cpu_has_bf16_asks_for_the_bf16_instructions_on_x86(monkeypatch):
    """oneDNN's check says yes on plain AVX-512 (bf16 emulated: slower than fp32), so the
    engine's ``auto`` dtype chose bf16 there."""
    import platform

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not cpu_has_bf16()
    assert SamplingEngine(tiny_model(), "ddim", 3).dtype == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cpu_has_bf16()


@pytest.mark.parametrize("n", [0, 2.0, True, "3"])
def test_stream_refuses_cell_counts_that_are_not_positive_integers(n):
    with pytest.raises(ValueError, match="n must be an integer number of cells"):
        SamplingEngine(tiny_model(), "ddim", 3).sample(n, {"c": 1})


def test_stream_refuses_seed_and_generator_together():
    with pytest.raises(ValueError, match="seed or generator"):
        SamplingEngine(tiny_model(), "ddim", 3).sample(2, {"c": 1}, seed=1, generator=torch.Generator())


def test_stream_encodes_shared_labels_once_not_for_all_cells(monkeypatch):
    """``stream(n)`` encoded the labels for all ``n`` cells up front ([n, P] multi-hot rows for a
    perturbation): memory grew with ``n``, not with the chunk. Shared labels are now encoded as one
    row; per-cell labels still give ``model.sample``'s cells chunk by chunk."""
    model = tiny_model(covariates={"c": 3}, perturbations={"drug": 5})
    engine = SamplingEngine(model, "ddim", 3, dtype=torch.float32, chunk_size=4)
    sizes = []
    encode = engine.model.encode_conditioning
    monkeypatch.setattr(engine.model, "encode_conditioning", lambda cond, b: sizes.append(b) or encode(cond, b))
    first = next(engine.stream(100_000, {"c": 1, "drug": 2}, seed=0))  # was [100,000, 6] floats up front
    assert first.shape == (4, 12) and max(sizes) <= 4
    sizes.clear()
    out = engine.sample(7, {"c": 1, "drug": 2}, seed=3)
    gen, ref = torch.Generator().manual_seed(3), []
    for b in (4, 3):
        ref.append(model.sample(b, {"c": 1, "drug": 2}, sampler="ddim", steps=3, generator=gen))
    torch.testing.assert_close(out, torch.cat(ref), atol=2e-5, rtol=2e-5)
    per_cell = {"c": torch.tensor([0, 1, 2, 1, 0]), "drug": torch.tensor([0, 1, 2, 3, -1])}
    out = engine.sample(5, per_cell, seed=3)
    gen, ref = torch.Generator().manual_seed(3), []
    for a, b in ((0, 4), (4, 5)):
        ref.append(model.sample(b - a, {k: v[a:b] for k, v in per_cell.items()}, sampler="ddim", steps=3,
                                generator=gen))
    torch.testing.assert_close(out, torch.cat(ref), atol=2e-5, rtol=2e-5)


# -- the kernels -----------------------------------------------------------------------------------
def _interpreter():
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU kernels need TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("hidden", [33, 64])
def test_folded_linear_statistics_with_a_narrow_fixed_tile(hidden):
    """With ``stats_out`` and a given ``config`` whose BLOCK_N does not span the row, each tile
    wrote the statistics of its own columns only (rstd off by 2-50x, silently)."""
    device = _interpreter()
    kernel = ops.load_kernel("modulated_block")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, hidden, generator=g).to(device)
    weight, bias = (torch.randn(hidden, hidden, generator=g) / hidden ** 0.5).to(device), torch.zeros(hidden).to(device)
    shift, scale, gate = (0.3 * torch.randn(1, hidden, generator=g).to(device) for _ in range(3))
    weight_t, u, v = ops.fold_layer_norm(weight, bias, shift, scale)
    mean, rstd = kernel.row_stats(h)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}
    out, out_mean, out_rstd = kernel.folded_linear(h, mean, rstd, weight_t[0], u[0], v[0], gate[0], stats_out=True,
                                                   config=config)
    ref_mean, ref_rstd = ops.row_stats_reference(out)
    torch.testing.assert_close(out, ops.modulated_block_reference(h, shift, scale, gate, weight, bias),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_mean, ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_rstd, ref_rstd, atol=1e-5, rtol=1e-5)


def test_sampler_step_kernel_keeps_a_nan_prediction_under_the_clamp():
    """The kernel's clamp turned a NaN prediction into the lower bound (the reference keeps NaN),
    hiding a diverged sample as a plausible value."""
    device = _interpreter()
    kernel = ops.load_kernel("sampler_step")
    x = torch.zeros(3, 5, device=device)
    pred = torch.tensor([[float("nan"), 2.0, -2.0, 0.5, float("nan")]] * 3, device=device)
    coef = torch.tensor([0.5, 1.0, 0.0, 0.0], device=device)
    out, x0 = kernel.sampler_step(x, pred, None, None, coef, 1.0, -1.0, 1.0)
    ref_out, ref_x0 = ops.sampler_step_reference(x, pred, None, None, coef, 1.0, -1.0, 1.0)
    torch.testing.assert_close(x0, ref_x0, equal_nan=True)
    torch.testing.assert_close(out, ref_out, equal_nan=True)
    assert bool(torch.isnan(x0[:, 0]).all()) and x0[0, 1] == 1.0 and x0[0, 2] == -1.0


def test_dispatch_refuses_kernels_compiled_before_the_interpreter(monkeypatch):
    """A kernel module imported before TRITON_INTERPRET=1 was set is compiled for a GPU: with CPU
    tensors it failed deep in Triton ("0 active drivers"); now a clear error."""
    pytest.importorskip("triton", reason="needs triton")
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the kernels are compiled for it: the CPU interpreter case only")
    from triton.runtime.jit import JITFunction

    def probe(x_ptr):
        pass

    module = types.ModuleType("scidiff.kernels._compiled_probe")
    module.probe = JITFunction(probe)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setenv("SCIDIFF_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=r"loaded before TRITON_INTERPRET=1"):
        ops.use_triton(torch.zeros(2))
    monkeypatch.delitem(sys.modules, module.__name__)
    assert ops.use_triton(torch.zeros(2))  # the interpreted kernels of this process run


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "2", None, True])
def test_one_guidance_check_serves_the_wrapper_the_model_and_the_engine(weight):
    """classifier_free_guidance took a NaN weight (every prediction NaN); model.sample took the text '2'
    that the engine refused. One check (diffusion.guidance.guidance_weight) for the three."""
    from scidiff.diffusion.guidance import classifier_free_guidance
    model = tiny_model()
    makers = [lambda: classifier_free_guidance(lambda x, t, c: x, weight),
              lambda: model.sample(2, {"c": 1}, steps=2, guidance_scale=weight),
              lambda: SamplingEngine(model, "ddim", 3, guidance_scale=weight)]
    for make in makers:
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            make()
