"""Shared helpers for the delta-method tests: tiny transformers models built from configs (no network)
and small comparison utilities. Every builder seeds torch, so two calls give the same base weights."""

from __future__ import annotations

import pytest
import torch

VOCAB = 96


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
