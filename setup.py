"""Build script for deltakern.

The Python packages install as usual. The native CPU kernels (csrc/cpu/*.cpp) compile with the host
C++ compiler into a second pybind11 module, deltakern._cpu: OpenMP, -O3, -ffp-contract=off, one
translation unit per instruction set (scalar; AVX2+FMA+F16C and AVX-512 on x86-64) chosen at run
time. If that compile fails the install goes on without it (pure-Python CPU path) after one notice.
When nvcc is found (PATH, then $CUDA_HOME/bin, $CUDA_PATH/bin),
every csrc/*.cu and csrc/*.cpp is compiled into ONE extension module, deltakern._C, by a build.ninja
written into the build temp dir: nvcc for .cu, the host C++ compiler for .cpp, one `nvcc -shared`
link with the CUDA runtime linked statically. The binding uses pybind11 and passes device pointers
as integers (no torch C++ API), so one build serves every torch version.

Environment:
  DELTAKERN_BUILD_CUDA=0       skip the CUDA extension deltakern._C
  DELTAKERN_BUILD_CPU=0        skip the CPU extension deltakern._cpu
  DELTAKERN_CUDA_ARCHS="80;90" target architectures ("9.0", "90", "sm_90", "90a" accepted; separators
                               ';', ',' or spaces); default 80;86;89;90. PTX of the highest is added.
  MAX_JOBS=N                   parallel compile jobs (ninja -j)
  CXX                          host compiler for .cpp files and deltakern._cpu (default c++)
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

VERSION = "0.1.0"
ROOT = Path(__file__).resolve().parent
EXT_NAME = "deltakern._C"
CPU_EXT_NAME = "deltakern._cpu"
CPU_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fopenmp", "-ffp-contract=off"]
CPU_ISA_FLAGS = {  # translation unit -> its -m flags (x86-64 only); the rest compile portable
    "cpu_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "cpu_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "cpu_quantize_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "cpu_lowrank_avx2.cpp": ["-mavx2", "-mfma", "-ffp-contract=fast"],
    "cpu_lowrank_avx512.cpp": ["-mavx512f", "-mavx512vl", "-mfma", "-ffp-contract=fast"],
}
CPU_UNIT_FLAGS = {"cpu_lowrank_scalar.cpp": ["-ffp-contract=fast"]}  # portable units' extra flags
DEFAULT_ARCHS = ("80", "86", "89", "90")


def find_nvcc() -> str | None:
    """Path of nvcc, or None: PATH first, then $CUDA_HOME/bin and $CUDA_PATH/bin."""
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def parse_archs(spec: str | None) -> list[str]:
    """'8.0;9.0' / '80,90' / 'sm_90' / '90a' / '9.0+PTX' -> ['80', '90'] (sorted, unique)."""
    if not spec or not spec.strip():
        return list(DEFAULT_ARCHS)
    archs = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(?:\+PTX)?", tok, re.IGNORECASE)
        if not m:
            raise ValueError(f"DELTAKERN_CUDA_ARCHS: cannot parse {tok!r} (expected e.g. 90, 9.0 or sm_90)")
        arch = m.group(1) + (m.group(2) or "") + m.group(3).lower()
        if arch not in archs:
            archs.append(arch)
    return sorted(archs, key=lambda a: (int(re.match(r"\d+", a).group()), a))


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch plus forward-compatible PTX for the highest (arch suffix dropped)."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = re.match(r"\d+", archs[-1]).group()
    flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def _ninja_path(p: Path | str) -> str:
    return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja_bin() -> str:
    try:
        import ninja

        cand = Path(ninja.BIN_DIR) / "ninja"
        if cand.is_file():
            return str(cand)
    except ImportError:
        pass
    found = shutil.which("ninja")
    if not found:
        raise RuntimeError("building deltakern._C needs ninja: pip install ninja")
    return found


def write_build_ninja(build_dir: Path, nvcc: str, archs: list[str]) -> Path:
    """Write build_dir/build.ninja that compiles csrc/ into build_dir/_C.so; returns the .so path."""
    import pybind11

    includes = [str(ROOT / "csrc"), pybind11.get_include(), sysconfig.get_paths()["include"]]
    plat = sysconfig.get_paths().get("platinclude")
    if plat and plat not in includes:
        includes.append(plat)
    inc = " ".join(f"-I{i}" for i in includes)
    cxx = os.environ.get("CXX", "c++")
    arch_tag = "_".join(archs)

    cu = sorted((ROOT / "csrc").glob("*.cu"))
    cpp = sorted((ROOT / "csrc").glob("*.cpp"))
    if not cu and not cpp:
        raise RuntimeError("no sources under csrc/")
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"cxx = {cxx}",
        f"cuda_flags = -O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden {inc} "
        f"-DDELTAKERN_VERSION={VERSION} -DDELTAKERN_CUDA_ARCHS={arch_tag} " + " ".join(gencode_flags(archs)),
        f"cxx_flags = -O3 -std=c++17 -fPIC -fvisibility=hidden {inc} -DDELTAKERN_VERSION={VERSION}",
        # static cudart; --exclude-libs keeps its symbols private to this module
        "ldflags = -shared -cudart static -Xlinker --exclude-libs,ALL",
        "",
        "rule cuda",
        "  command = $nvcc $cuda_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
        "rule cxx",
        "  command = $cxx $cxx_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "rule link",
        "  command = $nvcc $in -o $out $ldflags",
        "  description = LINK $out",
        "",
    ]
    objs = []
    for src in cu + cpp:
        obj = f"{src.name}.o"
        objs.append(obj)
        lines.append(f"build {obj}: {'cuda' if src.suffix == '.cu' else 'cxx'} {_ninja_path(src)}")
    lines += [f"build _C.so: link {' '.join(objs)}", "default _C.so", ""]
    build_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    path = build_dir / "build.ninja"
    if not path.is_file() or path.read_text() != text:  # keep ninja's incremental state when unchanged
        path.write_text(text)
    return build_dir / "_C.so"


def _off(var: str) -> bool:
    return os.environ.get(var, "1").strip().lower() in ("0", "false", "no", "off")


def cpu_sources() -> list[Path]:
    """csrc/cpu/*.cpp for this machine: the ISA units only on x86-64."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    return [p for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp")) if x86 or p.name not in CPU_ISA_FLAGS]


def build_cpu_module(target: Path, build_dir: Path) -> None:
    """Compile csrc/cpu into the shared object `target` with the host compiler (two jobs at a time,
    objects rebuilt only when older than their source or a header). Raises on any failure."""
    import pybind11

    cxx = os.environ.get("CXX", "c++")
    srcs = cpu_sources()
    includes = [pybind11.get_include(), sysconfig.get_paths()["include"], sysconfig.get_paths().get("platinclude")]
    inc = [f"-I{i}" for i in dict.fromkeys(i for i in includes if i)]
    defs = [f"-DDK_HAVE_{n[4:-4].upper()}" for n in CPU_ISA_FLAGS if any(p.name == n for p in srcs)]
    headers = list((ROOT / "csrc" / "cpu").glob("*.h"))
    newest_dep = max((h.stat().st_mtime for h in headers), default=0.0)
    build_dir.mkdir(parents=True, exist_ok=True)
    jobs, objs = [], []
    for src in srcs:
        obj = build_dir / (src.name + ".o")
        objs.append(str(obj))
        if obj.is_file() and obj.stat().st_mtime > max(src.stat().st_mtime, newest_dep):
            continue
        cmd = [cxx, *CPU_FLAGS, *CPU_ISA_FLAGS.get(src.name, []), *CPU_UNIT_FLAGS.get(src.name, []), *inc, *defs, "-c", str(src), "-o", str(obj)]
        jobs.append((cmd, obj))
    width = max(1, int(os.environ.get("MAX_JOBS", "2")))
    for i in range(0, len(jobs), width):
        procs = [(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), obj)
                 for cmd, obj in jobs[i:i + width]]
        for proc, obj in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                obj.unlink(missing_ok=True)
                raise RuntimeError(f"{cxx} failed on {obj.name[:-2]}: {out.strip().splitlines()[-1] if out.strip() else ''}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")  # then renamed: a process that has the old module loaded keeps it
    link = subprocess.run([cxx, "-shared", "-fopenmp", *objs, "-o", str(tmp)], capture_output=True, text=True)
    if link.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"linking {target.name} failed: {(link.stdout + link.stderr).strip()[-300:]}")
    os.replace(tmp, target)


class NinjaBuildExt(build_ext):
    """build_ext that builds deltakern._C with nvcc + ninja (or skips it without nvcc) and
    deltakern._cpu with the host compiler (or, if that fails, goes on without it)."""

    def run(self):
        if _off("DELTAKERN_BUILD_CPU"):
            print("deltakern: DELTAKERN_BUILD_CPU=0: installing without the CPU extension deltakern._cpu", file=sys.stderr)
            self.extensions = [e for e in self.extensions if e.name != CPU_EXT_NAME]
        skip = None
        if _off("DELTAKERN_BUILD_CUDA"):
            skip = "DELTAKERN_BUILD_CUDA=0"
        elif find_nvcc() is None:
            skip = "nvcc not found on PATH or in $CUDA_HOME/bin"
        if skip:
            print(
                f"deltakern: {skip}: installing without the CUDA extension deltakern._C "
                "(Triton / PyTorch backends only)",
                file=sys.stderr,
            )
            self.extensions = [e for e in self.extensions if e.name != EXT_NAME]
            for stale in (Path(self.build_lib) / "deltakern").glob("_C.*"):  # from an earlier build
                stale.unlink()
        super().run()

    def build_extension(self, ext):
        if ext.name == CPU_EXT_NAME:
            target = Path(self.get_ext_fullpath(ext.name))
            try:
                build_cpu_module(target, Path(self.build_temp).resolve() / "deltakern_cpu")
            except Exception as exc:  # no compiler, no OpenMP, no pybind11...: stay pure Python
                target.unlink(missing_ok=True)
                print(f"deltakern: the CPU extension {CPU_EXT_NAME} was not built ({exc}); "
                      "CPU ops use the pure-torch references", file=sys.stderr)
            return
        if ext.name != EXT_NAME:
            return super().build_extension(ext)
        archs = parse_archs(os.environ.get("DELTAKERN_CUDA_ARCHS"))
        build_dir = Path(self.build_temp).resolve() / "deltakern_C"
        so = write_build_ninja(build_dir, find_nvcc(), archs)
        cmd = [_ninja_bin(), "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        print(f"deltakern: building {EXT_NAME} for sm_{', sm_'.join(archs)}: {' '.join(cmd)}", file=sys.stderr)
        subprocess.run(cmd, check=True)  # a failed compile fails the install
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(so, target)


def _packages() -> list[str]:
    from setuptools import find_packages

    # deltakern/triton_kernels may also exist as a symlink in a checkout: dedupe, the mapping wins
    pkgs = find_packages(include=["deltakern", "deltakern.*"])
    pkgs += ["deltakern.triton_kernels"] + [f"deltakern.triton_kernels.{p}" for p in find_packages(where="triton_kernels")]
    return sorted(set(pkgs))


if __name__ == "__main__":
    setup(
        name="deltakern",
        version=VERSION,
        description="Fused GPU kernels for delta-tuning (LoRA, DoRA, adapters, NF4 bases)",
        python_requires=">=3.10",
        packages=_packages(),
        package_dir={"deltakern.triton_kernels": "triton_kernels"},
        package_data={"deltakern.data": ["*.jsonl"]},  # the demo's labelled texts
        entry_points={"console_scripts": ["deltakern=deltakern.cli:main"]},
        ext_modules=[
            Extension(
                EXT_NAME,
                sources=sorted(str(p.relative_to(ROOT)) for ext in ("cu", "cpp") for p in (ROOT / "csrc").glob(f"*.{ext}")),
                depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h")),
            ),
            Extension(
                CPU_EXT_NAME,
                sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp")),
                depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.h")),
            ),
        ],
        cmdclass={"build_ext": NinjaBuildExt},
        install_requires=[
            "torch>=2.4",
            "triton>=3.0; platform_system=='Linux'",
            "safetensors",
            "tqdm",
        ],
        extras_require={
            "test": [
                "pytest",
                "pytest-benchmark",
                "hypothesis",
                "bitsandbytes==0.50.2",
                "peft==0.21.0",
                "transformers",
            ],
        },
        zip_safe=False,
    )
