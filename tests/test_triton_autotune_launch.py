"""Triton autotuning and launcher tests: what the pinned-config interpreter lane does not exercise by itself.

- Autotuning over several configs (the interpreter and DELTAKERN_TRITON_PIN pin one config, so the
  autotuner's prune functions, pre_hooks and config switching never ran before). A fake `do_bench`
  makes the last config win, deterministically: the column-sum buffers of linear.py are sized for
  the smallest BLOCK_M, so a small-BLOCK_M trial leaves rows that a larger-BLOCK_M winner does not
  overwrite unless the autotuner zeroes them (it does now: `zero_when`).
- The prune functions called with the arguments Triton 3.6 passes (configs, named_args, **kwargs).
- Launcher details: non-contiguous bias / cols, the device guard, repeated calls bit-identical.

The interpreter variants run here; the `gpu` variants run the same checks compiled on the GPU.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from deltakern import nf4  # noqa: E402
from deltakern.triton_kernels import _common as C  # noqa: E402
from deltakern.triton_kernels import dora as D  # noqa: E402
from deltakern.triton_kernels import linear as L  # noqa: E402
from deltakern.triton_kernels import lora as LO  # noqa: E402
from deltakern.triton_kernels import nf4 as NK  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): the last one wins the fake tuning
FWD_SHAPES = [(16, 32, 32, 1, 4, 1), (32, 32, 32, 4, 4, 1)] if not CUDA else \
    [(16, 64, 64, 1, 4, 2), (64, 64, 64, 8, 4, 2), (128, 64, 64, 8, 4, 2)]
DX_SHAPES = FWD_SHAPES


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(shape, seed, scale=1.0, dtype=torch.float32, device=DEV):
    return (torch.randn(shape, generator=gen(seed)) * scale).to(dtype=dtype, device=device)


def forced(tuner, shapes):
    """An autotuner like `tuner` (same key, prune function and pre_hook) over `shapes`, whose fake
    benchmark runs each config once and makes the last one the fastest."""
    left = iter(range(len(shapes) * 10, 0, -1))

    def bench(kernel_call, quantiles=None):
        kernel_call()
        return [float(next(left))] * 3

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
               for bm, bn, bk, g, w, s in shapes]
    prune = {"early_config_prune": tuner.early_config_prune} if tuner.early_config_prune else None
    return triton.autotune(configs=configs, key=list(tuner.keys), prune_configs_by=prune, pre_hook=tuner.pre_hook,
                           do_bench=bench)(tuner.fn)


def close(got, want, scale, tol):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"error {err:.3g} > {tol:.1g} * {scale:.3g}"


def _weight(kind, N, K, dtype):
    W = rand((N, K), 11, 1 / math.sqrt(K), device="cpu")
    if kind == "nf4":
        q = nf4.quantize(W, blocksize=64).to(DEV)
        return q.packed_bytes(), dict(nf4=(q.absmax_fp32(), q.code, q.blocksize)), q.dequantize(dtype)
    W = W.to(dtype=dtype, device=DEV)
    return W, {}, W


# ---- multi-config autotuning -----------------------------------------------------------------


def _colsum_and_sums(monkeypatch, kind, M, N, K, r, dtype, shapes, tol):
    w, kw, Wd = _weight(kind, N, K, dtype)
    nf = int(kind == "nf4")
    monkeypatch.setitem(L._FWD, nf, forced(L._FWD[nf], shapes))
    monkeypatch.setitem(L._DX, nf, forced(L._DX[nf], shapes))
    x, dy = rand((M, K), 1, dtype=dtype), rand((M, N), 2, dtype=dtype)
    xa, B = rand((M, r), 3, dtype=dtype), rand((N, r), 4, dtype=dtype)
    y, b = rand((M, N), 5, dtype=dtype), rand((N,), 6, dtype=dtype)
    z = x.double() @ Wd.double().t() + 0.5 * xa.double() @ B.double().t()
    want_c = (dy.double() * z).sum(0)
    want_db = dy.double().sum(0)
    want_cy = (dy.double() * (y.double() - b.double())).sum(0)
    for call in range(2):  # the first call tunes, the second reuses the winner
        c = L.frozen_forward(x, w, N, lora=(xa, B, 0.5), colsum=dy, **kw)
        close(c, want_c, (dy.double() * z).abs().sum(0).max().item(), tol)
        _, db, cy = L.frozen_backward(dy, w, K, compute_dx=False, want_db=True, y=y, bias=b, **kw)
        close(db, want_db, dy.double().abs().sum(0).max().item(), tol)
        close(cy, want_cy, (dy.double() * (y.double() - b.double())).abs().sum(0).max().item(), tol)
        if call == 0:
            first = (c, db, cy)
    for a, b_ in zip(first, (c, db, cy)):
        assert torch.equal(a, b_), "a repeated call gave different bits"
    assert L._FWD[nf].best_config.kwargs["BLOCK_M"] == shapes[-1][0]  # the fake tuning picked the last config


@pytest.mark.skipif(CUDA, reason="interpreter lane; the gpu variant compiles it")
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_colsum_buffers_survive_autotuning_interpreter(kind, monkeypatch):
    """A 16-row trial writes ceil(70/16) = 5 partial rows; the 32-row winner overwrites 3 of them."""
    _colsum_and_sums(monkeypatch, kind, 70, 24, 40, 4, torch.float32, FWD_SHAPES, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("M", [200, 700])
def test_gpu_colsum_buffers_survive_autotuning(kind, M, monkeypatch):
    _colsum_and_sums(monkeypatch, kind, M, 328, 200, 16, torch.bfloat16, FWD_SHAPES, 1e-3)


def _lora_multi_config(monkeypatch, kind, M, N, K, r, dtype, tol):
    """lora.py's prune functions (named_args['x_ptr'] / ['dy_ptr']) under a multi-config autotune."""
    w, kw, Wd = _weight(kind, N, K, dtype)
    nf = int(kind == "nf4")
    monkeypatch.setitem(LO._FWD, nf, forced(LO._FWD[nf], FWD_SHAPES))
    monkeypatch.setitem(LO._DX, nf, forced(LO._DX[nf], DX_SHAPES))
    x, xa, B, b = rand((M, K), 1, dtype=dtype), rand((M, r), 2, dtype=dtype), rand((N, r), 3, dtype=dtype), \
        rand((N,), 4, dtype=dtype)
    dy, dyb, A = rand((M, N), 5, dtype=dtype), rand((M, r), 6, dtype=dtype), rand((r, K), 7, dtype=dtype)
    want = x.double() @ Wd.double().t() + 0.5 * xa.double() @ B.double().t() + b.double()
    want_dx = dy.double() @ Wd.double() + 0.5 * dyb.double() @ A.double()
    outs = []
    for _ in range(2):
        out = LO.lora_forward(x, w, b, xa, B, 0.5, **kw)
        dx = LO.lora_backward_dx(dy, w, dyb, A, 0.5, **kw)
        close(out, want, want.abs().max().item() + 1, tol)
        close(dx, want_dx, want_dx.abs().max().item() + 1, tol)
        outs.append((out, dx))
    assert all(torch.equal(a, b_) for a, b_ in zip(*outs))


