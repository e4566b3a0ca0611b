"""deltakern.integrations: bitsandbytes Linear4bit <-> NF4Linear (bit-exact, no requantization) and the
PEFT backend (patched PEFT LoRA / DoRA models match PEFT's own outputs and gradients, with the same
state dict), plus a CPU smoke run of the end-to-end benchmark's model-building path.

The oracle is the bitsandbytes wheel's CPU backend and PEFT itself; transformers models are tiny random
Llamas (hidden 32, 2 layers), saved to a temporary directory and loaded back with
`BitsAndBytesConfig(load_in_4bit=True, ...)`, which transformers 5.17 + bitsandbytes 0.50 allow on the CPU.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _helpers import bnb_dequantize_4bit as dequantize_4bit  # noqa: E402  (bitsandbytes' generic path)
from peft import LoraConfig, get_peft_model  # noqa: E402

from deltakern.integrations import bnb as dkbnb  # noqa: E402
from deltakern.integrations import peft as dkpeft  # noqa: E402
from deltakern.nn import NF4Linear  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- helpers --------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(_bits(a), _bits(b)), f"{int((_bits(a) != _bits(b)).sum())} of {a.numel()} values differ"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (packed codes viewed as floats may be NaN, so no torch.equal)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _frel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius) in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _quantized_stack(K, quant_type, nested, storage, dtype, seed=0):
    """Two bitsandbytes 4-bit layers (the first with a bias) quantized on the CPU."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        bnb.nn.Linear4bit(K, 10, bias=True, compress_statistics=nested, quant_type=quant_type, quant_storage=storage),
        nn.GELU(),
        bnb.nn.Linear4bit(10, 8, bias=False, compress_statistics=nested, quant_type=quant_type, quant_storage=storage),
    )
    with torch.no_grad():
        w0 = torch.randn(10, K, generator=g) * 0.2
        w0[3, : K // 2] = 0.0  # a block of zeros and a partly-zero row
        model[0].weight = bnb.nn.Params4bit(w0.to(dtype), requires_grad=False, compress_statistics=nested,
                                            quant_type=quant_type, quant_storage=storage, module=model[0])
        model[2].weight = bnb.nn.Params4bit((torch.randn(8, 10, generator=g) * 0.3).to(dtype), requires_grad=False,
                                            compress_statistics=nested, quant_type=quant_type, quant_storage=storage,
                                            module=model[2])
        model[0].bias = nn.Parameter(torch.randn(10, generator=g).to(dtype), requires_grad=False)
    return model.to("cpu")  # bitsandbytes quantizes here


def _tiny_llama_config(**kw):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    cfg.update(kw)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(_tiny_llama_config()).save_pretrained(path)
    return path


def _load_llama(path, four_bit: bool, dtype=torch.float32):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    kwargs = dict(dtype=dtype, device_map="cpu")
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return LlamaForCausalLM.from_pretrained(path, **kwargs)


def _trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _run(model, inputs, seed=1):
    """Loss-like scalar of the outputs, its gradients; the RNG is reseeded so dropout masks replay."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    out = out.logits if hasattr(out, "logits") else out
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().mean().backward()
    return out.detach(), _trainable_grads(model)


def _patched(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = dkpeft.patch(model, **kw)
    return summary, [str(w.message) for w in caught if "deltakern" in str(w.message)]


class _Toy(nn.Module):
    """Two linears (one with a bias) and an embedding, so the warning has something to name."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(11, 24)
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)
        self.to(dtype)

    def forward(self, ids):
        h = self.emb(ids)
        return self.down(torch.nn.functional.silu(self.up(h))) + h


def _toy_peft(dora=False, dropout=0.0, dtype=torch.float32, seed=0, **cfg):
    torch.manual_seed(seed)
    model = _Toy(dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down", "emb"], use_dora=dora, lora_dropout=dropout,
                        init_lora_weights=False, **cfg)  # random A and B: the LoRA term is non-zero
    return get_peft_model(model, config, autocast_adapter_dtype=False)


# ---- bitsandbytes: convert / to_bnb ---------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage,dtype", [(torch.uint8, torch.float32), (torch.uint8, torch.bfloat16),
                                           (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)])
