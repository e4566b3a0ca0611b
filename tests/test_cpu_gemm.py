"""The native packed fp32 GEMM (csrc/cpu/cpu_gemm_impl.h; deltakern._cpu_ext.gemm) and the CPU layer ops
that run on it (deltakern.backends.cpu_blas):

    out = (out +) bias + a . op(b) + scale2 * a2 . op2(b2)      op(b) = b^T (b_t) or b; b dense or NF4

Every ISA this CPU runs, at 1 and 2 threads (bit-identical: each output row has one writer and the
sums run in a fixed order), on shapes with tails in M, N and K against every tile and block size
(MR = 12 / 6 / 4 rows, NR = 32 / 16 / 8 columns, KC = 512, NC = 4096; threads splitting M or N),
with and without the rank-r term, bias and accumulation. Bound: a sum of n = K + R fp32 products
against float64 of the same inputs,

    |err| <= n * eps32 * (|a| . |op(b)| + |scale2| |a2| . |op2(b2)| + |bias| + |out|).

An NF4 operand is decoded while packed to exactly the values of the bit-exact dequantize, so its
result equals the dense GEMM over the dequantized W bit for bit.
"""

import pytest
import torch

from deltakern import _cpu_ext
from deltakern.backends import cpu_blas

from test_cpu_kernels import CODE, EPS32, built_so, ext, isa, threads  # noqa: F401  (fixtures)
from test_cpu_lowrank import _both_threads, _rand, _within

# (M, K, N, R): tails everywhere; K > 512 crosses K blocks; the larger ones split across 2 threads
SHAPES = [(1, 1, 1, 1), (5, 7, 3, 0), (13, 9, 33, 3), (37, 600, 70, 16), (130, 1031, 47, 64), (300, 64, 1000, 8),
          (257, 1100, 257, 0), (20, 530, 4200, 5)]  # the last: two N blocks (NC = 4096) split across threads


def _exact(a, b, b_t, bias, a2, b2, b2_t, s, out):
    d = lambda t: t.double()  # noqa: E731
    ob = d(b).t() if b_t else d(b)
    exact = d(a) @ ob
    mag = d(a).abs() @ ob.abs()
    if a2 is not None:
        ob2 = d(b2).t() if b2_t else d(b2)
        exact = exact + s * (d(a2) @ ob2)
        mag = mag + abs(s) * (d(a2).abs() @ ob2.abs())
    for t in (bias, out):
        if t is not None:
            exact, mag = exact + d(t), mag + d(t).abs()
    return exact, mag


@pytest.mark.parametrize("M,K,N,R", SHAPES)
@pytest.mark.parametrize("b_t", [True, False])
def test_gemm_within_fp32_rounding(isa, threads, M, K, N, R, b_t):
    a = _rand(M, K, seed=M + K)
    b = _rand(N, K, seed=N) if b_t else _rand(K, N, seed=N)
    bias, out0 = _rand(N, seed=3), _rand(M, N, seed=4)
    a2 = _rand(M, R, seed=5) if R else None
    for b2_t in ((True, False) if R else (False,)):
        b2 = (_rand(N, R, seed=6) if b2_t else _rand(R, N, seed=6)) if R else None
        for bb, acc in ((None, False), (bias, True)):
            got = _both_threads(lambda: _cpu_ext.gemm(a, b, b_t=b_t, bias=bb, a2=a2, b2=b2, b2_t=b2_t, scale2=-0.75,
                                                     out=out0.clone() if acc else None))
            assert got.shape == (M, N) and got.dtype == torch.float32
            exact, mag = _exact(a, b, b_t, bb, a2, b2, b2_t, -0.75, out0 if acc else None)
            _within(got, exact, (K + R + 2) * EPS32 * mag, (isa, M, K, N, R, b_t, b2_t, acc))


