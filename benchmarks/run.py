"""Run every op-family benchmark on the GPU and write the JSON and benchmarks/RESULTS.md.

python benchmarks/run.py --out results.json [--only nf4 lora dora e2e] [--results-md benchmarks/RESULTS.md]

`e2e` runs benchmarks/bench_e2e.py at its default (full) size; it has its own table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import require_cuda, table, write_json  # noqa: E402

# family -> (module, columns shown in the markdown table)
FAMILIES = {
    "nf4": ("benchmarks.bench_nf4", ["shape", "nested", "provider", "ms", "gbps", "of_copy"]),
    "lora": ("benchmarks.bench_lora", ["case", "N", "M", "provider", "fwd_bwd_ms", "fwd_ms", "tflops", "of_mm", "gbps", "peak_mib"]),
    "dora": ("benchmarks.bench_dora", ["N", "provider", "fwd_bwd_ms", "fwd_ms", "peak_mib"]),
    "e2e": ("benchmarks.bench_e2e", ["method", "tokens_per_s", "vs_peft", "step_ms", "peak_gib", "trainable_params",
                                     "final_loss"]),
}


def e2e_section(result: dict) -> list[str]:
    """bench_e2e's payload as markdown: one row per method, then the loss-curve comparisons."""
    from benchmarks.bench_e2e import BASELINE

    cfg, rows = result["config"], []
    for method, r in result["results"].items():
        base = result["results"].get(BASELINE.get(method, ""))
        rows.append({"method": method, "tokens_per_s": r["tokens_per_s"], "step_ms": r["step_ms"],
                     "vs_peft": r["tokens_per_s"] / base["tokens_per_s"] if base else None,
                     "peak_gib": r["peak_mib"] / 1024, "trainable_params": r["trainable_params"],
                     "final_loss": r["final_loss"]})
    lines = ["", "## e2e", "",
             f"Llama {cfg['layers']} layers, hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, heads "
             f"{cfg['heads']}/{cfg['kv_heads']}, vocab {cfg['vocab']}; batch {cfg['batch']} x {cfg['seq']} tokens; "
             f"r={cfg['rank']}; AdamW; {cfg['steps']} timed steps after {cfg['warmup']} warmup.", "",
             table(rows, FAMILIES["e2e"][1])]
    for key, c in result.get("loss_curves", {}).items():
        lines.append(f"- loss curve {key}: max |diff| {c['max_abs_diff']:.3g}, last {c['last_abs_diff']:.3g}")
    for method, why in {**result.get("skipped", {}), **result.get("errors", {})}.items():
        lines.append(f"- {method} not measured: {why}")
    return lines


def run_family(family: str, out: str) -> dict:
    module = importlib.import_module(FAMILIES[family][0])
    if family == "e2e":
        return module.main(["--out", out + ".e2e.json"])
    return module.run()


def markdown(results: dict) -> str:
    any_run = next(iter(results.values()))
    env, lines = any_run["env"], ["# Benchmark results", ""]
    lines.append(f"Device: {env.get('gpu')}; CUDA {env.get('cuda')}; torch {env['torch']}; triton {env.get('triton')}; "
                 f"bitsandbytes {env.get('bitsandbytes')}; peft {env.get('peft')}; "
                 f"written {time.strftime('%Y-%m-%d')} by benchmarks/run.py.")
    for family, result in results.items():
        if family == "e2e":
            lines += e2e_section(result)
            continue
        c = result["ceilings"]
        lines += ["", f"## {family}", "",
                  f"Ceilings measured in the same run: copy {c['copy_gbps']:.0f} GB/s, "
                  f"bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s.", ""]
        columns = [col for col in FAMILIES[family][1] if any(col in row for row in result["rows"])]
        lines.append(table(result["rows"], columns))
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results.json")
    parser.add_argument("--only", nargs="*", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--results-md", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    require_cuda()
    results = {}
    for family in args.only:
        results[family] = run_family(family, args.out)
        write_json(args.out, results)  # keep what finished if a later family fails
    text = markdown(results)
    print(text)
    if args.results_md:
        with open(args.results_md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
