"""The fused adaLN-modulated residual MLP block (Triton).

    out = h + gate * SiLU(W (LayerNorm(h) * (1 + scale) + shift) + b)

Forward: one kernel. Each program owns a ``BLOCK_M x BLOCK_N`` tile of the output: it computes
its rows' LayerNorm statistics, then streams ``h`` and the modulation along K, normalising and
modulating each tile in registers just before the tensor-core dot, so the normalised activation
never goes to memory; bias, SiLU, gate and the residual add are the epilogue.

Shared modulation (one ``shift``/``scale``/``gate`` row for all cells, the sampling engine's
case): LayerNorm is folded into the weight, ``W (LN(h)(1 + scale) + shift) =
rstd (h W'^T - mean u) + W shift`` with ``W' = W diag(1 + scale)`` and ``u = W' 1``, so the
kernel is a plain tiled GEMM over ``h`` that gathers each row's mean and variance from the
tiles it already loads (Chan et al.'s pairwise merge, 1979) and applies them in the epilogue:
one read of ``h`` per output tile, no statistics pass. Its tiles are autotuned per shape.

Backward (``modulated_block_backward``): the same kernel run with ``BACKWARD=True`` recomputes the
pre-activation and writes ``dy = g * gate * SiLU'(y)``, ``dgate = g * SiLU(y)``, the modulated
input ``z`` and the row statistics; two GEMMs (``dW = dy^T z``, ``dz = dy W``) go to cuBLAS; a
row kernel finishes the LayerNorm backward (``dh``, ``dscale``). Recomputing ``y`` costs one GEMM
but keeps nothing but the inputs alive between forward and backward.

Accumulation is fp32. The dot runs in the weight's dtype (fp32 as IEEE fp32, not TF32); under the
Triton interpreter bf16 operands are widened to fp32 first, because the interpreter's bf16 dot is
wrong. The pure-torch reference with the same signature is
``scidiff.ops.modulated_block.modulated_block_reference``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _row_stats(h_ptr, rows, rmask, stride_h, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/std over K of ``BLOCK_M`` rows (two passes, fp32)."""
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        acc += tl.sum(tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32), 1)
    mean = acc / K
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        d = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None]
        d = tl.where(m, d, 0.0)
        acc += tl.sum(d * d, 1)
    rstd = 1.0 / tl.sqrt(acc / K + eps)
    return mean, rstd