@pytest.mark.skipif(CUDA, reason="interpreter lane; the gpu variant compiles it")
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_lora_multi_config_interpreter(kind, monkeypatch):
    _lora_multi_config(monkeypatch, kind, 40, 33, 50, 4, torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_gpu_lora_multi_config(kind, monkeypatch):
    _lora_multi_config(monkeypatch, kind, 300, 328, 200, 16, torch.bfloat16, 2e-2)


def test_production_tuners_reset_the_column_sum_buffers():
    for nf in (0, 1):
        assert L._FWD[nf].pre_hook is L._FWD_HOOK and L._DX[nf].pre_hook is L._DX_HOOK
    buf, other = torch.ones(3), torch.ones(3)
    L._FWD_HOOK({"out_ptr": buf, "COLSUM": 0})
    assert buf.sum() == 3  # the forward output is not touched outside COLSUM
    L._FWD_HOOK({"out_ptr": buf, "COLSUM": 1}, reset_only=True)
    assert buf.sum() == 0
    L._DX_HOOK({"db_ptr": other, "c_ptr": buf.fill_(1), "DB": 0, "CY": 1})
    assert other.sum() == 3 and buf.sum() == 0  # db_ptr is a dummy (absmax / W) when DB is 0


# ---- prune functions with Triton 3.6's calling convention ------------------------------------


def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
            for bm, bn, bk, g, w, s in shapes]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kernel", ["fwd", "dx"])