def test_convert_is_bit_exact(quant_type, nested, storage, dtype):
    # K=123: odd element count (a half-filled last byte); other storages need whole elements -> K=124.
    # Either way the last 64-block is partial.
    K = 123 if storage == torch.uint8 else 124
    model = _quantized_stack(K, quant_type, nested, storage, dtype)
    refs = [dequantize_4bit(layer.weight.data, layer.weight.quant_state) for layer in (model[0], model[2])]
    sd_before = model.state_dict()
    x = torch.randn(5, K, dtype=dtype)
    model[0].compute_dtype = model[2].compute_dtype = dtype  # compute in the input dtype, as NF4Linear does
    y_bnb = model(x)

    summary = dkbnb.convert(model)
    assert summary.layers == 2 and summary.converted == ["0", "2"] and not summary.skipped
    assert isinstance(model[0], NF4Linear) and isinstance(model[2], NF4Linear)
    for layer, ref in zip((model[0], model[2]), refs):
        w = layer.weight
        assert (w.quant_type, w.nested, w.quant_storage) == (quant_type, nested, storage)
        got = w.dequantize()
        if quant_type == "nf4":
            _assert_bitwise(got, ref)
        else:
            # bitsandbytes' FP4 decoders disagree on the sign of zero for nibble 0b1000 (its native CPU
            # and CUDA kernels give -0.0, its pure-torch path and the checkpoint's quant_map +0.0)
            assert torch.equal(got, ref)
            nz = ref != 0
            assert torch.equal(_bits(got)[nz], _bits(ref)[nz])
    _assert_bitwise(model(x), y_bnb)
    sd_after = model.state_dict()
    assert sorted(sd_after) == sorted(sd_before)  # (NF4Linear writes the bias first)
    for k in sd_before:
        assert _same(sd_after[k], sd_before[k]), k

    back = dkbnb.to_bnb(model)
    assert back.layers == 2 and all(dkbnb.is_linear4bit(model[i]) for i in (0, 2))
    for layer, ref in zip((model[0], model[2]), refs):
        _assert_bitwise(dequantize_4bit(layer.weight.data, layer.weight.quant_state), ref)
    _assert_bitwise(model(x), y_bnb)
    sd_back = model.state_dict()
    assert list(sd_back) == list(sd_before)  # bitsandbytes' own order again
    assert all(_same(sd_back[k], sd_before[k]) for k in sd_before)


def test_convert_is_zero_copy_and_skips_unquantized():
    model = _quantized_stack(128, "nf4", True, torch.uint8, torch.float32)
    packed_ptr = model[0].weight.data_ptr()
    absmax_ptr = model[0].weight.quant_state.absmax.data_ptr()
    model.add_module("late", bnb.nn.Linear4bit(16, 16))  # never moved -> never quantized
    with pytest.warns(UserWarning, match="late"):
        summary = dkbnb.convert(model)
    assert summary.converted == ["0", "2"] and list(summary.skipped) == ["late"]
    assert "not quantized" in summary.skipped["late"] and "2 layers" in str(summary)
    assert model[0].weight.packed.data_ptr() == packed_ptr and model[0].weight.absmax.data_ptr() == absmax_ptr
    assert dkbnb.is_linear4bit(model.late)


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_weight_reads_bnb_cpu_packing(nested):
    """bitsandbytes' CPU backend repacks weights for its AVX512-BF16 kernel in eval forwards (on CPUs
    that have it), rounding the scales to bf16; simulated here with its own repacking function."""
    from bitsandbytes.functional import QuantState, _convert_weight_packed_for_cpu

    layer = bnb.nn.Linear4bit(128, 64, bias=False, compress_statistics=nested, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit((torch.randn(64, 128) * 0.1).to(torch.bfloat16), requires_grad=False,
                                     compress_statistics=nested, quant_type="nf4", module=layer)
    layer.to("cpu")
    p, qs = layer.weight, layer.weight.quant_state
    absmax = dkbnb.nf4_weight(p).absmax_fp32().to(torch.bfloat16).float()  # what the repacked layer uses
    ref = dequantize_4bit(p.data.clone(), QuantState(absmax, qs.shape, qs.code, qs.blocksize, "nf4", qs.dtype))
    p.data, p.quant_state = _convert_weight_packed_for_cpu(p.data, qs)
    assert p.quant_state.packing_format_for_cpu
    w = dkbnb.nf4_weight(p, layer)
    assert not w.nested and w.dtype == torch.bfloat16
    _assert_bitwise(w.dequantize(), ref)


def test_convert_transformers_4bit_llama(llama_dir):
    model = _load_llama(llama_dir, four_bit=True)
    n4 = sum(dkbnb.is_linear4bit(m) for m in model.modules())
    assert n4 == 2 * len(PROJ)  # transformers keeps lm_head dense
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    keys = list(model.state_dict())
    refs = {n: dequantize_4bit(m.weight.data, m.weight.quant_state) for n, m in model.named_modules()
            if dkbnb.is_linear4bit(m)}
    with torch.no_grad():
        before = model(ids).logits
    summary = dkbnb.convert(model)
    assert sorted(summary.converted) == sorted(refs)
    for name, ref in refs.items():
        _assert_bitwise(model.get_submodule(name).weight.dequantize(), ref)
    with torch.no_grad():  # same weights bit for bit; the NF4 kernels sum in another order than F.linear
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)
    assert sorted(model.state_dict()) == sorted(keys)


