"""LoRA / QLoRA linear layer: deltakern vs a frozen bf16 nn.Linear, PEFT LoRA and PEFT + bitsandbytes.

Training step (fwd + bwd with input grad), bf16, M=8192 tokens, K=4096, N in {4096, 14336}, r=16:
  frozen_bf16        nn.Linear with a frozen weight (the floor: x W^T forward, dY W backward)
  torch_compile      torch.compile of the plain composition x W^T + s (x A^T) B^T
  peft_lora          PEFT LoRA over that nn.Linear (bf16 adapters)
  peft_qlora         PEFT LoRA over a bitsandbytes Linear4bit (NF4, double quant), if importable
  deltakern_lora     deltakern.nn.LoRALinear over nn.Linear, default chooser; also forced
                     DELTAKERN_LORA_IMPL=triton / torch variants (the chooser's defaults are untuned)
  deltakern_qlora    deltakern.nn.LoRALinear over NF4Linear, same three variants
Decode forward (M in {1, 4, 16}): QLoRA forward, deltakern vs PEFT + bitsandbytes vs bnb Linear4bit.

TFLOP/s counts 2MNK for the base forward, 2MNK for dX, and the LoRA matmuls (fwd 2Mr(K+N), bwd
4Mr(K+N)); `of_mm` is that rate over the bf16 matmul ceiling measured in the same run. Decode rows
report effective GB/s over the NF4 weight bytes and `of_copy` against the copy bandwidth.
Timing: median of CUDA-event timings with L2 flushed (benchmarks.common.bench). Peak memory: the
allocator's peak above the starting point during one step.

Run: python benchmarks/bench_lora.py --out lora.json   (needs a CUDA GPU)
Also usable with pytest-benchmark: pytest benchmarks/bench_lora.py --benchmark-only
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import pytest
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Holder, env_var, impl_suffix, train_inputs  # noqa: E402

M_TRAIN, K, R, ALPHA = 8192, 4096, 16, 32
NS = (4096, 14336)
DECODE_MS = (1, 4, 16)
DTYPE = torch.bfloat16


def _peft(layer):
    import peft

    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(Holder(layer), cfg, autocast_adapter_dtype=False)
    inner = model.base_model.model.proj
    with torch.no_grad():
        inner.lora_B["default"].weight.normal_(0, 0.01)
    return model


def _bnb_linear(lin):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=DTYPE,
                          quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.detach().cpu().clone(), requires_grad=False)
    return q.cuda()


class _PlainLoRA(nn.Module):
    """The unfused composition, for torch.compile."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin
        self.lora_A = nn.Parameter(torch.randn(R, lin.in_features, device="cuda", dtype=DTYPE) / lin.in_features**0.5)
        self.lora_B = nn.Parameter(torch.randn(lin.out_features, R, device="cuda", dtype=DTYPE) * 0.01)

    def forward(self, x):
        return self.lin(x) + (ALPHA / R) * ((x @ self.lora_A.t()) @ self.lora_B.t())


def _deltakern(base):
    from deltakern.nn.lora import LoRALinear

    m = LoRALinear(base, r=R, alpha=ALPHA)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.01)
    return m


def layer_providers(N):
    """name -> (module, the DELTAKERN_LORA_IMPL value to run it under, or None for the default)."""
    from deltakern.nn import NF4Linear

    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False, device="cuda", dtype=DTYPE).requires_grad_(False)
    out = {"frozen_bf16": (lin, None), "torch_compile": (torch.compile(_PlainLoRA(copy.deepcopy(lin))), None)}
    try:
        out["peft_lora"] = (_peft(copy.deepcopy(lin)), None)
    except ImportError as exc:
        print(f"peft unavailable: {exc}")
    try:
        out["peft_qlora"] = (_peft(_bnb_linear(lin)), None)
    except Exception as exc:  # not installed, or no CUDA backend in this wheel
        print(f"peft + bitsandbytes unavailable: {exc}")
    dense = _deltakern(copy.deepcopy(lin))
    nf4 = _deltakern(NF4Linear.from_linear(lin))
    for impl in (None, "triton", "torch"):
        suffix = impl_suffix(impl)
        out[f"deltakern_lora{suffix}"] = (dense, impl)
        out[f"deltakern_qlora{suffix}"] = (nf4, impl)
    return out


def _train_step(module, x, dy):
    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)

    return step


def _flops(M, N, lora):
    base = 4 * M * N * K
    return base + (6 * M * R * (K + N) if lora else 0)


