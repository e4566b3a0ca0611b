"""End-to-end fine-tuning benchmark: a random-init Llama trained with LoRA-family adapters.

Model (defaults): hidden 2048, intermediate 5632, 12 layers, 32 heads, 4 KV heads, vocab 32000,
bf16 weights; batch 4 x 1024 random tokens; r=16 adapters on q,k,v,o,gate,up,down; AdamW; the step
runs under bf16 autocast with the adapter parameters in fp32 (PEFT's default adapter dtype).

Methods (`--methods`, default: every one whose libraries are installed):
  peft-lora        PEFT LoRA over the bf16 model
  peft-qlora       PEFT LoRA over bitsandbytes NF4 (double quant) -- QLoRA
  peft-qdora       PEFT DoRA over bitsandbytes NF4 -- QDoRA
  deltakern-qlora  deltakern.quantize(skip=("lm_head",)) + deltakern.apply(model, deltakern.LoRA(...))
  deltakern-qdora  deltakern.quantize(skip=("lm_head",)) + deltakern.apply(model, deltakern.DoRA(...))
  patched-lora / patched-qlora / patched-qdora
                   the PEFT model of the same name run through deltakern.integrations.peft.patch()
Every method loads the same checkpoint (written once per run from a seeded random init), gets the
same adapter initialisation (A from one seeded generator by layer name, B = 0) and the same batches.

Reported per method: median step time after warmup (CUDA events around forward + backward +
optimizer step), tokens/s, peak memory (torch.cuda.max_memory_allocated over the timed steps, model
included) and the weights' own memory. `--loss-curve` cycles a small pool of batches
(`--data-pool`) so the loss falls, records every step's loss, and compares each deltakern / patched
curve with its PEFT counterpart (max |difference| and at the last step).

    python benchmarks/bench_e2e.py                       # full size, 20 steps
    python benchmarks/bench_e2e.py --layers 2 --steps 5  # quick smoke run
    python benchmarks/bench_e2e.py --steps 200 --loss-curve --methods peft-qlora deltakern-qlora

Writes JSON (`--out`, default benchmarks/results/e2e.json) with the GPU name and library versions,
and prints a table. Needs a CUDA GPU; the model-building code also runs on the CPU (tests use it).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib.util
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("peft-lora", "peft-qlora", "peft-qdora", "deltakern-qlora", "deltakern-qdora",
           "patched-lora", "patched-qlora", "patched-qdora")
BASELINE = {  # the PEFT run each method is compared with
    "deltakern-qlora": "peft-qlora", "deltakern-qdora": "peft-qdora",
    "patched-lora": "peft-lora", "patched-qlora": "peft-qlora", "patched-qdora": "peft-qdora",
}
LABELS = {
    "peft-lora": "PEFT LoRA, bf16 base",
    "peft-qlora": "PEFT + bitsandbytes QLoRA (NF4, double quant)",
    "peft-qdora": "PEFT + bitsandbytes QDoRA (NF4, double quant)",
    "deltakern-qlora": "deltakern.quantize + deltakern.apply(LoRA) (NF4, double quant)",
    "deltakern-qdora": "deltakern.quantize + deltakern.apply(DoRA) (NF4, double quant)",
    "patched-lora": "PEFT LoRA, bf16 base, deltakern.integrations.peft.patch",
    "patched-qlora": "PEFT + bitsandbytes QLoRA, deltakern.integrations.peft.patch",
    "patched-qdora": "PEFT + bitsandbytes QDoRA, deltakern.integrations.peft.patch",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (all methods)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=20, help="timed steps (and curve length with --loss-curve)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-curve", action="store_true", help="record every step's loss and compare curves")
    p.add_argument("--data-pool", type=int, default=8, help="distinct batches cycled with --loss-curve")
    p.add_argument("--adapter-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--model-dir", default=None, help="reuse a checkpoint written by an earlier run")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "e2e.json"))
    return p.parse_args(argv)


# ---- environment --------------------------------------------------------------------------------------


def have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def needs_bnb(method: str) -> bool:
    return method.endswith(("qlora", "qdora")) and not method.startswith("deltakern")


def environment() -> dict:
    from benchmarks.common import environment as common_environment

    env = common_environment()
    try:
        from deltakern.backends import registry

        env["deltakern_backend"] = registry.resolve("lora_fwd", "cuda")
    except Exception as exc:  # noqa: BLE001
        env["deltakern_backend"] = f"unknown ({exc})"
    return env


# ---- model building -----------------------------------------------------------------------------------


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False)


def prepare_checkpoint(args, dtype=torch.bfloat16) -> str:
    """Write the seeded random-init model once (args.model_dir, else a temporary directory)."""
    if args.model_dir and (Path(args.model_dir) / "config.json").exists():
        return args.model_dir
    from transformers import LlamaForCausalLM

    path = args.model_dir or tempfile.mkdtemp(prefix="deltakern-e2e-")
    if not args.model_dir:
        atexit.register(shutil.rmtree, path, True)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(args)).to(dtype)
    model.save_pretrained(path)
    del model
    gc.collect()
    args.model_dir = path
    return path


@dataclass
class Setup:
    method: str
    model: nn.Module
    params: list = field(default_factory=list)
    adapters: dict = field(default_factory=dict)  # canonical layer name -> (A, B, magnitude or None)
    weights_bytes: int = 0

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def _load(args, device, dtype, four_bit: bool):
    from transformers import LlamaForCausalLM

    path = prepare_checkpoint(args, dtype)
    kwargs = dict(dtype=dtype, device_map={"": device})
    if four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    model = LlamaForCausalLM.from_pretrained(path, **kwargs)
    model.requires_grad_(False)
    return model


def _canonical(name: str) -> str:
    """Layer name without PEFT's wrapping (base_model.model.)."""
    return name.removeprefix("base_model.model.")


