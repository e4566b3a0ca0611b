"""CPU lane: deltakern against a copy, dense torch, bitsandbytes and PEFT, side by side in one run, no GPU.

Sections (`--sections`, default all):
  dequant  NF4 dequantize 4096x4096, nested (double quant), fp32 and bf16 out:
           clone() of a dense tensor of that size and dtype (the copy floor), bitsandbytes'
           dequantize_4bit, deltakern (`torch.ops.deltakern.nf4_dequantize`, whatever runs on the CPU).
  decode   NF4 layer forward at M = 1, 4, 16 for (K, N) = (2048, 8192) and (4096, 4096), no grad:
           dense nn.Linear fp32 and bf16, bitsandbytes Linear4bit (fp32 compute), deltakern's frozen
           linear (`deltakern.autograd.linear.linear`, the op the LoRA / BitFit layers run: decode
           kernels where built) fp32 and bf16, and
           deltakern's NF4Linear module fp32. The caches are flushed before every timed call (a 96 MiB
           write): weights come from memory, as when a model's layers stream through a decode step,
           and no contender finds the 4-bit weight the one before it read (the same weight serves
           the three deltakern rows).
  layer    one training step of one layer (fwd + bwd, x requires grad), fp32, r = 16, alpha = 32,
           bias, at (M, K, N) = (512, 1024, 1024) and (1024, 2048, 2048): the frozen nn.Linear (the
           floor), torch nn.Linear with only its bias trainable, and for each method deltakern vs PEFT
           (vs PEFT over bitsandbytes Linear4bit for the 4-bit ones): LoRA, QLoRA, DoRA, QDoRA, BitFit.
           Before every adapter step its trainable tensors are written in place (add_(0)), as an
           optimizer step would, so DoRA's row norms are recomputed each step as in training.
  mainjob  the main job's training step: all-MiniLM-L6-v2 as deltakern.demo builds it (no pooler,
           mean pooling, a linear head, train mode), r = 8, alpha = 16 on every linear layer of the
           encoder, batch 16 x 64 random tokens, cross-entropy, fwd + bwd + AdamW step: deltakern
           QLoRA / LoRA vs PEFT + bitsandbytes QLoRA / PEFT LoRA (same model, rank, targets, batch).

Timing: the contenders of one case run ROUND-ROBIN (one rep of each in turn, the starting contender
rotating every round) after a warmup, and each reports its median over the rounds: load that comes
and goes hits every contender alike. Every row also gives its ratio to the case's reference
(`vs`: copy for dequantize, dense fp32 for decode, the frozen layer for layer steps, the matching
PEFT run for the main job), as the median over rounds of the two times measured in the same round.

    python benchmarks/bench_cpu.py                                 # everything (a few minutes on 2 cores)
    python benchmarks/bench_cpu.py --sections layer --threads 2
    python benchmarks/bench_cpu.py --results-md benchmarks/RESULTS.md --out cpu.json
    pytest benchmarks/bench_cpu.py --benchmark-only                # the same cases through pytest-benchmark
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import sys
import time

import pytest
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import BitFit, Holder, environment, evict_caches, round_robin, table, write_json  # noqa: E402

SECTIONS = ("dequant", "decode", "layer", "mainjob")
DEQUANT_SHAPE = (4096, 4096)
DECODE_SHAPES = ((2048, 8192), (4096, 4096))  # (K, N)
DECODE_MS = (1, 4, 16)
LAYER_SHAPES = ((512, 1024, 1024), (1024, 2048, 2048))  # (M, K, N)
R, ALPHA = 16, 32
MAIN_R, MAIN_ALPHA, MAIN_BATCH, MAIN_TOKENS = 8, 16, 16, 64
CPU_BEGIN, CPU_END = "<!-- cpu-lane: begin (benchmarks/bench_cpu.py writes this section) -->", "<!-- cpu-lane: end -->"


def machine() -> dict:
    """Cores, ISA flags and library versions of this machine."""
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = re.search(r"model name\s*:\s*(.*)", text)
        have = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
        flags = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16",
                             "amx_bf16", "amx_tile") if f in have]
        cpu = model.group(1).strip() if model else platform.processor()
    except (OSError, AttributeError):
        cpu = platform.processor()
    env = environment()
    env.update(cpu=cpu, logical_cores=os.cpu_count(), torch_threads=torch.get_num_threads(), isa=" ".join(flags),
               torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), deltakern_cpu_ext=_cpu_ext_state())
    return env


def _cpu_ext_state() -> str:
    """Whether deltakern's native CPU extension is loaded here, and with which instruction set."""
    try:
        from deltakern import _cpu_ext
    except ImportError:
        return "absent"
    return f"loaded ({_cpu_ext.isa()})" if _cpu_ext.available() else "not built"