# ---- PEFT: patch / unpatch ------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_patch_toy_fp32_matches_peft(dora, dropout):
    model = _toy_peft(dora=dora, dropout=dropout)
    ids = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(0))
    keys = list(model.state_dict())
    y0, g0 = _run(model, ids)

    summary, messages = _patched(model)
    assert sorted(summary.patched) == ["base_model.model.down", "base_model.model.up"]
    assert list(summary.fallback) == ["base_model.model.emb"]
    assert len(messages) == 1 and "base_model.model.emb" in messages[0] and "Embedding" in messages[0]
    assert list(model.state_dict()) == keys
    layer = model.base_model.model.up
    assert dkpeft.is_patched(layer) and "forward" in layer.__dict__

    y1, g1 = _run(model, ids)
    assert _rel(y1, y0) < 1e-5
    assert set(g1) == set(g0) and len(g0) == 6 + 3 * dora  # A, B (+ magnitude) of emb, up and down
    for k in g0:
        assert _rel(g1[k], g0[k]) < 2e-5, k

    assert dkpeft.unpatch(model) == 2
    assert not dkpeft.is_patched(layer) and "forward" not in layer.__dict__
    y2, g2 = _run(model, ids)
    _assert_bitwise(y2, y0)
    assert all(torch.equal(g2[k], g0[k]) for k in g0)


def test_patch_runs_deltakern(monkeypatch):
    """The patched forward really goes through deltakern's functions (and unpatched does not)."""
    import deltakern.autograd.dora as dora_mod
    import deltakern.autograd.lora as lora_mod

    calls = []
    real_lora, real_dora = lora_mod.lora_linear, dora_mod.dora_linear
    monkeypatch.setattr(lora_mod, "lora_linear", lambda *a, **k: calls.append("lora") or real_lora(*a, **k))
    monkeypatch.setattr(dora_mod, "dora_linear", lambda *a, **k: calls.append("dora") or real_dora(*a, **k))
    for dora in (False, True):
        model = _toy_peft(dora=dora)
        ids = torch.randint(0, 11, (2, 4))
        model(ids)
        assert calls == []
        dkpeft.patch(model, warn=False)
        model(ids)
        assert calls == ["dora" if dora else "lora"] * 2
        calls.clear()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16-adapter", "fp32-adapter"])
def test_patch_toy_bf16_within_twice_peft_error(dora, adapter_dtype):
    """bf16 base: patched and PEFT are both compared with the same model in float64; the patched error
    must stay within 2x PEFT's own (+ a small atol)."""
    model = _toy_peft(dora=dora, dtype=torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(adapter_dtype)
    ref = copy.deepcopy(model).double()
    ids = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(0))
    y_ref, g_ref = _run(ref, ids)
    y0, g0 = _run(model, ids)
    dkpeft.patch(model, warn=False)
    y1, g1 = _run(model, ids)
    assert y1.dtype == y0.dtype == torch.bfloat16
    assert _rel(y1, y_ref) <= 2 * _rel(y0, y_ref) + 1e-3
    for k in g_ref:
        assert g1[k].dtype == adapter_dtype
        assert _rel(g1[k], g_ref[k]) <= 2 * _rel(g0[k], g_ref[k]) + 2e-3, k


