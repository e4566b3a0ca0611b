"""The native rank-r kernels (csrc/cpu/cpu_lowrank*.{h,cpp}; deltakern._cpu_ext.lowrank_*) and the
`deltakern::lowrank_*` ops the LoRA / DoRA layers call.

  xat  y = x a^T          gtx  scale g^T x (or its transpose), column sums of x      gb  bias + scale g bt
  (or, in place, out * cs + bias + scale g bt)      colsums  DoRA's sum dY, sum dY (y - b) and dY * g

Every ISA this CPU runs, at 1 and 2 threads, on odd shapes (tails of K / N not a multiple of any
vector width, R not a multiple of the register tiles, M not a multiple of the row tiles) and on
strided operands. Bound: fp32 sums of n terms against float64 of the same inputs,
|err| <= n * eps32 * (|a| . |b|) (eps32 = 2^-23; the classic bound is gamma_n ~ n * 2^-24), plus one
rounding of the scale and the bias add. Results are bit-identical at 1 and 2 threads (one writer
per output, fixed order). The ops' CPU kernels are compared with their torch references and fall
back to them off the kernels' domain (float64, fp16 / bf16, r > 64, tiny calls).
"""

import pytest
import torch

from deltakern import _cpu_ext
from deltakern.backends import registry
from deltakern.backends.reference import lowrank as ref
from deltakern.ops import lowrank

from test_cpu_kernels import EPS32, built_so, ext, isa, threads  # noqa: F401  (fixtures)

# (M, K, R): tails in every dimension; the last ones are big enough that the kernels use 2 threads
SHAPES = [(1, 1, 1), (3, 17, 5), (9, 100, 8), (33, 257, 16), (130, 48, 3), (300, 777, 13), (1024, 384, 8),
          (257, 1031, 64)]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _within(got, exact, bound, what):
    err = (got.double() - exact).abs()
    assert (err <= bound + 1e-30).all(), (what, float(err.max()), float((bound + 1e-30)[err > bound + 1e-30].min()))


def _both_threads(fn):
    """fn() at 1 and at 2 threads: the results must be bit-identical; returns the 2-thread one."""
    outs = []
    for t in (1, 2):
        torch.set_num_threads(t)
        outs.append(fn())
    a, b = outs
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert u is None and v is None or torch.equal(u, v)
    return b


@pytest.mark.parametrize("M,K,R", SHAPES)
def test_xat_within_fp32_rounding(isa, threads, M, K, R):
    x, a = _rand(M, K, seed=M + K), _rand(R, K, seed=R)
    y = _both_threads(lambda: _cpu_ext.lowrank_xat(x, a))
    assert y.shape == (M, R) and y.dtype == torch.float32
    _within(y, x.double() @ a.double().t(), K * EPS32 * (x.double().abs() @ a.double().abs().t()), (isa, M, K, R))


@pytest.mark.parametrize("M,K,R", SHAPES)
def test_gtx_within_fp32_rounding(isa, threads, M, K, R):
    g, x = _rand(M, R, seed=M), _rand(M, K, seed=K)
    gt = _rand(R, M, seed=M + 1).t()  # a transposed view, as dyb arrives
    for gg in (g, gt):
        exact = 0.37 * (gg.double().t() @ x.double())
        bound = M * EPS32 * 0.37 * (gg.double().abs().t() @ x.double().abs()) + EPS32 * exact.abs()
        out, cs = _both_threads(lambda: _cpu_ext.lowrank_gtx(gg, x, 0.37, colsum=True))
        assert out.shape == (R, K) and cs.shape == (K,)
        _within(out, exact, bound, (isa, M, K, R))
        _within(cs, x.double().sum(0), M * EPS32 * x.double().abs().sum(0), (isa, M, K, R, "colsum"))
        out_t, none = _both_threads(lambda: _cpu_ext.lowrank_gtx(gg, x, 0.37, transpose=True))
        assert none is None and out_t.shape == (K, R)
        assert torch.equal(out_t, out.t())  # the same sums, written transposed


@pytest.mark.parametrize("M,N,R", SHAPES)
def test_gb_within_fp32_rounding(isa, threads, M, N, R):
    g, bt, bias = _rand(M, R, seed=M), _rand(R, N, seed=N), _rand(N, seed=7)
    for b in (None, bias):
        exact = 1.5 * (g.double() @ bt.double()) + (0 if b is None else b.double())
        prod = 1.5 * (g.double().abs() @ bt.double().abs())
        bound = R * EPS32 * prod + EPS32 * (prod + exact.abs())
        out = _both_threads(lambda: _cpu_ext.lowrank_gb(g, bt, 1.5, b))
        assert out.shape == (M, N)
        _within(out, exact, bound, (isa, M, N, R, b is None))
    gt = _rand(R, M, seed=3).t()  # strided g
    assert torch.equal(_cpu_ext.lowrank_gb(gt, bt, 1.5, bias), _cpu_ext.lowrank_gb(gt.contiguous(), bt, 1.5, bias))