def _peft_model(args, device, dtype, four_bit: bool, dora: bool):
    from peft import LoraConfig, get_peft_model

    model = _load(args, device, dtype, four_bit)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=list(PROJ),
                        use_dora=dora, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    adapters = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            mag = module.lora_magnitude_vector["default"].weight if dora else None
            adapters[_canonical(name)] = (module.lora_A["default"].weight, module.lora_B["default"].weight, mag)
    return model, adapters


def _deltakern_model(args, device, dtype, dora: bool):
    """The public path: deltakern.quantize, then deltakern.apply(LoRA / DoRA) on the projections."""
    import deltakern
    from deltakern.nn import DoRALinear, LoRALinear

    model = _load(args, device, dtype, four_bit=False)
    deltakern.quantize(model, skip=("lm_head",), progress=False)
    method = (deltakern.DoRA if dora else deltakern.LoRA)(r=args.rank, alpha=args.alpha, dropout=args.dropout,
                                                          target=list(PROJ))
    deltakern.apply(model, method)
    adapters = {name: (m.lora_A, m.lora_B, m.lora_magnitude_vector if dora else None)
                for name, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}
    return model, adapters


def build(method: str, args, device="cuda", dtype=torch.bfloat16) -> Setup:
    """The model for `method` on `device`, adapters initialised identically across methods."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    dora = method.endswith("dora")
    if method.startswith("deltakern"):
        model, adapters = _deltakern_model(args, device, dtype, dora)
    else:
        model, adapters = _peft_model(args, device, dtype, four_bit=method.endswith(("qlora", "qdora")), dora=dora)
        if method.startswith("patched"):
            from deltakern.integrations.peft import patch

            summary = patch(model)
            if summary.fallback:
                raise RuntimeError(f"{method}: layers left on PEFT's forward: {summary.fallback}")
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    adapter_dtype = torch.float32 if args.adapter_dtype == "fp32" else dtype
    init_adapters(adapters, args.seed, adapter_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    model.train()
    return Setup(method, model, params, adapters, weights)


@torch.no_grad()
def init_adapters(adapters: dict, seed: int, dtype: torch.dtype):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5)) bound) from one generator in
    name order, B = 0, parameters cast to `dtype`; DoRA magnitudes keep the library's own ||W||_row."""
    g = torch.Generator().manual_seed(seed + 1)
    for name in sorted(adapters):
        A, B, mag = adapters[name]
        bound = 1.0 / math.sqrt(A.shape[1])
        A.data = (torch.rand(A.shape, generator=g, dtype=torch.float32) * 2 - 1).mul_(bound).to(A.device, dtype)
        B.data = torch.zeros(B.shape, dtype=dtype, device=B.device)
        if mag is not None:
            mag.data = mag.data.to(dtype)


# ---- training -----------------------------------------------------------------------------------------


def make_batches(args, device, steps: int):
    """`steps` batches of random token ids (fixed seed); with --loss-curve a pool of --data-pool
    batches is cycled so that the loss can fall."""
    g = torch.Generator().manual_seed(args.seed + 2)
    distinct = min(steps, args.data_pool) if args.loss_curve else steps
    pool = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(distinct)]
    return [pool[i % distinct].to(device) for i in range(steps)]


def train_steps(setup: Setup, batches, device="cuda", lr: float = 2e-4, autocast_dtype=torch.bfloat16):
    """Run one AdamW step per batch. Returns {'losses': [...], 'step_ms': [...]} (times on CUDA only)."""
    model = setup.model
    opt = torch.optim.AdamW(setup.params, lr=lr, fused=device == "cuda" or None)
    cuda = torch.device(device).type == "cuda"
    losses, events = [], []
    for ids in batches:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if cuda:
            end.record()
            events.append((start, end))
    if cuda:
        torch.cuda.synchronize()
    return {"losses": [float(v) for v in losses], "step_ms": [s.elapsed_time(e) for s, e in events]}


