"""Run every op-family benchmark on the GPU and write the JSON and benchmarks/RESULTS.md.

python benchmarks/run.py --out results.json [--only nf4 lora dora] [--results-md benchmarks/RESULTS.md]
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
}


def markdown(results: dict) -> str:
    any_run = next(iter(results.values()))
    env, lines = any_run["env"], ["# Benchmark results", ""]
    lines.append(f"Device: {env.get('gpu')}; CUDA {env.get('cuda')}; torch {env['torch']}; triton {env.get('triton')}; "
                 f"bitsandbytes {env.get('bitsandbytes')}; peft {env.get('peft')}; "
                 f"written {time.strftime('%Y-%m-%d')} by benchmarks/run.py.")
    for family, result in results.items():
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
        results[family] = importlib.import_module(FAMILIES[family][0]).run()
        write_json(args.out, results)  # keep what finished if a later family fails
    text = markdown(results)
    print(text)
    if args.results_md:
        with open(args.results_md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
