"""The Triton kernels against their pure-torch references (odd shapes, a tolerance per dtype,
gradients), their custom-op registrations, and torch.compile over the model with them inside.

Without a GPU the kernels run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1
before any kernel import), so shapes stay small. With a GPU the same tests run on CUDA (``gpu``)."""
import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'triton==3.8.0')")

from scidiff import ops  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]
# max |kernel - float64 reference| / max |reference|, per dtype of the inputs
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setenv("SCIDIFF_KERNELS", "triton")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def block_inputs(b, h, dtype, device, rows_of_modulation=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = rows_of_modulation or b
    x = torch.randn(b, h, generator=g) * 2 + 0.5
    shift, scale, gate = (torch.randn(r, h, generator=g) * 0.5 for _ in range(3))
    weight = torch.randn(h, h, generator=g) / h**0.5
    bias = torch.randn(h, generator=g) * 0.1
    return [t.to(device=device, dtype=dtype) for t in (x, shift, scale, gate, weight, bias)]


# -- the fused block -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,mod_rows", [(3, 48, None), (70, 300, None), (5, 67, 1), (70, 300, 1)])
def test_modulated_block_forward_matches_reference(device, dtype, b, h, mod_rows):
    kernel = ops.load_kernel("modulated_block")
    args = block_inputs(b, h, dtype, device, mod_rows)
    out = kernel.modulated_block(*args)
    ref = ops.modulated_block_reference(*(a.double() for a in args))
    assert out.dtype == dtype and out.shape == (b, h)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_shared_modulation_kernel_keeps_layer_norm_exact_on_offset_rows(device, monkeypatch):
    """One modulation row takes the folded GEMM kernel, with two-pass row statistics: on rows far
    from zero mean (mean 1,000, std 1) the block's update matches the float64 reference to 1e-3
    in fp32, where a one-pass ``E[h^2] - E[h]^2`` variance is 9% off."""
    module = ops.load_kernel("modulated_block")
    calls = []
    shared = module._launch_shared
    monkeypatch.setattr(module, "_launch_shared", lambda *a: calls.append(1) or shared(*a))
    x, *rest = block_inputs(9, 200, torch.float32, device, rows_of_modulation=1, seed=5)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True) + 1000.0
    out = module.modulated_block(x, *rest)
    ref = ops.modulated_block_reference(x.double(), *(a.double() for a in rest))
    assert calls, "one modulation row must take the shared-modulation kernel"
    update, ref_update = out.double() - x.double(), ref - x.double()  # the residual would hide it
    assert float((update - ref_update).abs().max() / ref_update.abs().max()) < 1e-3


