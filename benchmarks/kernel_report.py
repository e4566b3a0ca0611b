"""Static kernel report: every Triton kernel, every mode, every config the autotuner can pick, compiled
for sm_90 and sm_80 with no GPU, and read back from the SASS.

    python benchmarks/kernel_report.py [--arch 90 80] [--json PATH] [--subset] [--jobs N]

How it works. The real launchers (triton_kernels/*.py) are called with CPU tensors of the benchmark
shapes while `launch` is replaced by a recorder, so each mode's kernel arguments, constexpr flags and
dtypes are exactly what the launcher passes. For an autotuned kernel the autotuner's own pruning
(`early_config_prune`, run with the recorded arguments) gives the configs it can pick at that shape;
two shapes are recorded per mode (a training M = 8192 and a decode M = 16) and their configs united.
Each (kernel, mode, config, arch) is compiled with `triton.compile(ASTSource(...), GPUTarget("cuda",
arch, 32))` using the same argument specialisation as Triton's JIT (16-byte alignment, ints equal to
1 folded), then Triton's bundled tools report on the result:

- registers, spill bytes (stores + loads) from `ptxas -v` on the PTX (same flags Triton uses);
- shared memory: Triton's allocation (`metadata.shared`), checked against the arch's per-block limit;
- wgmma / cp.async / TMA: HGMMA / LDGSTS / UTMA* (UBLKCP) instructions in the SASS (`cuobjdump -sass`);
  `wgmma_wait0`: whether a `WARPGROUP.DEPBAR.LE gsb0, 0x0` (a wgmma wait with pendings = 0) sits in
  the main loop, i.e. the MMA cannot overlap the next tile's loads/dequantization;
- instructions per element, counted statically on the SASS (no timing; every instruction counts 1,
  NOPs excluded):
    * GEMM-style kernels (LoRA, frozen linear / DoRA, DoRA norm parts, C^T W, decode): the main loop
      is the largest backward branch's body; `instructions_per_element` = body instructions x warps /
      (weight elements one iteration consumes), i.e. warp-instructions per weight element per row
      tile (a warp issues one instruction for 32 threads). Lower is better; at 132 SMs x 4 issue
      slots x 1.7 GHz, 0.3 warp-instructions per element per row tile of 128 rows keeps up with the
      bf16 tensor cores.
    * dequantize (no loop): thread-instructions per output element = all instructions x threads /
      outputs per program (the whole program is counted once; masked-off tails are not subtracted).

Everything is cached (Triton's kernel cache for the compiles, a JSON cache for the ptxas/SASS stats
under $DELTAKERN_REPORT_CACHE or ~/.cache/deltakern/kernel_report), so a rerun costs seconds.
The report predicts; it times nothing.
"""

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # real configs, real compiles
os.environ.pop("DELTAKERN_TRITON_PIN", None)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import triton_kernels._common as _common  # noqa: E402
import triton_kernels.dora as _dora  # noqa: E402
import triton_kernels.linear as _linear  # noqa: E402
import triton_kernels.lora as _lora  # noqa: E402
import triton_kernels.nf4 as _nf4  # noqa: E402

try:
    import triton_kernels.decode as _decode  # noqa: E402
except ImportError:  # older trees
    _decode = None

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in shared memory per block
ARCHS = (90, 80)  # the archs whose pruning the jobs are recorded for
CACHE = Path(os.environ.get("DELTAKERN_REPORT_CACHE", Path.home() / ".cache" / "deltakern" / "kernel_report"))

# the benchmark shapes: a 4096 -> 14336 projection, rank 16, NF4 blocksize 64
N_, K_, R_, BLOCK_ = 14336, 4096, 16, 64
M_TRAIN, M_DECODE = 8192, 16
DT = torch.bfloat16


# --------------------------------------------------------------------------------------------
# recording the launches of every mode
# --------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, kernel, grid, device, *args, **kwargs):
        self.calls.append((kernel, args, kwargs))


