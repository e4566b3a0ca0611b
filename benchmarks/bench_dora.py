"""DoRA / QDoRA and bias-only (BitFit) linear layers: deltakern vs torch, PEFT and PEFT + bitsandbytes.

Training step (fwd + bwd with input grad), bf16, M=8192 tokens, K=4096, N in {4096, 14336}, r=16,
every base nn.Linear with a bias:
  frozen_bf16          nn.Linear, weight and bias frozen (the floor: x W^T + b forward, dY W backward)
  bias_only_torch      nn.Linear with only the bias trainable (torch's BitFit: dX and db = dY.sum(0))
  deltakern_linear     deltakern.autograd.linear.linear over the dense weight (BitFit), default chooser,
                       plus forced DELTAKERN_LINEAR_IMPL=triton / torch variants
  deltakern_linear_nf4 the same over an NF4Linear base
  peft_dora            PEFT DoRA (use_dora=True) over the nn.Linear (bf16 adapters)
  peft_qdora           PEFT DoRA over a bitsandbytes Linear4bit (NF4, double quant), if bnb's CUDA works
  deltakern_dora       deltakern.nn.DoRALinear over the nn.Linear, default chooser, plus forced
                       DELTAKERN_DORA_IMPL=triton / torch variants (the defaults are untuned)
  deltakern_qdora      deltakern.nn.DoRALinear over NF4Linear, same three variants
The DoRA rows are steady-state steps between optimizer steps (the row norms are cached); `norm_ms`
is what recomputing them costs once per optimizer step (deltakern) for the layer.

TFLOP/s counts 2MNK for the base forward and 2MNK for dX (so the frozen floor and all rows share one
yardstick; DoRA's small LoRA matmuls are not counted); `of_mm` is that rate over the bf16 matmul
ceiling measured in the same run. Timing: median of CUDA-event timings with L2 flushed
(benchmarks.common.bench). Peak memory: the allocator's peak above the starting point during one step.

Run: python benchmarks/bench_dora.py --out dora.json   (needs a CUDA GPU)
     python benchmarks/bench_dora.py --smoke           (tiny shapes on the CPU: checks the providers run)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import BitFit, Holder, env_var, impl_suffix, train_inputs  # noqa: E402

M_TRAIN, K, R, ALPHA = 8192, 4096, 16, 32
NS = (4096, 14336)
DTYPE = torch.bfloat16
IMPLS = (None, "triton", "torch")


def _perturb(lora_B, magnitude):
    """Nonzero B and a magnitude away from the norm, as after some training."""
    with torch.no_grad():
        lora_B.normal_(0, 0.01)
        magnitude.mul_(1.0 + 0.1 * torch.rand_like(magnitude))


def _peft_dora(layer):
    import peft

    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0, use_dora=True)
    model = peft.get_peft_model(Holder(layer), cfg, autocast_adapter_dtype=False)
    inner = model.base_model.model.proj
    _perturb(inner.lora_B["default"].weight, inner.lora_magnitude_vector["default"].weight)
    return model


def _bnb_linear(lin, device):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=lin.weight.dtype,
                          quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)
    q.bias = nn.Parameter(lin.bias.data.detach().cpu().clone(), requires_grad=False)
    q = q.to(device)
    x = torch.randn(2, lin.in_features, device=device, dtype=lin.weight.dtype)
    q(x)  # fail here (not mid-benchmark) if this wheel has no backend for the device
    return q


def _deltakern_dora(base):
    from deltakern.nn.dora import DoRALinear

    m = DoRALinear(base, r=R, alpha=ALPHA)
    _perturb(m.lora_B, m.lora_magnitude_vector)
    return m


def layer_providers(N, k=K, device="cuda", dtype=DTYPE):
    """name -> (module, (env var, value) to run it under, or None)."""
    from deltakern.nn import NF4Linear

    torch.manual_seed(0)
    lin = nn.Linear(k, N, bias=True, device=device, dtype=dtype).requires_grad_(False)
    bias_only = copy.deepcopy(lin)
    bias_only.bias.requires_grad_(True)
    out = {"frozen_bf16": (lin, None), "bias_only_torch": (bias_only, None)}
    bitfit = BitFit(copy.deepcopy(lin))
    bitfit_nf4 = BitFit(NF4Linear.from_linear(copy.deepcopy(lin)))
    for impl in IMPLS:
        suffix = impl_suffix(impl)
        env = None if impl is None else ("DELTAKERN_LINEAR_IMPL", impl)
        out[f"deltakern_linear{suffix}"] = (bitfit, env)
        out[f"deltakern_linear_nf4{suffix}"] = (bitfit_nf4, env)
    try:
        out["peft_dora"] = (_peft_dora(copy.deepcopy(lin)), None)
    except ImportError as exc:
        print(f"peft unavailable: {exc}")
    try:
        out["peft_qdora"] = (_peft_dora(_bnb_linear(lin, device)), None)
    except Exception as exc:  # not installed, or no backend for this device in the wheel
        print(f"peft + bitsandbytes unavailable: {type(exc).__name__}: {exc}")
    dense = _deltakern_dora(copy.deepcopy(lin))
    nf4 = _deltakern_dora(NF4Linear.from_linear(copy.deepcopy(lin)))
    for impl in IMPLS:
        suffix = impl_suffix(impl)
        env = None if impl is None else ("DELTAKERN_DORA_IMPL", impl)
        out[f"deltakern_dora{suffix}"] = (dense, env)
        out[f"deltakern_qdora{suffix}"] = (nf4, env)
    return out


def _train_step(module, x, dy):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(dy)

    return step


def _norm_step(module):
    """Recompute the layer's row norms as after an optimizer step (deltakern DoRA only)."""
    from deltakern.nn.dora import DoRALinear

    if not isinstance(module, DoRALinear):
        return None

    from deltakern.autograd.dora import dora_weight_norm

    def step():
        dora_weight_norm(module._weight_parts(), module.lora_A, module.lora_B, module.scaling)

    return step