def run_method(method: str, args) -> dict:
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    setup = build(method, args, "cuda", torch.bfloat16)
    build_s = time.perf_counter() - t0
    weights_mib = torch.cuda.memory_allocated() / 2**20
    steps = args.steps + args.warmup
    batches = make_batches(args, "cuda", steps)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = train_steps(setup, batches, "cuda", args.lr)
    peak_mib = torch.cuda.max_memory_allocated() / 2**20
    timed = out["step_ms"][args.warmup:] or out["step_ms"]
    step_ms = statistics.median(timed)
    tokens = args.batch * args.seq
    result = {
        "method": method, "label": LABELS[method], "step_ms": step_ms,
        "step_ms_min": min(timed), "tokens_per_s": tokens / (step_ms / 1e3),
        "peak_mib": peak_mib, "weights_mib": weights_mib, "model_bytes": setup.weights_bytes,
        "trainable_params": setup.trainable, "build_s": build_s,
        "losses": out["losses"], "final_loss": out["losses"][-1],
    }
    del setup, batches, out
    gc.collect()
    torch.cuda.empty_cache()
    return result


def compare_curves(results: dict, warmup: int) -> dict:
    """Each deltakern / patched loss curve against its PEFT counterpart (same init, same data)."""
    out = {}
    for method, base in BASELINE.items():
        if method in results and base in results:
            a, b = results[method]["losses"], results[base]["losses"]
            n = min(len(a), len(b))
            diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
            out[f"{method} vs {base}"] = {
                "max_abs_diff": max(diffs), "last_abs_diff": diffs[-1],
                "mean_abs_diff": sum(diffs) / n, "first_loss": b[0], "last_loss": b[-1],
            }
    return out


def print_table(results: dict, curves: dict):
    header = f"{'method':16} {'tokens/s':>10} {'step ms':>9} {'peak GiB':>9} {'weights GiB':>11} {'trainable M':>11} {'vs PEFT':>8} {'loss':>8}"
    print(header)
    print("-" * len(header))
    for method, r in results.items():
        base = results.get(BASELINE.get(method, ""), None)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"{method:16} {r['tokens_per_s']:10.0f} {r['step_ms']:9.1f} {r['peak_mib'] / 1024:9.2f} "
              f"{r['weights_mib'] / 1024:11.2f} {r['trainable_params'] / 1e6:11.2f} {ratio:>8} {r['final_loss']:8.4f}")
    for key, c in curves.items():
        print(f"loss curve {key}: max |diff| {c['max_abs_diff']:.4g}, last {c['last_abs_diff']:.4g} "
              f"(PEFT loss {c['first_loss']:.4f} -> {c['last_loss']:.4f})")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_e2e needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run")
    missing = [m for m in ("transformers", "peft") if not have(m)]
    if missing:
        sys.exit(f"bench_e2e needs {', '.join(missing)} (pip install {' '.join(missing)})")
    methods = list(args.methods or METHODS)
    skipped = {}
    if not have("bitsandbytes"):
        for m in [m for m in methods if needs_bnb(m)]:
            skipped[m] = "bitsandbytes not installed"
            methods.remove(m)
    if args.loss_curve:
        args.warmup = 0  # every step is part of the curve; timings then include the first steps
    env = environment()
    print(f"{env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | peft {env['peft']} | "
          f"transformers {env['transformers']} | bitsandbytes {env['bitsandbytes']} | deltakern backend "
          f"{env['deltakern_backend']}")
    print(f"Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, heads "
          f"{args.heads}/{args.kv_heads}, vocab {args.vocab}; batch {args.batch} x {args.seq}; r={args.rank}; "
          f"{args.steps} steps after {args.warmup} warmup")
    prepare_checkpoint(args)
    results, errors = {}, {}
    for method in methods:
        print(f"... {method}: {LABELS[method]}", flush=True)
        try:
            results[method] = run_method(method, args)
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others' numbers
            errors[method] = f"{type(exc).__name__}: {exc}"
            print(f"    failed: {errors[method]}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    curves = compare_curves(results, args.warmup)
    print()
    print_table(results, curves)
    if skipped or errors:
        print("skipped:", {**skipped, **errors})
    payload = {"benchmark": "e2e", "env": env, "config": {k: v for k, v in vars(args).items() if k != "model_dir"},
               "results": results, "loss_curves": curves, "skipped": skipped, "errors": errors}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for benchmarks.common
    main()