def _have(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception as exc:  # not installed, or a broken install
        print(f"{name} unavailable: {type(exc).__name__}: {exc}")
        return False


# ---- builders -----------------------------------------------------------------------------------


def bnb_linear(lin: nn.Linear, compute_dtype=torch.float32):
    """bitsandbytes Linear4bit (NF4, double quant, blocksize 64) holding `lin`'s weight, on the CPU."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                          quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.detach().float().clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=64)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.detach().clone(), requires_grad=False)
    q = q.to("cpu")  # quantizes
    q(torch.randn(2, lin.in_features, dtype=compute_dtype))  # fail here, not mid-benchmark
    return q


def _peft_layer(base, dora: bool):
    import peft

    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0, use_dora=dora)
    model = peft.get_peft_model(Holder(base), cfg, autocast_adapter_dtype=False)
    inner = model.base_model.model.proj
    with torch.no_grad():
        inner.lora_B["default"].weight.normal_(0, 0.01)
        if dora:
            mag = inner.lora_magnitude_vector["default"].weight
            mag.mul_(1.0 + 0.1 * torch.rand_like(mag))
    return model


def _deltakern_layer(base, dora: bool):
    from deltakern.nn.dora import DoRALinear
    from deltakern.nn.lora import LoRALinear

    m = (DoRALinear if dora else LoRALinear)(base, r=R, alpha=ALPHA)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.01)
        if dora:
            m.lora_magnitude_vector.mul_(1.0 + 0.1 * torch.rand_like(m.lora_magnitude_vector))
    return m


def layer_contenders(K: int, N: int, with_peft=True, with_bnb=True) -> dict:
    """name -> module for one layer shape (fp32, bias); PEFT / bitsandbytes rows only when importable."""
    from deltakern.nn import NF4Linear

    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=True).requires_grad_(False)
    bias_only = copy.deepcopy(lin)
    bias_only.bias.requires_grad_(True)
    out = {"frozen dense": lin, "torch bias-only": bias_only}
    out["deltakern BitFit"] = BitFit(copy.deepcopy(lin))
    out["deltakern BitFit NF4"] = BitFit(NF4Linear.from_linear(copy.deepcopy(lin)))
    for dora, name in ((False, "LoRA"), (True, "DoRA")):
        out[f"deltakern {name}"] = _deltakern_layer(copy.deepcopy(lin), dora)
        if with_peft:
            out[f"PEFT {name}"] = _peft_layer(copy.deepcopy(lin), dora)
        out[f"deltakern Q{name}"] = _deltakern_layer(NF4Linear.from_linear(copy.deepcopy(lin)), dora)
        if with_peft and with_bnb:
            out[f"PEFT+bnb Q{name}"] = _peft_layer(bnb_linear(lin), dora)
    return out


def train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """One fwd + bwd; trainable tensors are first written in place, as an optimizer step does."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        with torch.no_grad():
            for p in params:
                p.add_(0.0)
                p.grad = None
        x.grad = None
        module(x).backward(dy)

    return step


# ---- sections -----------------------------------------------------------------------------------


def run_dequant(reps: int, with_bnb: bool) -> list:
    import deltakern

    rows = []
    N, K = DEQUANT_SHAPE
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        w = torch.randn(N, K, dtype=dtype)
        q = deltakern.nf4.quantize(w, blocksize=64, double_quant=True)
        fns = {"copy (clone)": w.clone,
               "deltakern": lambda q=q, dtype=dtype: q.dequantize(dtype)}
        if with_bnb:
            import bitsandbytes.functional as bf

            bq, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            fns["bitsandbytes"] = lambda bq=bq, state=state: bf.dequantize_4bit(bq, state)
        ms = round_robin(fns, reps)
        for name, t in ms.items():
            rows.append({"case": f"dequantize {N}x{K} nested", "dtype": str(dtype)[6:], "contender": name, "ms": t,
                         "vs": ms.ratio(name, "copy (clone)"),
                         "vs_bnb": ms.ratio(name, "bitsandbytes") if with_bnb else None})
    return rows


def run_decode(reps: int, with_bnb: bool) -> list:
    from deltakern.autograd.linear import linear
    from deltakern.nn import NF4Linear

    rows = []
    for K, N in DECODE_SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(K, N, bias=False).requires_grad_(False)
        lin_bf16 = copy.deepcopy(lin).to(torch.bfloat16)
        q = NF4Linear.from_linear(lin)
        w = q.weight
        bq = bnb_linear(lin) if with_bnb else None
        for M in DECODE_MS:
            x = torch.randn(M, K)
            xb = x.to(torch.bfloat16)
            fns = {"dense fp32": lambda: lin(x), "dense bf16": lambda: lin_bf16(xb),  # noqa: B023
                   "deltakern linear() NF4 fp32": lambda: linear(x, w),  # noqa: B023
                   "deltakern linear() NF4 bf16": lambda: linear(xb, w),  # noqa: B023
                   "deltakern NF4Linear fp32": lambda: q(x)}  # noqa: B023
            if bq is not None:
                fns["bnb Linear4bit fp32"] = lambda: bq(x)  # noqa: B023
            with torch.no_grad():  # weights cold for every contender, as in a model's decode step
                ms = round_robin(fns, reps, before=evict_caches)
            for name, t in ms.items():
                rows.append({"case": f"decode M={M} K={K} N={N}", "contender": name, "ms": t,
                             "vs": ms.ratio(name, "dense fp32"), "vs_bf16": ms.ratio(name, "dense bf16"),
                             "vs_bnb": ms.ratio(name, "bnb Linear4bit fp32") if bq is not None else None})
    return rows


def run_layer(reps: int, with_peft: bool, with_bnb: bool, shapes=LAYER_SHAPES) -> list:
    rows = []
    for M, K, N in shapes:
        mods = layer_contenders(K, N, with_peft, with_bnb)
        torch.manual_seed(1)
        x = torch.randn(M, K, requires_grad=True)
        dy = torch.randn(M, N)
        ms = round_robin({name: train_step(m, x, dy) for name, m in mods.items()}, reps)
        for name, t in ms.items():
            row = {"case": f"layer fwd+bwd M={M} K={K} N={N} r={R} fp32", "contender": name, "ms": t,
                   "vs": ms.ratio(name, "frozen dense")}
            if "DoRA" in name:  # DoRA's target is relative to LoRA's
                lora = name.replace("DoRA", "LoRA")
                row["vs_lora"] = ms.ratio(name, lora) if lora in ms else None
            rows.append(row)
    return rows


def minilm_all_linear_names(encoder) -> list:
    return [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]


def mainjob_model(kind: str):
    """The demo's classifier over all-MiniLM-L6-v2 with `kind` in ('deltakern qlora', 'deltakern lora',
    'peft+bnb qlora', 'peft lora'); r = 8, alpha = 16, every encoder linear; returns (model, params)."""
    import deltakern
    from deltakern.demo import SentenceClassifier, load_minilm

    torch.manual_seed(0)
    encoder, _ = load_minilm("cpu", dtype=torch.float32, pooler=False)
    names = minilm_all_linear_names(encoder)
    if kind.startswith("deltakern"):
        if kind.endswith("qlora"):
            deltakern.quantize(encoder, skip=(), blocksize=64, progress=False)
        method = deltakern.LoRA(r=MAIN_R, alpha=MAIN_ALPHA)
        deltakern.apply(encoder, method)
        dropout = float(getattr(method, "dropout", 0.0))
    else:
        import peft

        if kind.endswith("qlora"):
            for name in names:
                parent_name, _, child = name.rpartition(".")
                parent = encoder.get_submodule(parent_name)
                setattr(parent, child, bnb_linear(getattr(parent, child)))
        dropout = float(deltakern.LoRA(r=MAIN_R, alpha=MAIN_ALPHA).dropout)
        cfg = peft.LoraConfig(r=MAIN_R, lora_alpha=MAIN_ALPHA, target_modules=names, lora_dropout=dropout)
        encoder = peft.get_peft_model(encoder, cfg, autocast_adapter_dtype=False).base_model.model
    model = SentenceClassifier(encoder, 4)
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), params


