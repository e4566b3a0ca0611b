"""deltakern.methods: apply every delta method to tiny transformers models (BERT, Llama, GPT-2 built from
configs, no network) and check what the API promises: identity at init, gradients only to the delta,
target matching, composition, the summary table, equality with PEFT (dense and over bitsandbytes 4-bit),
named deltas / disable / remove, merge / unmerge, clear errors for bad inputs, and prefix / prompt tuning
(shapes, masks, gradients, a few SGD steps that lower a loss).

Save / load (deltakern's format and PEFT's) is in test_artifacts.py.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import deltakern as dk  # noqa: E402
from deltakern.methods import base as dkbase  # noqa: E402
from deltakern.nn import DoRALinear, LoRALinear, NF4Linear  # noqa: E402

from _helpers import (MODELS, batch, bert, bert_cls, gpt2, llama, lm_loss, one_thread, perturb, rel, run,  # noqa: E402,F401
                      same_state, snapshot)

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# the method every architecture gets with defaults; None = the method cannot apply (a clear error is expected)
DEFAULTS = {
    "LoRA": lambda: dk.LoRA(),
    "DoRA": lambda: dk.DoRA(),
    "BitFit": lambda: dk.BitFit(),
    "Freeze": lambda: dk.Freeze(),
    "Adapter": lambda: dk.Adapter(),
    "PrefixTuning": lambda: dk.PrefixTuning(),
    "PromptTuning": lambda: dk.PromptTuning(),
}
CANNOT = {  # (arch, method) -> the words the error must contain
    ("llama", "BitFit"): "add_missing=True",  # Llama's linears have no bias
}
IDENTITY_AT_INIT = ("LoRA", "DoRA", "BitFit", "Freeze", "Adapter")
CASES = [(a, m) for a in MODELS for m in DEFAULTS if (a, m) not in CANNOT]


def _method_for(arch, name):
    if (arch, name) == ("llama", "BitFit"):
        return dk.BitFit(add_missing=True)
    return DEFAULTS[name]()


def _owned(model):
    """Ids of the parameters the active delta's methods own."""
    return {id(p) for app in dkbase.applications(model) for p in app.params.values()}


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


# ---- every method on models as they come --------------------------------------------------------------


@pytest.mark.parametrize("arch,name", CASES)
def test_defaults_apply_and_forward(arch, name):
    model = MODELS[arch]()
    ids, mask = batch()
    y0 = run(model, ids, mask)
    assert dk.apply(model, _method_for(arch, name)) is model
    assert dk.methods.deltas(model) == ["default"] and dk.methods.active_delta(model) == "default"
    y1 = run(model, ids, mask)
    assert y1.shape == y0.shape and torch.isfinite(y1).all()
    if name in IDENTITY_AT_INIT:
        # zero-initialised B / up-projection, copies of the biases, DoRA's magnitude = row norms
        torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-7)
        with torch.enable_grad():  # the training path (fused bias-only / LoRA functions) as well
            y2 = model(input_ids=ids, attention_mask=mask)
        y2 = y2.logits if hasattr(y2, "logits") else y2.last_hidden_state
        torch.testing.assert_close(y2.detach(), y0, rtol=1e-6, atol=1e-7)
    else:
        assert not torch.equal(y1, y0)  # prefixes and soft prompts change the output from the start
    s = dk.summary(model)
    assert len(s.rows) == 1 and s.rows[0]["method"].startswith(name)


@pytest.mark.parametrize("arch,name", sorted(CANNOT))
def test_method_that_cannot_apply_says_why_and_changes_nothing(arch, name):
    model = MODELS[arch]()
    before, flags = snapshot(model), _flags(model)
    with pytest.raises(ValueError, match=CANNOT[(arch, name)]):
        dk.apply(model, DEFAULTS[name]())
    assert same_state(snapshot(model), before) and _flags(model) == flags and dk.methods.deltas(model) == []


def test_identity_at_init_exact_for_lora_dora_adapter_bitfit_freeze_on_bert_model():
    model = bert()
    ids, mask = batch()
    y0 = run(model, ids, mask)
    for i, m in enumerate([dk.LoRA(r=4, target=["query", "value"]), dk.DoRA(r=4, target="key"),
                           dk.Adapter(bottleneck=8), dk.BitFit(), dk.Freeze(train=r"pooler\.")]):
        dk.apply(model, m, name=f"d{i}")
        assert torch.equal(run(model, ids, mask), y0), m.describe()


# ---- gradients reach the delta only ---------------------------------------------------------------------


