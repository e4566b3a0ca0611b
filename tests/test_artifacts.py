"""Deltas as artifacts: save_delta / load_delta (safetensors + JSON, no pickle) and PEFT's adapter format
both ways (save_peft_adapter -> peft.PeftModel.from_pretrained, get_peft_model(...).save_pretrained ->
load_peft_adapter), on tiny transformers models built from configs (no network).

What is checked: only the delta is written (keys, sizes), a fresh base reproduces the outputs exactly,
several named deltas round-trip, and every refusal (other base shapes, other method config, corrupt or
tampered files, unsupported PEFT adapters) names the problem and leaves the model bit-exactly as it was.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

import deltakern as dk  # noqa: E402
from deltakern.nn import DoRALinear, LoRALinear  # noqa: E402

from _helpers import batch, bert_cls, gpt2, llama, one_thread, perturb, rel, run, same_state, snapshot  # noqa: E402,F401

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _structure(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()]


class Untouched:
    """Asserts on exit that the model's state dict (bytes), grad flags, modules and deltas are unchanged."""

    def __init__(self, model, ids=None):
        self.model, self.ids = model, ids

    def __enter__(self):
        m = self.model
        self.state, self.flags, self.structure = snapshot(m), _flags(m), _structure(m)
        self.deltas, self.active = dk.methods.deltas(m), dk.methods.active_delta(m)
        self.y = run(m, self.ids) if self.ids is not None else None
        return self

    def __exit__(self, *exc):
        m = self.model
        assert same_state(snapshot(m), self.state)
        assert _flags(m) == self.flags and _structure(m) == self.structure
        assert dk.methods.deltas(m) == self.deltas and dk.methods.active_delta(m) == self.active
        if self.y is not None:
            assert torch.equal(run(m, self.ids), self.y)
        return False


# ---- deltakern's format ----------------------------------------------------------------------------------

