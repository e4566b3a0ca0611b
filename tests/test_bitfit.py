"""Bias-only fine-tuning (BitFit): `deltakern.autograd.linear.linear` over a frozen dense / NF4 W.

Lanes: CPU (the ops' CPU kernels are the references, and the torch composition), the Triton
interpreter (launchers and the whole CUDA code path on tiny CPU tensors), `-m gpu`.
Tolerance rule: error vs a float64 reference <= 2x the plain-torch same-dtype error + a small atol.
"""

import math

import pytest
import torch
from torch import nn

# _helpers first: it sets TRITON_INTERPRET=1 without a GPU, before deltakern's kernels are imported
from _helpers import (DEV, DTYPES, INTERPRET, assert_rule, check_impl_override, grads_of, opcheck_sample, rand,
                      triton_kernels)
from benchmarks.common import BitFit
from deltakern import nf4
from deltakern.autograd import linear as alinear
from deltakern.autograd.linear import linear, linear_ref
from deltakern.nn import NF4Linear
from deltakern.ops import linear as ops


def problem(M_shape, K, N, dtype, seed=0, kind="dense", device="cpu"):
    x = rand((*M_shape, K), seed, dtype=dtype, device=device)
    W = rand((N, K), seed + 1, 1 / math.sqrt(K))
    b = rand((N,), seed + 2, dtype=dtype, device=device)
    if kind == "nf4":
        q = nf4.quantize(W, blocksize=32).to(device)
        return x, q, q.dequantize(dtype), b
    W = W.to(dtype=dtype, device=device)
    return x, W, W, b


# ---- the Function vs float64 -----------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M_shape,K,N", [((5,), 123, 77), ((2, 3), 33, 48)])
def test_linear_vs_float64(impl, kind, dtype, M_shape, K, N, monkeypatch):
    monkeypatch.setenv("DELTAKERN_LINEAR_IMPL", "triton" if impl == "fused" else "torch")
    x, weight, W, b = problem(M_shape, K, N, dtype, seed=K, kind=kind)
    dy = rand((*M_shape, N), 9, dtype=dtype)
    got = grads_of(lambda x_, b_: linear(x_, weight, b_), dy, x, b)
    base = grads_of(lambda x_, b_: torch.nn.functional.linear(x_, W, b_), dy, x, b)
    ref = grads_of(lambda x_, b_: linear_ref(x_, W.double(), b_), dy.double(), x.double(), b.double())
    for name, g, bl, rf in zip(("out", "dx", "db"), got, base, ref):
        assert g.dtype == dtype and g.shape == rf.shape, name
        assert_rule(g, bl, rf, dtype, name)


def test_nothing_saved_but_the_weight():
    """x is not needed by any gradient of a frozen linear: only W (or its NF4 parts) is saved (a dense
    fp32 W on the CPU runs torch's own F.linear, which saves the transposed view W^T)."""
    x, W, _, b = problem((7,), 24, 10, torch.float32)
    q = nf4.quantize(W, blocksize=32)
    for weight, allowed in ((W, {(10, 24), (24, 10)}),
                            (q, {tuple(q.packed_bytes().shape), tuple(q.absmax_fp32().shape), (16,)})):
        saved = []
        xg, bg = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = linear(xg, weight, bg)
        assert set(saved) <= allowed, saved
        y.sum().backward()
        torch.testing.assert_close(bg.grad, torch.full((10,), 7.0))


def test_only_needed_grads():
    x, W, _, b = problem((4,), 16, 8, torch.float32)
    b.requires_grad_(True)
    linear(x, W, b).sum().backward()  # x frozen: only db
    torch.testing.assert_close(b.grad, torch.full((8,), 4.0))
    xg = x.clone().requires_grad_(True)
    y = linear(xg, W, None)  # no bias: only dx
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(xg.grad, W.sum(0).expand(4, 16))
    b.grad = None
    xs = x[:0].clone().requires_grad_(True)
    y = linear(xs, W, b)  # empty batch
    assert y.shape == (0, 8)
    y.sum().backward()
    assert xs.grad.shape == (0, 16) and torch.equal(b.grad, torch.zeros(8))


def test_expanded_upstream_gradient():
    x, W, _, b = problem((3, 5), 20, 6, torch.float32)
    bg = b.clone().requires_grad_(True)
    y = linear(x.requires_grad_(True), W, bg)
    y.sum().backward()  # dy is a stride-0 expand
    torch.testing.assert_close(bg.grad, torch.full((6,), 15.0))
    torch.testing.assert_close(x.grad, W.sum(0).expand(3, 5, 20))