@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_prune_functions(dtype, kernel, weight):
    nf = weight == "nf4"
    t = torch.empty(1, dtype=dtype)
    named = {"x_ptr": t, "dy_ptr": t}
    kept = LO._fit_smem(kernel, nf)["early_config_prune"](_configs(LO._CONFIGS[(kernel, weight)]), named)
    assert kept and all(C.smem_estimate(kernel, c, t.element_size(), nf) <= C.SMEM_BUDGET for c in kept)
    for M in (100, 5000):
        for drop in (0, 1):
            kw = {"DROP": drop} if kernel == "fwd" else {}
            kept = L._prune(kernel, nf)["early_config_prune"](_configs(L._CONFIGS[(kernel, weight)]),
                                                              {**named, "M": M}, **kw)
            assert kept
            assert all(C.smem_estimate(kernel, c, t.element_size(), nf, bool(drop)) <= C.SMEM_BUDGET for c in kept)
            # every kept config fills no more rows than the column-sum buffer holds
            min_bm = min(s[0] for s in L._CONFIGS[(kernel, weight)] if M <= L._SMALL_M or s[0] >= 64)
            assert all(c.kwargs["BLOCK_M"] >= min_bm for c in kept)


@pytest.mark.parametrize("kernel", ["fwd", "dx"])
@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_sm8x_pruning_fits_registers(kernel, weight):
    """On sm_8x the pruners shrink the sm_90 tiles until the accumulators (and, for DoRA's NF4 dX, the
    decoded W tile) fit the budget the kernel report's sm_80 compiles showed; sm_90 is unchanged. The
    column-sum buffer bound (BLOCK_M) is untouched, and the pruned lists stay non-empty."""
    nf = weight == "nf4"
    t = torch.empty(1, dtype=torch.bfloat16)
    out_key = "BLOCK_N" if kernel == "fwd" else "BLOCK_K"
    acc = lambda c: c.kwargs["BLOCK_M"] * c.kwargs[out_key] // (32 * c.num_warps)  # noqa: E731
    for M in (100, 5000):
        cases = [({}, 1, False), ({"DROP": 1, "HAS_SCALE": 1}, 2, kernel == "dx"), ({"HAS_SCALE": 1}, 1, kernel == "dx")]
        if kernel == "fwd":
            cases.append(({"DROP": 1, "COLSUM": 1}, 2, True))  # DoRA's dropout column sums of z
        for flags, accs, heavy in cases:
            named = {"x_ptr": t, "dy_ptr": t, "M": M}
            prune = L._prune(kernel, nf)["early_config_prune"]
            with C.pruning_arch(90):
                sm90 = prune(_configs(L._CONFIGS[(kernel, weight)]), named, **flags)
            with C.pruning_arch(80):
                sm80 = prune(_configs(L._CONFIGS[(kernel, weight)]), named, **flags)
            assert sm80 and {c.kwargs["BLOCK_M"] for c in sm80} <= {c.kwargs["BLOCK_M"] for c in sm90}
            limit = C.SM8X_ACC[weight] // accs // (2 if nf and heavy else 1)
            assert all(acc(c) <= limit or c.kwargs[out_key] == 16 for c in sm80), (kernel, weight, flags)
            if nf and heavy:
                assert all(c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps) <= C.SM8X_W_TILE // accs
                           for c in sm80)
        with C.pruning_arch(80):
            lo = LO._fit_smem(kernel, nf)["early_config_prune"](_configs(LO._CONFIGS[(kernel, weight)]), named)
        assert lo and all(acc(c) <= C.SM8X_ACC[weight] for c in lo)
    assert C.target_arch(t) == 90  # a CPU tensor (interpreter lane) keeps the sm_90 lists