CASES = {
    "lora": (bert_cls, lambda: dk.LoRA(r=2, target=["query", "value"])),
    "dora": (bert_cls, lambda: dk.DoRA(r=2, alpha=4, target="intermediate.dense", use_rslora=True)),
    "bitfit": (bert_cls, lambda: dk.BitFit()),
    "freeze": (bert_cls, lambda: dk.Freeze(train=r"^classifier\.")),
    "adapter": (bert_cls, lambda: dk.Adapter(bottleneck=4, where="mlp")),
    "prefix-mlp": (bert_cls, lambda: dk.PrefixTuning(num_virtual_tokens=3, projection=True, projection_hidden=8)),
    "prompt": (bert_cls, lambda: dk.PromptTuning(num_virtual_tokens=3)),
    "composite": (bert_cls, lambda: [dk.LoRA(r=2, target="query"), dk.Adapter(bottleneck=2), dk.BitFit(target="LayerNorm")]),
    "llama-prefix": (llama, lambda: dk.PrefixTuning(num_virtual_tokens=2)),
    "qlora+bitfit": (llama, lambda: [dk.LoRA(r=2, target=["q_proj", "v_proj"], quantize=True),
                                     dk.BitFit(add_missing=True, target=["q_proj", "v_proj"])]),
    "qdora": (llama, lambda: dk.DoRA(r=2, target="down_proj", quantize=True)),
    "gpt2-lora": (gpt2, lambda: dk.LoRA(r=2)),  # transformers Conv1D layers (weight [in, out])
    "gpt2-dora": (gpt2, lambda: dk.DoRA(r=2, target=["c_attn", "mlp.c_proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_save_only_the_delta_and_load_onto_a_fresh_base_exactly(tmp_path, case):
    make, method = CASES[case]
    model = make()
    base_keys = set(make().state_dict())
    base_bytes = sum(t.numel() * t.element_size() for t in make().state_dict().values())
    dk.apply(model, method(), name="task")
    perturb(model, seed=11)
    ids, mask = batch()
    y = run(model, ids, mask)
    ours = dk.methods.delta_state_dict(model)

    assert dk.save_delta(model, tmp_path / "d") == tmp_path / "d"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["delta.safetensors", "delta_config.json"]
    saved = load_file(tmp_path / "d" / "delta.safetensors")
    assert saved.keys() == ours.keys()
    for k, t in saved.items():
        assert torch.equal(t, ours[k])
        assert re.fullmatch(r"\d+\.(.+)", k)
    # nothing of the base but what the delta trains: LoRA/adapter/prefix/prompt keys are new names,
    # BitFit / Freeze keys are exactly the trained parameters
    trained = {k.split(".", 1)[1] for k in saved}
    base_named = trained & base_keys
    assert all(re.search(r"\.bias$|^classifier\.", k) for k in base_named)
    numel = sum(t.numel() for t in saved.values())
    assert numel == dk.summary(model).trainable
    size = (tmp_path / "d" / "delta.safetensors").stat().st_size
    assert size <= 4 * numel + 200 * len(saved) + 512  # the tensors and a small header, nothing else
    if case in ("lora", "dora", "prompt", "llama-prefix"):
        assert size < base_bytes / 8
    config = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert config["format"] == "deltakern.delta" and config["name"] == "task"

    fresh = make()
    assert dk.load_delta(fresh, tmp_path / "d") == "task"
    assert dk.methods.active_delta(fresh) == "task"
    assert torch.equal(run(fresh, ids, mask), y)
    theirs = dk.methods.delta_state_dict(fresh)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert [r["method"] for r in dk.summary(fresh).rows] == [r["method"] for r in dk.summary(model).rows]
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    if not case.startswith("q"):  # (LoRA(quantize=True) made the base NF4 on purpose)
        with dk.disable(fresh):
            assert torch.equal(run(fresh, ids, mask), run(make(), ids, mask))


def test_several_named_deltas_on_one_base(tmp_path):
    model = bert_cls()
    ids, mask = batch()
    y0 = run(model, ids, mask)
    outs = {}
    for name, method in [("a", dk.LoRA(r=2, target="query")), ("b", dk.PromptTuning(num_virtual_tokens=2)),
                         ("c", [dk.BitFit(), dk.Adapter(bottleneck=2)])]:
        dk.apply(model, method, name=name)
        perturb(model, seed=len(outs))
        outs[name] = run(model, ids, mask)
    for name in outs:  # save any delta by name, whichever is active
        dk.save_delta(model, tmp_path / name, name=name)
    assert dk.methods.active_delta(model) == "c"

    fresh = bert_cls()
    for name in ["b", "c", "a"]:
        assert dk.load_delta(fresh, tmp_path / name) == name
    # under another name, while "a" (LoRA on the same layers) is active: planned against the base
    assert dk.load_delta(fresh, tmp_path / "a", name="a2") == "a2"
    assert dk.methods.deltas(fresh) == ["b", "c", "a", "a2"]
    for name in ["b", "a2", "c", "a"]:
        dk.activate(fresh, name)
        assert torch.equal(run(fresh, ids, mask), outs[name.rstrip("2")])
        with dk.disable(fresh):
            assert torch.equal(run(fresh, ids, mask), y0)
    dk.remove(fresh, "a")
    dk.remove(fresh, "a2")
    dk.activate(fresh, "b")
    assert torch.equal(run(fresh, ids, mask), outs["b"])
    dk.remove(fresh)
    assert torch.equal(run(fresh, ids, mask), y0) and same_state(snapshot(fresh), snapshot(bert_cls()))


def test_load_while_a_delta_is_merged_is_refused(tmp_path):
    path = _saved(tmp_path, dk.BitFit())
    model = bert_cls()
    dk.apply(model, dk.LoRA(r=2, target="query"))
    perturb(model)
    dk.merge(model)
    with Untouched(model, batch()[0]):
        with pytest.raises(RuntimeError, match="merged into the base weights; call unmerge"):
            dk.load_delta(model, path, name="other")


def test_load_into_an_existing_delta_to_resume(tmp_path):
    model = bert_cls()
    dk.apply(model, [dk.LoRA(r=2, target="query"), dk.BitFit()], name="a")
    perturb(model)
    ids, mask = batch()
    y = run(model, ids, mask)
    dk.save_delta(model, tmp_path / "a")
    other = bert_cls()
    dk.apply(other, [dk.LoRA(r=2, target="query"), dk.BitFit()], name="a")  # fresh init
    params = {n: id(p) for n, p in other.named_parameters()}
    dk.apply(other, dk.BitFit(), name="z")
    assert dk.load_delta(other, tmp_path / "a") == "a"
    assert dk.methods.active_delta(other) == "a" and torch.equal(run(other, ids, mask), y)
    assert {n: id(p) for n, p in other.named_parameters()} == params  # loaded in place: the same parameters
    mismatched = bert_cls()
    dk.apply(mismatched, [dk.LoRA(r=2, alpha=8, target="query"), dk.BitFit()], name="a")
    with Untouched(mismatched, ids):
        with pytest.raises(ValueError, match="alpha=8 on the model, 16 in the file"):
            dk.load_delta(mismatched, tmp_path / "a")
    longer = bert_cls()
    dk.apply(longer, [dk.LoRA(r=2, target="query"), dk.BitFit(), dk.Adapter(bottleneck=2)], name="a")
    with Untouched(longer, ids):
        with pytest.raises(ValueError, match=r"has 3 method\(s\), the saved one 2"):
            dk.load_delta(longer, tmp_path / "a")


# ---- refusals: other bases, other configs, corrupt files ------------------------------------------------


def _saved(tmp_path, method, make=bert_cls, name="default"):
    model = make()
    dk.apply(model, method, name=name)
    perturb(model)
    return dk.save_delta(model, tmp_path / "saved")


@pytest.mark.parametrize("method,other,words", [
    (lambda: dk.LoRA(r=2, target="query"), lambda: bert_cls(hidden_size=48),
     r"method 0 \(LoRA\(r=2, alpha=16\)\): bert.encoder.layer.0.attention.self.query has shape \(48, 48\) in this "
     r"model, the delta was made for \(32, 32\)"),
    (lambda: dk.LoRA(r=2), lambda: bert_cls(num_hidden_layers=3),
     "also selects bert.encoder.layer.2.attention.self.query, which the delta does not have"),
    (lambda: dk.Adapter(bottleneck=2), lambda: bert_cls(num_hidden_layers=1),
     "targets bert.encoder.layer.1.attention.output.dense, which this model does not have"),
    (lambda: dk.LoRA(r=2, target=r"bert\.encoder\.layer\.1\..*query"), lambda: bert_cls(num_hidden_layers=1),
     r"does not fit this model: LoRA: no module matches target"),
    (lambda: dk.BitFit(), lambda: bert_cls(intermediate_size=48),
     "bert.encoder.layer.0.intermediate.dense has shape .48,. in this model, the delta was made for .64,."),
    (lambda: [dk.BitFit(), dk.PromptTuning(num_virtual_tokens=2)], lambda: bert_cls(vocab_size=100),
     r"method 1 \(PromptTuning\(2 tokens\)\): bert.embeddings.word_embeddings has shape \(100, 32\)"),
    (lambda: dk.PrefixTuning(num_virtual_tokens=2), lambda: bert_cls(num_attention_heads=2),
     r"has shape \(2, 16\) in this model, the delta was made for \(4, 8\)"),
    (lambda: dk.LoRA(r=2, target="q_proj"), lambda: bert_cls(), "no module matches target \\['q_proj'\\]"),
])
def test_load_refuses_another_base_and_changes_nothing(tmp_path, method, other, words):
    m = method()
    path = _saved(tmp_path, m, make=llama if getattr(m, "target", None) == ["q_proj"] else bert_cls)
    model = other()
    ids, mask = batch()
    with Untouched(model, ids):
        with pytest.raises(ValueError, match=words):
            dk.load_delta(model, path)
    # the same with a delta active on the target model
    dk.apply(model, dk.LoRA(r=2, target="value"), name="mine")
    perturb(model)
    with Untouched(model, ids):
        with pytest.raises(ValueError, match=words):
            dk.load_delta(model, path)


def _edit_config(path, edit):
    cfg_path = Path(path) / "delta_config.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,words", [
    (lambda c: c["methods"][0]["config"].update(r=4), r"tensor 0\..*lora_A has shape \(2, 32\), this model needs \(4, 32\)"),
    (lambda c: c["methods"][0]["config"].update(r=-1), r"method 0 \(LoRA\): LoRA: r must be a positive int, got -1"),
    (lambda c: c["methods"][0]["config"].update(rank=4), r"unknown config field\(s\) \['rank'\]"),
    (lambda c: c["methods"][0]["config"].update(target="key"),
     "the delta targets bert.encoder.layer.0.attention.self.query, which this model does not have"),
    (lambda c: c["methods"][0].update(type="LoRAX"), "method 0 has unknown type 'LoRAX'; known: "),
    (lambda c: c["methods"][0].update(type="DoRA"), "tensor 0.*lora_magnitude_vector is missing"),
    (lambda c: c["methods"][0].pop("type"), "method 0 has no type"),
    (lambda c: c["methods"][0].update(targets=[]), "method 0 has no targets"),
    (lambda c: c["methods"][0].update(tensors=["a"]), "method 0: tensors must be"),
    (lambda c: c["methods"][0]["tensors"].update({"x.lora_A": [2, 2]}), "the config and the tensors disagree on 0.x.lora_A"),
    (lambda c: c.update(methods=[]), "no methods listed"),
    (lambda c: c.update(format="peft"), "not a deltakern delta"),
    (lambda c: c.update(version=2), "delta format version 2"),
    (lambda c: c.update(name="a b"), "delta name"),
])
def test_tampered_config_is_refused_with_the_first_mismatch(tmp_path, edit, words):
    path = _saved(tmp_path, dk.LoRA(r=2, target="query"))
    _edit_config(path, edit)
    model = bert_cls()
    with Untouched(model, batch()[0]):
        with pytest.raises(ValueError, match=words):
            dk.load_delta(model, path)


def test_corrupt_files_give_clear_errors(tmp_path):
    path = _saved(tmp_path, [dk.LoRA(r=2, target="query"), dk.BitFit()])
    weights, config = path / "delta.safetensors", path / "delta_config.json"
    good_w, good_c = weights.read_bytes(), config.read_text()
    model = bert_cls()
    ids = batch()[0]

    def refused(exc, words):
        with Untouched(model, ids):
            with pytest.raises(exc, match=words):
                dk.load_delta(model, path)

    weights.write_bytes(good_w[: len(good_w) // 2])  # truncated
    refused(ValueError, "delta.safetensors: cannot read the tensors")
    weights.write_bytes(b"\x00" * 7)
    refused(ValueError, "cannot read the tensors")
    weights.write_bytes(good_w)
    config.write_text(good_c[:-20])  # malformed JSON
    refused(ValueError, "delta_config.json: not valid JSON")
    config.write_text("[1, 2]")
    refused(ValueError, "not a deltakern delta")
    config.write_text(good_c)
    tensors = load_file(weights)
    save_file({**tensors, "1.extra": torch.zeros(3)}, weights)  # a tensor no method uses
    refused(ValueError, "the delta has tensor '1.extra', which none of its methods uses")
    key = next(k for k in tensors if k.endswith("lora_B"))
    save_file({**tensors, key: tensors[key].to(torch.int32)}, weights)
    refused(ValueError, "expected a floating-point tensor")
    poisoned = tensors[key].clone()
    poisoned[0, 0], poisoned[-1, -1] = float("nan"), float("inf")
    save_file({**tensors, key: poisoned}, weights)
    refused(ValueError, re.escape(key) + " has 2 non-finite values")
    weights.unlink()
    refused(FileNotFoundError, "delta.safetensors is missing")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        dk.load_delta(model, tmp_path / "nowhere")
    with pytest.raises(TypeError, match="nn.Module"):
        dk.load_delta({"a": 1}, path)
    with pytest.raises(ValueError, match="apply a method first"):
        dk.save_delta(bert_cls(), tmp_path / "x")
    dk.apply(model, dk.BitFit())
    with pytest.raises(KeyError, match="no delta named 'nope'"):
        dk.save_delta(model, tmp_path / "x", name="nope")


def test_no_pickle_in_the_methods_package():
    root = Path(dk.methods.__file__).parent
    for src in root.glob("*.py"):
        text = src.read_text()
        assert not re.search(r"import pickle|pickle\.|torch\.save\(|import dill|cloudpickle", text), src
        for m in re.finditer(r"torch\.load\((.*)\)", text):
            assert "weights_only=True" in m.group(1), src


# ---- PEFT's adapter format ---------------------------------------------------------------------------------


def _train_a_little(model, ids, steps=2):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("variant", ["lora", "dora", "lora-rslora-mixed-ranks"])
def test_deltakern_adapter_loads_in_peft(tmp_path, variant):
    from peft import LoraConfig, PeftModel, get_peft_model

    ids, _ = batch(pad=False)
    model = llama()
    if variant == "lora-rslora-mixed-ranks":  # per-layer ranks / alphas -> rank_pattern / alpha_pattern
        dk.apply(model, [dk.LoRA(r=4, alpha=8, target=LLAMA_PROJ[:4], use_rslora=True),
                         dk.LoRA(r=2, alpha=3, target=["up_proj", "down_proj"], use_rslora=True)])
    else:
        dk.apply(model, (dk.DoRA if variant == "dora" else dk.LoRA)(r=4, alpha=8, target=LLAMA_PROJ))
    with torch.no_grad():  # B = 0 would make any adapter look right
        for m in model.modules():
            if isinstance(m, (LoRALinear, DoRALinear)):
                m.lora_B.normal_(0, 0.1)
    _train_a_little(model, ids)
    y = run(model, ids)
    dk.save_peft_adapter(model, tmp_path / "a", base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (variant == "dora")
    assert cfg["base_model_name_or_path"] == "tiny-llama"

    peft_model = PeftModel.from_pretrained(llama(), tmp_path / "a")
    peft_model.eval()
    assert rel(run(peft_model, ids), y) < 1e-6
    # the same keys and shapes PEFT itself writes for that config
    ref = get_peft_model(llama(), LoraConfig(**{k: cfg[k] for k in (
        "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora")}))
    ref.save_pretrained(tmp_path / "ref")
    ours, theirs = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(
        tmp_path / "ref" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_in_deltakern(tmp_path, dora):
    from peft import LoraConfig, get_peft_model

    ids, mask = batch()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora,
                        rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 5},
                        init_lora_weights=False, lora_dropout=0.1)
    peft_model = get_peft_model(llama(), config)
    peft_model.save_pretrained(tmp_path / "p")
    peft_model.eval()
    y = run(peft_model, ids, mask)

    model = llama()
    assert dk.load_peft_adapter(model, tmp_path / "p") == "default"
    assert rel(run(model, ids, mask), y) < 1e-6
    rows = {r["method"]: r["targets"] for r in dk.summary(model).rows}
    kind = "DoRA" if dora else "LoRA"
    assert rows == {f"{kind}(r=2, alpha=8)": 2, f"{kind}(r=4, alpha=5)": 1, f"{kind}(r=4, alpha=8)": 3}
    assert {m.dropout for m in model.modules() if isinstance(m, (LoRALinear, DoRALinear))} == {0.1}
    # the same gradients as PEFT (train mode, dropout replayed by the seed)
    for m in (model, peft_model):
        m.train()
        m.zero_grad()
        torch.manual_seed(5)
        m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", ""): p.grad
              for n, p in peft_model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert rel(ours[k], theirs[k]) < 1e-5, k
    # and back out: the same tensors PEFT wrote
    dk.save_peft_adapter(model, tmp_path / "back")
    a, b = load_file(tmp_path / "back" / "adapter_model.safetensors"), load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_peft_format_refusals(tmp_path):
    from peft import LoraConfig, get_peft_model

    ids = batch()[0]
    model = llama()
    dk.apply(model, [dk.LoRA(r=2, target="q_proj"), dk.BitFit(add_missing=True, target="q_proj")])
    with pytest.raises(ValueError, match="holds BitFit.add_missing.: PEFT's adapter formats store LoRA/DoRA layers"):
        dk.save_peft_adapter(model, tmp_path / "x")
    model = llama()
    dk.apply(model, [dk.LoRA(r=2, target="q_proj"), dk.DoRA(r=2, target="v_proj")])
    with pytest.raises(ValueError, match="mixes LoRA and DoRA"):
        dk.save_peft_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()

    get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    good = cfg_path.read_text()

    def refused(edit, words, exc=ValueError, target=None):
        cfg = json.loads(good)
        edit(cfg)
        cfg_path.write_text(json.dumps(cfg))
        m = target if target is not None else llama()
        with Untouched(m, ids):
            with pytest.raises(exc, match=words):
                dk.load_peft_adapter(m, tmp_path / "p")
        cfg_path.write_text(good)

    refused(lambda c: c.update(bias="all"), "bias='all'")
    refused(lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save")
    refused(lambda c: c.update(fan_in_fan_out="yes"), "fan_in_fan_out")  # True / False are read (see test_conv1d)
    refused(lambda c: c.update(peft_type="IA3"), "peft_type 'IA3'")
    refused(lambda c: c.update(r=3), "has rank 2, the config says 3")
    refused(lambda c: c.update(use_dora=True), "no \\['lora_magnitude_vector'\\]")
    refused(lambda c: None, "has shape .48, 48. in this model", target=llama(hidden_size=48, head_dim=12))
    taken = llama()
    dk.apply(taken, dk.LoRA(r=2, target="k_proj"))
    refused(lambda c: None, "already has a delta named 'default'", target=taken)
    cfg_path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        dk.load_peft_adapter(llama(), tmp_path / "p")
    cfg_path.write_text(good)
    w = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(w)
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(96, 32)}, w)
    refused(lambda c: None, "'base_model.model.lm_head.weight' is not a LoRA/DoRA weight")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, w)
    refused(lambda c: None, "lora_A has .* non-finite values")
    w.write_bytes(w.read_bytes()[:50])
    refused(lambda c: None, "cannot read the tensors")
    w.unlink()
    refused(lambda c: None, "adapter_model.safetensors is missing", exc=FileNotFoundError)


# ---- transformers: save_pretrained / from_pretrained / Trainer ---------------------------------------------


def _quiet_from_pretrained(path):
    """AutoModelForCausalLM.from_pretrained (its load report lists the deltakern.delta.* keys as unused)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _llama_loaded_4bit(tmp_path):
    """A tiny Llama loaded 4-bit by transformers + bitsandbytes, its Linear4bit layers converted to NF4Linear
    (it keeps transformers' hf_quantizer and quantization_config)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from deltakern.integrations import bnb as dkbnb

    llama().save_pretrained(tmp_path / "dense")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32, device_map="cpu",
                                             quantization_config=q).eval()
    dkbnb.convert(model)
    assert model.hf_quantizer is not None
    return model


@pytest.mark.parametrize("arch,nf4", [("llama", False), ("llama", True), ("gpt2", True), ("llama-bnb", True)],
                         ids=["llama-dense", "llama-nf4", "gpt2-nf4", "llama-loaded-4bit"])
def test_save_pretrained_writes_the_base_under_its_keys_and_the_delta_beside(tmp_path, arch, nf4):
    """save_pretrained (what Trainer calls): model.safetensors holds the base under the original keys (NF4: in
    bitsandbytes' format, with a bitsandbytes quantization_config, so transformers loads it 4-bit; GPT-2's Conv1D
    layers as Linear4bit), the delta beside it. from_pretrained gives the base exactly; load_delta / PEFT add the
    delta exactly. Saving again without an active delta removes the delta files."""
    peft = pytest.importorskip("peft")
    if arch == "llama-bnb":
        model = _llama_loaded_4bit(tmp_path)
        tmp_path = tmp_path / "out"
    else:
        model = llama() if arch == "llama" else gpt2(initializer_range=0.2)
        if nf4:
            dk.quantize(model, progress=False)
    target = LLAMA_PROJ if arch.startswith("llama") else None
    base_state = snapshot(model)
    ids, mask = batch()
    base_out = run(model, ids, mask)
    dk.apply(model, dk.LoRA(r=4, target=target))
    perturb(model, 0.1)
    want = run(model, ids, mask)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "delta_config.json",
                                                     "delta.safetensors", "peft_adapter"}
    saved = load_file(str(tmp_path / "model.safetensors"))
    base_keys = {k for k in saved if not k.startswith("deltakern.delta.")}
    assert base_keys == set(base_state) - {"lm_head.weight"} or base_keys == set(base_state)
    assert all(torch.equal(saved[k].reshape(-1).view(torch.uint8), base_state[k].reshape(-1).view(torch.uint8))
               for k in base_keys)
    assert {k.removeprefix("deltakern.delta.0.") for k in saved if k.startswith("deltakern.delta.")} == \
        {k.removeprefix("0.") for k in dk.delta_state_dict(model)}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert ("quantization_config" in cfg) == nf4
    if arch != "llama-bnb":
        assert not hasattr(model.config, "quantization_config")  # only the file gets it
    assert torch.equal(run(model, ids, mask), want)  # the model is as it was

    loaded = _quiet_from_pretrained(tmp_path)
    if nf4:
        import bitsandbytes as bnb

        from deltakern.integrations import bnb as dkbnb

        layer = loaded.model.layers[0].self_attn.q_proj if arch != "gpt2" else loaded.transformer.h[0].attn.c_attn
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
        dkbnb.convert(loaded)  # the same bytes as NF4Linear layers
    assert same_state(snapshot(loaded), base_state)
    assert torch.equal(run(loaded, ids, mask), base_out)
    assert dk.load_delta(loaded, tmp_path) == "default"
    assert torch.equal(run(loaded, ids, mask), want)
    if not nf4:  # PEFT's adapter format beside it
        pm = peft.PeftModel.from_pretrained(_quiet_from_pretrained(tmp_path), str(tmp_path / "peft_adapter"))
        torch.testing.assert_close(run(pm, ids, mask), want, rtol=1e-5, atol=1e-6)
    with dk.disable(model):
        model.save_pretrained(tmp_path)
    assert not {"delta_config.json", "delta.safetensors"} & {p.name for p in tmp_path.iterdir()}
    assert not any((tmp_path / "peft_adapter").iterdir())
    assert not any(k.startswith("deltakern.") for k in load_file(str(tmp_path / "model.safetensors")))


def test_save_pretrained_round_trips_every_method_through_load_state_dict(tmp_path):
    """A delta of BitFit (swapped biases), Adapter, PromptTuning and LoRA: the checkpoint loads back with
    load_state_dict into a model with a freshly initialised delta of the same methods (how Trainer resumes),
    and onto a fresh base with load_delta. A checkpoint without the delta warns; another delta is refused."""
    def make():
        m = gpt2(initializer_range=0.2)
        dk.apply(m, [dk.LoRA(r=2, target="c_attn"), dk.BitFit(), dk.Adapter(bottleneck=4),
                     dk.PromptTuning(num_virtual_tokens=3)])
        return m

    model = make()
    perturb(model, 0.2)
    ids, mask = batch()
    want = run(model, ids, mask)
    with dk.disable(model):
        base_state = snapshot(model)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "peft_adapter").exists()  # PEFT's LoRA format cannot hold BitFit / Adapter / prompt
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(saved[k], base_state[k]) for k in base_state if k in saved)  # the base's own biases
    fresh = make()
    assert not torch.equal(run(fresh, ids, mask), want)
    res = fresh.load_state_dict(saved)
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(run(fresh, ids, mask), want)
    with dk.disable(fresh):  # the base under the delta is untouched
        assert same_state(snapshot(fresh), base_state)
    other = _quiet_from_pretrained(tmp_path)
    assert same_state(snapshot(other), base_state)
    dk.load_delta(other, tmp_path)
    assert torch.equal(run(other, ids, mask), want)

    fresh2 = make()
    before = run(fresh2, ids, mask)
    base_only = {k: v for k, v in saved.items() if not k.startswith("deltakern.")}
    with pytest.warns(UserWarning, match="without a deltakern delta"):
        res = fresh2.load_state_dict(base_only, strict=False)
    assert torch.equal(run(fresh2, ids, mask), before) and res.missing_keys  # the delta's keys are named missing
    lora_only = gpt2(initializer_range=0.2)
    dk.apply(lora_only, dk.LoRA(r=2, target="c_attn"))
    with pytest.raises(RuntimeError, match="does not have"):
        lora_only.load_state_dict(saved)


