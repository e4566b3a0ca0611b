"""Fused LoRA / QLoRA linear: references, PEFT parity, dropout, Triton kernels, ops, compile.

Lanes: CPU (references and the autograd Function through the ops' CPU kernels), the Triton
interpreter (launchers called directly on tiny shapes when no GPU is present), and `-m gpu`.
Tolerance rule: an error against a float64 reference must be <= 2x the error of the plain-torch
same-dtype path (computed here) + a small atol.
"""

import copy
import math
import os

import pytest
import torch
from torch import nn

# _helpers first: it sets TRITON_INTERPRET=1 without a GPU, before deltakern's kernels are imported
import _helpers
from _helpers import (CUDA, DEV, DTYPES, Holder, assert_rule, check_impl_override, gen, max_err, opcheck_sample, rand,
                      triton_kernels)
from deltakern import nf4
from deltakern.autograd import lora as alora
from deltakern.autograd.lora import lora_linear, lora_linear_backward_ref, lora_linear_ref
from deltakern.nn import NF4Linear
from deltakern.nn.lora import LoRALinear
from deltakern.ops import lora as ops


# ---- helpers ---------------------------------------------------------------------------------


def make_problem(M_shape, K, N, r, dtype, seed=0, bias=True, device="cpu"):
    """x, W (dense), bias, A, B with B nonzero; fp32 masters cast to dtype."""
    x = rand((*M_shape, K), seed, dtype=dtype, device=device)
    W = rand((N, K), seed + 1, 1 / math.sqrt(K), dtype=dtype, device=device)
    b = rand((N,), seed + 2, dtype=dtype, device=device) if bias else None
    A = rand((r, K), seed + 3, 1 / math.sqrt(K), dtype=dtype, device=device)
    B = rand((N, r), seed + 4, 1 / math.sqrt(r), dtype=dtype, device=device)
    return x, W, b, A, B


def grads_of(fn, x, bias, A, B, dy):
    """(out, dx, dbias, dA, dB) of fn(x, bias, A, B) under upstream gradient dy (leaves cloned)."""
    return _helpers.grads_of(fn, dy, x, bias, A, B)


# ---- reference path (CPU): fused ops' CPU kernels and the torch composition ----------------


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M_shape,K,N,r,bias", [((5,), 123, 77, 3, True), ((2, 3), 33, 48, 16, False)])
def test_function_vs_float64(impl, kind, dtype, M_shape, K, N, r, bias, monkeypatch):
    monkeypatch.setenv("DELTAKERN_LORA_IMPL", "triton" if impl == "fused" else "torch")
    x, W, b, A, B = make_problem(M_shape, K, N, r, dtype, seed=len(M_shape) * 10, bias=bias)
    s = 1.7
    if kind == "nf4":
        weight = nf4.quantize(W.float(), blocksize=32)
        W = weight.dequantize(dtype)  # the defined values: cast(fp32(code * absmax))
    else:
        weight = W
    dy = rand((*M_shape, N), 99, dtype=dtype)

    got = grads_of(lambda x_, b_, A_, B_: lora_linear(x_, weight, b_, A_, B_, s), x, b, A, B, dy)
    base = grads_of(lambda x_, b_, A_, B_: lora_linear_ref(x_, W, b_, A_, B_, s), x, b, A, B, dy)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = grads_of(lambda x_, b_, A_, B_: lora_linear_ref(x_, W.double(), b_, A_, B_, s),
                   d(x), d(b), d(A), d(B), dy.double())
    for name, g, bl, rf in zip(("out", "dx", "dbias", "dA", "dB"), got, base, ref):
        if rf is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == rf.shape, name
        assert_rule(g, bl, rf, dtype, name)


def test_backward_ref_matches_autograd():
    x, W, b, A, B = make_problem((7,), 20, 12, 4, torch.float64, seed=3)
    keep = torch.rand(7, 20, generator=gen(5)) > 0.3
    dy = rand((7, 12), 6, dtype=torch.float64)
    auto = grads_of(lambda x_, b_, A_, B_: lora_linear_ref(x_, W, b_, A_, B_, 0.5, 0.3, True, keep), x, b, A, B, dy)
    dx, dA, dB, db = lora_linear_backward_ref(dy, x, W, A, B, 0.5, keep, 0.3)
    for got, want in ((dx, auto[1]), (db, auto[2]), (dA, auto[3]), (dB, auto[4])):
        torch.testing.assert_close(got, want)