@contextlib.contextmanager
def _recording():
    rec = _Recorder()
    mods = [m for m in (_common, _lora, _linear, _dora, _nf4, _decode) if m is not None and hasattr(m, "launch")]
    saved = [m.launch for m in mods]
    for m in mods:
        m.launch = rec
    try:
        yield rec
    finally:
        for m, f in zip(mods, saved):
            m.launch = f


def _e(*shape, dtype=DT):
    return torch.empty(*shape, dtype=dtype)  # never touched: the launchers only read shapes and strides


def _weights(N, K):
    """(weight, nf4 args) for a dense and an NF4 [N, K] weight."""
    packed = _e((N * K + 1) // 2, dtype=torch.uint8)
    absmax = _e(-(-N * K // BLOCK_), dtype=torch.float32)
    return {"dense": (_e(N, K), None), "nf4": (packed, (absmax, _e(16, dtype=torch.float32), BLOCK_))}


def _modes(M):
    """[(kernel name, mode, thunk)]: every launcher mode the autograd functions use, at M rows."""
    N, K, r = N_, K_, R_
    x, dy, y = _e(M, K), _e(M, N), _e(M, N)
    xa, dyb, A, B = _e(M, r), _e(M, r), _e(r, K), _e(N, r)
    keep = _e(M, K, dtype=torch.bool)
    bias, g = _e(N), _e(N, dtype=torch.float32)
    cols = _e(N, dtype=torch.bool)
    out = []
    for wk, (w, nf4) in _weights(N, K).items():
        out += [
            ("lora_fwd", f"{wk}", lambda w=w, nf4=nf4: _lora.lora_forward(x, w, None, xa, B, 2.0, nf4=nf4)),
            ("lora_fwd", f"{wk},bias", lambda w=w, nf4=nf4: _lora.lora_forward(x, w, bias, xa, B, 2.0, nf4=nf4)),
            ("lora_dx", f"{wk}", lambda w=w, nf4=nf4: _lora.lora_backward_dx(dy, w, dyb, A, 2.0, nf4=nf4)),
            ("lora_dx", f"{wk},dropout", lambda w=w, nf4=nf4: _lora.lora_backward_dx(
                dy, w, dyb, A, 2.0, mask=keep, mask_scale=1.25, nf4=nf4)),
            ("linear_fwd", f"{wk},bias", lambda w=w, nf4=nf4: _linear.linear_forward(x, w, bias, N, nf4=nf4)),
            ("linear_dx", f"{wk},db", lambda w=w, nf4=nf4: _linear.linear_backward(dy, w, K, nf4=nf4)),
            ("dora_fwd", f"{wk},bias", lambda w=w, nf4=nf4: _linear.frozen_forward(
                x, w, N, nf4=nf4, bias=bias, lora=(xa, B, 2.0), g=g)),
            ("dora_fwd", f"{wk},bias,dropout", lambda w=w, nf4=nf4: _linear.frozen_forward(
                x, w, N, nf4=nf4, bias=bias, lora=(xa, B, 2.0), g=g, keep=keep, mask_scale=1.25)),
            ("dora_dx", f"{wk},db,cy", lambda w=w, nf4=nf4: _linear.frozen_backward(
                dy, w, K, nf4=nf4, g=g, lora=(dyb, A, 2.0), want_db=True, y=y, bias=bias)),
            ("dora_dx", f"{wk},dropout,db,cy", lambda w=w, nf4=nf4: _linear.frozen_backward(
                dy, w, K, nf4=nf4, g=g, lora=(dyb, A, 2.0), keep=keep, mask_scale=1.25, want_db=True, y=y,
                bias=bias)),
            ("dora_colsums", f"{wk},db,cy", lambda w=w, nf4=nf4: _linear.frozen_backward(
                dy, w, K, nf4=nf4, compute_dx=False, want_db=True, y=y, bias=bias)),
            ("dora_colsum_z", f"{wk},dropout", lambda w=w, nf4=nf4: _linear.frozen_forward(
                x, w, N, nf4=nf4, lora=(xa, B, 2.0), keep=keep, mask_scale=1.25, colsum=dy)),
            ("dora_colsum_z", f"{wk},dropout,cols", lambda w=w, nf4=nf4: _linear.frozen_forward(
                x, w, N, nf4=nf4, lora=(xa, B, 2.0), keep=keep, mask_scale=1.25, colsum=dy, cols=cols)),
        ]
        if M == M_TRAIN:  # once per step, not per row count
            out += [
                ("dora_norm_parts", f"{wk},sumsq", lambda w=w, nf4=nf4: _dora.norm_parts(w, A, N, nf4=nf4)),
                ("dora_norm_parts", f"{wk}", lambda w=w, nf4=nf4: _dora.norm_parts(w, A, N, nf4=nf4,
                                                                                    want_sumsq=False)),
                ("dora_ctw", f"{wk}", lambda w=w, nf4=nf4: _dora.ctw(B, w, K, nf4=nf4)),
            ]
        if M == M_DECODE and wk == "nf4" and _decode is not None:
            out += [("nf4_decode", "nf4", lambda nf4=nf4, w=w: _decode.decode_forward(x, w, None, N, nf4=nf4)),
                    ("nf4_decode", "nf4,bias", lambda nf4=nf4, w=w: _decode.decode_forward(x, w, bias, N, nf4=nf4))]
    if M == M_TRAIN:
        n = N * K
        packed = _e((n + 1) // 2, dtype=torch.uint8)
        code, nb = _e(16, dtype=torch.float32), -(-n // BLOCK_)
        out += [
            ("dequantize", "fp32-absmax", lambda: _nf4.dequantize_nf4(packed, _e(nb, dtype=torch.float32), n, BLOCK_,
                                                                      DT, code)),
            ("dequantize", "nested", lambda: _nf4.dequantize_nf4(
                packed, _e(nb, dtype=torch.uint8), n, BLOCK_, DT, code, _e(-(-nb // 256), dtype=torch.float32),
                _e(256, dtype=torch.float32), 0.01)),
            ("dequantize", "nested,fp16", lambda: _nf4.dequantize_nf4(
                packed, _e(nb, dtype=torch.uint8), n, BLOCK_, torch.float16, code,
                _e(-(-nb // 256), dtype=torch.float32), _e(256, dtype=torch.float32), 0.01)),
        ]
    return out


def _config_name(kwargs, num_warps, num_stages):
    short = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "GROUP_M": "G", "BLOCK": "B"}
    parts = [f"{short.get(k, k)}{v}" for k, v in kwargs.items()]
    return "-".join(parts + [f"w{num_warps}", f"s{num_stages}"])


_JOBS = {}


def jobs(subset=False, only=None):
    """The compile jobs: dicts with kernel, mode, config name, the jit fn, args and launch kwargs.
    `only`: a regex matched against "kernel mode config". Memoised per process."""
    if (subset, only) not in _JOBS:
        _JOBS[(subset, only)] = _jobs(subset, only)
    return _JOBS[(subset, only)]


def _jobs(subset, only):
    seen, out = {}, []
    for M in (M_TRAIN, M_DECODE):
        for name, mode, thunk in _modes(M):
            with _recording() as rec:
                thunk()
            for kernel, args, kwargs in rec.calls:
                if isinstance(kernel, triton.runtime.autotuner.Autotuner):
                    fn = kernel.fn
                    named = dict(zip(fn.arg_names, args))
                    variants = []
                    for arch in ARCHS:  # the pruning depends on the target's registers (sm_8x: smaller tiles)
                        cfgs = kernel.configs
                        if kernel.early_config_prune:
                            with _common.pruning_arch(arch):
                                cfgs = kernel.early_config_prune(cfgs, named, **kwargs)
                        variants += [(dict(c.kwargs), c.num_warps, c.num_stages, arch) for c in cfgs]
                else:
                    fn = kernel
                    tiles = {k: kwargs[k] for k in ("BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kwargs}
                    variants = [(tiles, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3), a) for a in ARCHS]
                for cfg, warps, stages, arch in variants:
                    cname = _config_name(cfg, warps, stages)
                    key = (name, mode, cname)
                    if key in seen:
                        seen[key]["archs"].add(arch)
                        continue
                    if only and not re.search(only, f"{name} {mode} {cname}"):
                        continue
                    launch_kw = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
                    launch_kw.update(cfg)
                    seen[key] = dict(kernel=name, mode=mode, config=cname, fn=fn, args=args, kwargs=launch_kw,
                                     num_warps=warps, num_stages=stages, tile=cfg, archs={arch})
                    out.append(seen[key])
    if subset:
        out = _spill_risk_subset(out)
    return out


def _spill_risk_subset(all_jobs):
    """Per (kernel, mode, arch): the config, among those pruned for that arch, holding the most fp32
    accumulator values per thread (the spill risk: BLOCK_M x out tile / threads), then the most
    pipeline stages; each returned job carries the archs it was picked for."""
    best, rest = {}, []
    for j in all_jobs:
        t = j["tile"]
        if "BLOCK_M" not in t or "BLOCK_K" not in t:  # the small fixed-tile kernels and the column sums: all
            rest.append(j)
            continue
        out_tile = t["BLOCK_N"] if j["kernel"].endswith("fwd") or "colsum_z" in j["kernel"] else t["BLOCK_K"]
        risk = (t["BLOCK_M"] * out_tile / (32 * j["num_warps"]), j["num_stages"])
        for arch in j["archs"]:
            k = (j["kernel"], j["mode"], arch)
            if k not in best or risk > best[k][0]:
                best[k] = (risk, j)
    picked = {}
    for (_, _, arch), (_, j) in best.items():
        picked.setdefault(id(j), dict(j, archs=set()))["archs"].add(arch)
    return list(picked.values()) + rest


# --------------------------------------------------------------------------------------------
# compiling and reading back
# --------------------------------------------------------------------------------------------


def _compile(job, arch):
    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    fn = job["fn"]
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(job["kwargs"], num_warps=job["num_warps"], num_stages=job["num_stages"])
    bound, spec, opts = binder(*job["args"], **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__), options


def _ptxas_stats(ptx, arch, fmad):
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(BIN / "ptxas"), "-lineinfo", "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "k.o")]
        if not fmad:
            cmd.insert(1, "--fmad=false")
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(m.group(1)), int(m.group(2))


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"BRA\s.*?(0x[0-9a-f]+)")


def _sass(cubin):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.cubin"
        p.write_bytes(cubin)
        text = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(p)], check=True, capture_output=True,
                              text=True).stdout
    insns = [(int(a, 16), t) for a, t in _INSN.findall(text)]
    return [(a, t) for a, t in insns if not re.match(r"(@!?U?P\w+\s+)?NOP\b", t)]


def _main_loop(insns):
    """The instructions of the largest loop (a backward branch's range), or None."""
    best = None
    for addr, text in insns:
        m = _TARGET.search(text)
        if m and "BRA" in text.split()[0 if not text.startswith("@") else 1]:
            target = int(m.group(1), 16)
            if target <= addr:
                body = [t for a, t in insns if target <= a <= addr]
                if best is None or len(body) > len(best):
                    best = body
    return best


def _elements_per_iteration(job):
    """Weight elements one main-loop iteration consumes (GEMM kernels: one W tile)."""
    t = job["tile"]
    if job["kernel"] == "dora_colsums":  # no W: one [BLOCK_M, BLOCK_N] tile of dY (and y) per iteration
        return t["BLOCK_M"] * t["BLOCK_N"]
    if job["kernel"] in ("dora_norm_parts", "dora_ctw", "nf4_decode") or "BLOCK_M" in t:
        return t["BLOCK_N"] * t["BLOCK_K"]
    return None


def analyse(job, arch):
    """One record of the report (see the module docstring)."""
    kernel, options = _compile(job, arch)
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    key = hashlib.sha256(ptx.encode() + bytes([arch]) + bytes([int(options.enable_fp_fusion)])).hexdigest()
    cached = CACHE / f"{key}.json"
    if cached.exists():
        stats = json.loads(cached.read_text())
    else:
        regs, spill_st, spill_ld = _ptxas_stats(ptx, arch, options.enable_fp_fusion)
        insns = _sass(cubin)
        loop = _main_loop(insns)
        stats = dict(
            registers=regs, spill_store_bytes=spill_st, spill_load_bytes=spill_ld,
            sass_instructions=len(insns), loop_instructions=None if loop is None else len(loop),
            wgmma=any(t.startswith("HGMMA") or " HGMMA" in t for _, t in insns),
            mma=any("HMMA" in t for _, t in insns),
            cp_async=any("LDGSTS" in t for _, t in insns),
            tma=any(("UTMALDG" in t) or ("UBLKCP" in t) for _, t in insns),
            wgmma_wait0=bool(loop) and any(re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", t) for t in loop),
        )
        CACHE.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(stats))
    warps = job["num_warps"]
    if job["kernel"] == "dequantize":
        outputs = 2 * job["tile"]["BLOCK"]
        ipe, unit = stats["sass_instructions"] * 32 * warps / outputs, "thread-insn per output element"
        stats = dict(stats, loop_instructions=None)  # straight-line: the whole program is counted
    else:
        elems = _elements_per_iteration(job)
        loop_n = stats["loop_instructions"]
        ipe = None if (elems is None or loop_n is None) else loop_n * warps / elems
        unit = ("warp-insn per dY element (main loop)" if job["kernel"] == "dora_colsums"
                else "warp-insn per weight element per row tile (main loop)")
    return dict(
        kernel=job["kernel"], mode=job["mode"], config=job["config"], arch=f"sm_{arch}",
        registers=stats["registers"], spill_bytes=stats["spill_store_bytes"] + stats["spill_load_bytes"],
        spill_store_bytes=stats["spill_store_bytes"], spill_load_bytes=stats["spill_load_bytes"],
        shared_bytes=kernel.metadata.shared, shared_fits=kernel.metadata.shared <= SMEM_LIMIT[arch],
        instructions_per_element=None if ipe is None else round(ipe, 4), ipe_unit=unit,
        loop_instructions=stats["loop_instructions"], sass_instructions=stats["sass_instructions"],
        num_warps=warps, num_stages=job["num_stages"],
        wgmma=stats["wgmma"], mma=stats["mma"], cp_async=stats["cp_async"], tma=stats["tma"],
        wgmma_wait0=stats["wgmma_wait0"],
    )


def _analyse_indexed(i, arch, subset, only):
    return analyse(jobs(subset, only)[i], arch)


def report(archs=(90, 80), subset=False, workers=1, only=None):
    """All records, in job order, for the given archs."""
    js = jobs(subset, only)
    work = [(i, a) for a in archs for i in range(len(js)) if a in js[i]["archs"]]
    if workers <= 1 or len(work) <= 1:
        return [analyse(js[i], a) for i, a in work]
    n = len(work)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_analyse_indexed, [i for i, _ in work], [a for _, a in work], [subset] * n, [only] * n))


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------


def _table(records):
    head = f"{'kernel':16} {'mode':22} {'config':30} {'arch':5} {'regs':>4} {'spill':>6} {'smem':>7} " \
           f"{'ipe':>7} {'loop':>5} wgmma cp.async tma wait0"
    lines = [head, "-" * len(head)]
    for r in records:
        ipe = "-" if r["instructions_per_element"] is None else f"{r['instructions_per_element']:.3f}"
        smem = f"{r['shared_bytes'] // 1024}K" + ("" if r["shared_fits"] else "!")
        lines.append(f"{r['kernel']:16} {r['mode']:22} {r['config']:30} {r['arch']:5} {r['registers']:>4} "
                     f"{r['spill_bytes']:>6} {smem:>7} {ipe:>7} {str(r['loop_instructions'] or '-'):>5} "
                     f"{'y' if r['wgmma'] else '-':5} {'y' if r['cp_async'] else '-':8} {'y' if r['tma'] else '-':3} "
                     f"{'y' if r['wgmma_wait0'] else '-'}")
    return "\n".join(lines)


def summary(records):
    """Per (kernel, mode, arch): worst registers / spills and best / worst instructions per element."""
    groups = {}
    for r in records:
        groups.setdefault((r["kernel"], r["mode"], r["arch"]), []).append(r)
    rows = []
    for (k, m, a), rs in groups.items():
        ipes = [r["instructions_per_element"] for r in rs if r["instructions_per_element"] is not None]
        rows.append(dict(kernel=k, mode=m, arch=a, configs=len(rs), max_registers=max(r["registers"] for r in rs),
                         max_spill_bytes=max(r["spill_bytes"] for r in rs),
                         ipe_min=min(ipes) if ipes else None, ipe_max=max(ipes) if ipes else None,
                         wgmma=any(r["wgmma"] for r in rs), wgmma_wait0=any(r["wgmma_wait0"] for r in rs)))
    return rows


def markdown(records, before=None):
    """A per-(kernel, mode) table for RESULTS.md: sm_90 worst registers and spills, configs that
    spill on sm_90 / sm_80, instructions per element (best-worst config), configs whose main loop
    waits on its wgmma. `before`: an earlier report's records, shown as "now (before)"."""
    def groups(recs):
        g = {}
        for r in recs:
            g.setdefault((r["kernel"], r["mode"]), {}).setdefault(r["arch"], []).append(r)
        return g

    def cells(d):
        a, b = d.get("sm_90", []), d.get("sm_80", [])
        ipes = [r["instructions_per_element"] for r in a if r["instructions_per_element"] is not None]
        return [f"{len(a)}", f"{max(r['registers'] for r in a)}", f"{max(r['spill_bytes'] for r in a)}",
                f"{sum(1 for r in a if r['spill_bytes'])}/{len(a)}",
                f"{sum(1 for r in b if r['spill_bytes'])}/{len(b)}",
                f"{min(ipes):.2f}-{max(ipes):.2f}" if ipes else "-",
                f"{sum(1 for r in a if r['wgmma_wait0'])}/{len(a)}"]

    now, old = groups(records), groups(before or [])
    head = ["kernel", "mode", "configs", "max regs", "max spill B", "spilling sm_90", "spilling sm_80",
            "insn/elem sm_90", "wgmma wait 0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, d in now.items():
        c = cells(d)
        if key in old:
            c = [f"{x} ({y})" if x != y else x for x, y in zip(c, cells(old[key]))]
        lines.append("| " + " | ".join([key[0], key[1]] + c) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[80, 90])
    ap.add_argument("--json", type=Path, help="write the records here")
    ap.add_argument("--subset", action="store_true", help="only the spill-risk configs (what the test compiles)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--only", help='a regex over "kernel mode config": compile only those')
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md table")
    ap.add_argument("--before", type=Path, help="an earlier --json output to compare with (--markdown)")
    ap.add_argument("--from-json", type=Path, help="read records from this --json output instead of compiling")
    ap.add_argument("--summary", action="store_true", help="print the per-mode summary instead of every record")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.from_json:
        records = json.loads(a.from_json.read_text())
    else:
        records = report(tuple(a.arch), a.subset, a.jobs, a.only)
    if a.markdown:
        print(markdown(records, json.loads(a.before.read_text()) if a.before else None))
        return records
    if a.summary:
        for s in summary(records):
            print(json.dumps(s))
    else:
        print(_table(records))
    spills = [r for r in records if r["spill_bytes"]]
    print(f"\n{len(records)} compiles in {time.time() - t0:.0f} s; {len(spills)} with spills; "
          f"triton {triton.__version__}, ptxas {BIN / 'ptxas'}")
    if a.json:
        a.json.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")  # a record per line
    return records


if __name__ == "__main__":
    main()