# ---- launcher details --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_noncontiguous_bias_and_cols(kind):
    M, N, K, r = 9, 20, 33, 4
    dtype = torch.float32
    w, kw, Wd = _weight(kind, N, K, dtype)
    x, dy, xa, B = rand((M, K), 1), rand((M, N), 2), rand((M, r), 3), rand((N, r), 4)
    b = rand((2 * N,), 5)[::2]  # a strided [N] view
    assert not b.is_contiguous()
    out = L.frozen_forward(x, w, N, bias=b, **kw)
    close(out, x.double() @ Wd.double().t() + b.double(), 10.0, 1e-5)
    y = rand((M, N), 6)
    _, db, c = L.frozen_backward(dy, w, K, compute_dx=False, want_db=True, y=y, bias=b, **kw)
    close(c, (dy.double() * (y.double() - b.double())).sum(0), 10.0, 1e-5)
    cols = (torch.rand(2 * N, generator=gen(7)) > 0.5).to(DEV)[::2]
    assert not cols.is_contiguous()
    got = L.frozen_forward(x, w, N, lora=(xa, B, 0.5), colsum=dy, cols=cols, **kw)
    z = x.double() @ Wd.double().t() + 0.5 * xa.double() @ B.double().t()
    close(got, torch.where(cols, (dy.double() * z).sum(0), 0.0), 10.0, 1e-5)


def test_device_guard_cpu_is_a_no_op():
    with C.device_guard(torch.device("cpu")):
        pass
    if CUDA:
        with C.device_guard(torch.device("cuda", torch.cuda.device_count() - 1)):
            assert torch.cuda.current_device() == torch.cuda.device_count() - 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_second_device_while_current_is_first():
    """Triton launches on the current device: tensors on cuda:1 with cuda:0 current must still work."""
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    M, N, K, r = 64, 96, 128, 16
    x, W = rand((M, K), 1, dtype=torch.bfloat16, device=dev), rand((N, K), 2, 0.1, dtype=torch.bfloat16, device=dev)
    xa, B = rand((M, r), 3, dtype=torch.bfloat16, device=dev), rand((N, r), 4, dtype=torch.bfloat16, device=dev)
    out = LO.lora_forward(x, W, None, xa, B, 0.5)
    want = x.float() @ W.float().t() + 0.5 * xa.float() @ B.float().t()
    close(out, want, want.abs().max().item(), 2e-2)
    packed, absmax = NK.quantize_nf4(x, 64)
    deq = NK.dequantize_nf4(packed, absmax, x.numel(), 64, torch.float32, torch.tensor(NK.NF4_CODE, device=dev))
    assert deq.device == dev and torch.isfinite(deq).all()
    wa, sq = D.norm_parts(W, rand((r, K), 5, dtype=torch.bfloat16, device=dev), N)
    assert wa.device == dev and torch.isfinite(wa).all()


@pytest.mark.gpu
def test_gpu_production_autotune_first_call_equals_second():
    """The real autotuner (every config, real timings) on fresh keys: the tuning call must give the
    same bits as the cached-config call after it, for every kernel family."""
    if os.environ.get("DELTAKERN_TRITON_PIN") == "1":
        pytest.skip("DELTAKERN_TRITON_PIN=1 pins one config")
    M, N, K, r = 333, 344, 232, 16
    dt = torch.bfloat16
    for kind in ("dense", "nf4"):
        w, kw, _ = _weight(kind, N, K, dt)
        x, dy, y, b = rand((M, K), 1, dtype=dt), rand((M, N), 2, dtype=dt), rand((M, N), 3, dtype=dt), \
            rand((N,), 4, dtype=dt)
        xa, B, dyb, A = rand((M, r), 5, dtype=dt), rand((N, r), 6, dtype=dt), rand((M, r), 7, dtype=dt), \
            rand((r, K), 8, dtype=dt)
        g = rand((N,), 9).abs() + 0.5
        keep = torch.rand((M, K), generator=gen(10)).to(DEV) > 0.1
        calls = [
            lambda: LO.lora_forward(x, w, b, xa, B, 0.5, **kw),
            lambda: LO.lora_backward_dx(dy, w, dyb, A, 0.5, mask=keep, mask_scale=1 / 0.9, **kw),
            lambda: L.frozen_forward(x, w, N, bias=b, **kw),
            lambda: L.frozen_forward(x, w, N, bias=b, lora=(xa, B, 0.5), g=g, keep=keep, mask_scale=1 / 0.9, **kw),
            lambda: L.frozen_forward(x, w, N, lora=(xa, B, 0.5), colsum=dy, **kw),
            lambda: L.frozen_backward(dy, w, K, want_db=True, **kw),
            lambda: L.frozen_backward(dy, w, K, g=g, lora=(dyb, A, 0.5), keep=keep, mask_scale=1 / 0.9, want_db=True,
                                      y=y, bias=b, **kw),
            lambda: L.frozen_backward(dy, w, K, compute_dx=False, want_db=True, y=y, bias=b, **kw),
        ]
        for i, call in enumerate(calls):
            first = call()
            second = call()
            first = first if isinstance(first, tuple) else (first,)
            second = second if isinstance(second, tuple) else (second,)
            for a, b_ in zip(first, second):
                assert (a is None) == (b_ is None)
                assert a is None or torch.equal(a, b_), f"{kind} call {i}: the tuning call differs from the next"