def test_patch_autocast_cpu():
    model = _toy_peft(dora=True)
    ids = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model).double()
    y_ref, _ = _run(ref, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, g0 = _run(model, ids)
        dkpeft.patch(model, warn=False)
        y1, g1 = _run(model, ids)
    assert y1.dtype == y0.dtype
    assert _rel(y1, y_ref) <= 2 * _rel(y0, y_ref) + 1e-3
    for k in g0:
        assert _rel(g1[k], g0[k]) < 0.05, k


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "bnb4"])
def test_patch_llama_matches_peft(llama_dir, dora, four_bit):
    base = _load_llama(llama_dir, four_bit=four_bit)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=PROJ, use_dora=dora, lora_dropout=0.1, use_rslora=dora,
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    model.train()
    inputs = {"input_ids": torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))}
    keys = list(model.state_dict())
    y0, g0 = _run(model, inputs)

    summary, messages = _patched(model)
    assert len(summary.patched) == 2 * len(PROJ) and not summary.fallback and not messages
    if four_bit:
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert type(layer).__module__ == "peft.tuners.lora.bnb"
    assert list(model.state_dict()) == keys
    y1, g1 = _run(model, inputs)
    assert _rel(y1, y0) < 1e-5
    assert set(g1) == set(g0) and len(g0) == 2 * len(PROJ) * (3 if dora else 2)
    for k in g0:
        assert _rel(g1[k], g0[k]) < 1e-4, k

    # a training step on the patched model changes A/B; DoRA norms must follow
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    model.eval()
    with torch.no_grad():
        y_patched = model(**inputs).logits
        dkpeft.unpatch(model)
        y_peft = model(**inputs).logits
    assert _rel(y_patched, y_peft) < 1e-5


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_patch_llama_bnb4_bf16(llama_dir, dora):
    """bf16 compute over NF4 with PEFT's fp32 adapters (its default): same dtypes out and in the
    gradients as PEFT; errors against an fp32-compute run of the same model (same NF4 bytes) within
    2x those of PEFT's plain bf16 path on average over the gradients, 4x for each (adapters cast to
    bf16: deltakern computes the whole layer in the compute dtype, see the module docstring)."""
    torch.manual_seed(0)  # init_lora_weights=False draws from the global RNG
    model = get_peft_model(_load_llama(llama_dir, four_bit=True, dtype=torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, use_dora=dora, init_lora_weights=False))
    assert model.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight.dtype == torch.float32
    inputs = {"input_ids": torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))}
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
        for name, param in module.named_parameters(recurse=False):
            if param.dtype == torch.bfloat16:
                param.data = param.data.float()
    y_ref, g_ref = _run(ref, inputs)
    plain = copy.deepcopy(model)
    for name, param in plain.named_parameters():
        if param.requires_grad:
            param.data = param.data.bfloat16()
    y_plain, g_plain = _run(plain, inputs)
    y0, g0 = _run(model, inputs)
    dkpeft.patch(model, warn=False)
    y1, g1 = _run(model, inputs)
    assert y1.dtype == y0.dtype == torch.bfloat16
    assert _frel(y1, y_ref) <= 2 * _frel(y_plain, y_ref) + 1e-3
    assert set(g1) == set(g0) == set(g_ref)
    errs = {}
    for k in g0:
        assert g1[k].dtype == g0[k].dtype == torch.float32, k
        # Frobenius-relative (a max-entry ratio of two bf16 runs is dominated by single roundings)
        errs[k] = (_frel(g1[k], g_ref[k]), _frel(g_plain[k], g_ref[k]))
    # On average as accurate as PEFT's plain bf16 path (within 2x), and no single gradient far off
    # (4x: with ~30 tiny bf16 gradients the worst single ratio over seeds 0-3 reached 2.5x, the mean 1x).
    assert sum(e for e, _ in errs.values()) <= 2 * sum(p for _, p in errs.values()) + 2e-3
    for k, (e, p) in errs.items():
        assert e <= 4 * p + 2e-3, k


