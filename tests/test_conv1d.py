"""LoRA / DoRA over transformers' Conv1D (GPT-2 style layers, weight stored [in_features, out_features]),
as PEFT does with `fan_in_fan_out=True`, checked against PEFT itself on a tiny GPT-2 (fp32, tight tolerances).

Covered: the modules (PEFT's shapes and init, identity at init, the base weight reaching the fused
functions as its zero-copy view weight.t() [out, in] through the CPU references, the torch composition
and the Triton kernels (interpreter lane / GPU), merge / unmerge writing the [in, out] weight); the
methods layer (default targets, target patterns, summary, merge, quantize refusal, save/load);
PEFT's adapter format both ways; and the PEFT backend (`integrations.peft.patch`) on PEFT's GPT-2.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import deltakern as dk  # noqa: E402
from deltakern.autograd.dora import dora_linear  # noqa: E402
from deltakern.integrations import peft as dkpeft  # noqa: E402
from deltakern.nn import DoRALinear, LoRALinear  # noqa: E402

from _helpers import batch, gpt2, llama, one_thread, rel, run, same_state, snapshot  # noqa: E402,F401

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CONV1D = ["c_attn", "c_proj", "c_fc"]  # every Conv1D of GPT-2 (c_proj: attn.c_proj and mlp.c_proj)
N_CONV1D = 8  # 4 per block, 2 blocks
KINDS = ["lora", "dora"]
WRAPPERS = {"lora": LoRALinear, "dora": DoRALinear}


# ---- helpers ----------------------------------------------------------------------------------------


def _method(kind, **kw):
    return (dk.DoRA if kind == "dora" else dk.LoRA)(**kw)


def _wrappers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}


def _randomize(model, seed=3):
    """B != 0 and magnitudes off the row norms, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(_wrappers(model).items()):
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
            if isinstance(m, DoRALinear):
                m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(m.out_features, generator=g))