def test_save_pretrained_refuses_a_merged_delta_and_is_plain_without_deltas(tmp_path):
    model = llama()
    dk.apply(model, dk.LoRA(r=2))
    perturb(model, 0.1)
    dk.merge(model)
    with pytest.raises(RuntimeError, match="merged"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "model.safetensors").exists()
    dk.unmerge(model)
    twin = copy.deepcopy(model)  # the copy saves its own delta
    assert twin.__dict__["save_pretrained"].model is twin
    twin.save_pretrained(tmp_path / "c")
    saved = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert all(torch.equal(saved["deltakern.delta." + k], v) for k, v in dk.delta_state_dict(twin).items())
    dk.remove(model)
    assert "save_pretrained" not in model.__dict__  # the last delta gone: transformers' own method again
    model.save_pretrained(tmp_path / "b")
    assert not (tmp_path / "b" / "delta_config.json").exists()


@pytest.mark.parametrize("qlora", [False, True], ids=["lora+bitfit", "qlora+bitfit"])
def test_trainer_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, qlora):
    """transformers.Trainer on a deltakern model (dense or NF4 base): each checkpoint holds the delta; resuming a
    run from the middle checkpoint on a model with a freshly initialised delta gives the same loss curve and the
    same final delta as the run that was not interrupted."""
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(1, 96, (16, 8), generator=g)]

    def make(seed):
        m = llama()
        if qlora:
            dk.quantize(m, progress=False)
        torch.manual_seed(seed)
        dk.apply(m, [dk.LoRA(r=4), dk.BitFit(add_missing=True, target="o_proj")])
        return m.train()

    def trainer(model, out):
        args = transformers.TrainingArguments(str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                                              logging_steps=1, save_steps=3, report_to=[], use_cpu=True, seed=0,
                                              disable_tqdm=True)
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    def losses(t):
        return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}

    full = make(1)
    t1 = trainer(full, tmp_path / "a")
    t1.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert {"model.safetensors", "delta.safetensors", "delta_config.json", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}
    resumed = make(2)
    start = dk.delta_state_dict(resumed)
    assert any(not torch.equal(start[k], v) for k, v in dk.delta_state_dict(full).items())
    t2 = trainer(resumed, tmp_path / "b")
    t2.train(resume_from_checkpoint=str(ckpt))
    l1, l2 = losses(t1), losses(t2)
    assert sorted(l1) == list(range(1, 7)) and all(l2[s] == l1[s] for s in (4, 5, 6))
    a, b = dk.delta_state_dict(full), dk.delta_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_tuning_in_peft_format_both_ways(tmp_path, arch):
    """A delta that is one PromptTuning is PEFT's PROMPT_TUNING adapter: PEFT loads ours (save_peft_adapter, and
    save_pretrained's peft_adapter/) with the same logits on the caller's tokens, and ours loads PEFT's."""
    peft = pytest.importorskip("peft")

    def make():
        return llama() if arch == "llama" else gpt2(initializer_range=0.2)

    model = make()
    dk.apply(model, dk.PromptTuning(num_virtual_tokens=3))
    perturb(model, 0.3)
    ids, _ = batch(pad=False)
    want = run(model, ids)
    dk.save_peft_adapter(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "full")
    for path in (tmp_path / "a", tmp_path / "full" / "peft_adapter"):
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 3 and cfg["task_type"] == "CAUSAL_LM"
        pm = peft.PeftModel.from_pretrained(make(), str(path))
        torch.testing.assert_close(run(pm, ids)[:, 3:], want, rtol=1e-5, atol=1e-5)
    theirs = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = make()
    assert dk.load_peft_adapter(ours, tmp_path / "theirs", name="p") == "p"
    torch.testing.assert_close(run(ours, ids), run(theirs, ids)[:, 5:], rtol=1e-5, atol=1e-5)
    with dk.disable(ours):
        dk.apply(ours, [dk.PromptTuning(num_virtual_tokens=2), dk.BitFit(add_missing=True)], name="mixed")
    with pytest.raises(ValueError, match="LoRA/DoRA layers or a prompt tuning alone"):
        dk.save_peft_adapter(ours, tmp_path / "b", name="mixed")
    cfg_path = tmp_path / "theirs" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "num_transformer_submodules": 2}))
    m = make()
    with Untouched(m, ids), pytest.raises(ValueError, match="num_transformer_submodules=2"):
        dk.load_peft_adapter(m, tmp_path / "theirs")