@pytest.mark.parametrize("arch,name", CASES)
def test_gradients_only_reach_the_delta(arch, name):
    model = MODELS[arch]()
    originals = list(model.parameters())
    dk.apply(model, _method_for(arch, name))
    ids, mask = batch()
    lm_loss(model, ids, mask).backward()
    owned = _owned(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {id(p) for _, p in trainable} == owned
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert any(float(p.grad.abs().max()) > 0 for _, p in trainable)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    for p in originals:  # the base's own tensors (BitFit / Freeze train copies of them)
        assert id(p) not in owned and p.grad is None
    assert dk.summary(model).trainable == sum(p.numel() for _, p in trainable)
    if name == "Freeze":  # default: the top layer of the main stack
        top = {"bert": "bert.encoder.layer.1.", "llama": "model.layers.1.", "gpt2": "transformer.h.1."}[arch]
        assert trainable and all(n.startswith(top) for n, _ in trainable)
        assert {n for n, _ in trainable} == {n for n, _ in MODELS[arch]().named_parameters() if n.startswith(top)}
    if name == "BitFit":
        assert all(n.endswith(".bias") for n, _ in trainable)


def test_freeze_patterns_and_bitfit_targets_pick_exactly_those():
    model = bert_cls()
    dk.apply(model, dk.Freeze(train=[r"^classifier\.", r"LayerNorm\.weight$"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {n for n, _ in bert_cls().named_parameters() if n.startswith("classifier.") or n.endswith("LayerNorm.weight")}
    assert names == want
    model = bert_cls()
    dk.apply(model, dk.BitFit(target="LayerNorm"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in bert_cls().named_parameters() if n.endswith("LayerNorm.bias")} and len(names) == 5


# ---- target: names, suffixes, regexes -------------------------------------------------------------------


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear)))


@pytest.mark.parametrize("target,expected", [
    ("bert.encoder.layer.0.attention.self.query", ["bert.encoder.layer.0.attention.self.query"]),
    ("query", ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]),
    ("self.value", ["bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.1.attention.self.value"]),
    (r"bert\.encoder\.layer\.1\..*\.(key|value)", ["bert.encoder.layer.1.attention.self.key",
                                                    "bert.encoder.layer.1.attention.self.value"]),
    (["layer.0.output.dense", r".*pooler\.dense"], ["bert.encoder.layer.0.output.dense", "bert.pooler.dense"]),
    ("classifier", ["classifier"]),  # an explicit target may name the head
])
def test_target_names_suffixes_regexes(target, expected):
    model = bert_cls()
    dk.apply(model, dk.LoRA(r=2, target=target))
    assert _wrapped(model) == expected


_TARGETED = {"LoRA": lambda t: dk.LoRA(target=t), "DoRA": lambda t: dk.DoRA(target=t),
             "BitFit": lambda t: dk.BitFit(target=t), "Adapter": lambda t: dk.Adapter(target=t),
             "PrefixTuning": lambda t: dk.PrefixTuning(target=t),
             "Freeze": lambda t: dk.Freeze(train=t)}  # Freeze's `train` is searched (re.search) in parameter names


@pytest.mark.parametrize("method,pattern", [(m, p) for m in _TARGETED for p in ("no_such_module", r"layer\.7\..*")]
                         + [(m, "quer") for m in _TARGETED if m != "Freeze"])  # a part of a name is no suffix
def test_target_without_match_names_the_pattern_and_changes_nothing(method, pattern):
    model = bert_cls()
    before, flags = snapshot(model), _flags(model)
    with pytest.raises(ValueError) as err:
        dk.apply(model, _TARGETED[method](pattern))
    assert repr(pattern) in str(err.value)
    assert same_state(snapshot(model), before) and _flags(model) == flags and dk.methods.deltas(model) == []
    assert "_deltakern_deltas" not in model.__dict__


def test_lora_target_on_non_linear_module_is_refused():
    with pytest.raises(ValueError, match="only non-linear modules.*LayerNorm"):
        dk.apply(bert_cls(), dk.LoRA(target="attention.output.LayerNorm"))


def test_failed_apply_keeps_the_active_delta_and_its_flags():
    model = bert_cls()
    dk.apply(model, dk.LoRA(r=2, target="query"), name="a")
    perturb(model)
    ids, mask = batch()
    y, flags = run(model, ids, mask), _flags(model)
    for delta, bad in [("a", dk.LoRA(target="nothing")), ("a", dk.LoRA(target="query")),
                       ("a", [dk.BitFit(), dk.Freeze(train="bias")]), ("b", dk.LoRA(target="nothing")),
                       ("b", [dk.Adapter(bottleneck=2), dk.BitFit(target="nothing")])]:
        with pytest.raises(ValueError):
            dk.apply(model, bad, name=delta)
        assert dk.methods.deltas(model) == ["a"] and dk.methods.active_delta(model) == "a"
        assert torch.equal(run(model, ids, mask), y) and _flags(model) == flags


# ---- composition and summary -----------------------------------------------------------------------------


def _lora_numel(model, names, r):
    n = 0
    for name in names:
        out_f, in_f = model.get_submodule(name).weight.shape
        n += r * (out_f + in_f)
    return n


def test_summary_counts_match_a_manual_count():
    ref = bert_cls()
    base_total = sum(p.numel() for p in ref.parameters())
    biases = sum(p.numel() for n, p in ref.named_parameters() if n.endswith(".bias"))
    lora_targets = [n for n, _ in ref.named_modules() if n.endswith(("query", "value"))]
    adapter_targets = [n for n, _ in ref.named_modules() if n.endswith("output.dense")]
    n_lora = _lora_numel(ref, lora_targets, 4)
    n_adapter = len(adapter_targets) * (8 * 32 + 8 + 32 * 8 + 32)

    model = bert_cls()
    dk.apply(model, [dk.LoRA(r=4, alpha=8, target=["query", "value"]), dk.Adapter(bottleneck=8)])
    dk.apply(model, dk.BitFit())  # after the adapter: its bottleneck biases are not base biases
    s = dk.summary(model)
    assert [(r["method"], r["targets"], r["params"]) for r in s.rows] == [
        ("LoRA(r=4, alpha=8)", 4, n_lora), ("Adapter(bottleneck=8)", 4, n_adapter), ("BitFit()", 19, biases)]
    assert s.trainable == n_lora + n_adapter + biases
    assert s.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert s.total == base_total + n_lora + n_adapter == sum(p.numel() for p in model.parameters())
    assert s.percent == pytest.approx(100 * s.trainable / s.total)
    text = str(s)
    for r in s.rows:
        assert r["method"] in text and f"{r['params']:,}" in text and f"{100 * r['params'] / s.total:.3f}%" in text
    assert f"{s.trainable:,}" in text and f"{s.percent:.3f}%" in text and f"{s.total:,}" in text
    assert "'default' (active)" in text


def test_summary_without_delta_and_with_inactive_deltas():
    model = bert_cls()
    s = dk.summary(model)
    assert s.delta is None and s.trainable == s.total == sum(p.numel() for p in model.parameters())
    assert "no active delta" in str(s) and s.rows[0]["method"].startswith("other")
    dk.apply(model, dk.BitFit(), name="a")
    dk.apply(model, dk.LoRA(r=2, target="query"), name="b")
    s = dk.summary(model)
    assert s.delta == "b" and s.inactive == ["a"] and "inactive: 'a'" in str(s)
    assert s.trainable == _lora_numel(model, ["bert.encoder.layer.0.attention.self.query.base",
                                              "bert.encoder.layer.1.attention.self.query.base"], 2)


@pytest.mark.parametrize("cls", [dk.LoRA, dk.DoRA], ids=["QLoRA", "QDoRA"])
def test_qlora_plus_bitfit_compose_on_nf4_llama(cls):
    dense = llama()
    model = llama()
    dk.quantize(model, progress=False)  # every linear but lm_head becomes NF4Linear
    ids, _ = batch(pad=False)
    y_base = run(model, ids)
    dk.apply(model, cls(r=4, alpha=8))
    dk.apply(model, dk.BitFit(add_missing=True))  # Llama's linears have no bias: add zero biases to train
    wrapped = [m for m in model.modules() if isinstance(m, (LoRALinear, DoRALinear))]
    assert len(wrapped) == 2 * len(LLAMA_PROJ)
    for layer in wrapped:
        assert type(layer) is (LoRALinear if cls is dk.LoRA else DoRALinear) and layer.is_nf4
        assert isinstance(layer.base, NF4Linear) and layer.base.bias is not None
    # B = 0 and zero biases: the quantized base, up to fp32 summation order (the fused LoRA op may run
    # a native CPU kernel where NF4Linear runs dequantize + F.linear)
    torch.testing.assert_close(run(model, ids), y_base, rtol=1e-5, atol=1e-6)

    proj = [n for n, _ in dense.named_modules() if n.endswith(tuple(LLAMA_PROJ))]
    n_lora = _lora_numel(dense, proj, 4) + (sum(dense.get_submodule(n).weight.shape[0] for n in proj)
                                            if cls is dk.DoRA else 0)
    n_bias = sum(dense.get_submodule(n).weight.shape[0] for n in proj) + dense.lm_head.weight.shape[0]
    s = dk.summary(model)
    assert [(r["method"], r["params"]) for r in s.rows] == [(f"{cls.__name__}(r=4, alpha=8)", n_lora),
                                                              ("BitFit(add_missing)", n_bias)]
    assert s.total == sum(p.numel() for p in dense.parameters()) + n_lora + n_bias  # 4-bit counted per element
    text = str(s)
    assert cls.__name__ in text and "BitFit(add_missing)" in text

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        owned = _owned(model)
        assert all(id(p) in owned for p in model.parameters() if p.grad is not None)
        assert all(p.grad is not None for p in model.parameters() if id(p) in owned)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_lora_quantize_option_equals_quantize_then_lora():
    ids, _ = batch(pad=False)
    a = llama()
    dk.apply(a, dk.LoRA(r=4, quantize=True))
    b = llama()
    dk.quantize(b, progress=False)
    dk.apply(b, dk.LoRA(r=4))
    assert all(w.is_nf4 for w in a.modules() if isinstance(w, LoRALinear))
    assert isinstance(a.lm_head, nn.Linear)  # the head is not a target: it stays dense
    assert torch.equal(run(a, ids), run(b, ids))
    c = llama()
    dk.apply(c, dk.BitFit(add_missing=True), name="x")
    with pytest.raises(ValueError, match="quantize first"):
        dk.apply(c, dk.LoRA(quantize=True), name="y")


# ---- equality with PEFT ----------------------------------------------------------------------------------


def _copy_into_peft(dk_model, peft_model):
    """Copy every deltakern LoRA/DoRA tensor into the PEFT layer of the same module path."""
    inner = peft_model.base_model.model
    n = 0
    with torch.no_grad():
        for name, w in dk_model.named_modules():
            if not isinstance(w, (LoRALinear, DoRALinear)):
                continue
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(w.lora_A)
            layer.lora_B["default"].weight.copy_(w.lora_B)
            if isinstance(w, DoRALinear):
                layer.lora_magnitude_vector["default"].weight.copy_(w.lora_magnitude_vector)
            n += 1
    return n


def _peft_grads(peft_model):
    out = {}
    for name, p in peft_model.base_model.model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default.weight", "").replace(".weight", "").replace(".default", "")
            out[key] = p.grad
    return out


def _dk_grads(model):
    return {n.replace(".base", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _fwd_bwd(model, ids):
    model.zero_grad(set_to_none=True)
    o = model(input_ids=ids, labels=ids)
    o.loss.backward()
    return o.logits.detach()


@pytest.mark.parametrize("cls,rslora", [(dk.LoRA, False), (dk.DoRA, False), (dk.LoRA, True)],
                         ids=["lora", "dora", "lora-rslora"])
def test_lora_dora_equal_peft_outputs_and_gradients(cls, rslora):
    from peft import LoraConfig, get_peft_model

    ids, _ = batch(t=9, pad=False)
    ours = llama()
    dk.apply(ours, cls(r=4, alpha=8, target=LLAMA_PROJ, use_rslora=rslora))
    perturb(ours, scale=0.2)
    theirs = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJ,
                                                use_dora=cls is dk.DoRA, use_rslora=rslora))
    assert _copy_into_peft(ours, theirs) == 2 * len(LLAMA_PROJ)
    ours.train()
    theirs.train()
    y1, y2 = _fwd_bwd(ours, ids), _fwd_bwd(theirs, ids)
    assert rel(y1, y2) < 1e-5  # fp32 sums in another order than PEFT's matmuls (measured up to 2.3e-6)
    g1, g2 = _dk_grads(ours), _peft_grads(theirs)
    assert set(g1) == set(g2) and len(g1) == 2 * len(LLAMA_PROJ) * (3 if cls is dk.DoRA else 2)
    for k in g1:  # the same sums' rounding, carried back through every layer (measured up to 1.4e-5)
        assert rel(g1[k], g2[k]) < 5e-5, k


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    llama().save_pretrained(path)
    return path


def _load_4bit(path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", quantization_config=q)


@pytest.mark.parametrize("cls", [dk.LoRA, dk.DoRA], ids=["qlora", "qdora"])
def test_nf4_lora_dora_equal_peft_over_bitsandbytes(llama_dir, cls):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from deltakern.integrations import bnb as dkbnb

    ids, _ = batch(t=5, pad=False)
    target = ["q_proj", "v_proj", "down_proj"]
    theirs = get_peft_model(_load_4bit(llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=target,
                                                              use_dora=cls is dk.DoRA))
    ours = _load_4bit(llama_dir)
    assert len(dkbnb.convert(ours).converted) == 2 * len(LLAMA_PROJ)
    dk.apply(ours, cls(r=4, alpha=8, target=target))
    assert all(w.is_nf4 for w in ours.modules() if isinstance(w, (LoRALinear, DoRALinear)))
    perturb(ours, scale=0.2)
    assert _copy_into_peft(ours, theirs) == 6
    ours.train()
    theirs.train()
    y1, y2 = _fwd_bwd(ours, ids), _fwd_bwd(theirs, ids)
    assert rel(y1, y2) < 1e-5
    g1, g2 = _dk_grads(ours), _peft_grads(theirs)
    assert set(g1) == set(g2)
    for k in g1:
        assert rel(g1[k], g2[k]) < 1e-4, k


# ---- named deltas, disable, remove -----------------------------------------------------------------------


def test_named_deltas_switch_disable_remove():
    model = bert_cls()
    params0 = {n: id(p) for n, p in model.named_parameters()}
    state0 = snapshot(model)
    ids, mask = batch()
    y0 = run(model, ids, mask)

    dk.apply(model, [dk.LoRA(r=2, target=["query", "value"]), dk.BitFit()], name="a")
    perturb(model, seed=1)
    ya = run(model, ids, mask)
    dk.apply(model, dk.Adapter(bottleneck=4), name="b")  # detaches "a": "b" starts from the base
    assert dk.methods.active_delta(model) == "b" and torch.equal(run(model, ids, mask), y0)
    dk.apply(model, dk.Freeze(train=r"^classifier\."), name="b")  # joins "b"
    perturb(model, seed=2)
    yb = run(model, ids, mask)
    assert not torch.equal(ya, y0) and not torch.equal(yb, y0) and not torch.equal(ya, yb)
    assert sorted(dk.methods.deltas(model)) == ["a", "b"]

    dk.activate(model, "a")
    assert torch.equal(run(model, ids, mask), ya)
    assert {id(p) for p in model.parameters() if p.requires_grad} == _owned(model)
    with dk.disable(model) as m:
        assert m is model and dk.methods.active_delta(model) is None
        assert torch.equal(run(model, ids, mask), y0)
        assert not any(p.requires_grad for p in model.parameters())
    assert dk.methods.active_delta(model) == "a" and torch.equal(run(model, ids, mask), ya)
    dk.disable(model)  # without a block: stays disabled until activate
    assert torch.equal(run(model, ids, mask), y0)
    dk.activate(model, "b")
    assert torch.equal(run(model, ids, mask), yb)

    dk.remove(model, "b")  # the active one: the model runs on its base
    assert dk.methods.deltas(model) == ["a"] and dk.methods.active_delta(model) is None
    assert torch.equal(run(model, ids, mask), y0)
    with pytest.raises(KeyError, match="'b'"):
        dk.activate(model, "b")
    dk.activate(model, "a")
    assert torch.equal(run(model, ids, mask), ya)
    dk.remove(model)
    assert dk.methods.deltas(model) == [] and torch.equal(run(model, ids, mask), y0)
    assert {n: id(p) for n, p in model.named_parameters()} == params0  # the same parameter objects again
    assert same_state(snapshot(model), state0)
    assert not any(isinstance(m, (LoRALinear, DoRALinear)) for m in model.modules())


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_model_to_dtype_reaches_detached_deltas_and_swapped_out_base_parameters(name):
    """model.to(...) moves what is attached; detached deltas follow on activate, and the base parameters a
    BitFit/Freeze delta had swapped out follow on detach (they used to stay float32)."""
    model = bert_cls()
    dk.apply(model, DEFAULTS[name](), name="a")
    perturb(model)
    ids, mask = batch()
    ya = run(model, ids, mask)
    dk.apply(model, [dk.BitFit(), dk.Freeze(train=r"^classifier\.weight")], name="b")
    model.to(torch.bfloat16)
    dk.activate(model, "a")
    y = run(model, ids, mask)
    assert y.dtype == torch.bfloat16 and rel(y, ya) < 0.05
    fp32 = set(_owned(model)) if name in ("LoRA", "DoRA") else set()  # adapters stay fp32 (autocast_adapter_dtype)
    assert {p.dtype for p in model.parameters() if id(p) not in fp32} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if id(p) in fp32} <= {torch.float32}
    dk.remove(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_freeze_keeps_tied_weights_tied():
    """GPT-2's lm_head shares the token embedding: training it with Freeze must move both."""
    model = gpt2()
    dk.apply(model, dk.Freeze(train=r"wte"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert dk.summary(model).trainable == 96 * 32 and list(dk.methods.delta_state_dict(model)) == [
        "0.transformer.wte.weight"]
    ids, _ = batch(pad=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert model.lm_head.weight is model.transformer.wte.weight
    dk.remove(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, gpt2().lm_head.weight)


def test_requires_grad_flags_come_back_when_the_last_delta_goes():
    model = bert_cls()
    model.bert.embeddings.requires_grad_(False)  # the user's own choice before any delta
    flags = _flags(model)
    dk.apply(model, dk.LoRA(r=2, target="query"), name="a")
    dk.apply(model, dk.BitFit(), name="b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in bert_cls().named_parameters() if n.endswith(".bias")}
    dk.remove(model, "b")
    assert not any(p.requires_grad for p in model.parameters())  # "a" is held, the model is not plain yet
    dk.remove(model, "a")
    assert _flags(model) == flags
    dk.apply(model, dk.LoRA(r=2, target="query"))
    dk.merge(model, unload=True)  # merging the only delta for good also ends it
    assert dk.methods.deltas(model) == [] and _flags(model) == flags


def test_same_delta_name_twice():
    model = bert_cls()
    dk.apply(model, dk.LoRA(r=2, target="query"), name="a")
    with pytest.raises(ValueError, match="already has a LoRA/DoRA adapter"):
        dk.apply(model, dk.LoRA(r=2, target="query"), name="a")
    with pytest.raises(ValueError, match="already has a LoRA/DoRA adapter"):
        dk.apply(model, dk.DoRA(r=2, target="self.query"), name="a")
    dk.apply(model, dk.BitFit(), name="a")
    with pytest.raises(ValueError, match="trained by both"):
        dk.apply(model, dk.BitFit(target="query"), name="a")
    with pytest.raises(ValueError, match="LoRA/DoRA keeps frozen"):
        dk.apply(model, dk.Freeze(train=r"layer\.0\.attention\.self\.query\.weight"), name="a")
    dk.apply(model, dk.Freeze(train=r"layer\.0\.attention\.self\.query\.weight"), name="c")
    with pytest.raises(ValueError, match="trains bert.encoder.layer.0.attention.self.query.weight, but LoRA keeps"):
        dk.apply(model, dk.LoRA(r=2, target="query"), name="c")
    dk.activate(model, "a")
    for m in (dk.PrefixTuning(num_virtual_tokens=2), dk.PromptTuning(num_virtual_tokens=2)):
        dk.apply(model, m, name="a")
        with pytest.raises(ValueError, match="already has a"):
            dk.apply(model, type(m)(num_virtual_tokens=2), name="a")
    assert [r["method"].split("(")[0] for r in dk.summary(model).rows] == [
        "LoRA", "BitFit", "PrefixTuning", "PromptTuning"]


# ---- merge / unmerge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [dk.LoRA, dk.DoRA], ids=["lora", "dora"])
def test_merge_unmerge_restore_outputs_and_weights(cls):
    model = bert_cls()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = batch()
    y0 = run(model, ids, mask)
    # the adapters wrap two of the LoRA/DoRA layers (attention.output.dense, output.dense)
    dk.apply(model, [cls(r=4, target=["query", "value", "output.dense"]), dk.Adapter(bottleneck=4)])
    perturb(model, scale=0.3)
    y1 = run(model, ids, mask)
    assert dk.merge(model) == [cls(r=4).describe()]
    weights = {n.replace(".inner", "").replace(".base", ""): p for n, p in model.named_parameters() if ".base." in n}
    changed = [n for n, p in weights.items() if not torch.equal(p, w0[n])]
    assert sorted(changed) == sorted(n for n in weights if n.endswith("weight"))  # 8 weights, biases kept
    assert len(changed) == 8
    assert rel(run(model, ids, mask), y1) < 1e-5
    with pytest.raises(RuntimeError, match="already merged"):
        dk.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        dk.apply(model, dk.BitFit())
    assert dk.unmerge(model) == [cls(r=4).describe()]
    for n, p in weights.items():
        torch.testing.assert_close(p, w0[n], rtol=0, atol=1e-6)
    assert rel(run(model, ids, mask), y1) < 1e-5
    with pytest.raises(RuntimeError, match="not merged"):
        dk.unmerge(model)

    dk.merge(model)
    with dk.disable(model):  # detaching a merged delta unmerges it
        assert rel(run(model, ids, mask), y0) < 1e-5
    assert rel(run(model, ids, mask), y1) < 1e-5

    dk.merge(model, unload=True)  # for good: plain nn.Linear layers again, the adapters stay
    assert not any(isinstance(m, (LoRALinear, DoRALinear)) for m in model.modules())
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert type(model.bert.encoder.layer[0].output.dense.inner) is nn.Linear  # the adapter wraps the base now
    assert [r["method"] for r in dk.summary(model).rows] == ["Adapter(bottleneck=4)"]
    assert rel(run(model, ids, mask), y1) < 1e-5


def test_merge_refuses_nf4_and_deltas_without_lora():
    model = llama()
    dk.apply(model, dk.LoRA(r=2, target="q_proj", quantize=True))
    perturb(model)
    ids, _ = batch(pad=False)
    y, state = run(model, ids), snapshot(model)
    with pytest.raises(ValueError, match="NF4"):
        dk.merge(model)
    assert same_state(snapshot(model), state) and torch.equal(run(model, ids), y)
    dk.apply(model, dk.Freeze(), name="f")
    with pytest.raises(ValueError, match="no mergeable method"):
        dk.merge(model)


# ---- bad inputs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,words", [
    (lambda: dk.LoRA(r=0), "r must be a positive int"),
    (lambda: dk.LoRA(r=-2), "r must be a positive int"),
    (lambda: dk.LoRA(r=2.5), "r must be a positive int"),
    (lambda: dk.LoRA(r=True), "r must be a positive int"),
    (lambda: dk.DoRA(alpha=0), "alpha must be a positive number"),
    (lambda: dk.LoRA(alpha=float("nan")), "alpha must be a positive number"),
    (lambda: dk.LoRA(alpha="16"), "alpha must be a positive number"),
    (lambda: dk.LoRA(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    (lambda: dk.DoRA(dropout=-0.1), r"dropout must be a number in \[0, 1\)"),
    (lambda: dk.LoRA(use_rslora="yes"), "use_rslora must be True or False"),
    (lambda: dk.LoRA(target=5), "target must be"),
    (lambda: dk.LoRA(target=[]), "target must be"),
    (lambda: dk.BitFit(add_missing=1), "add_missing must be True or False"),
    (lambda: dk.Freeze(top_layers=0), "top_layers must be a positive int"),
    (lambda: dk.Freeze(train="("), "not a valid regex"),
    (lambda: dk.Freeze(train=[]), "non-empty list"),
    (lambda: dk.Adapter(bottleneck=0), "bottleneck must be a positive int"),
    (lambda: dk.Adapter(where="ffn"), "where must be"),
    (lambda: dk.Adapter(nonlinearity="swish"), "nonlinearity must be one of"),
    (lambda: dk.PrefixTuning(num_virtual_tokens=0), "num_virtual_tokens must be a positive int"),
    (lambda: dk.PrefixTuning(projection_hidden=-1), "projection_hidden must be a positive int"),
    (lambda: dk.PromptTuning(init="zeros"), "init must be"),
    (lambda: dk.PromptTuning(init_token_ids=[-1]), "init_token_ids"),
])
def test_bad_method_configs_raise_value_error(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_bad_apply_calls():
    model = bert_cls()
    flags = _flags(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dk.apply("bert", dk.LoRA())
    with pytest.raises(TypeError, match="got type"):
        dk.apply(model, dk.LoRA)  # the class, not a method object
    with pytest.raises(TypeError, match="got str"):
        dk.apply(model, "lora")
    with pytest.raises(TypeError, match="got Linear"):
        dk.apply(model, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got NoneType"):
        dk.apply(model, [dk.BitFit(), None])
    with pytest.raises(ValueError, match="delta name"):
        dk.apply(model, dk.BitFit(), name="my delta")
    with pytest.raises(ValueError, match="delta name"):
        dk.apply(model, dk.BitFit(), name=3)
    with pytest.raises(ValueError, match="top_layers=5 but bert.encoder.layer has only 2"):
        dk.apply(model, dk.Freeze(top_layers=5))
    with pytest.raises(ValueError, match="vocabulary has 96"):
        dk.apply(model, dk.PromptTuning(init_token_ids=[500]))
    with pytest.raises(ValueError, match="get_input_embeddings"):
        dk.apply(nn.Sequential(nn.Linear(4, 4)), dk.PromptTuning())
    with pytest.raises(ValueError, match="PrefixTuning needs a transformers model"):
        dk.apply(nn.Sequential(nn.Linear(4, 4)), dk.PrefixTuning())
    with pytest.raises(ValueError, match="pass target"):
        dk.apply(nn.Sequential(nn.Linear(4, 4)), dk.Adapter())
    assert _flags(model) == flags and dk.methods.deltas(model) == [] and "_deltakern_deltas" not in model.__dict__
    for fn in (dk.summary, dk.merge, dk.unmerge, dk.remove, dk.disable):
        with pytest.raises(TypeError, match="nn.Module"):
            fn(object())
    with pytest.raises(ValueError, match="apply a method first"):
        dk.merge(model)
    with pytest.raises(KeyError, match="no delta named 'x'"):
        dk.activate(model, "x")
    with pytest.raises(KeyError, match="no delta named 'x'"):
        dk.remove(model, "x")


def test_plain_torch_model_with_explicit_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        y0 = model(x)
    with pytest.raises(ValueError, match="cannot tell the output width of 1 .ReLU."):
        dk.apply(model, dk.Adapter(target="1"))
    dk.apply(model, [dk.LoRA(r=2, target="0"), dk.Adapter(bottleneck=2, target=["0", "2"]), dk.BitFit(target="4")])
    assert [type(m).__name__ for m in model] == ["AdapterLayer", "ReLU", "AdapterLayer", "ReLU", "Linear"]
    assert type(model[0].inner).__name__ == "LoRALinear"
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    perturb(model)
    model(x).square().sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        "0.inner.lora_A", "0.inner.lora_B", "4.bias"} | {f"{i}.adapter.{k}.{w}" for i in (0, 2) for k in ("down", "up")
                                                       for w in ("weight", "bias")}
    dk.remove(model)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    with torch.no_grad():
        assert torch.equal(model(x), y0)


# ---- prefix and prompt tuning ----------------------------------------------------------------------------


def _randomize_delta(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("make", [bert, llama, gpt2], ids=["bert", "llama", "gpt2"])
@pytest.mark.parametrize("method", [lambda: dk.PrefixTuning(num_virtual_tokens=3),
                                    lambda: dk.PrefixTuning(num_virtual_tokens=3, projection=True),
                                    lambda: dk.PromptTuning(num_virtual_tokens=3)], ids=["prefix", "prefix-mlp", "prompt"])
def test_prefix_prompt_shapes_and_masks(make, method):
    """Outputs keep the caller's length (soft-prompt positions are cut off the outputs); padding in the
    attention mask is honoured: a padded row equals that sequence run alone, and the padded tokens'
    content does not matter. Without a mask = an all-ones mask."""
    model = make()
    dk.apply(model, method())
    _randomize_delta(model)
    ids, mask = batch(t=7)
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    y = o.logits if hasattr(o, "logits") else o.last_hidden_state
    assert y.shape[:2] == (2, 7)
    assert all(h.shape[:2] == (2, 7) for h in o.hidden_states)
    alone = run(model, ids[1:, :5])
    torch.testing.assert_close(y[1, :5], alone[0], rtol=1e-5, atol=1e-5)
    ids2 = ids.clone()
    ids2[1, 5:] = 1
    torch.testing.assert_close(run(model, ids2, mask)[1, :5], y[1, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(model, ids), run(model, ids, torch.ones_like(mask)), rtol=1e-6, atol=1e-6)
    # causal models stay causal, BERT stays bidirectional
    ids3 = ids.clone()
    ids3[:, -1] = (ids3[:, -1] + 1) % 96
    first_changes = not torch.allclose(run(model, ids3)[:, 0], run(model, ids)[:, 0])
    assert first_changes == (make is bert)


@pytest.mark.parametrize("make", [bert, llama, gpt2], ids=["bert", "llama", "gpt2"])
def test_prefix_prompt_lora_adapter_compose_in_one_delta(make):
    model = make()
    methods = [dk.PrefixTuning(num_virtual_tokens=2), dk.PromptTuning(num_virtual_tokens=3), dk.Adapter(bottleneck=2)]
    lora_target = {llama: ["k_proj", "v_proj"], bert: ["key", "value"], gpt2: ["c_attn", "c_proj"]}[make]
    methods.insert(0, dk.LoRA(r=2, target=lora_target))  # on GPT-2: Conv1D layers, c_proj also under an adapter
    dk.apply(model, methods)
    _randomize_delta(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(0.3)
    ids, mask = batch()
    y = run(model, ids, mask)
    assert y.shape[:2] == (2, 7)
    torch.testing.assert_close(y[1, :5], run(model, ids[1:, :5])[0], rtol=1e-5, atol=1e-5)
    lm_loss(model, ids, mask).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == _owned(model) and all(p.grad is not None for p in trainable)
    assert [r["method"].split("(")[0] for r in dk.summary(model).rows] == [type(m).__name__ for m in methods]


def test_prompt_tuning_extends_inputs_like_a_user_expects():
    """position_ids move up by the prompt length (the prompt takes 0..p-1), token_type_ids and labels are
    extended, outputs are cut back: BERT's pooler reads the first virtual token."""
    model = bert()
    dk.apply(model, dk.PromptTuning(num_virtual_tokens=4))
    ids, mask = batch()
    y = run(model, ids, mask)
    pos = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(run(model, ids, mask, position_ids=pos), y, rtol=0, atol=0)
    torch.testing.assert_close(run(model, ids, mask, token_type_ids=torch.zeros_like(ids)), y, rtol=0, atol=0)
    with torch.no_grad():  # the same model run on [prompt embeddings, token embeddings] by hand
        dk.disable(model)
        emb = torch.cat([dk.methods.base.applications(model, "default")[0].params["prompt.embedding"].expand(2, -1, -1),
                         model.get_input_embeddings()(ids)], 1)
        full = model(inputs_embeds=emb, attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1))
        dk.activate(model, "default")
    torch.testing.assert_close(y, full.last_hidden_state[:, 4:], rtol=0, atol=0)
    with torch.no_grad():
        pooled = model(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(pooled, full.pooler_output, rtol=0, atol=0)

    lm = llama()
    dk.apply(lm, dk.PromptTuning(num_virtual_tokens=4))
    ids, _ = batch(pad=False)
    with torch.no_grad():
        o = lm(input_ids=ids, labels=ids)
    assert o.logits.shape == (2, 7, 96) and torch.isfinite(o.loss)
    gen = lm.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False, pad_token_id=0)
    assert gen.shape == (2, 9) and torch.equal(gen[:, :7], ids)
    assert torch.equal(lm.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0), gen)  # with a KV cache


def _prompt_lm(arch, p=4):
    """A tiny causal LM with a PromptTuning of p tokens away from its init. GPT-2 with a wider init: at
    initializer_range 0.02 the tiny tied-embedding model just repeats the last token, prompt or not."""
    model = llama() if arch == "llama" else gpt2(initializer_range=0.2)
    dk.apply(model, dk.PromptTuning(num_virtual_tokens=p))
    perturb(model, 0.3)
    return model


def _greedy(model, ids, **kw):
    return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_tuning_generate_with_kv_cache_equals_without(arch):
    """generate() with its default KV cache: the prefill call prepends the prompt (its keys/values stay in
    the cache), decoding calls extend the mask and positions by the prompt length. Token for token equal to
    use_cache=False, for greedy, sampling and beam search, without and with left padding, and for chunked
    prefill and prompt-lookup decoding; a left-padded row equals that sequence generated alone; the prompt
    changes what is generated."""
    model = _prompt_lm(arch)
    ids, _ = batch(pad=False)
    left = torch.ones_like(ids)
    left[1, :3] = 0  # row 1: 3 pad tokens on the left
    for mask in (None, left):
        kw = {} if mask is None else {"attention_mask": mask}
        a = _greedy(model, ids, **kw)
        assert a.shape == (2, 13) and torch.equal(a[:, :7], ids)
        assert torch.equal(a, _greedy(model, ids, use_cache=False, **kw))
        beams = dict(num_beams=3, **kw)
        assert torch.equal(_greedy(model, ids, **beams), _greedy(model, ids, use_cache=False, **beams))
        torch.manual_seed(3)
        s = model.generate(ids, max_new_tokens=6, do_sample=True, pad_token_id=0, **kw)
        torch.manual_seed(3)
        assert torch.equal(s, model.generate(ids, max_new_tokens=6, do_sample=True, pad_token_id=0, use_cache=False,
                                             **kw))
        with dk.disable(model):
            assert not torch.equal(a, _greedy(model, ids, **kw))
    assert torch.equal(_greedy(model, ids, attention_mask=left)[1, 7:], _greedy(model, ids[1:, 3:])[0, 4:])
    # chunked prefill (later chunks are decoding calls with several tokens); prompt-lookup decoding (batch 1)
    assert torch.equal(_greedy(model, ids, attention_mask=left, prefill_chunk_size=3),
                       _greedy(model, ids, attention_mask=left, use_cache=False))
    one = torch.cat([ids[:1], ids[:1]], 1)
    assert torch.equal(_greedy(model, one, prompt_lookup_num_tokens=2), _greedy(model, one, use_cache=False))
    # generate from inputs_embeds (used on the prefill call only) = from input_ids
    emb = model.get_input_embeddings()(ids).detach()
    assert torch.equal(_greedy(model, None, inputs_embeds=emb), _greedy(model, ids)[:, 7:])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_tuning_equals_peft_forward_and_generate(arch):
    """The same prompt embedding in PEFT's prompt tuning: the same logits (PEFT's also cover the virtual
    tokens) and the same greedy generation with a KV cache. No padding: PEFT drops position_ids, so its
    positions count left padding, ours (from generate's mask-based position_ids) do not."""
    peft = pytest.importorskip("peft")
    model = _prompt_lm(arch)
    base = llama() if arch == "llama" else gpt2(initializer_range=0.2)
    pm = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(dkbase.applications(model)[0].params["prompt.embedding"])
    ids, _ = batch(pad=False)
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, pm(input_ids=ids).logits
    assert theirs.shape[1] == 4 + 7
    torch.testing.assert_close(ours, theirs[:, 4:], rtol=1e-5, atol=1e-5)
    a = _greedy(model, ids)
    with warnings.catch_warnings():  # PEFT warns that it drops generate's position_ids
        warnings.simplefilter("ignore")
        b = pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_prompt_tuning_kv_cache_by_hand_and_refusals():
    """A hand-written decoding loop (cache from a prompted call, then one token at a time with the caller's
    2-D mask) equals full forward passes; static caches, a cache made without the prompt, and continuing
    generate() from a previous call's cache are refused with a clear error."""
    model = _prompt_lm("llama")
    ids, _ = batch(pad=False)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, use_cache=True)
        assert o.logits.shape[:2] == (2, 7) and o.past_key_values.get_seq_length() == 4 + 7
        seq, past = ids, o.past_key_values
        for _ in range(3):
            nxt = o.logits[:, -1:].argmax(-1)
            seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            o = model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
            assert o.logits.shape[:2] == (2, 1)
            torch.testing.assert_close(o.logits[:, -1], model(input_ids=seq).logits[:, -1], rtol=1e-5, atol=1e-5)
        # explicit position_ids on a decoding call move up by the prompt length, like the model's own
        pos = torch.full((2, 1), seq.shape[1], dtype=torch.long)
        nxt = o.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        c1, c2 = copy.deepcopy(past), copy.deepcopy(past)
        torch.testing.assert_close(model(input_ids=nxt, attention_mask=mask, past_key_values=c1).logits,
                                   model(input_ids=nxt, attention_mask=mask, past_key_values=c2, position_ids=pos).logits,
                                   rtol=0, atol=0)
        with dk.disable(model):
            plain = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="prompt attached"):
            model(input_ids=nxt[:, :1], attention_mask=torch.ones(2, 8, dtype=torch.long), past_key_values=plain)
    with pytest.raises(NotImplementedError, match="static"):
        _greedy(model, ids, cache_implementation="static")
    out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="previous call's cache"):
        _greedy(model, out.sequences, past_key_values=out.past_key_values)


def test_prefix_tuning_generation_with_kv_cache():
    model = llama()
    dk.apply(model, dk.PrefixTuning(num_virtual_tokens=3))
    _randomize_delta(model)
    ids, mask = batch(pad=False)
    a = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    b = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)
    with dk.disable(model):
        c = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("method", [lambda: dk.PrefixTuning(num_virtual_tokens=4),
                                    lambda: dk.PromptTuning(num_virtual_tokens=4)], ids=["prefix", "prompt"])
def test_prefix_prompt_training_lowers_the_loss_and_leaves_the_base(arch, method):
    model = bert() if arch == "bert" else MODELS[arch]()
    base = snapshot(model)
    dk.apply(model, method())
    model.train()
    ids, mask = batch(t=6)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 1 and {id(p) for p in params} == _owned(model)
    opt = torch.optim.SGD(params, lr=100.0 if arch == "bert" else 20.0)  # random tiny models: small gradients
    losses = []
    for _ in range(6):
        opt.zero_grad()
        if arch == "bert":  # BertModel: a fixed projection of the last hidden state
            loss = lm_loss(model, ids, mask)
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.995 * losses[0], losses
    dk.remove(model)
    assert same_state(snapshot(model), base)


@pytest.mark.parametrize("kind", ["lora", "qlora", "qdora", "bitfit"])
def test_model_compiles_fullgraph(kind):
    """A transformers model with a delta applied compiles with fullgraph=True (no graph break) and
    gives the eager outputs and adapter gradients."""
    model = llama()
    if kind.startswith("q"):
        dk.quantize(model, progress=False)
    method = {"lora": dk.LoRA(r=2), "qlora": dk.LoRA(r=2), "qdora": dk.DoRA(r=2),
              "bitfit": dk.BitFit(add_missing=True)}[kind]
    dk.apply(model, method)
    perturb(model)
    ids, _ = batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, model):
        model.zero_grad(set_to_none=True)
        y = fn(ids).logits
        y.float().square().mean().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (y1, g1), (y0, g0) = results
    torch.testing.assert_close(y1, y0)
    assert g1.keys() == g0.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)


# ---- habits PEFT users bring ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_linear_target_means_the_default(arch):
    """target="all-linear" (PEFT's name) = the default: every linear layer except the output head."""
    a, b = MODELS[arch](), MODELS[arch]()
    dk.apply(a, dk.LoRA(r=2))
    dk.apply(b, dk.DoRA(r=2, target="all-linear"))
    ta, tb = dkbase.applications(a)[0].plan.targets, dkbase.applications(b)[0].plan.targets
    assert list(ta) == list(tb) and ta and not any(n.endswith("lm_head") for n in ta)


def test_loading_a_delta_under_a_taken_name_names_the_clash(tmp_path):
    model = llama()
    dk.apply(model, dk.LoRA(r=2), name="task")
    dk.save_delta(model, tmp_path / "lora")
    dk.remove(model)
    dk.apply(model, dk.DoRA(r=2), name="task")
    with pytest.raises(ValueError, match=r"already has a delta named 'task'.*name='\.\.\.'"):
        dk.load_delta(model, tmp_path / "lora")
    assert dk.deltas(model) == ["task"]
    assert dk.load_delta(model, tmp_path / "lora", name="task2") == "task2" and dk.deltas(model) == ["task", "task2"]
    dk.save_peft_adapter(model, tmp_path / "peft")  # task2's LoRA: loads into 'task2' itself (a resume), not 'task'
    with pytest.raises(ValueError, match=r"already has a delta named 'task' holding DoRA.*name='\.\.\.'"):
        dk.load_peft_adapter(model, tmp_path / "peft", name="task")
    assert dk.load_peft_adapter(model, tmp_path / "peft", name="task2") == "task2"


def test_nn_modules_take_the_methods_defaults_and_warn_on_too_high_a_rank():
    lin = nn.Linear(24, 16)
    for cls, method in ((LoRALinear, dk.LoRA()), (DoRALinear, dk.DoRA())):
        m = cls(lin)
        assert (m.r, m.alpha, m.scaling) == (method.r, method.alpha, method.alpha / method.r) == (8, 16, 2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cls(lin, r=16)  # r = min(in, out): no warning
        with pytest.warns(UserWarning, match=r"r=17 exceeds min\(in_features=24, out_features=16\)"):
            cls(lin, r=17)
    model = llama()  # hidden 32, intermediate 64, 2 key/value heads of 8: k_proj/v_proj are 32 -> 16
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dk.apply(model, dk.LoRA(r=20))
    msgs = [str(w.message) for w in seen if "exceeds min" in str(w.message)]
    assert len(msgs) == 1 and "4 target(s)" in msgs[0] and "k_proj (32->16)" in msgs[0], msgs


@pytest.mark.parametrize("cls", [dk.LoRA, dk.DoRA])
def test_adapters_over_a_half_precision_base_are_fp32_by_default(cls):
    """As PEFT's autocast_adapter_dtype=True: fp32 adapter parameters over a bf16 base, the layer computing in
    bf16 (bit-equal to bf16 copies of the same adapters) with fp32 gradients; autocast_adapter_dtype=False keeps
    the base's dtype. Switching deltas keeps them fp32."""
    ids, mask = batch()
    a, b = llama().to(torch.bfloat16), llama().to(torch.bfloat16)
    dk.apply(a, cls(r=4))
    dk.apply(b, cls(r=4, autocast_adapter_dtype=False))
    pa, pb = dkbase.applications(a)[0].params, dkbase.applications(b)[0].params
    assert {p.dtype for p in pa.values()} == {torch.float32} and {p.dtype for p in pb.values()} == {torch.bfloat16}
    perturb(b, 0.1)
    with torch.no_grad():
        for k, p in pa.items():
            p.copy_(pb[k].float())
    ya, yb = run(a, ids, mask), run(b, ids, mask)
    assert ya.dtype == torch.bfloat16 and torch.equal(ya, yb)
    lm_loss(a, ids, mask).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in pa.values())
    dk.apply(a, dk.BitFit(add_missing=True), name="other")
    dk.activate(a, "default")
    assert {p.dtype for p in pa.values()} == {torch.float32}
    fp32_base = llama()
    dk.apply(fp32_base, cls(r=4))
    assert {p.dtype for p in dkbase.applications(fp32_base)[0].params.values()} == {torch.float32}


def test_nf4_linear_repr_shows_the_compute_dtype_and_helpers_are_top_level():
    r = repr(NF4Linear.from_linear(nn.Linear(64, 16).to(torch.bfloat16)))
    assert "weight_dtype=bfloat16" in r and "compute_dtype=x.dtype" in r
    model = llama()
    dk.apply(model, dk.LoRA(r=2), name="x")
    assert dk.deltas(model) == ["x"] and dk.active_delta(model) == "x"
    assert set(dk.delta_state_dict(model)) == set(dk.methods.delta_state_dict(model))


# ---- generate() step by step against an uncached forward ----------------------------------------------------


def _generate_vs_uncached(model, ids, mask, steps=6):
    """Max |score - logit| per step: generate(output_scores=True) with its default KV cache (greedy) against
    one uncached forward over the generated sequence with the same mask and generate's positions."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    seq, t = out.sequences, ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - t, dtype=mask.dtype)], 1)
    pos = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)  # as generate makes position_ids
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=full_mask, position_ids=pos, use_cache=False).logits
    assert len(out.scores) == steps
    return [float((out.scores[i] - logits[:, t - 1 + i]).abs().max()) for i in range(steps)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_generate_scores_equal_an_uncached_forward_at_every_step(arch, method, padded):
    """generate() with prompt / prefix tuning and the default KV cache: the scores of every new token equal the
    logits of an uncached forward over the final sequence (the base model alone gives the same equality, the
    reference for the tolerance), with and without left padding."""
    model = llama() if arch == "llama" else gpt2(initializer_range=0.2)
    ids, _ = batch(pad=False)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        ids = ids.masked_fill(mask == 0, 0)
    base_err = max(_generate_vs_uncached(model, ids, mask))
    dk.apply(model, dk.PromptTuning(num_virtual_tokens=4) if method == "prompt" else
             dk.PrefixTuning(num_virtual_tokens=3))
    perturb(model, 0.3)
    errs = _generate_vs_uncached(model, ids, mask)
    assert max(errs) <= max(10 * base_err, 2e-5), (errs, base_err)
    with dk.disable(model):  # the delta changes what is generated
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                                 pad_token_id=0))