def test_gemm_strided_operands(isa, threads):
    """Rows with a stride (views into wider tensors) are read in place; results equal the contiguous ones."""
    big_a, big_b = _rand(40, 300, seed=1), _rand(90, 300, seed=2)
    a, b = big_a[:, 10:210], big_b[:, 50:250]  # [40, 200], [90, 200]: row strides 300
    a2 = _rand(40, 24, seed=3)[:, 4:12]  # [40, 8], row stride 24
    b2 = _rand(90, 8, seed=4)
    got = _cpu_ext.gemm(a, b, b_t=True, a2=a2, b2=b2, b2_t=True, scale2=2.0)
    ref = _cpu_ext.gemm(a.contiguous(), b.contiguous(), b_t=True, a2=a2.contiguous(), b2=b2, b2_t=True, scale2=2.0)
    assert torch.equal(got, ref)


def _nf4(rows, cols, blocksize, seed):
    w = _rand(rows, cols, seed=seed)
    packed, absmax = _cpu_ext.quantize_nf4(w, blocksize)
    dense = _cpu_ext.dequantize_nf4(packed, absmax, None, None, 0.0, CODE, rows * cols, blocksize, torch.float32)
    return (packed, absmax, CODE, rows, cols, blocksize), dense.view(rows, cols)


@pytest.mark.parametrize("M,rows,cols,blocksize", [(3, 8, 8, 32), (19, 40, 64, 64), (50, 33, 600, 64),
                                                   (130, 100, 1056, 32), (33, 72, 136, 128), (64, 520, 256, 256),
                                                   (40, 24, 1000, 4096)])  # blocks crossing rows: 600, 136, 1000
@pytest.mark.parametrize("b_t", [True, False])
def test_gemm_nf4_equals_dense_over_the_dequantized_weight(isa, threads, M, rows, cols, blocksize, b_t):
    nf4, dense = _nf4(rows, cols, blocksize, seed=rows + cols)
    a = _rand(M, cols if b_t else rows, seed=M)
    N = rows if b_t else cols
    a2, b2, bias = _rand(M, 4, seed=1), _rand(N, 4, seed=2), _rand(N, seed=3)
    got = _both_threads(lambda: _cpu_ext.gemm(a, nf4=nf4, b_t=b_t, bias=bias, a2=a2, b2=b2, b2_t=True, scale2=0.5))
    assert torch.equal(got, _cpu_ext.gemm(a, dense, b_t=b_t, bias=bias, a2=a2, b2=b2, b2_t=True, scale2=0.5))