def run_train(ns=NS, M=M_TRAIN):
    from benchmarks.common import bench, peak_mib

    rows = []
    for N in ns:
        x, dy = train_inputs(M, K, N, DTYPE)
        for name, (module, env) in layer_providers(N).items():
            with env_var(*(env or ("DELTAKERN_UNUSED", None))):
                step = _train_step(module, x, dy)
                ms = bench(step)
                with torch.no_grad():
                    fwd_ms = bench(lambda: module(x))  # noqa: B023
                mib = peak_mib(step)
                norm = _norm_step(module)
                norm_ms = bench(norm, warmup=3, reps=10) if norm is not None else None
            flops = 4 * M * N * K
            rows.append({"case": "train", "M": M, "K": K, "N": N, "r": R, "provider": name, "fwd_bwd_ms": ms,
                         "fwd_ms": fwd_ms, "norm_ms": norm_ms, "tflops": flops / ms / 1e9, "peak_mib": mib})
            print(rows[-1], flush=True)
        del x, dy
        torch.cuda.empty_cache()
    return rows


def run(ns=NS):
    from benchmarks.common import ceilings, environment

    ceil = ceilings()
    rows = run_train(ns)
    for row in rows:
        row["of_mm"] = row["tflops"] / ceil["matmul_bf16_tflops"]
    notes = {"peft_adapters": "bf16 (autocast_adapter_dtype=False)", "impl_defaults": "untuned",
             "dora_rows": "steady state between optimizer steps (row norms cached); norm_ms = one recompute"}
    return {"env": environment(), "ceilings": ceil, "notes": notes, "rows": rows}


def smoke():
    """Every provider on tiny CPU shapes, one step each: checks they build and run (no timing)."""
    M, k, N = 16, 128, 96
    x, dy = train_inputs(M, k, N, torch.float32, device="cpu")
    for name, (module, env) in layer_providers(N, k=k, device="cpu", dtype=torch.float32).items():
        with env_var(*(env or ("DELTAKERN_UNUSED", None))):
            t = time.perf_counter()
            _train_step(module, x, dy)()
            norm = _norm_step(module)
            if norm is not None:
                norm()
        print(f"{name}: ok ({(time.perf_counter() - t) * 1e3:.1f} ms on the CPU)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dora.json")
    parser.add_argument("--n", type=int, nargs="*", default=list(NS), help="output features to run")
    parser.add_argument("--smoke", action="store_true", help="run every provider once on tiny CPU shapes")
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dora.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run. "
                         "`--smoke` checks the providers on the CPU.")
    from benchmarks.common import table, write_json

    result = run(tuple(args.n))
    print(result["env"], result["ceilings"])
    print(table(result["rows"], ["N", "provider", "fwd_bwd_ms", "fwd_ms", "norm_ms", "tflops", "of_mm", "peak_mib"]))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
