"""DoRA / QDoRA: the Function vs float64, PEFT parity (incl. dropout), exact norm gradient, the norm
cache, zero / cancelling rows, saved tensors, the Triton kernels (interpreter), ops, module.

Lanes: CPU (the ops' CPU kernels are the references, plus the torch composition), the Triton
interpreter (launchers called directly on tiny shapes when no GPU is present), `-m gpu`.
Tolerance rule: error vs a float64 reference <= 2x the plain-torch same-dtype error + a small atol.
"""

import copy
import math
import os

import pytest
import torch
from torch import nn

# _helpers first: it sets TRITON_INTERPRET=1 without a GPU, before deltakern's kernels are imported
from _helpers import (CUDA, DEV, INTERPRET, Holder, assert_rule, check_impl_override, gen, grads_of, opcheck_sample, rand,
                      triton_kernels)
from deltakern import nf4
from deltakern.autograd import dora as adora
from deltakern.autograd.dora import DoRANormCache, dora_linear, dora_linear_ref
from deltakern.nn import NF4Linear
from deltakern.nn.dora import DoRALinear
from deltakern.ops import dora as ops


# ---- helpers ---------------------------------------------------------------------------------


def make_problem(M_shape, K, N, r, dtype, seed=0, bias=True, device="cpu"):
    """x, W, bias, A, B (nonzero), magnitude = ||W + sBA|| * U(0.5, 1.5) (s = 1.7), all in dtype."""
    x = rand((*M_shape, K), seed, dtype=dtype, device=device)
    W = rand((N, K), seed + 1, 1 / math.sqrt(K))
    b = rand((N,), seed + 2, dtype=dtype, device=device) if bias else None
    A = rand((r, K), seed + 3, 1 / math.sqrt(K))
    B = rand((N, r), seed + 4, 0.5 / math.sqrt(r))
    m = torch.linalg.norm(W + 1.7 * B @ A, dim=1) * (0.5 + torch.rand(N, generator=gen(seed + 5)))
    return x, W.to(dtype=dtype, device=device), b, A.to(dtype=dtype, device=device), \
        B.to(dtype=dtype, device=device), m.to(dtype=dtype, device=device)


NAMES = ("out", "dx", "dbias", "dA", "dB", "dm")


def check_all(got, base, ref, dtype, kernel=False):
    for name, g, bl, rf in zip(NAMES, got, base, ref):
        if rf is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == rf.shape, name
        assert_rule(g, bl, rf, dtype, name, kernel)


def _nf4_weight(W, dtype, device="cpu"):
    q = nf4.quantize(W.float().cpu(), blocksize=32).to(device)
    return q, q.dequantize(dtype)


# ---- the Function vs float64 (CPU references and the torch composition) ---------------------


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("M_shape,K,N,r,bias", [((5,), 123, 77, 3, True), ((2, 3), 33, 48, 16, False)])
def test_function_vs_float64(impl, kind, dtype, exact, M_shape, K, N, r, bias, monkeypatch):
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", "triton" if impl == "fused" else "torch")
    x, W, b, A, B, m = make_problem(M_shape, K, N, r, dtype, seed=len(M_shape) * 10 + K, bias=bias)
    s = 1.7
    weight, W = _nf4_weight(W, dtype) if kind == "nf4" else (W, W)
    dy = rand((*M_shape, N), 99, dtype=dtype)
    got = grads_of(lambda *a: dora_linear(*a[:1], weight, *a[1:], s, exact_norm_grad=exact), dy, x, b, A, B, m)
    base = grads_of(lambda *a: dora_linear_ref(*a[:1], W, *a[1:], s, exact_norm_grad=exact), dy, x, b, A, B, m)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = grads_of(lambda *a: dora_linear_ref(*a[:1], W.double(), *a[1:], s, exact_norm_grad=exact),
                   dy.double(), d(x), d(b), d(A), d(B), d(m))
    check_all(got, base, ref, dtype)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_composition_in_row_chunks(p, monkeypatch):
    """The torch composition bounds its [rows, N] temporaries by row chunks: same numbers."""
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", "torch")
    x, W, b, A, B, m = make_problem((11,), 30, 20, 3, torch.float32, seed=41)
    dy = rand((11, 20), 42)
    results = []
    for chunk in (adora._CHUNK, 50):  # one chunk, then chunks of 2 rows
        monkeypatch.setattr(adora, "_CHUNK", chunk)
        torch.manual_seed(0)
        results.append(grads_of(lambda *a: dora_linear(a[0], W, *a[1:], 1.1, p), dy, x, b, A, B, m))
    for name, a, b_ in zip(NAMES, *results):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("lane", ["cpu", "interpreter"])
def test_column_sums_split_rows_past_int32(lane, tk, monkeypatch):
    """The composition's column sums (db, the magnitude gradient, the recomputed-z columns) run the
    column-sum kernels over row chunks when one call's operands would pass int32 indexing (M N >= 2**31
    at 131072 tokens x 28672 used to raise): with the limit lowered to a few rows, the same numbers."""
    if lane == "interpreter":
        if not INTERPRET:
            pytest.skip("the GPU lane covers the kernels on CUDA tensors")
        monkeypatch.setenv("DELTAKERN_CPU_KERNELS", "1")
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", "torch")
    x, W, b, A, B, m = make_problem((9,), 24, 20, 3, torch.float32, seed=43)
    m[2] = 0.0  # a zero magnitude: the recomputed-z column path
    dy = rand((9, 20), 44)
    results = []
    for limit in (adora.INT32_ELEMS, 2 * 24):  # everything in one call, then chunks of 2 rows
        monkeypatch.setattr(adora, "INT32_ELEMS", limit)
        results.append(grads_of(lambda *a: dora_linear(a[0], W, *a[1:], 0.9), dy, x, b, A, B, m))
    for name, a, b_ in zip(NAMES, *results):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6, msg=name)