@pytest.mark.parametrize("M,N,R", SHAPES)
def test_gb_accumulate_within_fp32_rounding(isa, threads, M, N, R):
    """In place: out * cs + bias + scale g bt (DoRA's forward epilogue), cs and bias optional."""
    g, bt, bias, cs, out0 = _rand(M, R, seed=M), _rand(R, N, seed=N), _rand(N, seed=7), _rand(N, seed=8), \
        _rand(M, N, seed=9)
    for b, c in ((None, None), (bias, None), (None, cs), (bias, cs)):
        kept = out0.double() * (1 if c is None else c.double())
        exact = kept + 1.5 * (g.double() @ bt.double()) + (0 if b is None else b.double())
        prod = 1.5 * (g.double().abs() @ bt.double().abs())
        bound = R * EPS32 * prod + 3 * EPS32 * (kept.abs() + prod + (0 if b is None else b.double().abs()))
        got = _both_threads(lambda b=b, c=c: _cpu_ext.lowrank_gb(g, bt, 1.5, b, out=out0.clone(), out_scale=c))
        _within(got, exact, bound, (isa, M, N, R, b is None, c is None))
    buf = out0.clone()
    assert _cpu_ext.lowrank_gb(g, bt, 1.5, out=buf) is buf  # in place, returned


@pytest.mark.parametrize("M,N,_R", SHAPES)
def test_colsums_within_fp32_rounding(isa, threads, M, N, _R):
    """db = sum dY, c = sum dY (y - b), dY * g from one pass; every combination of the optional parts."""
    d, y, bias, g = _rand(M, N, seed=M), _rand(M, N, seed=N), _rand(N, seed=5), _rand(N, seed=6)
    dd, yd = d.double(), y.double()
    for yy, b, gg, want_db in ((y, bias, g, True), (y, None, None, True), (None, None, g, False), (y, bias, None, False)):
        dg, db, c = _both_threads(lambda yy=yy, b=b, gg=gg, w=want_db: _cpu_ext.lowrank_colsums(d, yy, b, gg, w))
        assert (dg is None) == (gg is None) and (db is None) == (not want_db) and (c is None) == (yy is None)
        if gg is not None:
            assert torch.equal(dg, d * gg)  # one fp32 product per element
        if want_db:
            _within(db, dd.sum(0), M * EPS32 * dd.abs().sum(0), (isa, M, N, "db"))
        if yy is not None:
            t = yd - (0 if b is None else b.double())
            bound = (M + 2) * EPS32 * (dd.abs() * (yd.abs() + (0 if b is None else b.double().abs()))).sum(0)
            _within(c, (dd * t).sum(0), bound, (isa, M, N, "c"))
    wide = _rand(M, N + 9, seed=2)  # strided rows: read in place, the same sums
    got = _cpu_ext.lowrank_colsums(wide[:, 3:N + 3], y, bias, g)
    ref = _cpu_ext.lowrank_colsums(wide[:, 3:N + 3].contiguous(), y, bias, g)
    assert all(torch.equal(u, v) for u, v in zip(got, ref))


def test_strided_rows_and_empty(ext):
    x = _rand(40, 200, seed=1)[:, 10:150]  # row stride 200, unit column stride: read in place
    a = _rand(6, 140, seed=2)
    assert torch.equal(_cpu_ext.lowrank_xat(x, a), _cpu_ext.lowrank_xat(x.contiguous(), a))
    xt = _rand(140, 40, seed=3).t()  # column-major x: copied first, same result
    assert torch.equal(_cpu_ext.lowrank_xat(xt, a), _cpu_ext.lowrank_xat(xt.contiguous(), a))
    g = _rand(40, 6, seed=4)
    out, cs = _cpu_ext.lowrank_gtx(g, x, 2.0, colsum=True)
    out2, cs2 = _cpu_ext.lowrank_gtx(g, x.contiguous(), 2.0, colsum=True)
    assert torch.equal(out, out2) and torch.equal(cs, cs2)
    assert torch.equal(_cpu_ext.lowrank_xat(torch.empty(0, 5), _rand(3, 5, seed=5)), torch.empty(0, 3))
    out, cs = _cpu_ext.lowrank_gtx(torch.empty(0, 3), torch.empty(0, 5), 1.0, colsum=True)
    assert torch.equal(out, torch.zeros(3, 5)) and torch.equal(cs, torch.zeros(5))


