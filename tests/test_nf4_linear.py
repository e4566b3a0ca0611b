"""NF4Linear and deltakern.quantize(model) on the CPU."""

import json
import pytest
import torch
from torch import nn

import deltakern
from deltakern import nf4
from deltakern.nn import NF4Linear

bnb = pytest.importorskip("bitsandbytes")


def _linear(i=70, o=33, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_forward_equals_dequantized_linear(dtype):
    lin = _linear(dtype=dtype)
    m = NF4Linear.from_linear(lin)
    x = torch.randn(2, 5, 70, dtype=dtype)
    ref = torch.nn.functional.linear(x, nf4.dequantize(nf4.quantize(lin.weight), dtype), lin.bias)
    assert torch.equal(m(x), ref)
    assert m.weight.shape == (33, 70) and m.bias.requires_grad  # the bias keeps its requires_grad


def test_state_dict_is_bnb_format_and_round_trips():
    m = NF4Linear.from_linear(_linear())
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"}
    fresh = NF4Linear.from_linear(_linear(seed=1))
    fresh.load_state_dict(sd)
    x = torch.randn(4, 70)
    assert torch.equal(fresh(x), m(x))


def test_bnb_linear4bit_checkpoint_round_trip():
    """A bnb Linear4bit's state dict loads into NF4Linear, and ours loads into bnb, same outputs."""
    lin = _linear(dtype=torch.bfloat16)
    theirs = bnb.nn.Linear4bit(70, 33, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on the first move to a device
    assert theirs.weight.bnb_quantized
    x = torch.randn(3, 70, dtype=torch.bfloat16)
    ours = NF4Linear.from_linear(_linear(seed=5, dtype=torch.bfloat16))
    ours.load_state_dict(theirs.state_dict())
    w_theirs = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(nf4.dequantize(ours.weight), w_theirs)

    sd = NF4Linear.from_linear(lin).state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), nf4.dequantize(nf4.quantize(lin.weight)))


def test_load_rejects_bad_checkpoint_and_changes_nothing():
    m = NF4Linear.from_linear(_linear())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    other = NF4Linear.from_linear(_linear(i=64, o=33, seed=2)).state_dict()
    with pytest.raises(RuntimeError, match=r"checkpoint weight has shape \(33, 64\)"):
        m.load_state_dict(other)
    sd = NF4Linear.from_linear(_linear(seed=3)).state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match="absmax has"):
        m.load_state_dict(sd)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="Missing key"):
        m.load_state_dict({"bias": torch.zeros(33)})


def test_bad_construction():
    with pytest.raises(TypeError, match="NF4Weight"):
        NF4Linear(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(nf4.quantize(torch.randn(2, 3, 64)))
    with pytest.raises(ValueError, match="bias must have shape"):
        NF4Linear(nf4.quantize(torch.randn(4, 64)), torch.zeros(5))
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="expects 70"):
        NF4Linear.from_linear(_linear())(torch.randn(2, 69))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(64, 64), "mlp": nn.Linear(64, 128, bias=False)})
                                    for _ in range(2))
        self.lm_head = nn.Linear(128, 10)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b["mlp"](b["q_proj"](h))[..., :64]
        return self.lm_head(torch.cat([h, h], -1))


def test_quantize_model_in_place():
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.randint(0, 10, (2, 7))
    before = model(ids)
    summary = deltakern.quantize(model, progress=False)
    assert summary.layers == 4 and summary.skipped == ["lm_head"]
    assert isinstance(model.blocks[0]["q_proj"], NF4Linear) and isinstance(model.lm_head, nn.Linear)
    dense = 2 * (64 * 64 * 4 + 64 * 4 + 64 * 128 * 4)
    assert summary.bytes_before == dense
    assert summary.bytes_after == sum(m.weight.nbytes + (m.bias.numel() * 4 if m.bias is not None else 0)
                                      for m in model.modules() if isinstance(m, NF4Linear))
    assert summary.bytes_after < dense / 4
    after = model(ids)
    assert (after - before).abs().max() < 0.2 * before.abs().max()
    assert "quantized 4 linear layers" in str(summary)


def test_quantize_model_skip_patterns_and_errors():
    model = Tiny()
    summary = deltakern.quantize(model, skip=("lm_head", r"blocks\.1\..*", "mlp"), progress=False)
    assert summary.layers == 1 and isinstance(model.blocks[0]["q_proj"], NF4Linear)
    with pytest.raises(ValueError, match="blocksize"):
        deltakern.quantize(Tiny(), blocksize=100)
    with pytest.raises(TypeError, match="nn.Module"):
        deltakern.quantize("model")


def test_compile_fullgraph():
    m = NF4Linear.from_linear(_linear())
    x = torch.randn(3, 70)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), m(x))