def test_only_needed_grads():
    x, W, b, A, B = make_problem((4,), 16, 8, 2, torch.float32, seed=1)
    A.requires_grad_(True)  # x, B, bias frozen
    lora_linear(x, W, b, A, B, 2.0).sum().backward()
    assert A.grad is not None and B.grad is None
    x.requires_grad_(True)
    A.grad = None
    A.requires_grad_(False)
    lora_linear(x, W, None, A, B, 2.0).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_empty_batch():
    x, W, b, A, B = make_problem((0,), 16, 8, 2, torch.float32)
    x.requires_grad_(True)
    A.requires_grad_(True)
    y = lora_linear(x, W, b, A, B, 1.0)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(A.grad, torch.zeros_like(A))


# ---- PEFT parity -----------------------------------------------------------------------------


def _peft_model(base, r, alpha, dropout=0.0, rslora=False):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=dropout, use_rslora=rslora)
    model = peft.get_peft_model(Holder(base), cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():  # nonzero B, fresh A
        layer.lora_A["default"].weight.copy_(rand(layer.lora_A["default"].weight.shape, 11, 0.2))
        layer.lora_B["default"].weight.copy_(rand(layer.lora_B["default"].weight.shape, 12, 0.2))
    return model, layer


def _ours_from_peft(base_copy, layer, r, alpha, dropout=0.0, rslora=False):
    ours = LoRALinear(base_copy, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    return ours


def _run(module, x, dy, A, B):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_peft(dtype, rslora):
    torch.manual_seed(0)
    K, N, r, alpha = 40, 24, 4, 8
    lin = nn.Linear(K, N).to(dtype)
    ours_base = copy.deepcopy(lin)
    model, layer = _peft_model(lin, r, alpha, rslora=rslora)
    ours = _ours_from_peft(ours_base, layer, r, alpha, rslora=rslora)
    assert ours.scaling == layer.scaling["default"]
    x = rand((2, 5, K), 1, dtype=dtype)
    dy = rand((2, 5, N), 2, dtype=dtype)
    p = _run(model, x, dy, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    o = _run(ours, x, dy, ours.lora_A, ours.lora_B)
    if dtype == torch.float32:
        for a, b_ in zip(o, p):
            torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
        return
    # bf16: both against a float64 evaluation of the same parameters, PEFT's error as the baseline
    d = lambda t: t.detach().double()  # noqa: E731
    ref = grads_of(lambda x_, b_, A_, B_: lora_linear_ref(x_, d(ours_base.weight), b_, A_, B_, ours.scaling),
                   d(x), d(ours_base.bias), d(ours.lora_A), d(ours.lora_B), dy.double())
    for name, got, base, want in zip(("out", "dx", "dA", "dB"), o, p, (ref[0], ref[1], ref[3], ref[4])):
        assert_rule(got, base, want, dtype, name)


def test_matches_peft_over_bitsandbytes_nf4():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    K, N, r, alpha = 100, 48, 4, 8
    lin = nn.Linear(K, N)
    q = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)
    q.bias = nn.Parameter(lin.bias.data.clone())
    q = q.to("cpu")
    sd = q.state_dict()
    ours_base = NF4Linear(nf4.NF4Weight.from_bnb_state_dict(sd, "weight"), sd["bias"])
    model, layer = _peft_model(q, r, alpha)
    ours = _ours_from_peft(ours_base, layer, r, alpha)
    x = rand((6, K), 1)
    dy = rand((6, N), 2)
    with torch._dynamo.config.patch(disable=True):  # bnb compiles its CPU dequant; run it eagerly
        p = _run(model, x, dy, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    o = _run(ours, x, dy, ours.lora_A, ours.lora_B)
    for a, b_ in zip(o, p):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_init_matches_peft_scheme():
    lin = nn.Linear(64, 32)
    m = LoRALinear(lin, r=8, alpha=16)
    assert torch.equal(m.lora_B, torch.zeros(32, 8))
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.5 * bound
    assert m.scaling == 2.0 and LoRALinear(lin, r=4, alpha=8, use_rslora=True).scaling == 4.0
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    x = torch.randn(3, 64)
    torch.testing.assert_close(m(x), lin(x))


# ---- dropout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_same_mask_as_peft(dtype):
    torch.manual_seed(0)
    K, N, r, alpha, p = 48, 16, 4, 8, 0.3
    lin = nn.Linear(K, N).to(dtype)
    ours_base = copy.deepcopy(lin)
    model, layer = _peft_model(lin, r, alpha, dropout=p)
    ours = _ours_from_peft(ours_base, layer, r, alpha, dropout=p)
    model.train()
    ours.train()
    x = rand((3, 7, K), 1, dtype=dtype)
    dy = rand((3, 7, N), 2, dtype=dtype)
    torch.manual_seed(1234)
    pr = _run(model, x, dy, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    torch.manual_seed(1234)
    o = _run(ours, x, dy, ours.lora_A, ours.lora_B)
    for a, b_ in zip(o, pr):  # fp32: same mask -> same numbers; bf16: within a few bf16 ulps of the max
        if dtype == torch.float32:
            torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
        else:
            assert max_err(a, b_) <= 2**-6 * b_.abs().max().item()
    # eval mode: no dropout at all
    ours.eval()
    xe = x[:1]
    plain = lora_linear(xe, ours_base.weight, ours_base.bias, ours.lora_A, ours.lora_B, ours.scaling)
    torch.testing.assert_close(ours(xe), plain)


def test_dropout_mask_statistics_and_grads():
    M, K, N, r, p, s = 64, 96, 24, 4, 0.25, 0.8
    x, W, b, A, B = make_problem((M,), K, N, r, torch.float32, seed=7)
    dy = rand((M, N), 8)
    torch.manual_seed(5)
    got = grads_of(lambda x_, b_, A_, B_: lora_linear(x_, W, b_, A_, B_, s, p, True), x, b, A, B, dy)
    torch.manual_seed(5)
    keep = torch.native_dropout(x.reshape(-1, K), p, True)[1]  # the mask the function drew
    frac = 1 - keep.double().mean().item()
    assert abs(frac - p) < 0.03, frac
    dx, dA, dB, db = lora_linear_backward_ref(dy, x, W, A, B, s, keep, p)
    out = lora_linear_ref(x, W, b, A, B, s, p, True, keep)
    for g, want in zip(got, (out, dx, db, dA, dB)):
        torch.testing.assert_close(g, want)
    # the mask changes between calls, and p>0 outside training is the plain path
    y1 = lora_linear(x, W, b, A, B, s, p, True)
    y2 = lora_linear(x, W, b, A, B, s, p, True)
    assert not torch.equal(y1, y2)
    torch.testing.assert_close(lora_linear(x, W, b, A, B, s, p, False), lora_linear(x, W, b, A, B, s))


# ---- Triton kernels (interpreter without a GPU) ----------------------------------------------


@pytest.fixture
def tk():
    return triton_kernels("lora")


KERNEL_CASES = [  # (M, K, N, r, kind, dtype, bias/mask)
    (5, 33, 48, 4, "dense", torch.float32, True),
    (5, 33, 48, 4, "nf4", torch.float32, False),
    (17, 100, 48, 16, "nf4", torch.float16, True),
    (17, 100, 48, 16, "dense", torch.float16, False),
    (9, 100, 40, 4, "nf4", torch.bfloat16, True),
    (7, 64, 40, 4, "nf4", torch.float32, True),  # K % blocksize == 0: the vector-load NF4 tile path
    (6, 96, 37, 16, "nf4", torch.float16, False),
]


def _kernel_problem(M, K, N, r, kind, dtype, seed=0):
    x, W, b, A, B = make_problem((M,), K, N, r, dtype, seed=seed, device=DEV)
    if kind == "nf4":
        q = nf4.quantize(W.float().cpu(), blocksize=32).to(DEV)
        W = q.dequantize(dtype)
        wargs = (q.packed_bytes(), dict(nf4=(q.absmax_fp32(), q.code, q.blocksize)))
    else:
        wargs = (W, {})
    return x, W, b, A, B, wargs


@pytest.mark.parametrize("M,K,N,r,kind,dtype,flag", KERNEL_CASES)
def test_triton_forward(tk, M, K, N, r, kind, dtype, flag):
    x, W, b, A, B, (w, kw) = _kernel_problem(M, K, N, r, kind, dtype)
    b = b if flag else None
    xa = x @ A.t()
    got = tk.lora_forward(x, w, b, xa, B, 0.75, **kw)
    base = ops.lora_fwd_ref(x, W, b, xa, B, 0.75)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = ops.lora_fwd_ref(d(x), d(W), d(b), d(xa), d(B), 0.75)
    assert got.dtype == dtype and got.shape == (M, N)
    plain = torch.nn.functional.linear(x, W, b) + 0.75 * (xa @ B.t())  # unfused same-dtype baseline
    assert_rule(got, plain, ref, dtype, "out")
    assert_rule(base, plain, ref, dtype, "out (reference)")


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_triton_projecting_ops_compose_the_fused_ones(tk, kind):
    """The triton backend's lora_fwd_xa / lora_dx_dyb are the rank-r op and the fused kernel, composed."""
    from deltakern.backends import triton as triton_backend
    from deltakern.ops import lowrank

    M, K, N, r = 5, 64, 40, 4
    x, W, b, A, B, (w, kw) = _kernel_problem(M, K, N, r, kind, torch.float32)
    absmax, code, bs = kw.get("nf4", (None, None, 0))
    y, xa = triton_backend.lora_fwd_xa(x, w, absmax, code, N, K, bs, b, A, B, 0.5)
    assert torch.equal(xa, lowrank.xat(x, A)) and torch.equal(y, tk.lora_forward(x, w, b, xa, B, 0.5, **kw))
    dy = rand((M, N), 4, dtype=torch.float32, device=DEV)
    dx, dyb = triton_backend.lora_dx_dyb(dy, w, absmax, code, N, K, bs, B, A, 0.5)
    assert torch.equal(dyb, lowrank.xat(dy, B.t()))
    assert torch.equal(dx, tk.lora_backward_dx(dy, w, dyb, A, 0.5, **kw))


@pytest.mark.parametrize("M,K,N,r,kind,dtype,flag", KERNEL_CASES)
def test_triton_backward_dx(tk, M, K, N, r, kind, dtype, flag):
    x, W, b, A, B, (w, kw) = _kernel_problem(M, K, N, r, kind, dtype, seed=3)
    dy = rand((M, N), 4, dtype=dtype, device=DEV)
    dyb = dy @ B
    keep = (torch.rand(M, K, generator=gen(9)) > 0.3).to(DEV) if flag else None
    got = tk.lora_backward_dx(dy, w, dyb, A, 0.6, keep, 1 / 0.7, **kw)
    base = ops.lora_dx_ref(dy, W, dyb, A, 0.6, keep, 1 / 0.7)
    ref = ops.lora_dx_ref(dy.double(), W.double(), dyb.double(), A.double(), 0.6, keep, 1 / 0.7)
    assert got.dtype == dtype and got.shape == (M, K)
    lora = 0.6 * (dyb @ A)
    plain = dy @ W + (lora if keep is None else lora * keep / 0.7)
    assert_rule(got, plain, ref, dtype, "dx")
    assert_rule(base, plain, ref, dtype, "dx (reference)")


@pytest.mark.parametrize("K,blocksize", [(33, 32), (100, 64), (64, 32), (128, 64)])
def test_triton_nf4_tile_decode_is_exact(tk, K, blocksize):
    """x = I makes out = W^T exactly in fp32: checks the in-register dequantization bit for bit,
    with rows that straddle bytes (odd K) and blocks."""
    N, r = 20, 4
    W = rand((N, K), 21, 0.3)
    q = nf4.quantize(W, blocksize=blocksize, double_quant=True).to(DEV)
    x = torch.eye(K, device=DEV)
    xa = torch.zeros(K, r, device=DEV)
    B = torch.zeros(N, r, device=DEV)
    out = tk.lora_forward(x, q.packed_bytes(), None, xa, B, 1.0, nf4=(q.absmax_fp32(), q.code, q.blocksize))
    assert torch.equal(out.t(), q.dequantize(torch.float32))
    dx = tk.lora_backward_dx(torch.eye(N, device=DEV), q.packed_bytes(), torch.zeros(N, r, device=DEV),
                             torch.zeros(r, K, device=DEV), 1.0, nf4=(q.absmax_fp32(), q.code, q.blocksize))
    assert torch.equal(dx, q.dequantize(torch.float32))


def test_triton_launcher_validation(tk):
    x, W, b, A, B = make_problem((4,), 16, 8, 2, torch.float32, device=DEV)
    with pytest.raises(ValueError, match="xa"):
        tk.lora_forward(x, W, b, torch.zeros(4, 3, device=DEV), B, 1.0)
    with pytest.raises(ValueError, match="weight dtype"):
        tk.lora_forward(x, W.half(), b, x @ A.t(), B, 1.0)
    with pytest.raises(ValueError, match="rank"):
        tk.lora_forward(x, W, b, torch.zeros(4, 200, device=DEV), torch.zeros(8, 200, device=DEV), 1.0)
    assert tk.lora_forward(x[:0], W, b, (x @ A.t())[:0], B, 1.0).shape == (0, 8)


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deltakern.triton_kernels import lora as tk

ptrs = {
    "fwd": ("x_ptr", "w_ptr", "absmax_ptr", "code_ptr", "xa_ptr", "b_ptr", "bias_ptr", "out_ptr"),
    "dx": ("dy_ptr", "w_ptr", "absmax_ptr", "code_ptr", "dyb_ptr", "a_ptr", "mask_ptr", "dx_ptr"),
}
unit = ("stride_xk", "stride_wk", "stride_ar", "stride_br", "stride_on", "stride_dyn", "stride_ak", "stride_mk")
for kernel, weight, dt, prec in [("fwd", "dense", "bf16", "tf32"), ("fwd", "nf4", "bf16", "tf32"),
                                 ("dx", "dense", "bf16", "tf32"), ("dx", "nf4", "bf16", "tf32"),
                                 ("fwd", "nf4", "fp32", "ieee"), ("dx", "dense", "fp16", "tf32")]:
    fn = tk._lora_fwd_kernel if kernel == "fwd" else tk._lora_dx_kernel
    nf4 = int(weight == "nf4")
    bm, bn, bk, group, warps, stages = tk._CONFIGS[(kernel, weight)][0]  # the pinned config
    types = {name: f"*{dt}" for name in ptrs[kernel]}
    types.update(absmax_ptr="*fp32", code_ptr="*fp32", mask_ptr="*u8")
    if nf4:
        types["w_ptr"] = "*u8"
        types["code_ptr"] = "*i64"  # NF4_ALIGNED: the byte-indexed pair table
    flag = "HAS_BIAS" if kernel == "fwd" else "HAS_MASK"
    consts = {"IS_NF4": nf4, "NF4_BLOCK": 64, "NF4_ALIGNED": nf4, flag: 1, "R_PAD": 16, "DOT_FP32": 0, "INPUT_PRECISION": prec,
              "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}
    consts.update({name: 1 for name in unit if name in fn.arg_names})
    sig = {n: "constexpr" if n in consts else types.get(n, "fp32" if n in ("scaling", "mask_scale") else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and n not in ("scaling", "mask_scale", "R")}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    smem = k.metadata.shared
    mma = "wgmma.mma_async" in k.asm["ptx"]
    print(kernel, weight, dt, "smem", smem, "wgmma", mma)
    assert smem <= 232448, (kernel, weight, dt, smem)
    assert mma or dt == "fp32", (kernel, weight, dt)
"""


@pytest.mark.skipif(CUDA, reason="the GPU lane runs the compiled kernels for real")
def test_kernels_compile_for_sm90():
    """Without a GPU, compile the pinned configs ahead of time for sm_90 (Triton's bundled ptxas):
    catches errors of the compiled path the interpreter cannot see, and checks shared memory fits
    an H100 and the dots lower to wgmma."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DELTAKERN_TRITON_PIN")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- ops: opcheck, chooser, compile ----------------------------------------------------------


def _op_samples(dtype=torch.float32, device="cpu"):
    x, W, b, A, B = make_problem((5,), 33, 20, 4, dtype, device=device)
    q = nf4.quantize(W.float().cpu(), blocksize=32).to(device)
    xa = x @ A.t()
    dy = rand((5, 20), 4, dtype=dtype, device=device)
    dyb = dy @ B
    keep = (torch.rand(5, 33, generator=gen(1)) > 0.5).to(device)
    nq = (q.packed_bytes(), q.absmax_fp32(), q.code, 20, 33, q.blocksize)
    return [
        (torch.ops.deltakern.lora_fwd.default, (x, W, b, xa, B, 0.5)),
        (torch.ops.deltakern.lora_fwd.default, (x, W, None, xa, B, 0.5)),
        (torch.ops.deltakern.lora_fwd_nf4.default, (x, *nq, b, xa, B, 0.5)),
        (torch.ops.deltakern.lora_dx.default, (dy, W, dyb, A, 0.5, keep, 2.0)),
        (torch.ops.deltakern.lora_dx.default, (dy, W, dyb, A, 0.5, None, 1.0)),
        (torch.ops.deltakern.lora_dx_nf4.default, (dy, *nq, dyb, A, 0.5, keep, 2.0)),
        (torch.ops.deltakern.lora_fwd_xa.default, (x, W, None, None, 20, 33, 0, b, A, B, 0.5)),
        (torch.ops.deltakern.lora_fwd_xa.default, (x, *nq, None, A, B, 0.5)),
        (torch.ops.deltakern.lora_dx_dyb.default, (dy, W, None, None, 20, 33, 0, B, A, 0.5)),
        (torch.ops.deltakern.lora_dx_dyb.default, (dy, *nq, B, A, 0.5)),
    ]


@pytest.mark.parametrize("i", range(10))
def test_opcheck_cpu(i):
    opcheck_sample(_op_samples(), i)


def test_use_triton_chooser(monkeypatch):
    monkeypatch.delenv("DELTAKERN_LORA_IMPL", raising=False)
    assert alora._use_triton(8, 4096, 4096, "nf4") is True
    assert alora._use_triton(8192, 4096, 4096, "nf4") is False
    assert alora._use_triton(8192, 4096, 4096, "dense") is False
    assert alora._use_triton(1, 4096, 4096, "dense", r=512) is False
    monkeypatch.setenv("DELTAKERN_LORA_IMPL", "torch")
    assert alora._use_triton(1, 4096, 4096, "nf4") is False
    check_impl_override(monkeypatch, alora._use_triton, "DELTAKERN_LORA_IMPL", "cublas")


@pytest.mark.parametrize("kind,p", [("dense", 0.0), ("nf4", 0.0), ("dense", 0.2)])
def test_compile_fullgraph(kind, p):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    base = NF4Linear.from_linear(lin, blocksize=32) if kind == "nf4" else lin
    m = LoRALinear(base, r=4, alpha=8, dropout=p)
    nn.init.normal_(m.lora_B)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 40)
    results = []
    for fn in (compiled, m):
        torch.manual_seed(7)
        results.append(_run(fn, x, torch.ones(2, 3, 24), m.lora_A, m.lora_B))
        m.lora_A.grad = m.lora_B.grad = None
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_)


def test_autocast_casts_inputs():
    lin = nn.Linear(32, 16)
    m = LoRALinear(lin, r=4, alpha=4)
    nn.init.normal_(m.lora_B)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and m.lora_B.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), m(x), rtol=3e-2, atol=3e-2)


# ---- module: merge, bad input ------------------------------------------------------------------


def test_merge_unmerge_dense():
    lin = nn.Linear(20, 12)
    m = LoRALinear(lin, r=4, alpha=8)
    nn.init.normal_(m.lora_B)
    w0 = lin.weight.detach().clone()
    x = torch.randn(5, 20)
    y = m(x)
    m.merge()
    assert m.merged
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight, w0 + m.scaling * m.lora_B.detach() @ m.lora_A.detach())
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), y)


