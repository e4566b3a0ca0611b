"""Shared helpers for the delta-method tests: tiny transformers models built from configs (no network)
and small comparison utilities. Every builder seeds torch, so two calls give the same base weights."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # as in conftest: without a GPU the Triton kernels run in Triton's interpreter (set before they are imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 96


def bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit on the CPU through its generic pure-torch path, the format's
    definition (what its CUDA kernel computes). On AVX-512 CPUs bitsandbytes 0.50.2 routes CPU calls to
    a native kernel that mis-decodes 4-bit blocks crossing a row boundary (seen: a 64x64 weight with
    blocksize 128 decodes wrongly from its second block on), so the tests do not use that kernel as
    the oracle."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = packed.reshape(-1).view(torch.uint8)
    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile'd
    return eager(flat, absmax.float(), _get_4bit_code(state.quant_type, flat.device), state.blocksize,
                 state.shape, state.dtype)


class Holder(torch.nn.Module):
    """A one-layer model whose layer is named `proj` (what the PEFT configs in the tests target)."""

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


# ---- the kernel tests' lanes and tolerance rule (test_lora, test_dora, test_bitfit) ---------------

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if CUDA else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(shape, seed, scale=1.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(shape, generator=gen(seed)) * scale).to(dtype=dtype, device=device)


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_rule(got, base, ref, dtype, name, kernel=False):
    """|got - ref| <= 2 |base - ref| + atol (max norms), ref in float64; `kernel`: a Triton kernel's output, which
    in the interpreter gets 1 bf16 ulp more (its fp32->bf16 cast truncates)."""
    e_got, e_base = max_err(got, ref), max_err(base, ref)
    atol = ATOL[dtype] * max(1.0, ref.abs().max().item())
    if kernel and INTERPRET and dtype == torch.bfloat16:
        atol += 2**-7 * ref.abs().max().item()  # the interpreter's fp32->bf16 cast truncates: 1 ulp, not 1/2
    assert e_got <= 2 * e_base + atol, f"{name}: error {e_got:.3g} > 2 * baseline {e_base:.3g} + {atol:.3g}"


def grads_of(fn, dy, *leaves):
    """(out, grads of leaves) of fn(*leaves) under upstream gradient dy (leaves cloned; None kept)."""
    ls = [t.detach().clone().requires_grad_(True) if t is not None else None for t in leaves]
    out = fn(*ls)
    out.backward(dy)
    return (out.detach(),) + tuple(t.grad if t is not None else None for t in ls)


def triton_kernels(*names):
    """The modules deltakern.triton_kernels.<name> (one, or a tuple for several); skips without Triton, and
    without CUDA unless TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    import importlib

    if not INTERPRET and not CUDA:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    mods = tuple(importlib.import_module(f"deltakern.triton_kernels.{n}") for n in names)
    return mods[0] if len(mods) == 1 else mods


def opcheck_sample(samples, i, device=None):
    """torch.library.opcheck of the i-th (op, args) of `samples` (tensors moved to `device` if given)."""
    op, args = samples[i]
    if device is not None:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def check_impl_override(monkeypatch, use_triton, var, bad):
    """`var`=triton forces Triton on a large dense problem; an unknown value `bad` raises ValueError naming `var`."""
    monkeypatch.setenv(var, "triton")
    assert use_triton(8192, 4096, 4096, "dense") is True
    monkeypatch.setenv(var, bad)
    with pytest.raises(ValueError, match=var):
        use_triton(1, 8, 8, "dense")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and avoids OpenMP spin-waiting that
    made the run ~10x slower on a 2-core machine busy with other work. Import this fixture into a
    test module to use it; the previous thread count comes back after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bert_config(**kw):
    from transformers import BertConfig

    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
               max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    return BertConfig(**cfg)


def bert(seed=0, **kw):
    """BertModel, hidden 32, 2 layers, eval mode."""
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel(bert_config(**kw)).eval()


def bert_cls(seed=0, **kw):
    """BertForSequenceClassification (3 labels), hidden 32, 2 layers, eval mode."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(**kw)).eval()


def llama_config(**kw):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, max_position_embeddings=64)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def llama(seed=0, **kw):
    """LlamaForCausalLM, hidden 32, 2 layers (GQA: 4 query heads, 2 key/value heads), eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**kw)).eval()


def gpt2(seed=0, **kw):
    """GPT2LMHeadModel, hidden 32, 2 layers, eval mode (its linears are transformers' Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


MODELS = {"bert": bert_cls, "llama": llama, "gpt2": gpt2}


def batch(b=2, t=7, seed=1, pad=True):
    """input_ids [b, t] and a right-padded attention mask (the last row ends 2 tokens early)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[-1, t - 2:] = 0
    return ids, mask


def out(o):
    """The main tensor of a transformers output (logits or last_hidden_state)."""
    if isinstance(o, torch.Tensor):
        return o
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def run(model, ids, mask=None, **kw):
    with torch.no_grad():
        return out(model(input_ids=ids, attention_mask=mask, **kw))


def snapshot(model) -> dict:
    """A bit-exact copy of the state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_state(a: dict, b: dict) -> bool:
    """Same keys, dtypes, shapes and bytes."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(_bytes(a[k]), _bytes(b[k])) for k in a)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def perturb(model, scale=0.1, seed=7):
    """Add seeded noise to every trainable parameter (so a delta is not at its identity init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def lm_loss(model, ids, mask=None):
    """A loss of every model kind: the LM loss for causal LMs, else a fixed projection of the output."""
    o = model(input_ids=ids, attention_mask=mask)
    y = out(o).float()
    w = torch.linspace(-1, 1, y.shape[-1])
    return (y * w).square().mean()