def test_backward_formulas_match_autograd():
    """The gradients written in DoRALinearFunction's docstring are those of its forward formula."""
    M, K, N, r, s, p = 6, 20, 12, 4, 0.8, 0.3
    x, W, b, A, B, m = make_problem((M,), K, N, r, torch.float64, seed=3)
    keep = torch.rand(M, K, generator=gen(5)) > p
    dy = rand((M, N), 6, dtype=torch.float64)
    for kp in (None, keep):
        auto = grads_of(lambda *a: dora_linear_ref(a[0], W, *a[1:], s, p if kp is not None else 0.0, True, kp),
                        dy, x, b, A, B, m)
        xd = x if kp is None else x * kp / (1 - p)
        n = torch.linalg.norm(W + s * B @ A, dim=1)
        g = m / n
        xa = xd @ A.t()
        z = xd @ W.t() + s * xa @ B.t()
        dyb = (dy * g) @ B
        if kp is None:
            dx = (dy * g) @ W + s * dyb @ A
        else:
            dx = dy @ W + kp / (1 - p) * ((dy * (g - 1)) @ W + s * dyb @ A)
        want = (dx, dy.sum(0), s * dyb.t() @ xd, s * g[:, None] * (dy.t() @ xa), (dy * z).sum(0) / n)
        for got, w in zip(auto[1:], want):
            torch.testing.assert_close(got, w)


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_dropout_mask_and_grads(impl, monkeypatch):
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", "triton" if impl == "fused" else "torch")
    M, K, N, r, p, s = 64, 96, 24, 4, 0.25, 0.8
    x, W, b, A, B, m = make_problem((M,), K, N, r, torch.float32, seed=7)
    dy = rand((M, N), 8)
    for exact in (False, True):
        torch.manual_seed(5)
        got = grads_of(lambda *a: dora_linear(a[0], W, *a[1:], s, p, True, exact), dy, x, b, A, B, m)
        torch.manual_seed(5)
        keep = torch.native_dropout(x, p, True)[1]  # the mask the function drew
        assert abs((1 - keep.double().mean().item()) - p) < 0.03
        want = grads_of(lambda *a: dora_linear_ref(a[0], W, *a[1:], s, p, True, keep, exact), dy, x, b, A, B, m)
        for name, g_, w_ in zip(NAMES, got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-5, msg=name)
    y1, y2 = dora_linear(x, W, b, A, B, m, s, p, True), dora_linear(x, W, b, A, B, m, s, p, True)
    assert not torch.equal(y1, y2)
    torch.testing.assert_close(dora_linear(x, W, b, A, B, m, s, p, False), dora_linear(x, W, b, A, B, m, s))


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_magnitude_grad_for_small_and_zero_scales(impl, monkeypatch):
    """Columns with |g| < RECOVER_MIN_SCALE or m = 0 take the recomputed-z path: still exact."""
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", "triton" if impl == "fused" else "torch")
    x, W, b, A, B, m = make_problem((7,), 40, 30, 4, torch.float32, seed=11)
    m[3] = 0.0
    m[5] = -1e-3
    m[10] *= 0.1
    b = b * 50  # a large bias: dividing (y - b) by a small m would lose digits
    dy = rand((7, 30), 12)
    got = grads_of(lambda *a: dora_linear(a[0], W, *a[1:], 1.7), dy, x, b, A, B, m)
    d = lambda t: t.double()  # noqa: E731
    ref = grads_of(lambda *a: dora_linear_ref(a[0], W.double(), *a[1:], 1.7), dy.double(), d(x), d(b), d(A), d(B), d(m))
    torch.testing.assert_close(got[5], ref[5].float(), rtol=1e-5, atol=1e-5)


def test_colsum_helpers_torch_fallbacks():
    """The composition path's torch column sums (used where Triton cannot run) match the op."""
    M, K, N, r = 9, 20, 70, 3
    x, W, b, A, B, m = make_problem((M,), K, N, r, torch.float32, seed=31)
    keep = torch.rand(M, K, generator=gen(1)) > 0.4
    xd = torch.where(keep, x / 0.6, 0.0)
    xa = xd @ A.t()
    dy, y = rand((M, N), 2), rand((M, N), 3)
    Wt = (W, None, None, N, K, 0)
    cols = torch.rand(N, generator=gen(4)) > 0.7
    for kp, c_ in ((keep, None), (None, cols)):
        xa_ = xa if kp is not None else x @ A.t()
        want = ops.dora_colsum_ref(dy, x, W, kp, xa_, B, 1.3, 1 / 0.6, c_)
        got = adora._colsum_z_torch(dy, x, Wt, kp, xa_, B, 1.3, 1 / 0.6, c_)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    db, c = adora._colsums(dy, Wt, torch.ones(N), y, b, True)  # CPU: the chunked torch loop
    torch.testing.assert_close(db, dy.sum(0))
    torch.testing.assert_close(c, (dy * (y - b)).sum(0), rtol=1e-5, atol=1e-5)


def test_only_needed_grads_and_saved_tensors():
    M, K, N, r = 6, 16, 10, 2
    x, W, b, A, B, m = make_problem((M,), K, N, r, torch.float32, seed=1)
    A.requires_grad_(True)
    m.requires_grad_(True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = dora_linear(x, W, b, A, B, m, 1.0)
    y.sum().backward()
    assert A.grad is not None and m.grad is not None and B.grad is None
    # p = 0: the only [M, N] tensor kept is the output itself
    assert shapes.count((M, N)) == 1 and (M, K) in shapes
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = dora_linear(x, W, b, A, B, m, 1.0, dropout_p=0.2)
    assert (M, N) not in shapes  # p > 0: nothing of size [M, N] (the magnitude gradient recomputes z)
    y.sum().backward()
    # nothing needs a gradient but x: no x saved, no xa
    shapes.clear()
    xg = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = dora_linear(xg, W, None, A.detach(), B, m.detach(), 1.0)
    assert (M, K) not in shapes and (M, N) not in shapes and (M, r) not in shapes
    y.sum().backward()
    assert xg.grad.shape == (M, K)


def test_empty_batch():
    x, W, b, A, B, m = make_problem((0,), 16, 8, 2, torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, A, m)]
    y = dora_linear(x, W, b, A, B, m, 1.0)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, 16) and torch.equal(A.grad, torch.zeros_like(A))
    assert torch.equal(m.grad, torch.zeros_like(m))


def test_autocast_casts_inputs():
    x, W, b, A, B, m = make_problem((3,), 32, 16, 4, torch.float32)
    for t in (A, B, m):
        t.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dora_linear(x, W, b, A, B, m, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == B.grad.dtype == m.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), dora_linear(x, W, b, A, B, m, 2.0), rtol=3e-2, atol=3e-2)


# ---- the row norms: expansion, cache, zero and cancelling rows --------------------------------


def _norm_f64(W, A, B, s):
    return torch.linalg.norm(W.double() + s * B.double() @ A.double(), dim=1)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_weight_norm_expansion(kind):
    x, W, b, A, B, m = make_problem((1,), 123, 77, 3, torch.float32, seed=2)
    weight, Wd = _nf4_weight(W, torch.float32) if kind == "nf4" else (W, W)
    wp = adora._W(weight.packed_bytes(), weight.absmax_fp32(), weight.code, 77, 123, 32) if kind == "nf4" \
        else adora._W(W, None, None, 77, 123, 0)
    n, wa, sq = adora.dora_weight_norm(wp, A, B, 1.7)
    torch.testing.assert_close(n.double(), _norm_f64(Wd, A, B, 1.7), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa.double(), Wd.double() @ A.double().t(), rtol=1e-5, atol=1e-6)
    n2, _, _ = adora.dora_weight_norm(wp, A, B, 1.7, sumsq=sq)
    assert torch.equal(n, n2)