def test_merge_nf4_requires_requantize():
    lin = nn.Linear(64, 16)
    m = LoRALinear(NF4Linear.from_linear(lin), r=4, alpha=8)
    nn.init.normal_(m.lora_B, std=0.05)
    x = torch.randn(5, 64)
    y = m(x)
    with pytest.raises(ValueError, match="requantize=True"):
        m.merge()
    m.merge(requantize=True)
    assert m.merged and isinstance(m.base.weight, nf4.NF4Weight)
    # requantization error is 4-bit sized, not exact
    assert max_err(m(x), y) < 0.25 * y.abs().max().item()
    m.unmerge(requantize=True)
    assert not m.merged


def test_bad_inputs():
    lin = nn.Linear(16, 8)
    for r in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="r must be"):
            LoRALinear(lin, r=r, alpha=1)
    for alpha in (0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="alpha must be"):
            LoRALinear(lin, r=2, alpha=alpha)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(lin, r=2, alpha=2, dropout=1.0)
    with pytest.raises(TypeError, match="base must be"):
        LoRALinear(nn.Conv1d(16, 8, 1), r=2, alpha=2)
    with pytest.raises(TypeError, match="base must be"):
        LoRALinear(torch.randn(8, 16), r=2, alpha=2)
    m = LoRALinear(lin, r=2, alpha=2)
    with pytest.raises(ValueError, match="in_features=16"):
        m(torch.randn(3, 15))
    with pytest.raises(TypeError, match="x must be float16"):
        m(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="has dtype torch.float32 but x has torch.bfloat16"):
        m(torch.randn(3, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="meta"):
        m(torch.randn(3, 16, device="meta"))
    x, W, b, A, B = make_problem((3,), 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="requires grad"):
        lora_linear(x, W.requires_grad_(True), b, A, B, 1.0)
    W.requires_grad_(False)
    with pytest.raises(TypeError, match="lora_B"):
        lora_linear(x, W, b, A, B.double(), 1.0)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        lora_linear(x, W, b, A, B.t().contiguous(), 1.0)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, W, b[:4], A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, b, A, B, 1.0, dropout_p=1.5)
    with pytest.raises(TypeError, match="weight must be"):
        lora_linear(x, "W", b, A, B, 1.0)