def test_bad_inputs(ext):
    x, a, g = torch.randn(4, 8), torch.randn(3, 8), torch.randn(4, 3)
    cases = [
        (lambda: _cpu_ext.lowrank_xat(x.double(), a), TypeError, "x must be torch.float32"),
        (lambda: _cpu_ext.lowrank_xat(x, a.half()), TypeError, "a must be torch.float32"),
        (lambda: _cpu_ext.lowrank_xat(x, torch.randn(3, 9)), ValueError, r"a has shape \(3, 9\)"),
        (lambda: _cpu_ext.lowrank_xat(x.to("meta"), a), ValueError, "on meta"),
        (lambda: _cpu_ext.lowrank_xat(x, torch.randn(65, 8)), ValueError, "r <= 64"),
        (lambda: _cpu_ext.lowrank_xat(x[None], a), ValueError, "x must be 2-D"),
        (lambda: _cpu_ext.lowrank_gtx(g, torch.randn(5, 8)), ValueError, r"x has shape \(5, 8\)"),
        (lambda: _cpu_ext.lowrank_gtx(g.bfloat16(), x), TypeError, "g must be torch.float32"),
        (lambda: _cpu_ext.lowrank_gb(g, torch.randn(2, 8)), ValueError, r"bt has shape \(2, 8\)"),
        (lambda: _cpu_ext.lowrank_gb(g, a, 1.0, torch.randn(7)), ValueError, r"bias must have shape \(8,\)"),
        (lambda: _cpu_ext.lowrank_gb(g, a, 1.0, torch.randn(8).double()), TypeError, "bias must be torch.float32"),
        (lambda: _cpu_ext.lowrank_gb(g, a, 1.0, out_scale=torch.randn(8)), ValueError, "pass out as well"),
        (lambda: _cpu_ext.lowrank_gb(g, a, 1.0, out=torch.randn(4, 9)), ValueError, r"out must have shape \(4, 8\)"),
        (lambda: _cpu_ext.lowrank_gb(g, a, 1.0, out=torch.randn(8, 4).t()), ValueError, "out must be contiguous"),
        (lambda: _cpu_ext.lowrank_gb(g, a, 1.0, out=torch.randn(4, 8), out_scale=torch.randn(3)), ValueError,
         r"out_scale must have shape \(8,\)"),
        (lambda: _cpu_ext.lowrank_colsums(x, torch.randn(4, 7)), ValueError, r"y has shape \(4, 7\)"),
        (lambda: _cpu_ext.lowrank_colsums(x, x, torch.randn(8).double()), TypeError, "bias must be torch.float32"),
        (lambda: _cpu_ext.lowrank_colsums(x, None, None, torch.randn(9)), ValueError, r"g must have shape \(8,\)"),
        (lambda: _cpu_ext.lowrank_colsums(x.half()), TypeError, "d must be torch.float32"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_ops_match_references(ext, monkeypatch, dtype):
    """torch.ops.deltakern.lowrank_* (and the eager wrappers) on CPU tensors: the native kernels for
    fp32 above LOWRANK_MIN_WORK, the references otherwise; both within the fp32 bound of each other."""
    monkeypatch.delenv("DELTAKERN_BACKEND", raising=False)
    assert registry.resolve("lowrank_xat", "cpu") == "cpu"
    M, K, R = 300, 257, 16
    x, a, g, bias = (_rand(M, K, seed=1).to(dtype), _rand(R, K, seed=2).to(dtype), _rand(M, R, seed=3).to(dtype),
                     _rand(K, seed=4).to(dtype))
    tol = dict(rtol=1e-5, atol=1e-4) if dtype != torch.bfloat16 else dict(rtol=0, atol=0)  # bf16: the reference itself
    for got, want in [
        (torch.ops.deltakern.lowrank_xat(x, a), ref.lowrank_xat_ref(x, a)),
        (lowrank.xat(x, a), ref.lowrank_xat_ref(x, a)),
        (lowrank.gb(g, a, 0.5, bias), ref.lowrank_gb_ref(g, a, 0.5, bias)),
        (torch.ops.deltakern.lowrank_gb(g, a, 0.5, None), ref.lowrank_gb_ref(g, a, 0.5, None)),
        *zip(torch.ops.deltakern.lowrank_gtx(g, x, 0.5, True, True), ref.lowrank_gtx_ref(g, x, 0.5, True, True)),
        *zip(torch.ops.deltakern.lowrank_gtx(g, x, 0.5, False, False), ref.lowrank_gtx_ref(g, x, 0.5, False, False)),
    ]:
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
    out, none = lowrank.gtx(g, x, 0.5)
    assert none is None and out.shape == (R, K)


def test_backend_torch_runs_the_references(ext, monkeypatch):
    monkeypatch.setenv("DELTAKERN_BACKEND", "torch")
    assert registry.resolve("lowrank_gtx", "cpu") == "torch"
    calls = []
    monkeypatch.setattr(_cpu_ext, "lowrank_xat", lambda *a: calls.append(a))
    x, a = torch.randn(300, 257), torch.randn(16, 257)
    assert torch.equal(lowrank.xat(x, a), ref.lowrank_xat_ref(x, a)) and not calls


def test_opcheck():
    x, a, g = torch.randn(40, 33), torch.randn(5, 33), torch.randn(40, 5)
    torch.library.opcheck(torch.ops.deltakern.lowrank_xat, (x, a))
    torch.library.opcheck(torch.ops.deltakern.lowrank_gtx, (g, x, 0.5, True, False))
    torch.library.opcheck(torch.ops.deltakern.lowrank_gb, (g, a, 2.0, torch.randn(33)))