def test_cancelling_rows_are_recomputed_exactly():
    K, N, r, s = 64, 8, 2, 2.0
    A = rand((r, K), 1, 0.2)
    B = rand((N, r), 2)
    W = rand((N, K), 3, 0.1)
    W[4] = -s * (B[4] @ A) + 1e-4 * rand((K,), 4)  # ||W_4 + s (BA)_4|| ~ 8e-4 << ||W_4||
    n, _, _ = adora.dora_weight_norm(adora._W(W, None, None, N, K, 0), A, B, s)
    ref = _norm_f64(W, A, B, s)
    assert abs(n[4].item() - ref[4].item()) <= 1e-3 * ref[4].item()
    torch.testing.assert_close(n.double(), ref, rtol=1e-5, atol=1e-7)


def test_zero_rows_raise_naming_them():
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        lin.weight[3] = 0
        lin.weight[7] = 0
    with pytest.raises(ValueError, match=r"rows \[3, 7\]"):
        DoRALinear(lin, r=2, alpha=2)
    x, W, b, A, B, m = make_problem((2,), 16, 12, 2, torch.float32)
    s = 1.5
    W[5] = -s * (B[5] @ A)  # W + s B A has an exactly-zero row
    with pytest.raises(ValueError, match=r"zero for output rows \[5\]"):
        dora_linear(x, W, b, A, B, m, s)


def test_functional_norm_cache():
    x, W, b, A, B, m = make_problem((4,), 24, 16, 3, torch.float32, seed=51)
    cache = DoRANormCache()
    y1 = dora_linear(x, W, b, A, B, m, 1.5, norm_cache=cache)
    norm = cache._norm
    y2 = dora_linear(x, W, b, A, B, m, 1.5, norm_cache=cache)
    assert cache._norm is norm and torch.equal(y1, y2)
    dora_linear(x, W, b, A, B, m, 2.5, norm_cache=cache)  # another scaling
    assert cache._norm is not norm
    norm = cache._norm
    A.mul_(1.1)  # in place: version bump
    y3 = dora_linear(x, W, b, A, B, m, 2.5, norm_cache=cache)
    assert cache._norm is not norm
    torch.testing.assert_close(y3, dora_linear_ref(x, W, b, A, B, m, 2.5), rtol=1e-5, atol=1e-5)


def test_norm_cache_recomputes_only_when_A_or_B_change(monkeypatch):
    calls = []
    from deltakern.autograd import dora_norm

    real = dora_norm.dora_weight_norm
    monkeypatch.setattr(dora_norm, "dora_weight_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    mod = DoRALinear(nn.Linear(24, 16), r=4, alpha=8)
    nn.init.normal_(mod.lora_B, std=0.1)
    opt = torch.optim.SGD([mod.lora_A, mod.lora_B, mod.lora_magnitude_vector], lr=0.1)
    x = torch.randn(5, 24)
    calls.clear()
    for _ in range(3):  # gradient accumulation: three forwards, one norm
        mod(x).square().sum().backward()
    assert len(calls) == 1
    opt.step()  # A and B change in place
    y = mod(x)
    assert len(calls) == 2
    want = dora_linear_ref(x, mod.base.weight, mod.base.bias, mod.lora_A, mod.lora_B, mod.lora_magnitude_vector,
                           mod.scaling)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    mod(x)
    assert len(calls) == 2
    with torch.no_grad():
        mod.lora_magnitude_vector.mul_(2)  # m is not part of the norm
    mod(x)
    assert len(calls) == 2
    with torch.no_grad():
        mod.base.weight.add_(0.01)  # a rewritten base weight (version bump) invalidates it too
    mod(x)
    assert len(calls) == 3


# ---- PEFT parity -----------------------------------------------------------------------------


def _peft_dora(base, r, alpha, dropout=0.0, rslora=False):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=dropout, use_rslora=rslora,
                          use_dora=True)
    model = peft.get_peft_model(Holder(base), cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(rand(layer.lora_A["default"].weight.shape, 11, 0.2))
        layer.lora_B["default"].weight.copy_(rand(layer.lora_B["default"].weight.shape, 12, 0.2))
        mag = layer.lora_magnitude_vector["default"].weight
        mag.mul_((0.5 + torch.rand(mag.shape, generator=gen(13))).to(mag.dtype))
    params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight)
    return model, layer, params


def _ours_from(base, params, r, alpha, dropout=0.0, rslora=False):
    ours = DoRALinear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora).to(params[0].dtype)
    with torch.no_grad():
        for dst, src in zip((ours.lora_A, ours.lora_B, ours.lora_magnitude_vector), params):
            dst.copy_(src)
    return ours, (ours.lora_A, ours.lora_B, ours.lora_magnitude_vector)


def _run(module, x, dy, params, seed=None):
    x = x.detach().clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y = module(x)
    y.backward(dy)
    return (y.detach(), x.grad) + tuple(p.grad for p in params)


def _assert_vs_float64(o, p, x, dy, lin, pparams, scaling, dropout, seed, dtype):
    """Ours (o) and PEFT's (p) (out, dx, dA, dB, dm) by the tolerance rule against the float64 reference, under
    the dropout mask torch.manual_seed(seed) draws for x (as both modules did)."""
    torch.manual_seed(seed)
    keep = torch.native_dropout(x, dropout, True)[1] if dropout else None
    d = lambda t: t.detach().double()  # noqa: E731
    ref = grads_of(lambda x_, b_, A_, B_, m_: dora_linear_ref(x_, d(lin.weight), b_, A_, B_, m_, scaling,
                                                              dropout, True, keep),
                   dy.double(), d(x), d(lin.bias), d(pparams[0]), d(pparams[1]), d(pparams[2]))
    for name, got, base, want in zip(("out", "dx", "dA", "dB", "dm"), o, p, (ref[0], ref[1], ref[3], ref[4], ref[5])):
        assert_rule(got, base, want, dtype, name)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_matches_peft(kind, dtype, dropout):
    """PEFT's DoRA over the (dequantized) dense weight vs ours over the same dense / NF4 weight."""
    torch.manual_seed(0)
    K, N, r, alpha = 123, 77, 3, 6
    lin = nn.Linear(K, N)
    if kind == "nf4":
        ours_base = NF4Linear.from_linear(lin, blocksize=64).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(ours_base.weight.dequantize(torch.float32))
        lin = lin.to(dtype)
        ours_base.bias.data = lin.bias.data.clone()
    else:
        lin = lin.to(dtype)
        ours_base = copy.deepcopy(lin)
    model, layer, pparams = _peft_dora(lin, r, alpha, dropout)
    ours, oparams = _ours_from(ours_base, pparams, r, alpha, dropout)
    assert ours.scaling == layer.scaling["default"]
    model.train()
    ours.train()
    x = rand((5, K), 1, dtype=dtype)
    dy = rand((5, N), 2, dtype=dtype)
    p = _run(model, x, dy, pparams, seed=1234)
    o = _run(ours, x, dy, oparams, seed=1234)
    if dtype == torch.float32:
        for name, a, b_ in zip(("out", "dx", "dA", "dB", "dm"), o, p):
            torch.testing.assert_close(a, b_, rtol=2e-5, atol=2e-5, msg=name)
        return
    _assert_vs_float64(o, p, x, dy, lin, pparams, ours.scaling, dropout, 1234, dtype)


