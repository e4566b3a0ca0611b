"""How often the reciprocal's rounding changes an NF4 / nested 8-bit code (CPU only; no timing).

bitsandbytes' CUDA quantizer scales each block by rcp.approx.ftz(absmax), within 1 ulp of 1/absmax;
deltakern's CPU reference uses the correctly rounded 1/absmax. The hardware value is the correctly
rounded one or its neighbour on the other side of 1/absmax, so the codes that can differ are those
that change when the reciprocal moves 1 ulp up or down. This script counts them on realistic weights
(randn * 0.02, [4096, 4096] by default) with the CUDA emulation of tests/nf4_cuda_oracle.py, and
also counts where bitsandbytes' CPU backend (when installed) disagrees with the CUDA rule.

    python benchmarks/nf4_rcp_rate.py --weights-4bit 2 --weights-nested 256 --out rcp_rate.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import nf4_cuda_oracle as oracle  # noqa: E402

from deltakern import _codes  # noqa: E402

VARIANTS = {"down": oracle.recip_ulp(-1), "up": oracle.recip_ulp(+1)}


def weight(seed, shape, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def nibble_changes(w, blocksize, chunk_blocks=1 << 14):
    """{variant: nibbles whose code differs from the correctly rounded reciprocal's}, and the count."""
    x = w.float().reshape(-1).numpy()
    counts = {k: 0 for k in (*VARIANTS, "either")}
    step = chunk_blocks * blocksize
    for start in range(0, x.size, step):
        part = x[start:start + step]
        base = oracle.nf4_tree(oracle.scale_blocks(part, blocksize)[0])
        changed = np.zeros(base.shape, dtype=bool)
        for name, recip in VARIANTS.items():
            diff = oracle.nf4_tree(oracle.scale_blocks(part, blocksize, recip)[0]) != base
            counts[name] += int(diff.sum())
            changed |= diff
        counts["either"] += int(changed.sum())
    return counts, x.size


def nested_changes(w, blocksize, code2):
    """The same for the 8-bit codes of the double-quantized absmax (whose values do not depend on
    the reciprocal: absmax = max|x| is exact)."""
    absmax = w.float().reshape(-1, blocksize).abs().amax(dim=1)
    x = (absmax - absmax.mean()).numpy()
    base = oracle.quantize_8bit(x, code2)[0]
    counts, changed = {}, np.zeros(base.shape, dtype=bool)
    for name, recip in VARIANTS.items():
        diff = oracle.quantize_8bit(x, code2, 256, recip)[0] != base
        counts[name] = int(diff.sum())
        changed |= diff
    counts["either"] = int(changed.sum())
    return counts, x.size


def exhaustive_pairs(dtype):
    """Every (absmax, x) pair of a 16-bit dtype whose NF4 code can change with the reciprocal's last
    bit: (pairs that change, pairs). z = fp32(x * fp32(1/absmax)) is invariant under scaling both by
    a power of two (normal range), so absmax runs over [1, 2) and x over +-[2**-6, absmax] (below,
    |z| < 2**-5 lies under every threshold's magnitude: code 7 whatever the reciprocal)."""
    one_two = torch.arange(1.0, 2.0, 2.0**-10).to(dtype).unique()
    xs = torch.cat([torch.arange(2.0**k, 2.0**(k + 1), 2.0**(k - 10)) for k in range(-6, 1)]).to(dtype).unique().float()
    xs = torch.cat([xs, -xs]).numpy()
    changed = total = 0
    for a in one_two.float().numpy():
        x = xs[np.abs(xs) <= a]
        a_ = np.full(1, a, dtype=np.float32)
        base = oracle.nf4_tree(oracle.ftz(x * oracle.recip_correct(a_)))
        diff = np.zeros(x.shape, dtype=bool)
        for recip in VARIANTS.values():
            diff |= oracle.nf4_tree(oracle.ftz(x * recip(a_))) != base
        changed += int(diff.sum())
        total += x.size
    return changed, total


def bnb_cpu_disagreement(w, blocksize, code2):
    """Fractions of nibbles / nested codes where bitsandbytes' CPU backend differs from the CUDA rule."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    want = oracle.quantize(w, blocksize, True, code2)
    nib = lambda p: torch.stack([p.reshape(-1) >> 4, p.reshape(-1) & 15], 1).reshape(-1)  # noqa: E731
    return {
        "nibbles": int((nib(packed) != nib(want["packed"])).sum()), "n_nibbles": 2 * packed.numel(),
        "nested": int((state.absmax != want["absmax"]).sum()), "n_nested": state.absmax.numel(),
        "offset_equal": bool(state.offset.item() == want["offset"].item()),
        "nested_absmax_equal": bool(torch.equal(state.state2.absmax, want["nested_absmax"])),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 4096))
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--weights-4bit", type=int, default=2, help="weights for the 4-bit code count")
    p.add_argument("--weights-nested", type=int, default=256, help="weights for the nested code count")
    p.add_argument("--weights-bnb", type=int, default=2, help="weights compared with bitsandbytes' CPU backend")
    p.add_argument("--exhaustive", nargs="*", default=["bfloat16", "float16"], help="dtypes to enumerate")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    code2 = _codes.dynamic_map().numpy()
    t0 = time.time()
    res = {"config": {**vars(a), "shape": list(a.shape)}, "nibbles": {}, "nested": {}}
    for key, n_weights, fn in (("nibbles", a.weights_4bit, nibble_changes), ("nested", a.weights_nested, nested_changes)):
        total, counts = 0, {}
        for seed in range(n_weights):
            args = (weight(seed, a.shape, dtype), a.blocksize) + ((code2,) if key == "nested" else ())
            c, n = fn(*args)
            total += n
            counts = {k: counts.get(k, 0) + v for k, v in c.items()}
        res[key] = {"codes": total, **{k: v for k, v in counts.items()},
                    **{f"rate_{k}": v / max(total, 1) for k, v in counts.items()}}
        print(f"{key}: {total} codes; changed by a 1-ulp reciprocal: "
              + ", ".join(f"{k} {v} ({v / max(total, 1):.2e})" for k, v in counts.items()), flush=True)
    res["exhaustive_4bit"] = {}
    for name in a.exhaustive:
        changed, total = exhaustive_pairs(getattr(torch, name))
        res["exhaustive_4bit"][name] = {"changed": changed, "pairs": total}
        print(f"every {name} (absmax, x) pair: {changed} of {total} NF4 codes can change with the reciprocal", flush=True)
    try:
        import bitsandbytes  # noqa: F401

        if not a.weights_bnb:
            raise ImportError
        rows = [bnb_cpu_disagreement(weight(10_000 + s, a.shape, dtype), a.blocksize, code2) for s in range(a.weights_bnb)]
        agg = {k: sum(r[k] for r in rows) for k in ("nibbles", "n_nibbles", "nested", "n_nested")}
        agg["offset_equal"] = all(r["offset_equal"] for r in rows)
        agg["nested_absmax_equal"] = all(r["nested_absmax_equal"] for r in rows)
        res["bnb_cpu_vs_cuda_rule"] = agg
        print(f"bitsandbytes CPU vs the CUDA rule: nibbles {agg['nibbles']}/{agg['n_nibbles']} "
              f"({agg['nibbles'] / agg['n_nibbles']:.2e}), nested codes {agg['nested']}/{agg['n_nested']} "
              f"({agg['nested'] / agg['n_nested']:.2e}); offsets equal {agg['offset_equal']}, "
              f"nested absmax equal {agg['nested_absmax_equal']}")
    except ImportError:
        print("bitsandbytes' CPU backend not compared (not installed, or --weights-bnb 0)")
    res["seconds"] = round(time.time() - t0, 1)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
