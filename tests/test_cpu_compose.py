"""The BLAS implementations of the LoRA / DoRA / frozen-linear ops on the CPU (deltakern.backends.cpu_blas,
built from deltakern.backends.compose) against float64 references, with the rounding bound stated per output.

Bound: an fp32 output that sums n products (each term a product of stored values), computed with
fp32 operands and accumulator in any order, is within
    (n + extra) * u32 * T   of the exact sum,   u32 = 2^-24,  T = the same sum of |terms| (float64),
where `extra` counts the roundings outside the dot product (alpha scaling, bias, the column scale g
folded into an operand, the mask scale). A bf16 / fp16 output adds one final rounding, u_out * |exact|
(u_out = 2^-8 / 2^-11). These are worst-case (not statistical) bounds, so any summation order the BLAS
picks must meet them; a wrong term or a lost pass breaks them by orders of magnitude.
"""

import pytest
import torch

from deltakern import nf4
from deltakern.backends import compose
from deltakern.backends import cpu_blas as cb
from deltakern.ops import lowrank

U32 = 2.0**-24
U_OUT = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

# (M, K, N, r): K > M, K <= M (DoRA then scales W, not the [M, N] operand), a single row, odd sizes, and a
# decode shape (M <= 16, K a multiple of the blocksize: the native NF4 matmuls run it when built)
SHAPES = [(7, 33, 20, 16), (40, 24, 30, 4), (1, 17, 9, 3), (5, 64, 24, 4)]


