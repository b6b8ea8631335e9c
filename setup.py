"""Build dino_fast and its native extension dino_fast._C.

The extension is compiled by CMake (CMakeLists.txt) against the torch already installed
in the environment, so install with ``pip install --no-build-isolation -e .`` (an isolated
build would not see that torch). ``DINO_FAST_NO_EXT=1`` skips the extension entirely;
``DINO_FAST_NO_CUDA=1`` builds only the CPU kernels even when torch has CUDA and nvcc is
found. ``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0") picks the CUDA architectures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"
MANIFEST = "_C_build.json"  # read by dino_fast/ops/native.py before it loads the module


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def find_tool(name: str, required: bool = True) -> str | None:
    """pip's cmake/ninja of this Python's environment first (found through their modules, so also
    when the venv is not activated or inherits its packages), then PATH: an older system cmake
    (Debian 12's 3.25) cannot configure CUDA at C++20."""
    dirs = [Path(sys.executable).parent]
    try:
        module = __import__(name)
        dirs.append(Path(getattr(module, "CMAKE_BIN_DIR", None) or module.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    found = next((hit for d in dirs if (hit := shutil.which(name, path=str(d)))), None) or shutil.which(name)
    if found is None and required:
        raise RuntimeError(f"building dino_fast._C needs `{name}`: pip install {name}")
    return found


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home, "bin", "nvcc")] if cuda_home else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.insert(0, Path(on_path))
    return next((str(c) for c in candidates if c.exists()), None)


# The sources are C++17 and C++20 clean (CI builds them against torch 2.11 and 2.14); each build
# uses the standard this torch's own headers demand, the one its own extensions are compiled with.
def torch_cxx_standard(include_dir: Path) -> int:
    """What ATen.h demands: "C++17 or later" in torch 2.11, "C++20 or later" in 2.14."""
    text = (include_dir / "ATen" / "ATen.h").read_text(errors="replace")
    demanded = [int(n) for n in re.findall(r"#\s*error\s+C\+\+(\d+) or later", text)]
    return max([17, *demanded])


def require_bdist_wheel() -> None:
    """pip's editable and wheel builds run setuptools' bdist_wheel, which setuptools < 70.1 leaves
    to the separate `wheel` package; --no-build-isolation does not install either, and the bare
    error is "invalid command 'bdist_wheel'". Say what to install instead."""
    wheel_commands = {"dist_info", "bdist_wheel", "editable_wheel"}
    if not wheel_commands.intersection(sys.argv[1:]):
        return
    try:
        from setuptools.command.bdist_wheel import bdist_wheel  # noqa: F401  (setuptools >= 70.1)
    except ImportError:
        try:
            import wheel  # noqa: F401
        except ImportError:
            sys.exit(
                "dino_fast: this setuptools has no bdist_wheel and the `wheel` package is missing, "
                "which `pip install --no-build-isolation` does not install for you. Run "
                "`pip install 'setuptools>=70.1' wheel` first (the README's install line does)."
            )


def cuda_archs_for_cmake() -> str:
    """ "8.0;9.0+PTX" (torch's spelling) -> "80-real;90" (CMake's)."""
    archs = []
    for arch in os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS).replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        number = arch.removesuffix("+PTX").replace(".", "")
        archs.append(number if ptx else f"{number}-real")
    # Always keep PTX for the newest arch so newer GPUs can JIT it.
    if archs and archs[-1].endswith("-real"):
        archs[-1] = archs[-1].removesuffix("-real")
    return ";".join(archs)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import pybind11
            import torch
            from torch.utils import cpp_extension
        except ImportError as err:
            raise RuntimeError(
                f"building dino_fast._C needs torch and pybind11 importable ({err}). Install torch "
                "first, then run `pip install --no-build-isolation -e .`; or set DINO_FAST_NO_EXT=1 "
                "to install without the native extension."
            ) from err

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        ext_dir = ext_path.parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)

        nvcc = None if env_flag("DINO_FAST_NO_CUDA") else find_nvcc()
        with_cuda = torch.version.cuda is not None and nvcc is not None
        torch_lib_dir = Path(torch.__file__).parent / "lib"
        cxx_standard = torch_cxx_standard(Path(torch.__file__).parent / "include")
        cmake = find_tool("cmake")
        configure = [
            cmake,
            str(ROOT),
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBRARY_DIR={torch_lib_dir}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DTORCH_VERSION={torch.__version__}",
            f"-DDINO_FAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DDINO_FAST_CXX_STANDARD={cxx_standard}",
        ]
        if with_cuda:
            configure += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs_for_cmake()}",
            ]
        ninja = find_tool("ninja", required=False)
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)

        # Written next to the module so dino_fast can compare torch versions *before* loading
        # the .so: a module built against another torch can crash at load time.
        manifest = {"torch_version": torch.__version__, "cuda": with_cuda}
        (ext_dir / MANIFEST).write_text(json.dumps(manifest) + "\n")

    def copy_extensions_to_source(self) -> None:
        """Editable installs copy the module into the source tree; its manifest goes along."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            built = Path(regular_file).parent / MANIFEST
            if built.exists():
                shutil.copyfile(built, Path(inplace_file).parent / MANIFEST)


require_bdist_wheel()
ext_modules = [] if env_flag("DINO_FAST_NO_EXT") else [CMakeExtension("dino_fast._C")]

setup(
    packages=[
        "dino_fast",
        "dino_fast.ops",
        "dino_fast.models",
        "dino_fast.official",
        "dino_fast.data",
        "dino_fast.train",
        "dino_fast.eval",
        "dino_fast.kernels",
    ],
    package_dir={"dino_fast": "dino_fast", "dino_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