def run_mainjob(reps: int, with_peft: bool, with_bnb: bool, kinds=None) -> list:
    if kinds is None:
        kinds = ["deltakern qlora", "deltakern lora"]
        if with_peft:
            kinds += (["peft+bnb qlora"] if with_bnb else []) + ["peft lora"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (MAIN_BATCH, MAIN_TOKENS), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 4, (MAIN_BATCH,), generator=g)
    fns = {}
    for kind in kinds:
        model, params = mainjob_model(kind)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

        def step(model=model, opt=opt):
            loss = nn.functional.cross_entropy(model(ids, mask), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[kind] = step
    ms = round_robin(fns, reps, warmup=2)
    base = {"deltakern qlora": "peft+bnb qlora", "deltakern lora": "peft lora"}
    rows = []
    for name, t in ms.items():
        ref = base.get(name)
        rows.append({"case": f"main job step (MiniLM-L6, r={MAIN_R}, {MAIN_BATCH}x{MAIN_TOKENS}, AdamW)",
                     "contender": name, "ms": t, "vs": ms.ratio(name, ref) if ref in ms else None})
    return rows


# ---- report -------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [CPU_BEGIN, "## CPU lane (`make bench-cpu`, benchmarks/bench_cpu.py)", "",
             f"Measured {result['date']} on {env['cpu']}: {env['logical_cores']} logical cores, "
             f"{env['torch_threads']} torch threads, ISA {env['isa'] or 'n/a'} (torch uses {env['torch_cpu_capability']}); "
             f"torch {env['torch']}, bitsandbytes {env.get('bitsandbytes')}, peft {env.get('peft')}, "
             f"transformers {env.get('transformers')}; deltakern's native CPU extension {env.get('deltakern_cpu_ext')}. Contenders of one case timed round-robin in one run, "
             f"median of {result['reps']} rounds (main job: {result['mainjob_reps']}; ratios: median of per-round ratios). {result.get('note', '')}", ""]
    titles = {"dequant": ("NF4 dequantize (vs: ÷ clone of the same output)", ["case", "dtype", "contender", "ms", "vs", "vs_bnb"]),
              "decode": (("NF4 decode forward, weights cold: caches flushed before every timed call "
                         "(vs: ÷ dense fp32 nn.Linear)"), ["case", "contender", "ms", "vs", "vs_bf16", "vs_bnb"]),
              "layer": ("Layer fwd+bwd (vs: ÷ frozen dense layer; vs_lora: DoRA ÷ the same library's LoRA)",
                        ["case", "contender", "ms", "vs", "vs_lora"]),
              "mainjob": ("Main job training step (vs: ÷ the matching PEFT run)", ["case", "contender", "ms", "vs"])}
    for section, rows in result["sections"].items():
        title, cols = titles[section]
        lines += [f"### {title}", "", table(rows, cols), ""]
    lines.append(CPU_END)
    return "\n".join(lines)