def test_gemm_bad_inputs(ext):
    a, b = torch.randn(20, 16), torch.randn(24, 16)
    nf4, _ = _nf4(24, 16, 32, seed=0)
    with pytest.raises(ValueError, match="exactly one of b"):
        _cpu_ext.gemm(a, b, nf4=nf4, b_t=True)
    with pytest.raises(ValueError, match="exactly one of b"):
        _cpu_ext.gemm(a, b_t=True)
    with pytest.raises(TypeError, match="must be torch.float32"):
        _cpu_ext.gemm(a.double(), b, b_t=True)
    with pytest.raises(ValueError, match="has shape"):
        _cpu_ext.gemm(a, torch.randn(24, 15), b_t=True)
    with pytest.raises(ValueError, match="has shape"):
        _cpu_ext.gemm(a, b, b_t=False)  # b as [K, N] needs 16 rows
    with pytest.raises(ValueError, match="does not match"):
        _cpu_ext.gemm(torch.randn(20, 24), nf4=nf4, b_t=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        _cpu_ext.gemm(torch.randn(20, 12), nf4=_nf4(32, 12, 32, seed=0)[0], b_t=True)
    with pytest.raises(ValueError, match="both a2 and b2"):
        _cpu_ext.gemm(a, b, b_t=True, a2=torch.randn(20, 4))
    with pytest.raises(ValueError, match="r <= 64"):
        _cpu_ext.gemm(a, b, b_t=True, a2=torch.randn(20, 65), b2=torch.randn(24, 65), b2_t=True)
    with pytest.raises(ValueError, match="b2 has shape"):
        _cpu_ext.gemm(a, b, b_t=True, a2=torch.randn(20, 4), b2=torch.randn(4, 24), b2_t=True)
    with pytest.raises(ValueError, match="bias must have shape"):
        _cpu_ext.gemm(a, b, b_t=True, bias=torch.randn(23))
    with pytest.raises(ValueError, match="not both"):
        _cpu_ext.gemm(a, b, b_t=True, a2=torch.randn(20, 4), proj=torch.randn(4, 16), proj_t=True,
                      b2=torch.randn(24, 4), b2_t=True)
    with pytest.raises(ValueError, match="pass b2 as well"):
        _cpu_ext.gemm(a, b, b_t=True, proj=torch.randn(4, 16), proj_t=True)
    with pytest.raises(ValueError, match="proj has shape"):
        _cpu_ext.gemm(a, b, b_t=True, proj=torch.randn(4, 15), proj_t=True, b2=torch.randn(24, 4), b2_t=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        _cpu_ext.gemm(a, b, b_t=True, col_scale=torch.ones(24), out=torch.empty(20, 24))
    with pytest.raises(TypeError, match="must be torch.float32"):
        _cpu_ext.gemm(a, b, b_t=True, col_scale=torch.ones(24, dtype=torch.float64))
    out = torch.full((20, 24), 7.0)
    with pytest.raises(ValueError, match="out must have shape"):
        _cpu_ext.gemm(a, b, b_t=True, out=torch.empty(20, 23))
    with pytest.raises(ValueError, match="on meta"):
        _cpu_ext.gemm(a, b.to("meta"), b_t=True, out=out)
    assert (out == 7.0).all()  # nothing written by a refused call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nf4", [False, True])
def test_layer_ops_take_the_gemm_and_match_blas(ext, monkeypatch, dtype, nf4):
    """lora_fwd / lora_dx (dense and NF4) on the native GEMM equal the BLAS composition they replace, within
    fp32 rounding of the same decoded W; the GEMM really ran (counted)."""
    if not _cpu_ext.gemm_fast():
        pytest.skip("the native GEMM serves only AVX2 / AVX-512 builds")
    M, K, N, r, bs = 130, 512, 520, 8, 64  # M N K >= cpu_blas.GEMM_MIN_WORK
    x, dy = _rand(M, K, seed=1).to(dtype), _rand(M, N, seed=2).to(dtype)
    A, B, bias = _rand(r, K, seed=3).to(dtype), _rand(N, r, seed=4).to(dtype), _rand(N, seed=5).to(dtype)
    xa, dyb = _rand(M, r, seed=6).to(dtype), _rand(M, r, seed=7).to(dtype)
    wq, wd = _nf4(N, K, bs, seed=8)
    if nf4:
        w_args = (wq[0], wq[1], wq[2], N, K, bs)
        fwd = lambda: cpu_blas.lora_fwd_nf4(x, *w_args, bias, xa, B, 0.5)  # noqa: E731
        dx = lambda: cpu_blas.lora_dx_nf4(dy, *w_args, dyb, A, 0.5, None, 1.0)  # noqa: E731
        wv = wd.to(dtype).float()  # the values every backend multiplies by: W rounded to the input dtype
    else:
        wv = wd.to(dtype)
        fwd = lambda: cpu_blas.lora_fwd(x, wv, bias, xa, B, 0.5)  # noqa: E731
        dx = lambda: cpu_blas.lora_dx(dy, wv, dyb, A, 0.5, None, 1.0)  # noqa: E731
    calls = []
    real = _cpu_ext.gemm
    monkeypatch.setattr(_cpu_ext, "gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    y, g = fwd(), dx()
    assert len(calls) == 2 and y.dtype == dtype and g.dtype == dtype
    f = lambda t: t.double()  # noqa: E731
    y_ref = f(x) @ f(wv).t() + f(bias) + 0.5 * f(xa) @ f(B).t()
    dx_ref = f(dy) @ f(wv) + 0.5 * f(dyb) @ f(A)
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # fp32 sums; bf16: one rounding of the result
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * 30)
    torch.testing.assert_close(g.double(), dx_ref, rtol=tol, atol=tol * 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("M", [130, 20])  # 130: the native GEMM projects (M N K >= GEMM_MIN_WORK); 20: the fallback
def test_projecting_ops_match_the_reference(ext, dtype, nf4, M):
    """lora_fwd_xa / lora_dx_dyb on the CPU (xa, dyb computed inside the GEMM) against their references:
    the projections within fp32 rounding of float64, the outputs as lora_fwd / lora_dx."""
    from deltakern.backends.reference import lora as ref

    K, N, r, bs = 512, 520, 8, 64
    x, dy = _rand(M, K, seed=1).to(dtype), _rand(M, N, seed=2).to(dtype)
    A, B, bias = _rand(r, K, seed=3).to(dtype), _rand(N, r, seed=4).to(dtype), _rand(N, seed=5).to(dtype)
    wq, wd = _nf4(N, K, bs, seed=8)
    w_args = (wq[0], wq[1], wq[2], N, K, bs) if nf4 else (wd.to(dtype), None, None, N, K, 0)
    wv = wd.to(dtype).double()  # the W every path multiplies by (an NF4 W decoded, rounded to the input dtype)
    y, xa = cpu_blas.lora_fwd_xa(x, *w_args, bias, A, B, 0.5)
    y_ref, xa_ref = ref.lora_fwd_xa(x, *w_args, bias, A, B, 0.5)
    dx, dyb = cpu_blas.lora_dx_dyb(dy, *w_args, B, A, 0.5)
    dx_ref, dyb_ref = ref.lora_dx_dyb(dy, *w_args, B, A, 0.5)
    for got, want in ((y, y_ref), (xa, xa_ref), (dx, dx_ref), (dyb, dyb_ref)):
        assert got.dtype == dtype and got.shape == want.shape
    f = lambda t: t.double()  # noqa: E731
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(xa.double(), f(x) @ f(A).t(), rtol=tol, atol=tol * K**0.5)
    torch.testing.assert_close(dyb.double(), f(dy) @ f(B), rtol=tol, atol=tol * N**0.5)
    y_exact = f(x) @ wv.t() + f(bias) + 0.5 * (f(x) @ f(A).t()) @ f(B).t()
    dx_exact = f(dy) @ wv + 0.5 * (f(dy) @ f(B)) @ f(A)
    torch.testing.assert_close(y.double(), y_exact, rtol=tol, atol=tol * K**0.5)
    torch.testing.assert_close(dx.double(), dx_exact, rtol=tol, atol=tol * N**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("M", [130, 20])
def test_dora_projecting_ops_match_the_reference(ext, dtype, nf4, M):
    """dora_fwd_xa / dora_bwd_dyb on the CPU (xa = x A^T, dyb = (dY * g) B inside the GEMM, g as a
    column scale of the forward) against their references."""
    from deltakern.backends.reference import dora as ref

    K, N, r, bs = 512, 520, 8, 64
    x, dy, y = _rand(M, K, seed=1).to(dtype), _rand(M, N, seed=2).to(dtype), _rand(M, N, seed=9).to(dtype)
    A, B, bias = _rand(r, K, seed=3).to(dtype), _rand(N, r, seed=4).to(dtype), _rand(N, seed=5).to(dtype)
    g = torch.rand(N, generator=torch.Generator().manual_seed(6)) + 0.5
    wq, wd = _nf4(N, K, bs, seed=8)
    w_args = (wq[0], wq[1], wq[2], N, K, bs) if nf4 else (wd.to(dtype), None, None, N, K, 0)
    got = cpu_blas.dora_fwd_xa(x, *w_args, bias, A, B, g, 0.5) + cpu_blas.dora_bwd_dyb(dy, *w_args, B, A, g, y, bias,
                                                                                         0.5, 1)
    want = ref.dora_fwd_xa(x, *w_args, bias, A, B, g, 0.5) + ref.dora_bwd_dyb(dy, *w_args, B, A, g, y, bias, 0.5, 1)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, u, v in zip(("y", "xa", "dx", "db", "c", "dyb"), got, want):
        assert u.dtype == v.dtype and u.shape == v.shape, name
        scale = v.double().abs().max().item() + 1e-30
        assert (u.double() - v.double()).abs().max().item() <= tol * scale, (name, dtype, nf4, M)
