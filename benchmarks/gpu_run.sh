#!/usr/bin/env bash
# Everything deltakern checks on a CUDA GPU, in stages, for a machine whose Python already has
# torch, triton, transformers, peft, pytest and pytest-benchmark (no network needed). Run from the
# repository root:
#
#   OUT=gpu-out benchmarks/gpu_run.sh                 # all stages: build test bench e2e
#   OUT=gpu-out benchmarks/gpu_run.sh build test      # some of them (each fits in a few minutes)
#
# build  install deltakern in editable mode and compile deltakern._C for this GPU only
# test   pytest -m gpu (bit-exactness with bitsandbytes, parity with PEFT on the GPU) -> $OUT/gpu-tests.xml
# bench  benchmarks/run.py --only nf4 lora dora  -> $OUT/bench.json, $OUT/RESULTS.md
# e2e    benchmarks/bench_e2e.py (full size)     -> $OUT/e2e.json; E2E_ARGS adds options
# fsdp   tests/test_distributed.py's checks on NCCL, one process per GPU (FSDP2, DDP, DCP, deltas from
#        live shards, the example) -> $OUT/fsdp/report.json (not in the default stages)
#
# bench and e2e are skipped when the test stage of the same run failed (FORCE=1 runs them anyway).
# bitsandbytes wheels placed in .whl/ are installed into /tmp/site first (it is the peer and the
# test oracle). Copy $OUT/RESULTS.md to benchmarks/RESULTS.md once the numbers are reviewed.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
stages=${*:-build test bench e2e}
status=0
tests_failed=0

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF' | tee "$OUT/env.txt"
import importlib.metadata as md, torch
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None, "| torch", torch.__version__,
      "| cuda", torch.version.cuda)
for name in ("triton", "bitsandbytes", "peft", "transformers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
EOF

for stage in $stages; do
  echo "=== $stage ($(date +%T))"
  start=$SECONDS
  if [ "$tests_failed" = 1 ] && [ "${FORCE:-0}" != 1 ] && { [ "$stage" = bench ] || [ "$stage" = e2e ]; }; then
    echo "skipped: the GPU tests failed (FORCE=1 runs it anyway)"; continue
  fi
  case $stage in
    build)
      arch=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
      DELTAKERN_CUDA_ARCHS=${DELTAKERN_CUDA_ARCHS:-$arch} $PY -m pip install -q --no-build-isolation --no-deps -e . \
        > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; status=1; }
      if ! $PY -c "import deltakern.triton_kernels" 2>/dev/null; then
        # no editable install (e.g. no setuptools): run from the source tree, Triton kernels only
        ln -sfn ../triton_kernels deltakern/triton_kernels
        echo "editable install failed: running from the source tree (deltakern/triton_kernels -> triton_kernels)"
      fi
      $PY -c "import deltakern._ext as e; print('extension:', 'loaded' if e.available() else e.load_error())" \
        2>&1 | tee -a "$OUT/build.log" ;;
    test)
      $PY -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" -x -ra 2>&1 \
        | tee "$OUT/gpu-tests.log" | tail -40
      [ "${PIPESTATUS[0]}" = 0 ] || { status=1; tests_failed=1; } ;;
    bench)
      $PY benchmarks/run.py --only nf4 lora dora --out "$OUT/bench.json" --results-md "$OUT/RESULTS.md" \
        > "$OUT/bench.log" 2>&1 || status=1
      tail -60 "$OUT/bench.log" ;;
    e2e)
      # shellcheck disable=SC2086
      $PY benchmarks/bench_e2e.py --out "$OUT/e2e.json" ${E2E_ARGS:-} > "$OUT/e2e.log" 2>&1 || status=1
      tail -25 "$OUT/e2e.log" ;;
    fsdp)
      mkdir -p "$OUT/fsdp"
      OUT="$OUT/fsdp" $PY -m torch.distributed.run --nproc-per-node "$($PY -c 'import torch; print(torch.cuda.device_count())')" \
        tests/test_distributed.py > "$OUT/fsdp.log" 2>&1 || status=1
      tail -25 "$OUT/fsdp.log" ;;
    *) echo "unknown stage $stage (build test bench e2e fsdp)"; status=2 ;;
  esac
  echo "=== $stage done in $((SECONDS - start)) s"
done
exit $status