def test_init_matches_peft():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    model, layer, _ = _peft_dora(copy.deepcopy(lin), 8, 16)
    with torch.no_grad():  # undo the helper's perturbation: PEFT's own init value
        layer.lora_magnitude_vector["default"].weight.copy_(torch.linalg.norm(lin.weight, dim=1))
    m = DoRALinear(lin, r=8, alpha=16)
    assert torch.equal(m.lora_B, torch.zeros(32, 8))
    torch.testing.assert_close(m.lora_magnitude_vector, torch.linalg.norm(lin.weight, dim=1))
    assert m.scaling == 2.0 and DoRALinear(lin, r=4, alpha=8, use_rslora=True).scaling == 4.0
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B", "lora_magnitude_vector"}
    x = torch.randn(3, 64)
    torch.testing.assert_close(m(x), lin(x))  # B = 0 and m = ||W||: the adapter is a no-op


def test_merge_unmerge_like_peft():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    model, layer, pparams = _peft_dora(copy.deepcopy(lin), 4, 8)
    m, _ = _ours_from(lin, pparams, 4, 8)
    w0 = lin.weight.detach().clone()
    x = torch.randn(5, 20)
    y = m(x)
    m.merge()
    layer.merge()
    torch.testing.assert_close(lin.weight, layer.get_base_layer().weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x), y)
    q = DoRALinear(NF4Linear.from_linear(nn.Linear(64, 16)), r=2, alpha=2)
    with pytest.raises(ValueError, match="NF4 base"):
        q.merge()


def test_qdora_module_over_nf4linear():
    torch.manual_seed(0)
    lin = nn.Linear(100, 40)
    q = NF4Linear.from_linear(lin, blocksize=64)
    m = DoRALinear(q, r=4, alpha=8, dropout=0.1)
    nn.init.normal_(m.lora_B, std=0.1)
    Wd = q.weight.dequantize(torch.float32)
    torch.testing.assert_close(m.lora_magnitude_vector, torch.linalg.norm(Wd, dim=1))
    m.eval()
    x = torch.randn(3, 100)
    want = dora_linear_ref(x, Wd, q.bias, m.lora_A, m.lora_B, m.lora_magnitude_vector, m.scaling)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


# ---- bad input -------------------------------------------------------------------------------