def test_bitfit_module_trains_only_the_bias():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    model = BitFit(lin)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    w0 = lin.weight.detach().clone()
    x = torch.randn(8, 32)
    loss0 = model(x).square().mean()
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert model(x).square().mean() < loss0
    assert torch.equal(lin.weight, w0) and lin.weight.grad is None


def test_autocast():
    x, W, _, b = problem((3,), 32, 16, torch.float32)
    bg = b.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, W, bg)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert bg.grad.dtype == torch.float32
    torch.testing.assert_close(bg.grad, torch.full((16,), 3.0))


def test_bad_inputs():
    x, W, _, b = problem((4,), 16, 8, torch.float32)
    with pytest.raises(ValueError, match="requires grad"):
        linear(x, W.clone().requires_grad_(True), b)
    with pytest.raises(ValueError, match="x has 15 features"):
        linear(x[:, :15], W, b)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        linear(x, W, b[:3])
    with pytest.raises(TypeError, match="bias has dtype"):
        linear(x, W, b.double())
    with pytest.raises(TypeError, match="weight has dtype"):
        linear(x, W.half(), b)
    with pytest.raises(ValueError, match="2-D"):
        linear(x, W[None], b)
    with pytest.raises(TypeError, match="weight must be"):
        linear(x, None, b)
    with pytest.raises(TypeError, match="x must be float16"):
        linear(x.long(), W, b)


def test_use_triton_chooser(monkeypatch):
    monkeypatch.delenv("DELTAKERN_LINEAR_IMPL", raising=False)
    assert alinear._use_triton(8192, 4096, 4096, "dense") is False
    assert alinear._use_triton(8192, 4096, 4096, "nf4") is True
    check_impl_override(monkeypatch, alinear._use_triton, "DELTAKERN_LINEAR_IMPL", "cublas")


# ---- ops: opcheck, compile ---------------------------------------------------------------------


def _op_samples(device="cpu"):
    x, W, _, b = problem((5,), 33, 20, torch.float32, device=device)
    q = nf4.quantize(W.float().cpu(), blocksize=32).to(device)
    nq = (q.packed_bytes(), q.absmax_fp32(), q.code, 20, 33, q.blocksize)
    dn = (W, None, None, 20, 33, 0)
    dy = rand((5, 20), 4, device=device)
    D = torch.ops.deltakern
    return [
        (D.linear_fwd.default, (x, *dn, b)),
        (D.linear_fwd.default, (x, *nq, None)),
        (D.linear_bwd.default, (dy, *dn, 1)),
        (D.linear_bwd.default, (dy, *nq, 1)),
        (D.linear_bwd.default, (dy, *dn, 0)),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck_cpu(i):
    opcheck_sample(_op_samples(), i)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_compile_fullgraph(kind):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    m = BitFit(NF4Linear.from_linear(lin, blocksize=32) if kind == "nf4" else lin)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 40)
    results = []
    for fn in (compiled, m):
        xg = x.clone().requires_grad_(True)
        y = fn(xg)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xg.grad, m.base.bias.grad.clone()))
        m.base.bias.grad = None
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_)


# ---- Triton kernels (interpreter without a GPU) ----------------------------------------------


@pytest.fixture
def tk():
    return triton_kernels("linear")


def _as_decoded(W, weight, dtype):
    """The interpreter's fp32->bf16 cast truncates instead of rounding to nearest even, so its bf16
    NF4 tiles can sit 1 ulp off the defined values (a bias a long reduction accumulates). There,
    compare against the weight as the kernel decodes it (read back through x = I, exact); the decode
    itself is checked bit-exactly in fp32 (test_dora.py) and in bf16 by the GPU lane."""
    if not (INTERPRET and dtype == torch.bfloat16 and isinstance(weight, nf4.NF4Weight)):
        return W
    from deltakern.triton_kernels import linear as tk

    N, K = weight.shape
    eye = torch.eye(K, dtype=dtype, device=W.device)
    return tk.linear_forward(eye, weight.packed_bytes(), None, N, nf4=(weight.absmax_fp32(), weight.code,
                                                                      weight.blocksize)).t().contiguous()


KERNEL_CASES = [(5, 33, 48, "dense", torch.float32), (9, 67, 45, "nf4", torch.float32),
                (17, 100, 40, "dense", torch.float16), (7, 100, 40, "nf4", torch.float16),
                (9, 40, 33, "nf4", torch.bfloat16), (33, 20, 70, "dense", torch.bfloat16),
                (7, 64, 37, "nf4", torch.float32), (5, 96, 40, "nf4", torch.bfloat16)]  # K % 32 == 0: vector loads