def _peft_twin(model, kind, r=4, alpha=8, dropout=0.0, targets=CONV1D):
    """PEFT's GPT-2 (fan_in_fan_out=True) with the same base and the adapter tensors of `model`."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=True, use_dora=kind == "dora",
                     lora_dropout=dropout)
    pm = get_peft_model(gpt2(), cfg)
    ours = _wrappers(model)
    with torch.no_grad():
        for n, m in ours.items():
            layer = pm.base_model.model.get_submodule(n)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
            if kind == "dora":
                layer.lora_magnitude_vector["default"].weight.copy_(m.lora_magnitude_vector)
    theirs = [n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert sorted(theirs) == sorted(ours)
    return pm


def _peft_name(n: str) -> str:
    """PEFT's parameter name -> deltakern's (base_model.model.<path>.lora_A.default.weight -> <path>.lora_A)."""
    return n.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", "")


def _loss_and_grads(model, ids, mask, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both models
    o = model(input_ids=ids, attention_mask=mask, labels=ids)
    o.loss.backward()
    return o.logits.detach(), o.loss.detach()


def _grads(model, rename=lambda n: n):
    return {rename(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _conv1d(nx, nf, seed=0, dtype=torch.float32, device="cpu"):
    """A Conv1D(nf=out, nx=in) with a random weight [in, out] and bias [out]."""
    g = torch.Generator().manual_seed(seed)
    conv = Conv1D(nf, nx)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(nx, nf, generator=g) / math.sqrt(nx))
        conv.bias.copy_(torch.randn(nf, generator=g))
    return conv.to(dtype=dtype, device=device)


def _linear_twin(conv):
    """The same layer as an nn.Linear (weight [out, in], a contiguous copy)."""
    nx, nf = conv.weight.shape
    lin = nn.Linear(nx, nf, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return lin


def _pair(cls, conv, r=3, alpha=6, dropout=0.0, seed=1):
    """cls over the Conv1D and over its nn.Linear twin, with the same (non-trivial) adapter tensors."""
    a = cls(conv, r, alpha, dropout=dropout)
    b = cls(_linear_twin(conv), r, alpha, dropout=dropout)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        a.lora_B.copy_(0.3 * torch.randn(a.lora_B.shape, generator=g))
        if cls is DoRALinear:
            a.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(a.out_features, generator=g))
        for name, p in a.named_parameters():
            if p.requires_grad:
                b.get_parameter(name).copy_(p)
    return a, b


def _fwd_bwd(m, x, dy, seed=4):
    x = x.detach().clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = m(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in m.parameters() if p.requires_grad]


# ---- the modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_module_shapes_init_and_zero_copy_view(kind):
    conv = _conv1d(64, 16)  # in 64, out 16: weight [64, 16]
    torch.manual_seed(0)
    m = WRAPPERS[kind](conv, r=8, alpha=16)
    assert m.fan_in_fan_out and (m.in_features, m.out_features) == (64, 16)
    assert m.lora_A.shape == (8, 64) and m.lora_B.shape == (16, 8)  # PEFT's shapes
    assert not m.lora_B.any()
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) over fan_in = in_features, as PEFT
    assert 0.8 * bound < float(m.lora_A.abs().max()) <= bound
    assert not conv.weight.requires_grad and not conv.bias.requires_grad
    w = m.base_weight()
    assert w.shape == (16, 64) and not w.is_contiguous() and w.data_ptr() == conv.weight.data_ptr()
    if kind == "dora":  # the row norm of the [out, in] view: over the input dim
        torch.testing.assert_close(m.lora_magnitude_vector.detach(), conv.weight.norm(dim=0), rtol=1e-6, atol=0)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), conv(x), rtol=1e-6, atol=1e-6)  # identity at init
    y = m(x)  # the training path too
    torch.testing.assert_close(y.detach(), conv(x).detach(), rtol=1e-6, atol=1e-6)
    assert "fan_in_fan_out=True" in repr(m)


@pytest.mark.parametrize("kind", KINDS)
def test_module_passes_the_transposed_view_to_the_function(kind, monkeypatch):
    """No copy of the base weight per call: the function receives weight.t() of the Conv1D's own storage."""
    import deltakern.nn.dora as ndora
    import deltakern.nn.lora as nlora

    seen = []
    mod, fname = (ndora, "dora_linear") if kind == "dora" else (nlora, "lora_linear")
    real = getattr(mod, fname)
    monkeypatch.setattr(mod, fname, lambda x, w, *a, **k: seen.append(w) or real(x, w, *a, **k))
    conv = _conv1d(7, 11)
    m = WRAPPERS[kind](conv, r=2, alpha=4)
    m(torch.randn(3, 7))
    (w,) = seen
    assert w.shape == (11, 7) and w.stride() == (1, 11) and w.data_ptr() == conv.weight.data_ptr()


def _check_against_linear(cls, device, dtype, dropout, tol):
    """cls over a Conv1D == cls over the same weight as an nn.Linear (contiguous [out, in]): outputs and
    every gradient, in train mode with the same dropout mask."""
    conv = _conv1d(37, 29, dtype=dtype, device=device)
    a, b = _pair(cls, conv, dropout=dropout)
    a.train(), b.train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 37, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(2, 6, 29, generator=g).to(device=device, dtype=dtype)
    got, want = _fwd_bwd(a, x, dy), _fwd_bwd(b, x, dy)
    assert len(got) == len(want) == (5 if cls is DoRALinear else 4)  # y, dx, dA, dB (, dm); the bias is frozen
    for i, (u, v) in enumerate(zip(got, want)):
        assert rel(u, v) <= tol, (i, rel(u, v))