def run_train(ns=NS, M=M_TRAIN):
    from benchmarks.common import bench, peak_mib

    rows = []
    for N in ns:
        x, dy = train_inputs(M, K, N, DTYPE)
        for name, (module, impl) in layer_providers(N).items():
            with env_var("DELTAKERN_LORA_IMPL", impl):
                step = _train_step(module, x, dy)
                ms = bench(step)
                fwd_ms = bench(lambda: module(x.detach()))  # noqa: B023
                mib = peak_mib(step)
            flops = _flops(M, N, name != "frozen_bf16")
            rows.append({"case": "train", "M": M, "K": K, "N": N, "r": R, "provider": name, "fwd_bwd_ms": ms,
                         "fwd_ms": fwd_ms, "tflops": flops / ms / 1e9, "peak_mib": mib})
        torch.cuda.empty_cache()
    return rows


def run_decode(ns=NS, ms_list=DECODE_MS):
    from benchmarks.common import bench
    from deltakern.nn import NF4Linear

    rows = []
    for N in ns:
        torch.manual_seed(0)
        lin = nn.Linear(K, N, bias=False, device="cuda", dtype=DTYPE).requires_grad_(False)
        q = NF4Linear.from_linear(lin)
        w = q.weight
        wbytes = w.nbytes
        provs = {}
        for impl in (None, "triton", "torch"):
            provs["deltakern_qlora" + impl_suffix(impl)] = (_deltakern(q), impl)
        provs["frozen_bf16"] = (lin, None)
        try:
            bl = _bnb_linear(lin)
            provs["bnb_linear4bit"] = (bl, None)
            provs["peft_qlora"] = (_peft(_bnb_linear(lin)), None)
        except Exception as exc:
            print(f"bitsandbytes unavailable: {exc}")
        for M in ms_list:
            x = torch.randn(M, K, device="cuda", dtype=DTYPE)
            for name, (module, impl) in provs.items():
                with env_var("DELTAKERN_LORA_IMPL", impl), torch.no_grad():
                    ms = bench(lambda: module(x))  # noqa: B023
                nbytes = (N * K * 2) if name == "frozen_bf16" else wbytes
                rows.append({"case": "decode_fwd", "M": M, "K": K, "N": N, "r": R, "provider": name, "fwd_ms": ms,
                             "gbps": nbytes / ms / 1e6})
    return rows


def run(ns=NS):
    from benchmarks.common import ceilings, environment

    ceil = ceilings()
    train = run_train(ns)
    for row in train:
        row["of_mm"] = row["tflops"] / ceil["matmul_bf16_tflops"]
    decode = run_decode(ns)
    for row in decode:
        row["of_copy"] = row["gbps"] / ceil["copy_gbps"]
    notes = {"peft_adapters": "bf16 (autocast_adapter_dtype=False)", "lora_impl_defaults": "untuned"}
    return {"env": environment(), "ceilings": ceil, "notes": notes, "rows": train + decode}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lora.json")
    parser.add_argument("--n", type=int, nargs="*", default=list(NS), help="output features to run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run")
    from benchmarks.common import table, write_json

    result = run(tuple(args.n))
    print(result["env"], result["ceilings"])
    train = [r for r in result["rows"] if r["case"] == "train"]
    decode = [r for r in result["rows"] if r["case"] == "decode_fwd"]
    print(table(train, ["N", "provider", "fwd_bwd_ms", "fwd_ms", "tflops", "of_mm", "peak_mib"]))
    print(table(decode, ["N", "M", "provider", "fwd_ms", "gbps", "of_copy"]))
    write_json(args.out, result)


# ---- pytest-benchmark entry points (GPU only) --------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("provider", ["frozen_bf16", "torch_compile", "peft_lora", "peft_qlora", "deltakern_lora",
                                      "deltakern_qlora"])
def test_lora_fwd_bwd(benchmark, provider, N):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    provs = layer_providers(N)
    if provider not in provs:
        pytest.skip(f"{provider} unavailable")
    module, _ = provs[provider]
    x, dy = train_inputs(M_TRAIN, K, N, DTYPE)
    step = _train_step(module, x, dy)

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark(timed)


@pytest.mark.gpu
@pytest.mark.parametrize("M", DECODE_MS)
def test_qlora_decode_fwd(benchmark, M):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from deltakern.nn import NF4Linear

    lin = nn.Linear(K, NS[1], bias=False, device="cuda", dtype=DTYPE)
    module = _deltakern(NF4Linear.from_linear(lin))
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)

    def timed():
        with torch.no_grad():
            module(x)
        torch.cuda.synchronize()

    benchmark(timed)


if __name__ == "__main__":
    main()