def test_bad_inputs():
    x, W, b, A, B, m = make_problem((4,), 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(8,\)"):
        dora_linear(x, W, b, A, B, m[:7], 1.0)
    with pytest.raises(TypeError, match="magnitude has dtype torch.float64"):
        dora_linear(x, W, b, A, B, m.double(), 1.0)
    with pytest.raises(ValueError, match="magnitude is on meta"):
        dora_linear(x, W, b, A, B, m.to("meta"), 1.0)
    with pytest.raises(TypeError, match="magnitude must be a torch.Tensor"):
        dora_linear(x, W, b, A, B, [1.0] * 8, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(8, 2\)"):
        dora_linear(x, W, b, A, B[:, :1], m, 1.0)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(2, 16\)"):
        dora_linear(x, W, b, A[:, :15], B, m, 1.0)
    with pytest.raises(ValueError, match="x has 15 features"):
        dora_linear(x[:, :15], W, b, A, B, m, 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        dora_linear(x, W, b[:3], A, B, m, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        dora_linear(x, W, b, A, B, m, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="requires grad"):
        dora_linear(x, W.clone().requires_grad_(True), b, A, B, m, 1.0)
    with pytest.raises(TypeError, match="norm_cache"):
        dora_linear(x, W, b, A, B, m, 1.0, norm_cache={})
    with pytest.raises(TypeError, match="weight must be"):
        dora_linear(x, "W", b, A, B, m, 1.0)
    lin = nn.Linear(16, 8)
    for r in (0, 2.5, True):
        with pytest.raises(ValueError, match="r must be"):
            DoRALinear(lin, r=r, alpha=1)
    with pytest.raises(ValueError, match="alpha must be"):
        DoRALinear(lin, r=2, alpha=float("nan"))
    with pytest.raises(TypeError, match="base must be"):
        DoRALinear(nn.Conv1d(4, 4, 1), r=2, alpha=2)
    with pytest.raises(ValueError, match="in_features=16"):
        DoRALinear(lin, r=2, alpha=2)(torch.randn(3, 15))


# ---- Triton kernels (interpreter without a GPU) ----------------------------------------------


@pytest.fixture
def tk():
    return triton_kernels("linear", "dora")


KERNEL_CASES = [  # (M, K, N, r, kind, dtype, dropout)
    (5, 33, 48, 4, "dense", torch.float32, False),
    (9, 67, 45, 3, "nf4", torch.float32, True),
    (17, 100, 40, 16, "dense", torch.float16, True),
    (7, 100, 40, 5, "nf4", torch.float16, False),
    (9, 40, 33, 4, "nf4", torch.bfloat16, True),
    (7, 64, 37, 4, "nf4", torch.float32, True),  # K % blocksize == 0: the vector-load NF4 tile path
    (5, 96, 40, 5, "nf4", torch.bfloat16, False),
]


def _kernel_problem(M, K, N, r, kind, dtype, drop, seed=0):
    x, W, b, A, B, m = make_problem((M,), K, N, r, dtype, seed=seed, device=DEV)
    if kind == "nf4":
        q, W = _nf4_weight(W, dtype, DEV)
        wargs = (q.packed_bytes(), (q.absmax_fp32(), q.code, q.blocksize))
    else:
        wargs = (W, None)
    g = (0.5 + torch.rand(N, generator=gen(seed + 9))).to(DEV)
    keep = (torch.rand(M, K, generator=gen(seed + 8)) > 0.3).to(DEV) if drop else None
    return x, W, b, A, B, g, keep, wargs


def _plain_fwd(x, W, b, xa, B, g, keep, s, ms):
    """Unfused same-dtype baseline (PEFT-style composition)."""
    base = torch.nn.functional.linear(x, W, b)
    gd = g.to(x.dtype)
    if keep is None:
        return gd * (x @ W.t() + s * (xa @ B.t())) + b
    xd = torch.where(keep, x * ms, 0).to(x.dtype)
    return base + (gd - 1) * (xd @ W.t()) + gd * s * (xa @ B.t())


@pytest.mark.parametrize("M,K,N,r,kind,dtype,drop", KERNEL_CASES)
def test_triton_forward(tk, M, K, N, r, kind, dtype, drop):
    lin, _ = tk
    x, W, b, A, B, g, keep, (w, nq) = _kernel_problem(M, K, N, r, kind, dtype, drop)
    s, ms = 0.75, 1 / 0.7
    xd = x if keep is None else torch.where(keep, x * ms, 0).to(dtype)
    xa = xd @ A.t()
    got = lin.frozen_forward(x, w, N, nf4=nq, bias=b, lora=(xa, B, s), g=g, keep=keep, mask_scale=ms)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = ops.dora_fwd_ref(d(x), d(W), d(b), d(xa), d(B), g.double(), keep, s, ms)
    assert got.dtype == dtype and got.shape == (M, N)
    assert_rule(got, _plain_fwd(x, W, b, xa, B, g, keep, s, ms), ref, dtype, "out", kernel=True)
    assert_rule(ops.dora_fwd_ref(x, W, b, xa, B, g, keep, s, ms), _plain_fwd(x, W, b, xa, B, g, keep, s, ms), ref,
                dtype, "out (reference)")


@pytest.mark.parametrize("M,K,N,r,kind,dtype,drop", KERNEL_CASES)
def test_triton_backward(tk, M, K, N, r, kind, dtype, drop):
    lin, _ = tk
    x, W, b, A, B, g, keep, (w, nq) = _kernel_problem(M, K, N, r, kind, dtype, drop, seed=3)
    s, ms = 0.6, 1 / 0.7
    dy = rand((M, N), 4, dtype=dtype, device=DEV)
    y = rand((M, N), 5, dtype=dtype, device=DEV)
    dyb = dy @ (B.float() * g[:, None]).to(dtype)
    dx, db, c = lin.frozen_backward(dy, w, K, nf4=nq, g=g, lora=(dyb, A, s), keep=keep, mask_scale=ms, want_db=True,
                                    y=y, bias=b)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    rdx, rdb, rc = ops.dora_bwd_ref(d(dy), d(W), d(dyb), d(A), g.double(), keep, d(y), d(b), s, ms)
    gd = g.to(dtype)
    if keep is None:
        plain = (dy * gd) @ W + s * (dyb @ A)
    else:
        plain = dy @ W + torch.where(keep, ((dy * (gd - 1)) @ W + s * (dyb @ A)) * ms, 0).to(dtype)
    assert dx.dtype == dtype and dx.shape == (M, K)
    assert_rule(dx, plain, rdx, dtype, "dx", kernel=True)
    torch.testing.assert_close(db.double(), rdb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.double(), rc, rtol=1e-5, atol=1e-4)
    # column sums only (no dx): one program per row tile
    none, db2, c2 = lin.frozen_backward(dy, w, K, nf4=nq, compute_dx=False, want_db=True, y=y, bias=b)
    assert none is None and torch.equal(db2, db) and torch.equal(c2, c)


@pytest.mark.parametrize("M,K,N,r,kind,dtype,drop", KERNEL_CASES)
def test_triton_colsum(tk, M, K, N, r, kind, dtype, drop):
    lin, _ = tk
    x, W, b, A, B, g, keep, (w, nq) = _kernel_problem(M, K, N, r, kind, dtype, drop, seed=6)
    s, ms = 1.3, 1 / 0.7
    dy = rand((M, N), 7, dtype=dtype, device=DEV)
    xd = x if keep is None else torch.where(keep, x * ms, 0).to(dtype)
    xa = xd @ A.t()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = ops.dora_colsum_ref(d(dy), d(x), d(W), keep, d(xa), d(B), s, ms)
    got = lin.frozen_forward(x, w, N, nf4=nq, lora=(xa, B, s), keep=keep, mask_scale=ms, colsum=dy)
    plain = (dy.float() * (xd @ W.t() + s * (xa @ B.t())).float()).sum(0)
    assert got.dtype == torch.float32 and got.shape == (N,)
    if INTERPRET and dtype == torch.bfloat16:
        # the interpreter's fp32->bf16 cast truncates (not round-to-nearest-even): the in-register
        # x_d / NF4 tiles sit up to 1 ulp below the reference's, a bias the column sum accumulates
        # over M and K. The GPU lane applies the plain rule.
        plain = plain + 2 * (plain - ref.float()).abs().max()
    assert_rule(got, plain, ref, dtype, "c", kernel=True)
    cols = torch.zeros(N, dtype=torch.bool, device=DEV)
    cols[[1, N - 1]] = True  # two column tiles in the interpreter config, the rest skip their loop
    masked = lin.frozen_forward(x, w, N, nf4=nq, lora=(xa, B, s), keep=keep, mask_scale=ms, colsum=dy, cols=cols)
    assert torch.equal(masked[~cols], torch.zeros_like(masked[~cols]))
    torch.testing.assert_close(masked[cols], got[cols])


@pytest.mark.parametrize("kind,dtype", [("dense", torch.float32), ("nf4", torch.float32), ("nf4", torch.float16),
                                        ("dense", torch.bfloat16)])
@pytest.mark.parametrize("K", [130, 128])
def test_triton_norm_parts_and_ctw(tk, kind, dtype, K):
    _, dk = tk
    N, r = 45, 3
    x, W, b, A, B, g, keep, (w, nq) = _kernel_problem(2, K, N, r, kind, dtype, False, seed=12)
    wa, sq = dk.norm_parts(w, A, N, nf4=nq)
    assert wa.shape == (N, r) and sq.shape == (N,) and wa.dtype == sq.dtype == torch.float32
    Wd = W.double()
    torch.testing.assert_close(wa.double(), Wd @ A.double().t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq.double(), Wd.square().sum(1), rtol=1e-5, atol=1e-5)
    wa2, none = dk.norm_parts(w, A, N, nf4=nq, want_sumsq=False)
    assert none is None and torch.allclose(wa2, wa)
    C = rand((N, r), 13, dtype=dtype, device=DEV)
    got = dk.ctw(C, w, K, nf4=nq)
    torch.testing.assert_close(got.double(), C.double().t() @ Wd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [33, 64])
def test_triton_nf4_tile_decode_is_exact(tk, K):
    """W A^T with A = I gives W^T exactly in fp32: the in-register decode is bit-exact (odd K, rows
    straddling bytes and blocks; K = 64: the aligned vector-load path), and the plain forward with
    x = I gives W^T too."""
    lin, dk = tk
    N = 20
    q = nf4.quantize(rand((N, K), 21, 0.3), blocksize=32).to(DEV)
    nq = (q.absmax_fp32(), q.code, q.blocksize)
    dense = q.dequantize(torch.float32)
    eye = torch.eye(K, device=DEV)
    chunks = [dk.norm_parts(q.packed_bytes(), eye[i:i + 16], N, nf4=nq)[0] for i in range(0, K, 16)]
    assert torch.equal(torch.cat(chunks, 1), dense)
    assert torch.equal(lin.linear_forward(eye, q.packed_bytes(), None, N, nf4=nq).t(), dense)


@pytest.mark.parametrize("kind,dtype,p,exact,bias", [
    ("dense", torch.float32, 0.0, False, True),
    ("nf4", torch.float32, 0.3, True, False),
    ("nf4", torch.float16, 0.0, True, True),
    ("dense", torch.float16, 0.3, False, True),
    ("dense", torch.bfloat16, 0.0, False, True),
])
def test_function_through_kernels(tk, kind, dtype, p, exact, bias, monkeypatch):
    """The whole CUDA code path (autograd Function -> ops -> Triton launchers -> kernels) in the
    interpreter on CPU tensors, vs float64 with the same dropout mask."""
    if not INTERPRET:
        pytest.skip("the GPU lane covers this on CUDA tensors")
    monkeypatch.setenv("DELTAKERN_CPU_KERNELS", "1")
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", "torch" if dtype == torch.float16 else "triton")  # fp16: the
    # composition path, whose column sums still run the kernels
    M, K, N, r, s = 6, 37, 29, 3, 1.3
    x, W, b, A, B, m = make_problem((M,), K, N, r, dtype, seed=21, bias=bias)
    m[4] = 0.0  # a zero magnitude: the recomputed-z column path
    weight, W = _nf4_weight(W, dtype) if kind == "nf4" else (W, W)
    dy = rand((M, N), 22, dtype=dtype)
    torch.manual_seed(3)
    got = grads_of(lambda *a: dora_linear(a[0], weight, *a[1:], s, p, True, exact), dy, x, b, A, B, m)
    torch.manual_seed(3)
    keep = torch.native_dropout(x, p, True)[1] if p else None
    base = grads_of(lambda *a: dora_linear_ref(a[0], W, *a[1:], s, p, True, keep, exact), dy, x, b, A, B, m)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = grads_of(lambda *a: dora_linear_ref(a[0], W.double(), *a[1:], s, p, True, keep, exact),
                   dy.double(), d(x), d(b), d(A), d(B), d(m))
    check_all(got, base, ref, dtype, kernel=True)


def test_gpu_config_pruning(tk):
    """The GPU config lists (not run here) prune to configs that fit shared memory, and at large M
    to BLOCK_M >= the row count the column-sum buffers are sized for."""
    lin, _ = tk
    import triton

    from deltakern.triton_kernels._common import SMEM_BUDGET, smem_estimate

    for (kernel, weight), shapes in lin._CONFIGS.items():
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w,
                                 num_stages=st) for bm, bn, bk, g, w, st in shapes]
        prune = lin._prune(kernel, weight == "nf4")["early_config_prune"]
        ptr = "x_ptr" if kernel == "fwd" else "dy_ptr"
        for M in (8, 8192):
            for drop in (0, 1):
                kept = prune(configs, {ptr: torch.empty(0, dtype=torch.bfloat16), "M": M}, DROP=drop)
                assert kept, (kernel, weight, M)
                elem = 2
                assert all(smem_estimate(kernel, c, elem, weight == "nf4", drop) <= SMEM_BUDGET for c in kept)
                min_bm = 64 if M > lin._SMALL_M else min(s[0] for s in shapes)
                assert min(c.kwargs["BLOCK_M"] for c in kept) >= min_bm


def test_triton_launcher_validation(tk):
    lin, dk = tk
    x, W, b, A, B, m = make_problem((4,), 16, 8, 2, torch.float32, device=DEV)
    g = torch.ones(8, device=DEV)
    with pytest.raises(ValueError, match="xa"):
        lin.frozen_forward(x, W, 8, lora=(torch.zeros(4, 3, device=DEV), B, 1.0), g=g)
    with pytest.raises(ValueError, match="g must be fp32"):
        lin.frozen_forward(x, W, 8, lora=(x @ A.t(), B, 1.0), g=g.half())
    with pytest.raises(ValueError, match="weight dtype"):
        lin.frozen_forward(x, W.half(), 8)
    with pytest.raises(ValueError, match="DROP"):
        lin.frozen_forward(x, W, 8, keep=torch.ones(4, 16, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="rank"):
        dk.norm_parts(W, torch.zeros(200, 16, device=DEV), 8)
    assert lin.frozen_forward(x[:0], W, 8, bias=b).shape == (0, 8)


# ---- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [False, True], ids=["detached-norm", "exact-norm-grad"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_compile_fullgraph(kind, exact):
    """A compiled DoRALinear (no graph break: the row norms come from one opaque op instead of the
    eager cache) gives the eager module's output and gradients."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    base = NF4Linear.from_linear(lin, blocksize=32) if kind == "nf4" else lin
    m = DoRALinear(base, r=4, alpha=8, exact_norm_grad=exact)
    nn.init.normal_(m.lora_B)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 40, requires_grad=True)
    w = torch.randn(2, 3, 24)
    results = []
    for fn in (compiled, m):
        y = fn(x)
        grads = torch.autograd.grad((y * w).sum(), (x, m.lora_A, m.lora_B, m.lora_magnitude_vector))
        results.append((y.detach(), *grads))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_)


def test_compiled_zero_norm_row_still_raises():
    lin = nn.Linear(8, 4)
    m = DoRALinear(lin, r=2, alpha=2)
    with torch.no_grad():
        lin.weight[2] = 0.0  # B = 0: row 2 of W + s B A is now exactly zero
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"zero for output rows \[2\]"):
        compiled(torch.randn(3, 8))


def test_weight_norm_op_opcheck():
    torch.manual_seed(0)
    W = torch.randn(12, 20)
    A, B = torch.randn(3, 20), torch.randn(12, 3)
    torch.library.opcheck(torch.ops.deltakern.dora_weight_norm.default, (W, None, None, 12, 20, 0, A, B, 0.5))
    norm, wa, sq = torch.ops.deltakern.dora_weight_norm(W, None, None, 12, 20, 0, A, B, 0.5)
    torch.testing.assert_close(norm, torch.linalg.norm(W + 0.5 * B @ A, dim=1))
    torch.testing.assert_close(wa, W @ A.t())


# ---- ops: opcheck ----------------------------------------------------------------------------


def _op_samples():
    x, W, b, A, B, m = make_problem((5,), 33, 20, 4, torch.float32)
    q = nf4.quantize(W, blocksize=32)
    nq = (q.packed_bytes(), q.absmax_fp32(), q.code, 20, 33, q.blocksize)
    dn = (W, None, None, 20, 33, 0)
    g = torch.rand(20) + 0.5
    xa = x @ A.t()
    dy = rand((5, 20), 4)
    y = rand((5, 20), 5)
    keep = torch.rand(5, 33, generator=gen(1)) > 0.5
    cols = torch.rand(20, generator=gen(2)) > 0.5
    dyb = dy @ B
    C = rand((20, 4), 6)
    D = torch.ops.deltakern
    return [
        (D.dora_norm_parts.default, (*dn, A, 1)),
        (D.dora_norm_parts.default, (*nq, A, 0)),
        (D.dora_fwd.default, (x, *dn, b, xa, B, g, None, 0.5, 1.0)),
        (D.dora_fwd.default, (x, *nq, None, xa, B, g, keep, 0.5, 2.0)),
        (D.dora_bwd.default, (dy, *dn, dyb, A, g, None, y, b, 0.5, 1.0, 1, 1)),
        (D.dora_bwd.default, (dy, *nq, dyb, A, g, keep, None, None, 0.5, 2.0, 1, 0)),
        (D.dora_bwd.default, (dy, *dn, dyb, A, g, None, y, None, 0.5, 1.0, 0, 1)),
        (D.dora_colsum.default, (dy, x, *dn, keep, xa, B, 0.5, 2.0, None)),
        (D.dora_colsum.default, (dy, x, *nq, None, xa, B, 0.5, 1.0, cols)),
        (D.dora_ctw.default, (C, *dn)),
        (D.dora_ctw.default, (C, *nq)),
        (D.dora_fwd_xa.default, (x, *dn, b, A, B, g, 0.5)),
        (D.dora_fwd_xa.default, (x, *nq, None, A, B, g, 0.5)),
        (D.dora_bwd_dyb.default, (dy, *dn, B, A, g, y, b, 0.5, 1)),
        (D.dora_bwd_dyb.default, (dy, *nq, B, A, g, None, None, 0.5, 0)),
    ]


@pytest.mark.parametrize("i", range(15))
def test_opcheck_cpu(i):
    opcheck_sample(_op_samples(), i)


def test_use_triton_chooser(monkeypatch):
    monkeypatch.delenv("DELTAKERN_DORA_IMPL", raising=False)
    assert adora._use_triton(8, 4096, 4096, "nf4") is True
    assert adora._use_triton(8192, 4096, 4096, "nf4") is False
    assert adora._use_triton(32, 4096, 4096, "dense") is True
    assert adora._use_triton(8192, 4096, 4096, "dense") is False
    assert adora._use_triton(1, 4096, 4096, "dense", r=256) is False
    check_impl_override(monkeypatch, adora._use_triton, "DELTAKERN_DORA_IMPL", "bogus")


# ---- ahead-of-time compile for sm_90 (no GPU needed) -----------------------------------------

_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deltakern.triton_kernels import linear as L, dora as D

FLOATS = ("scaling", "mask_scale")
UNIT = {"stride_xk", "stride_wk", "stride_kk", "stride_ar", "stride_br", "stride_dn", "stride_on", "stride_dyn",
        "stride_ak", "stride_yn", "stride_cr"}
def compile_(fn, ptr_types, consts, warps, stages, label):
    consts = dict(consts)
    unit = UNIT - ({"stride_wk"} if consts.get("IS_NF4") else set())  # NF4 passes 0 strides
    consts.update({n: 1 for n in fn.arg_names if n in unit})  # contiguous inner dims: Triton specialises 1
    sig = {n: "constexpr" if n in consts else ptr_types.get(n, "fp32" if n in FLOATS else "i32") for n in fn.arg_names}
    # pointers, sizes and leading strides divisible by 16, as a training-shape launch specialises them
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and n not in FLOATS and n not in ("R",)}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    mma = "wgmma.mma_async" in k.asm["ptx"]
    print(label, "smem", k.metadata.shared, "mma", mma)
    assert k.metadata.shared <= 232448, label
    return mma

def ptrs(fn, dt, nf4, extra):
    t = {n: f"*{dt}" for n in fn.arg_names if n.endswith("_ptr")}
    t.update(absmax_ptr="*fp32", code_ptr="*fp32", keep_ptr="*u8", cols_ptr="*u8", g_ptr="*fp32")
    t.update(extra)
    if nf4:
        t["w_ptr"] = "*u8"
        t["code_ptr"] = "*i64"  # NF4_ALIGNED: the byte-indexed pair table
    return t

for weight in ("dense", "nf4"):
    nf4 = int(weight == "nf4")
    for dt in ("bf16", "fp16"):
        for mode in ("plain", "dora", "drop", "colsum", "colsum_drop"):
            bm, bn, bk, grp, w, s = L._CONFIGS[("fwd", weight)][0]
            colsum = mode.startswith("colsum")
            c = dict(IS_NF4=nf4, NF4_BLOCK=64, NF4_ALIGNED=nf4, HAS_LORA=int(mode != "plain"), HAS_SCALE=int(mode in ("dora", "drop")),
                     HAS_BIAS=int(not colsum), DROP=int(mode.endswith("drop")), COLSUM=int(colsum),
                     COLMASK=int(mode == "colsum"),
                     R_PAD=16, DOT_FP32=0, INPUT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=grp)
            extra = {"out_ptr": "*fp32"} if colsum else {}
            assert compile_(L._fwd_kernel, ptrs(L._fwd_kernel, dt, nf4, extra), c, w, s, f"fwd {weight} {dt} {mode}")
        for mode in ("bitfit", "dora", "drop", "sums"):
            bm, bn, bk, grp, w, s = L._CONFIGS[("dx", weight)][0]
            c = dict(IS_NF4=nf4, NF4_BLOCK=64, NF4_ALIGNED=nf4, COMPUTE_DX=int(mode != "sums"), HAS_SCALE=int(mode in ("dora", "drop")),
                     HAS_LORA=int(mode in ("dora", "drop")), DROP=int(mode == "drop"), DB=1, CY=int(mode != "bitfit"),
                     HAS_BIAS=1, R_PAD=16, DOT_FP32=0, INPUT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                     GROUP_M=grp)
            mma = compile_(L._dx_kernel, ptrs(L._dx_kernel, dt, nf4, {"db_ptr": "*fp32", "c_ptr": "*fp32"}), c, w, s,
                           f"dx {weight} {dt} {mode}")
            assert mma or mode == "sums"
    bn, bk = D._NORM_TILE
    c = dict(IS_NF4=nf4, NF4_BLOCK=64, NF4_ALIGNED=nf4, SUMSQ=1, R_PAD=16, DOT_FP32=0, INPUT_PRECISION="tf32", BLOCK_N=bn, BLOCK_K=bk)
    compile_(D._norm_parts_kernel, ptrs(D._norm_parts_kernel, "bf16", nf4, {"wa_ptr": "*fp32", "sq_ptr": "*fp32"}), c,
             4, 2 if nf4 else 3, f"norm_parts {weight}")
    bn, bk = D._CTW_TILE
    c = dict(IS_NF4=nf4, NF4_BLOCK=64, NF4_ALIGNED=nf4, R_PAD=16, DOT_FP32=0, INPUT_PRECISION="tf32", BLOCK_N=bn, BLOCK_K=bk)
    compile_(D._ctw_kernel, ptrs(D._ctw_kernel, "bf16", nf4, {"out_ptr": "*fp32"}), c, 4, 2 if nf4 else 3,
             f"ctw {weight}")
"""


@pytest.mark.skipif(CUDA, reason="the GPU lane runs the compiled kernels for real")
def test_kernels_compile_for_sm90():
    """Compile every kernel mode's pinned config for sm_90 with Triton's bundled ptxas: catches
    errors the interpreter cannot see and checks shared memory fits an H100."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DELTAKERN_TRITON_PIN")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- GPU lane --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpu_vs_peft(impl, kind, dropout, monkeypatch):
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", impl)
    torch.manual_seed(0)
    K, N, r, alpha, M = 1000, 777, 16, 32, 300
    lin = nn.Linear(K, N)
    if kind == "nf4":
        ours_base = NF4Linear.from_linear(lin, blocksize=64).to(torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(ours_base.weight.dequantize(torch.float32))
    else:
        ours_base = copy.deepcopy(lin).to(torch.bfloat16)
    lin = lin.to(torch.bfloat16)
    if kind == "nf4":
        ours_base.bias.data = lin.bias.data.clone()
    model, layer, pparams = _peft_dora(lin, r, alpha, dropout)
    ours, oparams = _ours_from(ours_base, pparams, r, alpha, dropout)
    model, ours = model.cuda().train(), ours.cuda().train()
    pparams = tuple(p for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                layer.lora_magnitude_vector["default"].weight))
    oparams = (ours.lora_A, ours.lora_B, ours.lora_magnitude_vector)
    x = rand((M, K), 1, dtype=torch.bfloat16, device="cuda")
    dy = rand((M, N), 2, dtype=torch.bfloat16, device="cuda")
    p = _run(model, x, dy, pparams, seed=7)
    o = _run(ours, x, dy, oparams, seed=7)
    _assert_vs_float64(o, p, x, dy, lin, pparams, ours.scaling, dropout, 7, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(15))
def test_gpu_opcheck(i):
    opcheck_sample(_op_samples(), i, "cuda")


def test_cpu_norm_recompute_skips_a_clean_repair_with_the_same_result(monkeypatch):
    """On CPU tensors the steady-state norm skips the fixed-size repair when no row is cancelled:
    bit-identical to running it; a cancelled row still goes through the repair."""
    from deltakern.autograd import dora_norm
    from deltakern.autograd.dora_norm import FrozenWeight, dora_weight_norm

    g = torch.Generator().manual_seed(3)
    N, K, r = 70, 48, 4
    W, A, B = torch.randn(N, K, generator=g), torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    fw = FrozenWeight(W, None, None, N, K, 0)
    calls = []
    topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **k: calls.append(1) or topk(*a, **k))
    fast = dora_weight_norm(fw, A, B, 0.5, None, sync=False)
    assert not calls  # nothing cancelled: no repair ran
    monkeypatch.setattr(dora_norm, "CPU_SKIP_CLEAN_REPAIR", False)
    full = dora_weight_norm(fw, A, B, 0.5, None, sync=False)
    assert calls and all(torch.equal(a, b) for a, b in zip(fast, full))
    monkeypatch.setattr(dora_norm, "CPU_SKIP_CLEAN_REPAIR", True)
    calls.clear()
    A2 = A.clone()
    A2[:, :] = 0
    A2[0] = -W[5] / 0.5  # s (B A)_5 = -W_5 when B_5 = e_0: row 5 cancels exactly
    B2 = B.clone()
    B2[5] = torch.tensor([1.0, 0, 0, 0])
    dora_weight_norm(fw, A2, B2, 0.5, None, sync=False)
    assert calls  # a cancelled row: the repair ran
    with pytest.raises(ValueError, match="became zero"):
        dora_norm.check_dora_norms()


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_triton_projecting_ops_compose_the_fused_ones(kind):
    """The triton backend's dora_fwd_xa / dora_bwd_dyb are the rank-r op and its dora_fwd / dora_bwd, composed."""
    from deltakern.backends import triton as tb
    from deltakern.ops import lowrank

    x, W, b, A, B, m = make_problem((5,), 64, 40, 4, torch.float32, device=DEV)
    dn = (W, None, None, 40, 64, 0)
    if kind == "nf4":
        q = nf4.quantize(W.float().cpu(), blocksize=32).to(DEV)
        dn = (q.packed_bytes(), q.absmax_fp32(), q.code, 40, 64, q.blocksize)
    g = torch.rand(40, generator=gen(3)).to(DEV) + 0.5
    dy, y = rand((5, 40), 4, device=DEV), rand((5, 40), 5, device=DEV)
    out, xa = tb.dora_fwd_xa(x, *dn, b, A, B, g, 0.5)
    assert torch.equal(xa, lowrank.xat(x, A))
    assert torch.equal(out, tb.dora_fwd(x, *dn, b, xa, B, g, None, 0.5, 1.0))
    dx, db, c, dyb = tb.dora_bwd_dyb(dy, *dn, B, A, g, y, b, 0.5, 1)
    assert torch.equal(dyb, lowrank.xat(dy, (B.float() * g[:, None]).t()))
    for u, v in zip((dx, db, c), tb.dora_bwd(dy, *dn, dyb, A, g, None, y, b, 0.5, 1.0, 1, 1)):
        assert torch.equal(u, v)