@triton.jit
def _block_kernel(h_ptr, shift_ptr, scale_ptr, gate_ptr, w_ptr, b_ptr, out_ptr,
                  g_ptr, z_ptr, dy_ptr, dgate_ptr, mean_ptr, rstd_ptr,
                  M, N, K,
                  stride_h, stride_shift, stride_scale, stride_gate, stride_w, stride_out,
                  stride_g, stride_z, stride_dy, stride_dgate,
                  eps,
                  BACKWARD: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    mean, rstd = _row_stats(h_ptr, rows, rmask, stride_h, K, eps, BLOCK_M, BLOCK_K)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        m = rmask[:, None] & kmask[None, :]
        hv = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + rows[:, None] * stride_scale + ks[None, :], mask=m, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + rows[:, None] * stride_shift + ks[None, :], mask=m, other=0.0).to(tl.float32)
        z = (hv - mean[:, None]) * rstd[:, None] * (1.0 + sc) + sh
        z = tl.where(m, z, 0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        zc = z.to(w.dtype)
        if BACKWARD:
            if pid_n == 0:
                tl.store(z_ptr + rows[:, None] * stride_z + ks[None, :], zc.to(z_ptr.dtype.element_ty), mask=m)
        if DOT_FP32:
            acc += tl.dot(zc.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(zc, w, input_precision=PRECISION)

    om = rmask[:, None] & cmask[None, :]
    y = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sig = tl.sigmoid(y)
    act = y * sig
    gate = tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=om, other=0.0).to(tl.float32)
    res = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], (res + gate * act).to(out_ptr.dtype.element_ty),
             mask=om)
    if BACKWARD:
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=om, other=0.0).to(tl.float32)
        dy = g * gate * sig * (1.0 + y * (1.0 - sig))
        tl.store(dy_ptr + rows[:, None] * stride_dy + cols[None, :], dy.to(dy_ptr.dtype.element_ty), mask=om)
        tl.store(dgate_ptr + rows[:, None] * stride_dgate + cols[None, :], (g * act).to(dgate_ptr.dtype.element_ty),
                 mask=om)
        if pid_n == 0:
            tl.store(mean_ptr + rows, mean, mask=rmask)
            tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _shared_block_kernel(h_ptr, w_ptr, u_ptr, v_ptr, gate_ptr, out_ptr, M, N, K,
                         stride_h, stride_w, stride_out, eps,
                         DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out = h + gate * SiLU(rstd (h W'^T - mean u) + v)`` with one modulation row (folded
    into ``W'``, ``u``, ``v`` by the caller); row statistics merged tile by tile along K."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        hv = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        hc = hv.to(w.dtype)
        if DOT_FP32:
            acc += tl.dot(hc.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(hc, w, input_precision=PRECISION)
        # this tile's count, mean and sum of squared deviations, merged into the running ones
        seen = k0 * 1.0
        n_tile = tl.minimum(K - k0, BLOCK_K) * 1.0
        hf = hv.to(tl.float32)
        tile_mean = tl.sum(hf, 1) / n_tile
        dev = tl.where(kmask[None, :], hf - tile_mean[:, None], 0.0)
        delta = tile_mean - mean
        total = seen + n_tile
        mean += delta * (n_tile / total)
        m2 += tl.sum(dev * dev, 1) + delta * delta * (seen * n_tile / total)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    v = tl.load(v_ptr + cols, mask=cmask, other=0.0)
    y = rstd[:, None] * (acc - mean[:, None] * u[None, :]) + v[None, :]
    act = y * tl.sigmoid(y)
    gate = tl.load(gate_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    om = rmask[:, None] & cmask[None, :]
    res = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], (res + gate[None, :] * act).to(out_ptr.dtype.element_ty),
             mask=om)


# GEMM tiles for the shared-modulation kernel on a GPU, chosen per (M, N, K, dtype) by timing
_SHARED_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                   for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                             (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]]
_shared_block_tuned = triton.autotune(configs=_SHARED_CONFIGS, key=["M", "N", "K", "DOT_FP32", "PRECISION"])(
    _shared_block_kernel)


@triton.jit
def _layer_norm_backward_kernel(h_ptr, scale_ptr, dz_ptr, g_ptr, mean_ptr, rstd_ptr, dh_ptr, dscale_ptr,
                                M, K, stride_h, stride_scale, stride_dz, stride_g, stride_dh, stride_dscale,
                                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dh = g + rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))`` with ``dxhat = dz (1 + scale)``,
    and ``dscale = dz xhat`` (``g``: the gradient reaching ``h`` through the residual path)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        xhat = (tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32)
                - mean[:, None]) * rstd[:, None]
        dz = tl.load(dz_ptr + rows[:, None] * stride_dz + ks[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + rows[:, None] * stride_scale + ks[None, :], mask=m, other=0.0).to(tl.float32)
        dxhat = tl.where(m, dz * (1.0 + sc), 0.0)
        s1 += tl.sum(dxhat, 1)
        s2 += tl.sum(tl.where(m, dxhat * xhat, 0.0), 1)
    c1 = s1 / K
    c2 = s2 / K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (ks < K)[None, :]
        xhat = (tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32)
                - mean[:, None]) * rstd[:, None]
        dz = tl.load(dz_ptr + rows[:, None] * stride_dz + ks[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + rows[:, None] * stride_scale + ks[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * stride_g + ks[None, :], mask=m, other=0.0).to(tl.float32)
        dh = g + rstd[:, None] * (dz * (1.0 + sc) - c1[:, None] - xhat * c2[:, None])
        tl.store(dh_ptr + rows[:, None] * stride_dh + ks[None, :], dh.to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dscale_ptr + rows[:, None] * stride_dscale + ks[None, :], (dz * xhat).to(dscale_ptr.dtype.element_ty),
                 mask=m)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _blocks(M: int, N: int, K: int):
    """Tile sizes and warps: 64 x 64 x 64 on a GPU (4 warps, 3 pipeline stages); as large as
    allowed under the interpreter, where every program instance costs milliseconds."""
    if _interpreting():
        return _pow2(M, 16, 64), _pow2(N, 16, 128), _pow2(K, 16, 128), 4
    return _pow2(M, 16, 64), _pow2(N, 16, 64), _pow2(K, 16, 64), 4


STAGES = 3  # software pipelining of the K loop on a GPU (ignored by the interpreter)


def _rows(t: torch.Tensor, M: int, K: int) -> torch.Tensor:
    """``t`` broadcast to ``[M, K]`` with unit column stride (row stride 0 where broadcast)."""
    t = t.reshape(-1, K) if t.dim() != 1 else t.reshape(1, K)
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.shape[0] == 1 and M != 1:
        return t.expand(M, K)
    if t.shape[0] != M:
        raise ValueError(f"modulation has {t.shape[0]} rows, expected {M} or 1")
    return t


def _check(h, weight, bias):
    K = h.shape[-1]
    N, Kw = weight.shape
    if Kw != K or N != K:
        raise ValueError(f"the residual block needs a square weight [{K}, {K}], got {list(weight.shape)}")
    if bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {list(bias.shape)}")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {h.dtype}")
    return N, K


def _dot_mode(weight: torch.Tensor) -> tuple[bool, str]:
    """``(DOT_FP32, PRECISION)`` for a dot in ``weight``'s dtype: bf16 widened to fp32 under the
    interpreter (whose bf16 dot is wrong); fp32 as IEEE fp32, not TF32."""
    return (weight.dtype == torch.bfloat16 and _interpreting(),
            "ieee" if weight.dtype == torch.float32 else "tf32")


def _launch_shared(h2, shift, scale, gate, weight, bias, eps):
    """The block with one modulation row: fold LayerNorm's affine part and the modulation into
    ``W' = W diag(1 + scale)``, ``u = W' 1`` and ``v = W shift + b`` (fp32), then one GEMM kernel."""
    M, K = h2.shape
    N = weight.shape[0]
    w32 = weight.float()
    folded = (w32 * (1.0 + scale.reshape(K).float())[None, :]).to(weight.dtype).contiguous()
    u = folded.float().sum(1)
    v = torch.addmv(bias.float(), w32, shift.reshape(K).float())
    gate = gate.reshape(N).contiguous()
    out = torch.empty((M, N), device=h2.device, dtype=h2.dtype)
    dot_fp32, precision = _dot_mode(weight)
    args = (h2, folded, u, v, gate, out, M, N, K, h2.stride(0), folded.stride(0), out.stride(0), float(eps))
    if _interpreting():
        BM, BN, BK, _ = _blocks(M, N, K)
        _shared_block_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            *args, DOT_FP32=dot_fp32, PRECISION=precision, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _shared_block_tuned[grid](*args, DOT_FP32=dot_fp32, PRECISION=precision)
    return out


def _launch(h, shift, scale, gate, weight, bias, eps, grad_out=None):
    N, K = _check(h, weight, bias)
    h2 = h.reshape(-1, K)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    M = h2.shape[0]
    if grad_out is None and all(t.numel() == K for t in (shift, scale, gate)):
        return _launch_shared(h2, shift, scale, gate, weight, bias, eps).reshape(h.shape[:-1] + (N,))
    shift2, scale2, gate2 = _rows(shift, M, K), _rows(scale, M, K), _rows(gate, M, K)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.empty((M, N), device=h.device, dtype=h.dtype)
    backward = grad_out is not None
    if backward:
        g = grad_out.reshape(-1, N)
        g = g if g.stride(-1) == 1 else g.contiguous()
        z = torch.empty((M, K), device=h.device, dtype=weight.dtype)
        dy = torch.empty((M, N), device=h.device, dtype=weight.dtype)
        dgate = torch.empty((M, N), device=h.device, dtype=torch.float32)
        mean = torch.empty(M, device=h.device, dtype=torch.float32)
        rstd = torch.empty(M, device=h.device, dtype=torch.float32)
    else:
        g = z = dy = dgate = out
        mean = rstd = out
    BM, BN, BK, warps = _blocks(M, N, K)
    dot_fp32, precision = _dot_mode(weight)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _block_kernel[grid](h2, shift2, scale2, gate2, weight, bias, out, g, z, dy, dgate, mean, rstd,
                        M, N, K,
                        h2.stride(0), shift2.stride(0), scale2.stride(0), gate2.stride(0), weight.stride(0),
                        out.stride(0), g.stride(0), z.stride(0), dy.stride(0), dgate.stride(0),
                        float(eps),
                        BACKWARD=backward, DOT_FP32=dot_fp32, PRECISION=precision,
                        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=STAGES)
    if not backward:
        return out.reshape(h.shape[:-1] + (N,))
    return out, g, z, dy, dgate, mean, rstd, (h2, shift2, scale2, gate2, M, N, K)


def modulated_block(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
                    weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``h + gate * SiLU(Linear(LayerNorm(h) * (1 + scale) + shift))`` in one kernel. ``h``:
    ``[..., H]``; ``shift``, ``scale``, ``gate``: ``[..., H]`` or ``[1, H]`` (one row for all);
    ``weight``: ``[H, H]``; output in ``h``'s dtype."""
    return _launch(h, shift, scale, gate, weight, bias, eps)


def _reduce_like(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a ``[M, H]`` gradient over the rows a broadcast input did not have."""
    if grad.shape[0] != 1 and (like.dim() == 1 or like.reshape(-1, like.shape[-1]).shape[0] == 1):
        grad = grad.sum(0, keepdim=True)
    return grad.reshape(like.shape).to(like.dtype)


def modulated_block_backward(grad_out: torch.Tensor, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                             gate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6):
    """Gradients ``(dh, dshift, dscale, dgate, dweight, dbias)`` of :func:`modulated_block`,
    each shaped and typed like its input."""
    _, g, z, dy, dgate, mean, rstd, (h2, shift2, scale2, gate2, M, N, K) = _launch(
        h, shift, scale, gate, weight, bias, eps, grad_out)
    dweight = dy.t().mm(z)
    dbias = dy.sum(0, dtype=torch.float32)
    dz = dy.mm(weight)
    dh = torch.empty((M, K), device=h.device, dtype=h.dtype)
    dscale = torch.empty((M, K), device=h.device, dtype=torch.float32)
    BM, _, BK, warps = _blocks(M, N, K)
    _layer_norm_backward_kernel[(triton.cdiv(M, BM),)](
        h2, scale2, dz, g, mean, rstd, dh, dscale, M, K,
        h2.stride(0), scale2.stride(0), dz.stride(0), g.stride(0), dh.stride(0), dscale.stride(0),
        BLOCK_M=BM, BLOCK_K=BK, num_warps=warps)
    return (dh.reshape(h.shape), _reduce_like(dz, shift), _reduce_like(dscale, scale), _reduce_like(dgate, gate),
            dweight.to(weight.dtype), dbias.to(bias.dtype))