# ---- GPU lane ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("M", [16, 2048])
def test_gpu_dense_vs_peft(impl, M, monkeypatch):
    monkeypatch.setenv("DELTAKERN_LORA_IMPL", impl)
    torch.manual_seed(0)
    K, N, r, alpha = 4096, 4096, 16, 32
    dtype = torch.bfloat16
    lin = nn.Linear(K, N, device="cuda", dtype=dtype)
    ours_base = copy.deepcopy(lin)
    model, layer = _peft_model(lin, r, alpha)
    model.cuda()
    ours = _ours_from_peft(ours_base, layer, r, alpha)
    x = rand((M, K), 1, dtype=dtype, device="cuda")
    dy = rand((M, N), 2, dtype=dtype, device="cuda")
    p = _run(model, x, dy, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    o = _run(ours, x, dy, ours.lora_A, ours.lora_B)
    d = lambda t: t.detach().double()  # noqa: E731
    ref = grads_of(lambda x_, b_, A_, B_: lora_linear_ref(x_, d(ours_base.weight), b_, A_, B_, ours.scaling),
                   d(x), d(ours_base.bias), d(ours.lora_A), d(ours.lora_B), dy.double())
    for name, got, base, want in zip(("out", "dx", "dA", "dB"), o, p, (ref[0], ref[1], ref[3], ref[4])):
        assert_rule(got, base, want, dtype, name)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_gpu_qlora_vs_peft_bnb(impl, M, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("DELTAKERN_LORA_IMPL", impl)
    torch.manual_seed(0)
    K, N, r, alpha = 4096, 4096, 16, 32
    dtype = torch.bfloat16
    lin = nn.Linear(K, N, dtype=dtype)
    q = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.cuda()
    sd = q.state_dict()
    ours_base = NF4Linear(nf4.NF4Weight.from_bnb_state_dict(sd, "weight"), sd["bias"])
    model, layer = _peft_model(q, r, alpha)
    ours = _ours_from_peft(ours_base, layer, r, alpha)
    x = rand((M, K), 1, dtype=dtype, device="cuda")
    dy = rand((M, N), 2, dtype=dtype, device="cuda")
    p = _run(model, x, dy, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    o = _run(ours, x, dy, ours.lora_A, ours.lora_B)
    W = ours_base.weight.dequantize(dtype)
    d = lambda t: t.detach().double()  # noqa: E731
    ref = grads_of(lambda x_, b_, A_, B_: lora_linear_ref(x_, d(W), b_, A_, B_, ours.scaling),
                   d(x), d(ours_base.bias), d(ours.lora_A), d(ours.lora_B), dy.double())
    for name, got, base, want in zip(("out", "dx", "dA", "dB"), o, p, (ref[0], ref[1], ref[3], ref[4])):
        assert_rule(got, base, want, dtype, name)


@pytest.mark.gpu
def test_gpu_dropout_same_mask_as_peft():
    torch.manual_seed(0)
    K, N, r, alpha, p = 1024, 512, 16, 16, 0.1
    dtype = torch.bfloat16
    lin = nn.Linear(K, N, device="cuda", dtype=dtype)
    ours_base = copy.deepcopy(lin)
    model, layer = _peft_model(lin, r, alpha, dropout=p)
    ours = _ours_from_peft(ours_base, layer, r, alpha, dropout=p)
    model.train()
    x = rand((256, K), 1, dtype=dtype, device="cuda")
    torch.manual_seed(3)
    yp = model(x)
    torch.manual_seed(3)
    yo = ours(x)
    torch.testing.assert_close(yo.float(), yp.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(6))
def test_gpu_opcheck(i):
    opcheck_sample(_op_samples(torch.bfloat16, "cuda"), i)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_triton(monkeypatch):
    monkeypatch.setenv("DELTAKERN_LORA_IMPL", "triton")
    lin = nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    m = LoRALinear(NF4Linear.from_linear(lin), r=16, alpha=16)
    nn.init.normal_(m.lora_B, std=0.02)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    a = _run(compiled, x, torch.ones(4, 64, 512, device="cuda", dtype=torch.bfloat16), m.lora_A, m.lora_B)
    m.lora_A.grad = m.lora_B.grad = None
    b_ = _run(m, x, torch.ones(4, 64, 512, device="cuda", dtype=torch.bfloat16), m.lora_A, m.lora_B)
    for u, v in zip(a, b_):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("cls_name", ["LoRALinear", "DoRALinear"])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_fp32_adapters_over_bf16_input(cls_name, kind):
    """Adapters kept in fp32 over a bf16 base and input (PEFT's default adapter dtype): the layer
    computes in bf16 with the parameters cast inside; outputs equal those of bf16 copies of the
    parameters bit for bit, and the gradients arrive in fp32 with the values of the bf16 run."""
    import deltakern.nn as dknn

    torch.manual_seed(0)
    lin = nn.Linear(40, 24).to(torch.bfloat16)
    base = NF4Linear.from_linear(lin, blocksize=32) if kind == "nf4" else lin
    m32 = getattr(dknn, cls_name)(base, r=4, alpha=8)
    nn.init.normal_(m32.lora_B)
    m16 = copy.deepcopy(m32)
    names = [n for n, p in m32.named_parameters() if p.requires_grad]
    for n in names:
        m32.get_parameter(n).data = m32.get_parameter(n).data.float()
        m16.get_parameter(n).data = m16.get_parameter(n).data.bfloat16()
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    w = torch.randn(2, 3, 24, dtype=torch.bfloat16)
    y32, y16 = m32(x), m16(x)
    assert y32.dtype == torch.bfloat16 and torch.equal(y32, y16)
    (y32 * w).sum().backward()
    (y16 * w).sum().backward()
    for n in names:
        g32, g16 = m32.get_parameter(n).grad, m16.get_parameter(n).grad
        assert g32.dtype == torch.float32, n
        torch.testing.assert_close(g32, g16.float(), rtol=0, atol=0)
