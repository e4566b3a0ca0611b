# make demo  - set up a virtual environment and run the main job: QLoRA fine-tuning of
#              all-MiniLM-L6-v2 (DEMO_ARGS="--method dora" etc. picks another method, see `deltakern demo -h`)
# make test  - set up the same environment and run the tests (CPU, Triton interpreter, extension build)
# make gpu-test / make bench - on a machine with a CUDA GPU (benchmarks/gpu_run.sh: all GPU checks in stages)
# make kernel-report - no GPU needed: every Triton kernel x mode x autotune config compiled for sm_90 and
#              sm_80, registers / spills / shared memory / SASS instructions per element
#              (benchmarks/kernel_report.json; the RESULTS.md "static" section comes from it)
# make bench-cpu - the CPU lane, no GPU (a few minutes on 2 cores): deltakern vs copy, dense torch, bitsandbytes
#              and PEFT, round-robin in one run; writes the CPU section of benchmarks/RESULTS.md
#              (BENCH_CPU_ARGS="--threads 2 --sections layer" etc.)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.deltakern-installed
DEMO_ARGS ?=
BENCH_CPU_ARGS ?=

.PHONY: setup demo test gpu-test bench bench-cpu kernel-report clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*) $(wildcard csrc/cpu/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(PY) -m deltakern demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q -m "not gpu" tests

gpu-test: setup
	$(PY) -m pytest -q -m gpu tests

bench: setup
	$(PY) benchmarks/run.py --out benchmarks/results.json --results-md benchmarks/RESULTS.md

kernel-report: setup
	$(PY) benchmarks/kernel_report.py --json benchmarks/kernel_report.json --summary

bench-cpu: setup
	$(PY) benchmarks/bench_cpu.py --out benchmarks/results-cpu.json --results-md benchmarks/RESULTS.md $(BENCH_CPU_ARGS)

clean:
	rm -rf build *.egg-info deltakern/_C*.so $(VENV)