def test_folding_layer_norm_into_the_weight_is_exact():
    """``W (LN(h)(1 + scale) + shift) + b == rstd (h W' - mean u) + v`` per modulation row, in
    float64, for the block and for a non-square output layer."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(11, 40, generator=g, dtype=torch.float64) * 3 + 2
    shift, scale, gate = (torch.randn(4, 40, generator=g, dtype=torch.float64) for _ in range(3))
    for n in (40, 17):
        weight = torch.randn(n, 40, generator=g, dtype=torch.float64)
        bias = torch.randn(n, generator=g, dtype=torch.float64)
        weight_t, u, v = ops.fold_layer_norm(weight, bias, shift, scale)
        assert weight_t.shape == (4, 40, n) and u.shape == v.shape == (4, n)
        mean, rstd = ops.row_stats_reference(h, 1e-6)
        for s in range(4):
            z = torch.nn.functional.layer_norm(h, (40,), eps=1e-6) * (1 + scale[s]) + shift[s]
            expected = torch.nn.functional.linear(z, weight, bias)
            got = ops.folded_linear_reference(h, mean, rstd, weight_t[s], u[s], v[s], out_dtype=torch.float64)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            if n == 40:
                block = ops.modulated_block_reference(h, shift[s], scale[s], gate[s], weight, bias)
                got = ops.folded_linear_reference(h, mean, rstd, weight_t[s], u[s], v[s], gate[s],
                                                  out_dtype=torch.float64)
                torch.testing.assert_close(got, block, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,k,n,residual", [(3, 48, 48, True), (70, 300, 37, False), (5, 67, 67, True)])
def test_folded_linear_and_row_stats_kernels_match_reference(device, dtype, b, k, n, residual):
    kernel = ops.load_kernel("modulated_block")
    x, shift, scale, gate, _, _ = block_inputs(b, k, dtype, device, rows_of_modulation=1, seed=4)
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(device=device, dtype=dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(device=device, dtype=dtype)
    weight_t, u, v = ops.fold_layer_norm(weight, bias, shift, scale)
    mean, rstd = kernel.row_stats(x)
    ref_mean, ref_rstd = ops.row_stats_reference(x.double())
    assert float((mean - ref_mean).abs().max()) < 1e-5 and rel_err(rstd, ref_rstd) < 1e-5
    gate = gate[0] if residual else None
    out = kernel.folded_linear(x, mean, rstd, weight_t[0], u[0], v[0], gate, out_dtype=torch.float32)
    z = torch.nn.functional.layer_norm(x.double(), (k,), eps=1e-6) * (1 + scale.double()) + shift.double()
    ref = torch.nn.functional.linear(z, weight.double(), bias.double())
    if residual:
        ref = x.double() + gate.double() * torch.nn.functional.silu(ref)
    assert out.dtype == torch.float32 and out.shape == (b, n)
    assert rel_err(out, ref) < TOL[dtype]
    # the output rows' statistics from the epilogue: those of the rounded rows written
    out, out_mean, out_rstd = kernel.folded_linear(x, mean, rstd, weight_t[0], u[0], v[0], gate, stats_out=True)
    ref_mean, ref_rstd = ops.row_stats_reference(out.double())
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    assert float((out_mean - ref_mean).abs().max()) < 1e-5 * float(ref_mean.abs().max() + 1)
    assert rel_err(out_rstd, ref_rstd) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", range(8))
def test_every_folded_tile_config_is_right_at_the_engine_shape(config):
    """Each autotuned tile of the folded kernel at ``[16,384, 512]`` bf16 (the engine's shape), and
    the per-row block kernel there too: a miscompiled pipeline shows as wrong rows only at such
    sizes (reductions over the dot's operand inside the K loop did, on an H200)."""
    kernel = ops.load_kernel("modulated_block")
    x, shift, scale, gate, weight, bias = block_inputs(16384, 512, torch.bfloat16, "cuda", rows_of_modulation=1)
    weight_t, u, v = ops.fold_layer_norm(weight, bias, shift, scale)
    mean, rstd = kernel.row_stats(x)
    ref = ops.modulated_block_reference(*(a.double() for a in (x, shift, scale, gate, weight, bias)))
    if config == len(kernel.FOLDED_CONFIGS):  # the fixed tile that also writes the rows' statistics
        out, out_mean, out_rstd = kernel.folded_linear(x, mean, rstd, weight_t[0], u[0], v[0], gate[0],
                                                       stats_out=True)
        ref_mean, ref_rstd = ops.row_stats_reference(out.double())
        assert float((out_mean - ref_mean).abs().max()) < 1e-4 and rel_err(out_rstd, ref_rstd) < 1e-5
    else:
        c = kernel.FOLDED_CONFIGS[config]
        out = kernel.folded_linear(x, mean, rstd, weight_t[0], u[0], v[0], gate[0],
                                   config={**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    if config == 0:
        per_row = block_inputs(16384, 512, torch.bfloat16, "cuda", seed=6)
        ref = ops.modulated_block_reference(*(a.double() for a in per_row))
        assert rel_err(kernel.modulated_block(*per_row), ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,mod_rows", [(3, 48, None), (5, 67, 1)])
def test_modulated_block_gradients_match_reference(device, dtype, b, h, mod_rows, triton_kernels):
    args = [a.requires_grad_(True) for a in block_inputs(b, h, dtype, device, mod_rows, seed=1)]
    out = ops.modulated_block(*args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, args, grad_out)
    ref_args = [a.detach().double().requires_grad_(True) for a in args]
    ref_grads = torch.autograd.grad(ops.modulated_block_reference(*ref_args), ref_args, grad_out.double())
    for name, g, r, a in zip(("h", "shift", "scale", "gate", "weight", "bias"), grads, ref_grads, args):
        assert g.shape == a.shape and g.dtype == a.dtype, name
        assert rel_err(g, r) < 2 * TOL[dtype], name


@pytest.mark.parametrize("device", DEVICES)
def test_block_custom_op_registration(device, triton_kernels):
    """Schema, fake (meta) implementation and autograd registration, checked by torch itself."""
    args = block_inputs(4, 32, torch.float32, device)
    args = [a.requires_grad_(True) for a in args]
    torch.library.opcheck(torch.ops.scidiff.modulated_block.default, (*args, 1e-6),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("device", DEVICES)
def test_folded_custom_op_registrations(device, triton_kernels):
    """The row-statistics and folded-GEMM ops: schema and fake (meta) implementation checked by
    torch, and the dispatching calls go through them."""
    x, shift, scale, gate, weight, bias = block_inputs(5, 32, torch.float32, device, rows_of_modulation=1)
    weight_t, u, v = (t[0] for t in ops.fold_layer_norm(weight, bias, shift, scale))
    mean, rstd = ops.row_stats(x)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.scidiff.row_stats.default, (x, 1e-6), test_utils=checks)
    for g in (gate[0], None):
        torch.library.opcheck(torch.ops.scidiff.folded_linear.default, (x, mean, rstd, weight_t, u, v, g, None),
                              test_utils=checks)
        torch.library.opcheck(torch.ops.scidiff.folded_linear.default,
                              (x, mean, rstd, weight_t, u, v, g, torch.float64), test_utils=checks)
        torch.library.opcheck(torch.ops.scidiff.folded_linear_with_stats.default, (x, mean, rstd, weight_t, u, v, g),
                              test_utils=checks)
    out, out_mean, out_rstd = ops.folded_linear(x, mean, rstd, weight_t, u, v, gate[0], stats_out=True)
    ref = ops.folded_linear_reference(x, mean, rstd, weight_t, u, v, gate[0])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((out_mean, out_rstd), ops.row_stats_reference(ref), atol=1e-5, rtol=1e-5)


def test_dispatch_rules(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setenv("SCIDIFF_KERNELS", "torch")
    assert not ops.use_triton(x)
    monkeypatch.setenv("SCIDIFF_KERNELS", "auto")
    assert ops.use_triton(x) == (x.is_cuda and ops.HAS_TRITON)  # CPU tensors: the reference
    assert not ops.use_triton(x.double())
    monkeypatch.setenv("SCIDIFF_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="SCIDIFF_KERNELS"):
        ops.use_triton(x)
    monkeypatch.setenv("SCIDIFF_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            ops.use_triton(x)


# -- the sampler step ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,d", [(3, 2001), (7, 67)])
@pytest.mark.parametrize("guided,with_prev,clamp,per_row", [(True, True, True, True), (False, False, False, False),
                                                             (True, False, False, True)])
def test_sampler_step_matches_reference(device, dtype, b, d, guided, with_prev, clamp, per_row):
    kernel = ops.load_kernel("sampler_step")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, d, generator=g).to(device)  # the state stays float32
    c, u, prev, noise = (torch.randn(b, d, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    coef = torch.randn(b if per_row else 1, 4, generator=g).to(device)
    args = dict(pred_uncond=u if guided else None, prev=prev if with_prev else None, coef=coef, guidance=1.7,
                clamp_min=-0.8 if clamp else None, clamp_max=0.9 if clamp else None, noise=noise)
    out, x0 = kernel.sampler_step(x, c, **args)
    ref_out, ref_x0 = ops.sampler_step_reference(x.double(), c.double(), **{
        k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()})
    assert out.dtype == torch.float32 and out.shape == (b, d)
    assert rel_err(x0, ref_x0) < TOL[dtype]
    assert rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_step_in_kernel_noise(device, triton_kernels):
    """Seeded Philox noise: standard normal, independent across elements and steps, reproducible."""
    from scipy import stats

    b, d = 64, 300
    zeros = torch.zeros(b, d, device=device)
    only_noise = torch.tensor([0.0, 0.0, 0.0, 1.0], device=device)
    seed = torch.tensor([1234], device=device)

    def draw(seed, offset):
        return ops.sampler_step(zeros, zeros, coef=only_noise, seed=seed, offset=offset)[0].cpu()

    z = draw(seed, 3)
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    torch.testing.assert_close(draw(seed, 3), z)  # same seed and step: same noise
    other_step, other_seed = draw(seed, 4), draw(seed + 1, 3)
    for w in (other_step, other_seed):
        assert abs(float(torch.corrcoef(torch.stack([z.flatten(), w.flatten()]))[0, 1])) < 0.03
    # neighbouring rows and columns are uncorrelated (the counter is the flat index)
    assert abs(float(torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]))[0, 1])) < 0.03
    # the coefficient scales it, per row
    scaled = ops.sampler_step(zeros, zeros, coef=only_noise.expand(b, 4) * torch.arange(b, device=device)[:, None],
                              seed=seed, offset=3)[0].cpu()
    torch.testing.assert_close(scaled, z * torch.arange(b)[:, None].float())


# -- torch.compile over the model with the kernels inside ------------------------------------------
def _small_model():
    from scidiff.models import ScIDiffModel

    torch.manual_seed(0)
    model = ScIDiffModel(gene_dim=67, hidden_dim=48, num_layers=2, num_timesteps=100, covariates={"c": 3})
    with torch.no_grad():
        for p in model.parameters():  # leave the zero init: every block must matter
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_traces_the_kernels_without_breaks_or_recompiles(device, triton_kernels, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = _small_model().to(device).eval()
    seen = []

    def recording_inductor(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=recording_inductor)
    x = torch.randn(3, 67, device=device)
    cases = [(x, torch.tensor([5, 50, 99]), torch.tensor([0, 1, 2])),
             (torch.randn(3, 67, device=device), torch.tensor([1, 2, 3]), torch.tensor([2, 2, 0]))]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for xs, t, c in cases:
            out = compiled(xs, t.to(device), {"c": c.to(device)})
            with monkeypatch.context() as m:
                m.setenv("SCIDIFF_KERNELS", "torch")
                ref = model(xs, t.to(device), {"c": c.to(device)})
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert sum(counters["graph_break"].values()) == 0
    assert sum("scidiff.modulated_block" in s for s in seen) == model.num_layers  # one fused op per block


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_uses_the_kernel_backward(device, triton_kernels, monkeypatch):
    """fullgraph through forward and backward (AOT autograd over the registered backward op)."""
    import torch._dynamo

    model = _small_model().to(device).train()
    x, t, c = torch.randn(5, 67, device=device), torch.tensor([3, 9, 27, 81, 99], device=device), {
        "c": torch.tensor([0, 1, 2, 1, 0], device=device)}

    def loss_fn(m):
        return (m(x, t, c) - x).pow(2).mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(model), list(model.parameters()))
    with monkeypatch.context() as m:
        m.setenv("SCIDIFF_KERNELS", "torch")
        ref = torch.autograd.grad(loss_fn(model), list(model.parameters()))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not INTERPRETING, reason="the bench's --check mode runs in the Triton interpreter")
def test_kernel_bench_check_mode_runs_every_part(tmp_path):
    """``bench/bench_kernels.py --check`` (the GPU lease's kernel bench, at toy sizes here): every
    section is written, and each folded tile it times is right."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kernels.json"
    assert bench.main(["--check", "--rows", "21", "--hidden", "40", "--dims", "7", "--model", str(tmp_path / "none"),
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"ceilings", "block", "folded_tiles", "sampler_step"} <= set(result)
    assert len(result["folded_tiles"]) == len(ops.load_kernel("modulated_block").FOLDED_CONFIGS) + 1
    assert all(r["relative_error_vs_float64"] < TOL[torch.bfloat16] for r in result["folded_tiles"])