@pytest.mark.parametrize("impl", ["", "torch"], ids=["fused-op", "composition"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("kind", KINDS)
def test_module_equals_linear_twin_cpu(kind, dropout, impl, monkeypatch):
    """CPU: the fused ops' reference kernels and the torch composition both take the strided view."""
    monkeypatch.setenv("DELTAKERN_LORA_IMPL", impl)
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", impl)
    _check_against_linear(WRAPPERS[kind], "cpu", torch.float32, dropout, 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_module_merge_unmerge_writes_the_in_out_weight(kind):
    conv = _conv1d(24, 40)
    w0 = conv.weight.detach().clone()
    m, twin = _pair(WRAPPERS[kind], conv)
    x = torch.randn(3, 24)
    with torch.no_grad():
        y = m(x)
        m.merge()
        twin.merge()
        assert m.merged and conv.weight.shape == (24, 40) and conv.weight.is_contiguous()
        torch.testing.assert_close(conv.weight, twin.base.weight.t(), rtol=1e-6, atol=1e-7)  # same maths, transposed
        if kind == "lora":
            torch.testing.assert_close(conv.weight, w0 + m.scaling * (m.lora_B @ m.lora_A).t(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv(x), y, rtol=1e-5, atol=1e-5)
        m.unmerge()
        torch.testing.assert_close(conv.weight, w0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m(x), y, rtol=1e-6, atol=1e-6)


def test_module_rejects_other_bases():
    with pytest.raises(TypeError, match="Conv1D"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2, alpha=4)
    with pytest.raises(TypeError, match="Conv1D"):
        DoRALinear(nn.Embedding(4, 4), r=2, alpha=4)


# ---- the Triton kernels with a transposed weight (interpreter lane; the GPU lane below) ---------------


@pytest.fixture
def tk():
    pytest.importorskip("triton")
    import importlib

    if not INTERPRET and not CUDA:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    return importlib.import_module("deltakern.triton_kernels.lora")


def test_triton_lora_kernels_take_the_transposed_view(tk):
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(0)
    M, K, N, r, s = 5, 33, 48, 4, 0.75
    r_ = lambda *shape: torch.randn(*shape, generator=g).to(dev)  # noqa: E731
    w_in_out = r_(K, N) / math.sqrt(K)  # Conv1D layout
    view, dense = w_in_out.t(), w_in_out.t().contiguous()
    x, b, A, B, dy = r_(M, K), r_(N), r_(r, K) / math.sqrt(K), r_(N, r), r_(M, N)
    xa, dyb = x @ A.t(), dy @ B
    keep = torch.rand(M, K, generator=g).to(dev) > 0.3
    torch.testing.assert_close(tk.lora_forward(x, view, b, xa, B, s), tk.lora_forward(x, dense, b, xa, B, s),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tk.lora_backward_dx(dy, view, dyb, A, s, keep, 1.5),
                               tk.lora_backward_dx(dy, dense, dyb, A, s, keep, 1.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout,exact", [(0.0, False), (0.3, True)])
def test_dora_function_through_kernels_with_the_transposed_view(tk, dropout, exact, monkeypatch):
    """The whole CUDA code path of DoRA (norm parts, forward, backward, column sums, C^T W) on the view."""
    if not INTERPRET:
        pytest.skip("the GPU lane covers this on CUDA tensors")
    monkeypatch.setenv("DELTAKERN_CPU_KERNELS", "1")
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", "triton")
    g = torch.Generator().manual_seed(1)
    M, K, N, r, s = 6, 37, 29, 3, 1.3
    w_in_out = torch.randn(K, N, generator=g) / math.sqrt(K)
    x, b, A = torch.randn(M, K, generator=g), torch.randn(N, generator=g), torch.randn(r, K, generator=g) / 6
    B, m, dy = torch.randn(N, r, generator=g) * 0.3, torch.rand(N, generator=g) + 0.5, torch.randn(M, N, generator=g)

    def run_with(weight):
        leaves = [t.clone().requires_grad_(True) for t in (x, b, A, B, m)]
        torch.manual_seed(3)
        y = dora_linear(leaves[0], weight, *leaves[1:], s, dropout, True, exact)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    for u, v in zip(run_with(w_in_out.t()), run_with(w_in_out.t().contiguous())):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_module_equals_linear_twin(kind, dtype, impl, monkeypatch):
    monkeypatch.setenv("DELTAKERN_LORA_IMPL", impl)
    monkeypatch.setenv("DELTAKERN_DORA_IMPL", impl)
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_against_linear(WRAPPERS[kind], "cuda", dtype, 0.1, 1e-5 if dtype == torch.float32 else 2e-2)


# ---- the methods layer on GPT-2 -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_wrap_every_conv1d_but_the_head_and_count(kind):
    model = gpt2()
    ids, mask = batch()
    y0 = run(model, ids, mask)
    dk.apply(model, _method(kind, r=4, alpha=8))
    ws = _wrappers(model)
    assert len(ws) == N_CONV1D and all(w.fan_in_fan_out and isinstance(w.base, Conv1D) for w in ws.values())
    assert sorted({n.rsplit(".", 1)[1] for n in ws}) == sorted(CONV1D)
    assert isinstance(model.lm_head, nn.Linear)  # the output head stays as it is
    torch.testing.assert_close(run(model, ids, mask), y0, rtol=1e-6, atol=1e-6)  # identity at init
    row = dk.summary(model).rows[0]
    pm = get_peft_model(gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=CONV1D, fan_in_fan_out=True,
                                           use_dora=kind == "dora"))
    assert row["targets"] == N_CONV1D and row["params"] == pm.get_nb_trainable_parameters()[0]
    app = dk.methods.base.applications(model)[0]
    assert app.plan.targets["transformer.h.0.attn.c_attn"] == {"type": "Conv1D", "shape": [96, 32]}
    assert app.plan.tensors["transformer.h.0.mlp.c_fc.lora_A"] == (4, 32)
    assert app.plan.tensors["transformer.h.0.mlp.c_fc.lora_B"] == (128, 4)


def test_target_patterns_select_conv1d_layers():
    def targets(t):
        model = gpt2()
        dk.apply(model, dk.LoRA(r=2, target=t))
        return sorted(_wrappers(model))

    assert targets("c_attn") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert targets("attn.c_proj") == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert targets(r"transformer\.h\.1\.mlp\..*") == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert targets(["h.0.mlp.c_fc"]) == ["transformer.h.0.mlp.c_fc"]
    with pytest.raises(ValueError, match="matches only non-linear modules .Embedding"):
        dk.apply(gpt2(), dk.LoRA(target="wte"))


def test_quantize_converts_conv1d_to_the_same_nf4_weight():
    """deltakern.quantize on GPT-2: every Conv1D becomes an NF4Linear holding NF4(W^T), and the model
    computes what the Conv1D model computes with its weights replaced by their dequantized values."""
    from deltakern.nn import NF4Linear

    model, dense = gpt2(), gpt2()
    summary = dk.quantize(model, progress=False)
    convs = [n for n, m in dense.named_modules() if isinstance(m, Conv1D)]
    assert summary.layers == len(convs) == N_CONV1D and summary.skipped == ["lm_head"]
    assert summary.bytes_after < summary.bytes_before / 4
    for n in convs:
        q, conv = model.get_submodule(n), dense.get_submodule(n)
        assert isinstance(q, NF4Linear) and (q.out_features, q.in_features) == tuple(conv.weight.t().shape)
        ref = dk.nf4.quantize(conv.weight.detach().t().contiguous())
        assert torch.equal(q.weight.packed, ref.packed) and torch.equal(q.weight.absmax, ref.absmax)
        with torch.no_grad():
            conv.weight.copy_(q.weight.dequantize(torch.float32).t())
    ids, mask = batch()
    assert rel(run(model, ids), run(dense, ids)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_qlora_qdora_on_conv1d(kind):
    """LoRA/DoRA(quantize=True) on GPT-2 targets: the targets become NF4 and are wrapped, the other
    Conv1D layers stay dense, the model is unchanged at init against the quantized base, and only the
    adapters get gradients."""
    from deltakern.nn import NF4Linear

    model = gpt2()
    dk.apply(model, _method(kind, target="c_attn", quantize=True))
    wrapped = _wrappers(model)
    assert sorted(wrapped) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(isinstance(w.base, NF4Linear) for w in wrapped.values())
    assert isinstance(model.get_submodule("transformer.h.0.attn.c_proj"), Conv1D)
    ids, mask = batch()
    with dk.disable(model):
        y_base = run(model, ids)
    assert rel(run(model, ids), y_base) < 1e-6
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("kind", KINDS)
def test_gpt2_equals_peft_outputs_and_gradients(kind, dropout):
    model = gpt2()
    dk.apply(model, _method(kind, r=4, alpha=8, dropout=dropout))
    _randomize(model)
    pm = _peft_twin(model, kind, dropout=dropout)
    ids, mask = batch()
    model.train(), pm.train()
    y, loss = _loss_and_grads(model, ids, mask)
    yp, loss_p = _loss_and_grads(pm, ids, mask)
    assert rel(y, yp) < 1e-6 and rel(loss, loss_p) < 1e-6
    ours, theirs = _grads(model), _grads(pm, _peft_name)
    assert ours.keys() == theirs.keys() and len(ours) == N_CONV1D * (3 if kind == "dora" else 2)
    for k in ours:
        assert rel(ours[k], theirs[k]) < 1e-5, k
    model.eval(), pm.eval()
    y = run(model, ids, mask)
    assert rel(y, run(pm, ids, mask)) < 1e-6 and rel(y, run(gpt2(), ids, mask)) > 1e-3  # the adapters do act


@pytest.mark.parametrize("kind", KINDS)
def test_gpt2_merge_unmerge_and_unload_match_peft(kind):
    model = gpt2()
    dk.apply(model, _method(kind, r=4, alpha=8))
    _randomize(model)
    pm = _peft_twin(model, kind)
    base = {n: p.detach().clone() for n, p in gpt2().named_parameters()}
    ids, mask = batch()
    y = run(model, ids, mask)
    assert sorted(dk.merge(model)) == [_method(kind, r=4, alpha=8).describe()]
    assert rel(run(model, ids, mask), y) < 1e-5
    dk.unmerge(model)
    assert rel(run(model, ids, mask), y) < 1e-6
    for n, w in _wrappers(model).items():
        assert rel(w.base.weight, base[f"{n}.weight"]) < 1e-6, n
    dk.merge(model, unload=True)  # permanent: the Conv1D layers hold the merged weights, no wrappers
    assert not _wrappers(model) and dk.methods.deltas(model) == []
    merged = pm.merge_and_unload()
    theirs = dict(merged.named_parameters())
    for n, p in model.named_parameters():
        assert rel(p, theirs[n]) < 1e-6, n
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert rel(run(model, ids, mask), y) < 1e-5


def test_gpt2_save_load_delta_refuses_another_width(tmp_path):
    model = gpt2()
    dk.apply(model, dk.DoRA(r=2))
    _randomize(model)
    dk.save_delta(model, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert cfg["methods"][0]["targets"]["transformer.h.1.mlp.c_proj"] == {"type": "Conv1D", "shape": [32, 128]}
    other = gpt2(n_embd=48)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn has shape \(144, 48\) in this model, "
                                         r"the delta was made for \(96, 32\)"):
        dk.load_delta(other, tmp_path / "d")
    assert same_state(snapshot(other), before) and dk.methods.deltas(other) == []
    fresh = gpt2()
    dk.load_delta(fresh, tmp_path / "d")
    ids, mask = batch()
    assert torch.equal(run(fresh, ids, mask), run(model, ids, mask))


# ---- PEFT's adapter format both ways ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_our_gpt2_adapter_loads_in_peft(tmp_path, kind):
    model = gpt2()
    dk.apply(model, _method(kind, r=4, alpha=8, target=["c_attn", "mlp.c_proj"]))
    _randomize(model)
    ids, mask = batch()
    y = run(model, ids, mask)
    dk.save_peft_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["use_dora"] == (kind == "dora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(gpt2(), tmp_path / "a")
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # the flag PEFT expects for Conv1D
    pm.eval()
    assert rel(run(pm, ids, mask), y) < 1e-6
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and isinstance(layer.get_base_layer(), Conv1D)
    # the keys and shapes PEFT itself writes for that config
    ref = get_peft_model(gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=cfg["target_modules"],
                                            fan_in_fan_out=True, use_dora=kind == "dora"))
    ref.save_pretrained(tmp_path / "ref")
    ours, theirs = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(
        tmp_path / "ref" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert json.loads((tmp_path / "ref" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


@pytest.mark.parametrize("kind", KINDS)
def test_peft_gpt2_adapter_loads_in_deltakern(tmp_path, kind):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                        use_dora=kind == "dora", rank_pattern={"c_fc": 2}, init_lora_weights=False, lora_dropout=0.1)
    pm = get_peft_model(gpt2(), config)
    pm.save_pretrained(tmp_path / "p")
    ids, mask = batch()
    pm.eval()
    y = run(pm, ids, mask)

    model = gpt2()
    assert dk.load_peft_adapter(model, tmp_path / "p") == "default"
    ws = _wrappers(model)
    assert len(ws) == 4 and all(w.fan_in_fan_out for w in ws.values())
    assert rel(run(model, ids, mask), y) < 1e-6
    name = "DoRA" if kind == "dora" else "LoRA"
    assert {r["method"]: r["targets"] for r in dk.summary(model).rows} == {f"{name}(r=2, alpha=8)": 2,
                                                                         f"{name}(r=4, alpha=8)": 2}
    model.train(), pm.train()
    _loss_and_grads(model, ids, mask)
    _loss_and_grads(pm, ids, mask)
    ours, theirs = _grads(model), _grads(pm, _peft_name)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert rel(ours[k], theirs[k]) < 1e-5, k
    dk.save_peft_adapter(model, tmp_path / "back")  # and back out: the same tensors and flag
    a, b = load_file(tmp_path / "back" / "adapter_model.safetensors"), load_file(
        tmp_path / "p" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_fan_in_fan_out_flag_on_linear_targets_is_read_as_peft_reads_it(tmp_path):
    """PEFT resets fan_in_fan_out per layer from the layer type (with a warning for nn.Linear); the flag
    does not change the adapter tensors, so deltakern reads such an adapter onto nn.Linear layers too."""
    pm = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fan_in_fan_out"] = True
    cfg_path.write_text(json.dumps(cfg))
    ids, mask = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(llama(), tmp_path / "p").eval()
    model = llama()
    dk.load_peft_adapter(model, tmp_path / "p")
    assert rel(run(model, ids, mask), run(theirs, ids, mask)) < 1e-6
    dk.save_peft_adapter(model, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["fan_in_fan_out"] is False


# ---- the PEFT backend on PEFT's GPT-2 ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_patched_peft_gpt2_equals_unpatched(kind, monkeypatch):
    import deltakern.autograd.dora as adora
    import deltakern.autograd.lora as alora

    config = LoraConfig(r=4, lora_alpha=8, target_modules=CONV1D, fan_in_fan_out=True, use_dora=kind == "dora",
                        lora_dropout=0.1, init_lora_weights=False)
    pm = get_peft_model(gpt2(), config)
    pm.train()
    ids, mask = batch()
    keys = list(pm.state_dict())
    y0, _ = _loss_and_grads(pm, ids, mask)
    g0 = _grads(pm)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = dkpeft.patch(pm)
    assert len(summary.patched) == N_CONV1D and not summary.fallback
    assert not [w for w in caught if "deltakern" in str(w.message)]
    assert list(pm.state_dict()) == keys

    seen = []
    fname = "dora_linear" if kind == "dora" else "lora_linear"
    mod = adora if kind == "dora" else alora
    real = getattr(mod, fname)
    monkeypatch.setattr(mod, fname, lambda x, w, *a, **k: seen.append(w) or real(x, w, *a, **k))
    y1, _ = _loss_and_grads(pm, ids, mask)
    g1 = _grads(pm)
    assert len(seen) == N_CONV1D
    conv_ptrs = {m.weight.data_ptr() for m in pm.modules() if isinstance(m, Conv1D)}
    assert all(not w.is_contiguous() and w.data_ptr() in conv_ptrs for w in seen)  # the views, not copies
    assert rel(y1, y0) < 1e-6
    assert g1.keys() == g0.keys() and len(g0) == N_CONV1D * (3 if kind == "dora" else 2)
    for k in g0:
        assert rel(g1[k], g0[k]) < 1e-5, k

    # a training step on the patched model changes A / B; DoRA's cached norms must follow
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5).step()
    pm.eval()
    y_patched = run(pm, ids, mask)
    assert dkpeft.unpatch(pm) == N_CONV1D
    assert rel(y_patched, run(pm, ids, mask)) < 1e-6