@pytest.mark.parametrize("M,K,N,kind,dtype", KERNEL_CASES)
def test_triton_linear(tk, M, K, N, kind, dtype):
    x, weight, W, b = problem((M,), K, N, dtype, seed=M, kind=kind, device=DEV)
    W = _as_decoded(W, weight, dtype)
    w, nq = (weight.packed_bytes(), (weight.absmax_fp32(), weight.code, weight.blocksize)) if kind == "nf4" \
        else (weight, None)
    y = tk.linear_forward(x, w, b, N, nf4=nq)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_rule(y, torch.nn.functional.linear(x, W, b), ops.linear_fwd_ref(x.double(), W.double(), b.double()),
                dtype, "out", kernel=True)
    dy = rand((M, N), 3, dtype=dtype, device=DEV)
    dx, db = tk.linear_backward(dy, w, K, nf4=nq)
    rdx, rdb = ops.linear_bwd_ref(dy.double(), W.double())
    assert dx.dtype == dtype and dx.shape == (M, K) and db.dtype == torch.float32 and db.shape == (N,)
    assert_rule(dx, dy @ W, rdx, dtype, "dx", kernel=True)
    torch.testing.assert_close(db.double(), rdb, rtol=1e-6, atol=1e-5)  # fp32 sums of exact values
    dx2, none = tk.linear_backward(dy, w, K, nf4=nq, want_db=False)
    assert none is None and torch.equal(dx2, dx)


@pytest.mark.parametrize("kind,dtype,K", [("dense", torch.float32, 37), ("nf4", torch.float16, 37),
                                           ("nf4", torch.bfloat16, 37), ("nf4", torch.float16, 128)])
def test_function_through_kernels(tk, kind, dtype, K, monkeypatch):
    """Autograd Function -> ops -> Triton launchers -> kernels, on CPU tensors in the interpreter (NF4 with
    K % blocksize == 0 and M <= 16: the forward runs the decode kernel)."""
    if not INTERPRET:
        pytest.skip("the GPU lane covers this on CUDA tensors")
    monkeypatch.setenv("DELTAKERN_CPU_KERNELS", "1")
    monkeypatch.setenv("DELTAKERN_LINEAR_IMPL", "triton")
    x, weight, W, b = problem((2, 5), K, 29, dtype, seed=4, kind=kind)
    W = _as_decoded(W, weight, dtype)
    dy = rand((2, 5, 29), 5, dtype=dtype)
    got = grads_of(lambda x_, b_: linear(x_, weight, b_), dy, x, b)
    base = grads_of(lambda x_, b_: torch.nn.functional.linear(x_, W, b_), dy, x, b)
    ref = grads_of(lambda x_, b_: torch.nn.functional.linear(x_, W.double(), b_), dy.double(), x.double(), b.double())
    for name, g, bl, rf in zip(("out", "dx", "db"), got, base, ref):
        assert g.dtype == dtype, name
        assert_rule(g, bl, rf, dtype, name, kernel=True)


# ---- GPU lane --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_gpu_vs_torch_bias_only(impl, kind, monkeypatch):
    monkeypatch.setenv("DELTAKERN_LINEAR_IMPL", impl)
    x, weight, W, b = problem((300,), 1000, 777, torch.bfloat16, kind=kind, device="cuda")
    dy = rand((300, 777), 9, dtype=torch.bfloat16, device="cuda")
    got = grads_of(lambda x_, b_: linear(x_, weight, b_), dy, x, b)
    base = grads_of(lambda x_, b_: torch.nn.functional.linear(x_, W, b_), dy, x, b)
    ref = grads_of(lambda x_, b_: torch.nn.functional.linear(x_, W.double(), b_), dy.double(), x.double(), b.double())
    for name, g, bl, rf in zip(("out", "dx", "db"), got, base, ref):
        assert_rule(g, bl, rf, torch.bfloat16, name)


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(5))
def test_gpu_opcheck(i):
    opcheck_sample(_op_samples("cuda"), i)


def test_dense_fp32_cpu_is_torch_linear_and_backend_torch_keeps_the_op(monkeypatch):
    """A dense fp32 W on the CPU (cpu backend) runs torch's F.linear itself: the same addmm as the cpu
    backend's op, without the Function's overhead; DELTAKERN_BACKEND=torch still runs the reference op."""
    x, W, _, b = problem((5,), 16, 8, torch.float32)
    b.requires_grad_(True)
    monkeypatch.delenv("DELTAKERN_BACKEND", raising=False)
    y = linear(x, W, b)
    assert y.grad_fn is not None and "Addmm" in type(y.grad_fn).__name__
    assert torch.equal(y, torch.nn.functional.linear(x, W, b))
    monkeypatch.setenv("DELTAKERN_BACKEND", "torch")
    y2 = linear(x, W, b)
    assert "FrozenLinearFunction" in type(y2.grad_fn.next_functions[0][0]).__name__  # under the output's view
    torch.testing.assert_close(y2, y)