def test_dtype_cast_keeps_the_format():
    m = NF4Linear.from_linear(_linear()).to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16
    assert m.weight.absmax.dtype == torch.uint8 and m.weight.code.dtype == torch.float32
    assert m.weight.nested_absmax.dtype == torch.float32
    x = torch.randn(2, 70, dtype=torch.bfloat16)
    assert m(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="this layer is"):
        m.set_weight(nf4.quantize(torch.randn(4, 64)))


def test_quantize_on_meta_gives_empty_layers_ready_for_loading():
    from deltakern.nn.nf4_linear import quant_state_blob

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(70, 33), nn.ReLU(), nn.Linear(33, 5, bias=False))
    ref = __import__("copy").deepcopy(dense)
    deltakern.quantize(ref, skip=(), progress=False)
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(70, 33), nn.ReLU(), nn.Linear(33, 5, bias=False))
    summary = deltakern.quantize(empty, skip=(), progress=False)
    assert summary.layers == 2 and isinstance(empty[0], NF4Linear) and empty[0].weight.device.type == "meta"
    empty.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(4, 70)
    assert torch.equal(empty(x), ref(x))
    sd = empty.state_dict()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in sd.items())
    # the fixed-length quant-state JSON (used by sharded layers) does not depend on the offset, and parses the same
    a, b = NF4Linear.from_linear(_linear(seed=1)).weight, NF4Linear.from_linear(_linear(seed=2)).weight
    assert a.offset != b.offset
    fa, fb = quant_state_blob(a, fixed_length=True), quant_state_blob(b, fixed_length=True)
    assert fa.numel() == fb.numel() and fa.numel() >= quant_state_blob(a).numel()
    assert json.loads(bytes(fa.tolist())) == json.loads(bytes(quant_state_blob(a).tolist()))
    padded = dict(NF4Linear.from_linear(_linear(seed=1)).state_dict())
    padded["weight.quant_state.bitsandbytes__nf4"] = fa
    stats = {k[len("weight."):]: v for k, v in padded.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(padded["weight"], stats, device="cpu")  # bitsandbytes reads it
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), nf4.dequantize(a))


def test_nf4_parts_are_frozen_integer_parameters_torch_tools_understand():
    """The 4-bit codes and scales are frozen integer Parameters under their state-dict names: dtype casts,
    optimizers and summary leave them alone, and torch.distributed.checkpoint's state-dict API (which walks
    each key attribute by attribute) reads and writes the bitsandbytes keys."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    for dq in (True, False):
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(70, 33), nn.Linear(33, 9))
        n_dense = sum(p.numel() for p in dense.parameters())
        model = dense
        deltakern.quantize(model, skip=(), blocksize=64, double_quant=dq, progress=False)
        deltakern.apply(model, deltakern.LoRA(r=2))
        nf4_params = [p for m in model.modules() if isinstance(m, NF4Linear) for p in m.nf4_parameters()]
        assert all(not p.requires_grad and not p.is_floating_point() for p in nf4_params)
        assert deltakern.summary(model).total == n_dense + sum(p.numel() for n, p in model.named_parameters()
                                                               if "lora_" in n)
        x = torch.randn(3, 70)
        y = model(x)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        y.square().sum().backward()
        opt.step()
        before = {k: v.clone() for k, v in model.state_dict().items() if ".weight" in k}  # the 4-bit base
        model.to(torch.float16).to(torch.float32)
        after = model.state_dict()
        assert all(torch.equal(v, after[k]) and v.dtype == after[k].dtype for k, v in before.items())
        sd = get_model_state_dict(model)
        assert set(sd) == set(model.state_dict())
        fresh = nn.Sequential(nn.Linear(70, 33), nn.Linear(33, 9))
        deltakern.quantize(fresh, skip=(), double_quant=dq, progress=False)
        deltakern.apply(fresh, deltakern.LoRA(r=2))
        set_model_state_dict(fresh, sd)
        assert torch.equal(fresh(x), model(x))


def test_weight_object_and_its_decoded_scales_are_reused():
    """`layer.weight` is assembled once and reused while the module holds the same tensors, so the
    decoded fp32 block scales (nested: one decode) are not recomputed on every forward; an in-place
    change of the scales, a move or new tensors give fresh values."""
    m = NF4Linear.from_linear(_linear())
    w = m.weight
    assert m.weight is w and w.absmax_fp32() is m.weight.absmax_fp32()
    first = w.absmax_fp32().clone()
    other = NF4Linear.from_linear(_linear(seed=3))
    m.load_state_dict(other.state_dict())  # copies into the same tensors: the memo sees their versions
    assert torch.equal(m.weight.absmax_fp32(), other.weight.absmax_fp32())
    assert not torch.equal(m.weight.absmax_fp32(), first)
    x = torch.randn(3, 70)
    torch.testing.assert_close(m(x), other(x))
    m.to("cpu")
    assert m.weight is not w