def test_patch_bnb4_view_is_cached_and_zero_copy(llama_dir):
    model = get_peft_model(_load_llama(llama_dir, four_bit=True), LoraConfig(r=2, target_modules=["q_proj"]))
    dkpeft.patch(model, warn=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    ids = torch.randint(0, 96, (1, 5))
    model(ids)
    state = layer.__dict__[dkpeft._STATE]
    view = state.nf4
    assert view.packed.data_ptr() == layer.base_layer.weight.data_ptr()
    assert view.absmax is layer.base_layer.weight.quant_state.absmax
    model(ids)
    assert state.nf4 is view  # built once


def test_fallbacks_are_named_once_and_match_peft():
    from transformers.pytorch_utils import Conv1D

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.conv1d = Conv1D(16, 16)  # GPT-2 style [in, out] weight -> fan_in_fan_out
            self.conv = nn.Conv1d(16, 16, 1)

        def forward(self, x):
            h = self.conv1d(self.lin(x))
            return self.conv(h.transpose(1, 2)).transpose(1, 2)

    torch.manual_seed(0)
    cfg = dict(r=2, lora_alpha=4, init_lora_weights=False)
    model = get_peft_model(Mixed(), LoraConfig(target_modules=["lin", "conv"], **cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fan = get_peft_model(Mixed(), LoraConfig(target_modules=["conv1d"], fan_in_fan_out=True, **cfg))
    x = torch.randn(2, 5, 16)
    y0 = model(x)
    summary, messages = _patched(model)
    assert summary.patched == ["base_model.model.lin"]
    assert summary.fallback == {"base_model.model.conv": "lora.Conv1d layers are not supported"}
    assert len(messages) == 1 and "base_model.model.conv" in messages[0]
    assert torch.allclose(model(x), y0, atol=1e-6)

    y0 = fan(x)  # fan_in_fan_out=True over a Conv1D runs on deltakern (its weight's transposed view)
    summary, messages = _patched(fan)
    assert summary.patched == ["base_model.model.conv1d"] and not summary.fallback and not messages
    assert _rel(fan(x), y0) < 1e-6

    bias_model = get_peft_model(Mixed(), LoraConfig(target_modules=["lin"], lora_bias=True, **cfg))
    summary, _ = _patched(bias_model)
    assert summary.fallback == {"base_model.model.lin": "lora_bias=True"}
    y0 = bias_model(x)
    assert torch.equal(bias_model(x), y0)


def test_multiple_adapters_mixed_batch_merge_and_disable():
    model = _toy_peft()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["up"], init_lora_weights=False))
    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        y_default = model(ids)
        y_mixed = model(ids, adapter_names=["default", "other", "__base__", "default"])
        model.base_model.set_adapter(["default", "other"])
        y_both = model(ids)
        model.base_model.set_adapter("default")

    summary, messages = _patched(model)
    assert summary.patched == ["base_model.model.up", "base_model.model.down"] and len(messages) == 1
    with torch.no_grad():
        assert _rel(model(ids), y_default) < 1e-5
        with pytest.warns(UserWarning, match="adapter_names"):
            y = model(ids, adapter_names=["default", "other", "__base__", "default"])
        _assert_bitwise(y, y_mixed)
        model.base_model.set_adapter(["default", "other"])
        with pytest.warns(UserWarning, match="2 active adapters"):  # `up` defers to PEFT, `down` stays patched
            assert _rel(model(ids), y_both) < 1e-5
        model.base_model.set_adapter("default")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a reason already reported does not warn again
            model(ids, adapter_names=["default"] * 4)
        with model.disable_adapter():
            y_off = model(ids)
        dkpeft.unpatch(model)
        with model.disable_adapter():
            _assert_bitwise(model(ids), y_off)
        dkpeft.patch(model, warn=False)
        model.merge_adapter()
        y_merged = model(ids)
        assert _rel(y_merged, y_default) < 1e-5
        model.unmerge_adapter()
        assert _rel(model(ids), y_default) < 1e-5
    assert dkpeft.patch(model, warn=False).patched == summary.patched  # idempotent
    assert dkpeft.unpatch(model) == 2 and dkpeft.unpatch(model) == 0


def test_patch_survives_deepcopy_and_requires_peft_layers():
    model = _toy_peft(dora=True)
    dkpeft.patch(model, warn=False)
    ids = torch.randint(0, 11, (2, 5))
    y = model(ids)
    twin = copy.deepcopy(model)
    layer = twin.base_model.model.up
    assert dkpeft.is_patched(layer) and layer.forward.args[0] is layer
    assert torch.equal(twin(ids), y)
    with torch.no_grad():
        twin.base_model.model.up.lora_B["default"].weight.mul_(2)
    assert not torch.equal(twin(ids), y) and torch.equal(model(ids), y)
    dkpeft.clear_caches(model)
    assert torch.equal(model(ids), y)
    with pytest.raises(ValueError, match="no PEFT"):
        dkpeft.patch(nn.Linear(2, 2))


# ---- end-to-end benchmark: model building on the CPU ----------------------------------------------


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["deltakern-qlora", "deltakern-qdora", "peft-qlora", "patched-qdora"])
def test_bench_e2e_builds_and_steps_on_cpu(method):
    bench = _bench_module()
    args = bench.parse_args(["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                             "--kv-heads", "2", "--vocab", "128", "--batch", "2", "--seq", "16", "--rank", "4"])
    setup = bench.build(method, args, device="cpu", dtype=torch.float32)
    # r * (in + out) per projection (k/v out = 2 KV heads x 16 = 32) + DoRA magnitudes (out)
    assert setup.trainable == 4 * 1024 + (512 if method.endswith("dora") else 0)
    assert len(setup.adapters) == 7
    out = bench.train_steps(setup, bench.make_batches(args, "cpu", steps=2), device="cpu", autocast_dtype=None)
    assert len(out["losses"]) == 2 and all(math.isfinite(v) for v in out["losses"])
    assert abs(out["losses"][0] - math.log(128)) < 1.0  # random init, random tokens


def test_bench_e2e_same_init_across_methods():
    """deltakern and PEFT runs start from the same weights and adapters: equal first losses."""
    bench = _bench_module()
    args = bench.parse_args(["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                             "--kv-heads", "2", "--vocab", "128", "--batch", "2", "--seq", "16", "--rank", "4",
                             "--loss-curve", "--data-pool", "2"])
    batches = bench.make_batches(args, "cpu", steps=3)
    curves = {}
    for method in ("peft-qlora", "deltakern-qlora", "patched-qlora"):
        setup = bench.build(method, args, device="cpu", dtype=torch.float32)
        curves[method] = bench.train_steps(setup, batches, device="cpu", autocast_dtype=None)["losses"]
    for method in ("deltakern-qlora", "patched-qlora"):
        assert max(abs(a - b) for a, b in zip(curves[method], curves["peft-qlora"])) < 1e-3, (method, curves)
    assert "vs peft-qlora" in next(iter(bench.compare_curves({k: {"losses": v} for k, v in curves.items()}, 0)))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_patched_peft_model_compiles_fullgraph(llama_dir, dora):
    """A patched PEFT model compiles with fullgraph=True (the per-call support checks trace) and gives
    the eager outputs and adapter gradients, without dynamo warnings about our own code."""
    model = get_peft_model(_load_llama(llama_dir, four_bit=False),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora,
                                      init_lora_weights=False))
    dkpeft.patch(model, warn=False)
    inputs = {"input_ids": torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))}
    y0, g0 = _run(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, g1 = _run(compiled, inputs)
    g1 = {k.removeprefix("_orig_mod."): v for k, v in g1.items()}
    ours = [str(w.message) for w in caught
            if any(f in str(w.message) for f in ("deltakern", "peft.py", "bnb.py")) or "deltakern" in str(w.filename)]
    assert not ours, ours
    torch.testing.assert_close(y1, y0)
    assert g1.keys() == g0.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-7)