def rnd(shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def weight(N, K, kind, dtype, seed=5):
    """(weight args for the ops: (w, absmax, code, blocksize), the values they stand for in dtype)."""
    W = rnd((N, K), seed, K**-0.5)
    if kind == "dense":
        w = W.to(dtype)
        return (w, None, None, 0), w
    q = nf4.quantize(W, blocksize=32, double_quant=True)
    return (q.packed_bytes(), q.absmax_fp32(), q.code, q.blocksize), q.dequantize(dtype)


def col_major(t):
    """The same values in a non-contiguous (column-major) layout."""
    return t.t().contiguous().t()


def check(got, exact, T, n_terms, extra, dtype, name):
    """|got - exact| <= (n_terms + extra) u32 T + u_out |exact|, elementwise."""
    assert got.dtype == dtype and got.shape == exact.shape, name
    bound = (n_terms + extra) * U32 * T + U_OUT[dtype] * exact.abs() + 1e-30
    err = (got.double() - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{name}: error reaches {worst:.3g} x the bound"


d = lambda t: None if t is None else t.double()  # noqa: E731
a = lambda t: None if t is None else t.double().abs()  # noqa: E731


@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_fwd_and_dx(M, K, N, r, kind, dtype, bias):
    (w, absmax, code, bs), W = weight(N, K, kind, dtype)
    x, A, B = rnd((M, K), 1, dtype=dtype), rnd((r, K), 2, K**-0.5, dtype), rnd((N, r), 3, dtype=dtype)
    b = rnd((N,), 4, dtype=dtype) if bias else None
    xa = lowrank.xat(x, A)  # as the Function computes it
    s = 0.7
    if kind == "dense":
        out = cb.lora_fwd(col_major(x), w, b, xa, B, s)
    else:
        out = cb.lora_fwd_nf4(col_major(x), w, absmax, code, N, K, bs, b, xa, B, s)
    exact = d(x) @ d(W).t() + s * d(xa) @ d(B).t() + (0 if b is None else d(b))
    T = a(x) @ a(W).t() + s * a(xa) @ a(B).t() + (0 if b is None else a(b))
    check(out, exact, T, K + r + 1, 3, dtype, "out")

    dy, dyb = rnd((M, N), 6, dtype=dtype), rnd((M, r), 7, dtype=dtype)
    keep = rnd((M, K), 8) > -0.5
    for mask in (None, keep):
        if kind == "dense":
            dx = cb.lora_dx(dy, w, col_major(dyb), A, s, mask, 1 / 0.7)
        else:
            dx = cb.lora_dx_nf4(dy, w, absmax, code, N, K, bs, col_major(dyb), A, s, mask, 1 / 0.7)
        m = 1.0 if mask is None else mask.double() / 0.7
        exact = d(dy) @ d(W) + s * (d(dyb) @ d(A)) * m
        T = a(dy) @ a(W) + s * (a(dyb) @ a(A)) * m
        check(dx, exact, T, N + r, 4, dtype, f"dx mask={mask is not None}")


@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fwd_bwd(M, K, N, r, kind, dtype):
    (w, absmax, code, bs), W = weight(N, K, kind, dtype)
    x, b, dy = rnd((M, K), 1, dtype=dtype), rnd((N,), 4, dtype=dtype), rnd((M, N), 6, dtype=dtype)
    y = cb.linear_fwd(col_major(x), w, absmax, code, N, K, bs, b)
    check(y, d(x) @ d(W).t() + d(b), a(x) @ a(W).t() + a(b), K + 1, 1, dtype, "y")
    dx, db = cb.linear_bwd(dy, w, absmax, code, N, K, bs, 1)
    check(dx, d(dy) @ d(W), a(dy) @ a(W), N, 0, dtype, "dx")
    check(db, d(dy).sum(0), a(dy).sum(0), M, 0, dtype, "db")
    assert cb.linear_bwd(dy, w, absmax, code, N, K, bs, 0)[1].shape == (0,)


def _dora_problem(M, K, N, r, kind, dtype):
    (w, absmax, code, bs), W = weight(N, K, kind, dtype)
    x, A, B = rnd((M, K), 1, dtype=dtype), rnd((r, K), 2, K**-0.5, dtype), rnd((N, r), 3, dtype=dtype)
    b = rnd((N,), 4, dtype=dtype)
    g = 0.5 + torch.rand(N, generator=torch.Generator().manual_seed(9))  # fp32, as the Function passes it
    return (w, absmax, code, bs), W, x, A, B, b, g


@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_fwd_bwd(M, K, N, r, kind, dtype):
    (w, absmax, code, bs), W, x, A, B, b, g = _dora_problem(M, K, N, r, kind, dtype)
    w_before = w.clone()
    xa = lowrank.xat(x, A)
    s = 1.3
    y = cb.dora_fwd(x, w, absmax, code, N, K, bs, b, xa, B, g, None, s, 1.0)
    gd = g.double()
    exact = (d(x) @ d(W).t() + s * d(xa) @ d(B).t()) * gd + d(b)
    T = (a(x) @ a(W).t() + s * a(xa) @ a(B).t()) * gd + a(b)
    check(y, exact, T, K + r + 1, 5, dtype, "y")
    assert torch.equal(w, w_before), "the op wrote into the frozen weight"

    dy = rnd((M, N), 6, dtype=dtype)
    dyb = lowrank.xat(dy, (B.float() * g[:, None]).to(dtype).t())
    y_before = y.clone()
    dx, db, c = cb.dora_bwd(dy, w, absmax, code, N, K, bs, dyb, A, g, None, y, b, s, 1.0, 1, 1)
    exact = (d(dy) * gd) @ d(W) + s * d(dyb) @ d(A)
    T = (a(dy) * gd) @ a(W) + s * a(dyb) @ a(A)
    # bf16: the reference rounds dy * g to bf16 before its GEMM (as the Triton kernel does); this
    # path keeps it in fp32 (g folded into W or into fp32 dy), so it is only closer to exact
    check(dx, exact, T, N + r, 4, dtype, "dx")
    check(db, d(dy).sum(0), a(dy).sum(0), M, 0, torch.float32, "db")
    yb = d(y) - d(b)
    check(c, (d(dy) * yb).sum(0), (a(dy) * (a(y) + a(b))).sum(0), M, 2, torch.float32, "c")
    assert torch.equal(w, w_before) and torch.equal(y, y_before), "the op wrote into an input"
    # column sums only
    none, db2, c2 = cb.dora_bwd(dy, w, absmax, code, N, K, bs, dyb, A, g, None, None, b, s, 1.0, 0, 1)
    assert none.shape == (0,) and c2.shape == (0,) and torch.equal(db2, db)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("select", ["none", "some", "all"])
def test_dora_colsum_masked_columns(kind, select):
    M, K, N, r = 9, 40, 21, 4
    (w, absmax, code, bs), W, x, A, B, b, g = _dora_problem(M, K, N, r, kind, torch.float32)
    dy = rnd((M, N), 6)
    xa = lowrank.xat(x, A)
    cols = {"none": torch.zeros(N, dtype=torch.bool), "all": torch.ones(N, dtype=torch.bool),
            "some": torch.arange(N) % 3 == 1}[select]
    c = cb.dora_colsum(dy, x, w, absmax, code, N, K, bs, None, xa, B, 0.9, 1.0, cols)
    z = d(x) @ d(W).t() + 0.9 * d(xa) @ d(B).t()
    Tz = a(x) @ a(W).t() + 0.9 * a(xa) @ a(B).t()
    exact = torch.where(cols, (d(dy) * z).sum(0), 0.0)
    T = torch.where(cols, (a(dy) * Tz).sum(0), 0.0)
    check(c, exact, T, M + K + r + 1, 3, torch.float32, "c")
    assert torch.equal(c[~cols], torch.zeros_like(c[~cols]))


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_dora_norm_parts(kind):
    N, K, r = 26, 70, 5
    (w, absmax, code, bs), W = weight(N, K, kind, torch.float32)
    A = rnd((r, K), 2, K**-0.5)
    wa, sq = cb.dora_norm_parts(w, absmax, code, N, K, bs, A, 1)
    assert wa.is_contiguous() and wa.dtype == torch.float32
    check(wa, d(W) @ d(A).t(), a(W) @ a(A).t(), K, 0, torch.float32, "W A^T")
    check(sq, d(W).square().sum(1), d(W).square().sum(1), K, 1, torch.float32, "||W_j||^2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [5, 16, 17])
def test_dora_norm_parts_nf4_without_squares(monkeypatch, dtype, r):
    """An NF4 W without the squares (the cached steady state): W A^T by the decode matmul for r <= 16
    (K % blocksize == 0), the workspace path otherwise; both the values of W A^T over W rounded to A's
    dtype."""
    from deltakern import _cpu_ext

    N, K = 26, 96
    (w, absmax, code, bs), W = weight(N, K, "nf4", dtype)
    A = rnd((r, K), 2, K**-0.5).to(dtype)
    calls = []
    real = _cpu_ext.nf4_matmul
    monkeypatch.setattr(_cpu_ext, "nf4_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    wa, sq = cb.dora_norm_parts(w, absmax, code, N, K, bs, A, 0)
    assert len(calls) == (1 if r <= 16 and _cpu_ext.available() else 0)
    assert wa.shape == (N, r) and wa.is_contiguous() and wa.dtype == torch.float32 and sq.numel() == 0
    check(wa, d(W) @ d(A).t(), a(W) @ a(A).t(), K, 0, torch.float32, "W A^T")
    full, _ = cb.dora_norm_parts(w, absmax, code, N, K, bs, A, 1)  # the workspace path
    check(wa, d(full), a(W) @ a(A).t(), 2 * K, 0, torch.float32, "W A^T (both paths)")


def test_lora_db_dB_one_pass():
    M, N, r = 13, 11, 3
    dy, xa = rnd((M, N), 1), rnd((M, r), 2)
    dB, db = compose.lora_db_dB(dy, col_major(xa), 0.5, True)
    check(dB, 0.5 * d(dy).t() @ d(xa), 0.5 * a(dy).t() @ a(xa), M, 1, torch.float32, "dB")
    check(db, d(dy).sum(0), a(dy).sum(0), M, 0, torch.float32, "db")
    assert dB.is_contiguous() and db.is_contiguous()
    dB2, none = compose.lora_db_dB(dy, xa, 0.5, False)
    assert none is None and torch.allclose(dB2, dB, rtol=0, atol=8 * M * U32 * float(a(dy).max() * a(xa).max()))


def test_registered_as_the_cpu_default(monkeypatch):
    """CPU calls run these implementations by default; DELTAKERN_BACKEND=torch runs the references."""
    from deltakern.backends import registry

    for var in ("DELTAKERN_BACKEND", "DELTAKERN_CPU_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    ops = ("linear_fwd", "linear_bwd", "lora_fwd", "lora_fwd_nf4", "lora_dx", "lora_dx_nf4", "dora_norm_parts",
           "dora_fwd", "dora_bwd", "dora_colsum")
    for op in ops:
        assert registry.resolve(op, "cpu") == "cpu", op
    monkeypatch.setenv("DELTAKERN_BACKEND", "torch")
    for op in ops:
        assert registry.resolve(op, "cpu") == "torch", op


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_dora_layer_tall_input_vs_float64(impl, kind, monkeypatch):
    """M > K: g is folded into W (a copy for a dense W, never W itself) on both the CPU op and the
    composition path. Normwise bound for the output and every gradient (each chains up to three
    products of lengths K, N, M): max |got - exact| <= 64 (K + N + M) u32 max |exact|; W untouched."""
    from deltakern.autograd.dora import dora_linear, dora_linear_ref

    monkeypatch.setenv("DELTAKERN_DORA_IMPL", "triton" if impl == "fused" else "torch")
    M, K, N, r = 48, 20, 28, 4
    W = weight(N, K, "dense", torch.float32)[1]
    base = nf4.quantize(W, blocksize=32) if kind == "nf4" else W
    W = base.dequantize(torch.float32) if kind == "nf4" else W
    w_before = W.clone()
    leaves = [rnd((M, K), 1), rnd((N,), 4), rnd((r, K), 2, 0.3), rnd((N, r), 3, 0.3), 0.5 + torch.rand(N)]
    dy = rnd((M, N), 6)

    def run(fn, ts, w_):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        y = fn(ts[0], w_, ts[1], ts[2], ts[3], ts[4], 0.8)
        y.backward(dy.to(y.dtype))
        return [y.detach()] + [t.grad for t in ts]

    got = run(dora_linear, leaves, base)
    ref = run(dora_linear_ref, [t.double() for t in leaves], W.double())
    for name, g_, r_ in zip(("y", "dx", "db", "dA", "dB", "dm"), got, ref):
        assert g_.dtype == torch.float32, name
        scale = float(r_.abs().max())
        assert float((g_.double() - r_).abs().max()) <= 64 * (K + N + M) * U32 * scale, name
    if kind == "dense":
        assert torch.equal(base, w_before)


def test_describe_names_the_blas_compositions(monkeypatch):
    from deltakern.backends import registry

    for var in ("DELTAKERN_BACKEND", "DELTAKERN_CPU_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    assert registry.describe("lora_fwd", "cpu") == f"{cb.KIND} (backend cpu) on CPU"
