"""Build script for deltakern.

The Python packages install as usual. When nvcc is found (PATH, then $CUDA_HOME/bin, $CUDA_PATH/bin),
every csrc/*.cu and csrc/*.cpp is compiled into ONE extension module, deltakern._C, by a build.ninja
written into the build temp dir: nvcc for .cu, the host C++ compiler for .cpp, one `nvcc -shared`
link with the CUDA runtime linked statically. The binding uses pybind11 and passes device pointers
as integers (no torch C++ API), so one build serves every torch version.

Environment:
  DELTAKERN_BUILD_CUDA=0       skip the extension (pure-Python install)
  DELTAKERN_CUDA_ARCHS="80;90" target architectures ("9.0", "90", "sm_90", "90a" accepted; separators
                               ';', ',' or spaces); default 80;86;89;90. PTX of the highest is added.
  MAX_JOBS=N                   parallel compile jobs (ninja -j)
  CXX                          host compiler for .cpp files (default c++)
"""

from __future__ import annotations

import os
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


class NinjaBuildExt(build_ext):
    """build_ext that builds deltakern._C with nvcc + ninja, or skips it without nvcc."""

    def run(self):
        skip = None
        if os.environ.get("DELTAKERN_BUILD_CUDA", "1").strip().lower() in ("0", "false", "no", "off"):
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
            )
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