def write_results_md(path: str, section: str):
    """Replace the CPU section of `path` (between its markers) or append it; the rest is kept."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if CPU_BEGIN in text and CPU_END in text:
        head, rest = text.split(CPU_BEGIN, 1)
        text = head + section + rest.split(CPU_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote the CPU section of {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--reps", type=int, default=15, help="round-robin rounds per case")
    p.add_argument("--mainjob-reps", type=int, default=8)
    p.add_argument("--no-peers", action="store_true", help="skip PEFT and bitsandbytes (deltakern and torch only)")
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--results-md", default=None, help="write the CPU section into this RESULTS.md")
    p.add_argument("--note", default="", help="a sentence for the RESULTS.md section (e.g. 'machine busy')")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with_bnb = not args.no_peers and _have("bitsandbytes")
    with_peft = not args.no_peers and _have("peft")
    result = {"env": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": args.reps,
              "mainjob_reps": args.mainjob_reps, "note": args.note, "sections": {}}
    print(result["env"])
    runners = {"dequant": lambda: run_dequant(max(3, args.reps // 2), with_bnb),
               "decode": lambda: run_decode(args.reps, with_bnb),
               "layer": lambda: run_layer(args.reps, with_peft, with_bnb),
               "mainjob": lambda: run_mainjob(args.mainjob_reps, with_peft, with_bnb)}
    cols = ["case", "dtype", "contender", "ms", "vs", "vs_bf16", "vs_lora", "vs_bnb"]
    for section in args.sections:
        t = time.perf_counter()
        rows = runners[section]()
        result["sections"][section] = rows
        print(f"\n{section} ({time.perf_counter() - t:.0f} s)")
        print(table(rows, [c for c in cols if any(r.get(c) is not None for r in rows)]), flush=True)
    if args.out:
        write_json(args.out, result)
    if args.results_md:
        write_results_md(args.results_md, markdown(result))
    return result


# ---- pytest-benchmark ---------------------------------------------------------------------------

_SMALL = (256, 512, 512)  # (M, K, N): every layer contender at a size pytest-benchmark runs quickly


@pytest.fixture(scope="module")
def _small_layers():
    return layer_contenders(_SMALL[1], _SMALL[2], _have("peft"), _have("bitsandbytes"))


@pytest.mark.parametrize("name", ["frozen dense", "torch bias-only", "deltakern BitFit", "deltakern LoRA", "PEFT LoRA",
                                  "deltakern QLoRA", "PEFT+bnb QLoRA", "deltakern DoRA", "PEFT DoRA",
                                  "deltakern QDoRA", "PEFT+bnb QDoRA"])
def test_cpu_layer_step(benchmark, _small_layers, name):
    if name not in _small_layers:
        pytest.skip(f"{name}: library unavailable")
    M, K, N = _SMALL
    torch.manual_seed(1)
    x, dy = torch.randn(M, K, requires_grad=True), torch.randn(M, N)
    benchmark.pedantic(train_step(_small_layers[name], x, dy), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("contender", ["copy", "deltakern", "bitsandbytes"])
def test_cpu_dequantize_2048(benchmark, contender):
    import deltakern

    w = torch.randn(2048, 2048)
    if contender == "copy":
        fn = w.clone
    elif contender == "deltakern":
        q = deltakern.nf4.quantize(w, blocksize=64, double_quant=True)
        fn = q.dequantize
    else:
        bf = pytest.importorskip("bitsandbytes.functional")
        bq, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        fn = lambda: bf.dequantize_4bit(bq, state)  # noqa: E731
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1)


if __name__ == "__main__":
    main()