def test_fp32_dot_flags_with_torch_fp32_precision_api():
    """torch >= 2.9: after `torch.backends.cuda.matmul.fp32_precision = "tf32"` reading the legacy
    `allow_tf32` raises; the fp32 kernels must still pick their dot precision (subprocess: global state)."""
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    code = ("import torch\n"
            "from deltakern.triton_kernels import _common as C\n"
            "C.INTERPRET = False\n"
            "assert C.dot_flags(torch.float32) == (0, 'ieee')\n"
            "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
            "assert C.dot_flags(torch.float32) == (0, 'tf32'), C.dot_flags(torch.float32)\n"
            "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
            "assert C.dot_flags(torch.float32) == (0, 'ieee')\n"
            "torch.backends.cuda.matmul.allow_tf32 = True\n"
            "assert C.dot_flags(torch.float32) == (0, 'tf32')\n")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("M,N", [(1, 1), (33, 129), (70, 300), (1030, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_sums_kernel(M, N, dtype, monkeypatch):
    """frozen_backward without dX runs `_colsums_kernel` (a 2-D grid over row groups and column tiles):
    db = sum_i dy and c = sum_i dy (y - b) against float64, over more than one row group (COLSUM_ROWS
    lowered), with and without the bias, and only what is asked for."""
    monkeypatch.setattr(L, "COLSUM_ROWS", 64)
    g = gen(M * 1000 + N)
    dy, y = torch.randn(M, N, generator=g).to(dtype).to(DEV), torch.randn(M, N, generator=g).to(dtype).to(DEV)
    b = torch.randn(N, generator=g).to(dtype).to(DEV)
    d64, y64 = dy.double(), y.double()
    bound = lambda t: M * 2.0**-23 * t + 1e-30  # noqa: E731  (fp32 sums of M terms)
    for bias in (None, b):
        dx, db, c = L.frozen_backward(dy, torch.zeros(N, 8, dtype=dtype, device=DEV), 8, compute_dx=False,
                                      want_db=True, y=y, bias=bias)
        want_c = (d64 * (y64 - (0 if bias is None else bias.double()))).sum(0)
        assert dx is None and db.dtype == torch.float32 and c.shape == (N,)
        assert ((db.double() - d64.sum(0)).abs() <= bound(d64.abs().sum(0))).all()
        assert ((c.double() - want_c).abs() <= bound((d64 * (y64 - (0 if bias is None else bias.double()))).abs().sum(0)) * 2).all()
    _, db, c = L.frozen_backward(dy, torch.zeros(N, 8, dtype=dtype, device=DEV), 8, compute_dx=False, want_db=True)
    assert c is None and torch.allclose(db.double(), d64.sum(0), rtol=1e-5, atol=1e-4)
    _, none, c2 = L.frozen_backward(dy, torch.zeros(N, 8, dtype=dtype, device=DEV), 8, compute_dx=False,
                                    want_db=False, y=y)
    assert none is None and c2.shape == (N,)
