"""How the multi-scale deformable attention kernels are built: the extension ``deformable_detr_ops._C``
that the project's ``setup.py`` compiles on ``pip install`` (its sources are ``ops/csrc``).

The CPU kernel is always built; the CUDA kernel too whenever torch has CUDA and nvcc is
found, with or without a visible GPU. This module imports torch only inside ``extension()``,
after CUDA_HOME is settled, because torch.utils.cpp_extension reads it once at import.

Environment:
    MS_DEFORM_ATTN_CUDA     "0": CPU only; "1": CUDA required (fail without nvcc);
                            unset or "auto": CUDA when available.
    TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0+PTX". Default: 7.0 to 9.0
                            plus PTX, limited to what the installed nvcc supports.
    CUDA_HOME               CUDA toolkit to use (default: found from nvcc).
    MAX_JOBS                parallel compile jobs (ninja).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

DEFAULT_ARCHES = ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0"]
SOURCES = ["ops/csrc/library.cpp", "ops/csrc/ms_deform_attn_cpu.cpp", "ops/csrc/hash_dropout_cpu.cpp"]
CUDA_SOURCES = ["ops/csrc/ms_deform_attn_cuda.cu"]
EXTENSION_NAME = "deformable_detr_ops._C"


def nvcc_path(home):
    for name in ("nvcc", "nvcc.exe"):
        path = os.path.join(home, "bin", name)
        if os.path.isfile(path):
            return path
    return None


def has_toolkit(home):
    return nvcc_path(home) is not None and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def nvcc_version(nvcc):
    """(major, minor) of nvcc, e.g. (13, 0); None if it cannot say."""
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_cuda_home():
    """Toolkit root: CUDA_HOME / CUDA_PATH, else the one around nvcc, else /usr/local/cuda*.

    torch guesses the toolkit as the parent of the first nvcc on PATH, which is
    wrong when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc); this
    only accepts directories that hold both nvcc and the CUDA headers.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for home in candidates:
        if has_toolkit(home):
            return home
    return None


def cuda_mode():
    mode = os.environ.get("MS_DEFORM_ATTN_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto", ""):
        sys.exit(f"MS_DEFORM_ATTN_CUDA must be 0, 1 or auto, got {mode!r}")
    return mode or "auto"


def supported_arches(nvcc):
    """Compute capabilities nvcc can compile for, e.g. {"7.5", "8.0"}; None if it cannot say."""
    try:
        listing = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    arches = set()
    for word in listing.split():
        if word.startswith("compute_") and word[len("compute_"):].isdigit():
            number = word[len("compute_"):]
            arches.add(f"{number[:-1]}.{number[-1]}")
    return arches or None


def default_arch_list(nvcc):
    supported = supported_arches(nvcc)
    arches = [a for a in DEFAULT_ARCHES if supported is None or a in supported]
    if not arches:
        sys.exit(f"{nvcc} supports none of the default architectures {DEFAULT_ARCHES}; set TORCH_CUDA_ARCH_LIST")
    return ";".join(arches) + "+PTX"


def cuda_unavailable(mode, cuda_home, torch_cuda):
    """Why the CUDA kernel is not built, or None when it is."""
    if mode == "0":
        return "MS_DEFORM_ATTN_CUDA=0"
    if torch_cuda is None:
        return "torch has no CUDA"
    if cuda_home is None or nvcc_path(cuda_home) is None:
        return "no CUDA toolkit (nvcc) was found"
    version = nvcc_version(nvcc_path(cuda_home))
    # torch refuses to build with an nvcc of another major version than its own CUDA;
    # without a forced CUDA build, the CPU kernel alone is more useful than a failed build.
    if mode == "auto" and version is not None and str(version[0]) != torch_cuda.split(".")[0]:
        return f"nvcc {version[0]}.{version[1]} in {cuda_home} does not match torch's CUDA {torch_cuda}"
    return None


def extension():
    """The extension to build and the ``build_ext`` command class, as ``(extension, cmdclass)``.

    Source paths are relative to the repository root, where setuptools runs."""
    mode = cuda_mode()
    cuda_home = find_cuda_home() if mode != "0" else None
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads it once.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    reason = cuda_unavailable(mode, cuda_home, torch.version.cuda)
    with_cuda = reason is None
    if mode == "1" and not with_cuda:
        sys.exit(f"MS_DEFORM_ATTN_CUDA=1 but {reason}; set CUDA_HOME or build CPU-only with MS_DEFORM_ATTN_CUDA=0")

    # -g0: the interpreter's default flags ask for debug info, which only slows the build.
    # -ffp-contract=fast: let the AVX2 loops use fused multiply-adds, which -std=c++XX turns off.
    cxx_flags = ["-O3", "-g0", "-ffp-contract=fast"] if os.name != "nt" else ["/O2"]
    link_flags = []
    # at::parallel_for only runs in parallel in code compiled with OpenMP.
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    elif os.name == "nt":
        cxx_flags.append("/openmp")

    if with_cuda:
        nvcc = nvcc_path(cuda_home)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(nvcc)
        # Compile the architectures of the one .cu file in parallel.
        threads = max(1, min(len(os.environ["TORCH_CUDA_ARCH_LIST"].split(";")), os.cpu_count() or 1))
        ext = CUDAExtension(
            EXTENSION_NAME,
            SOURCES + CUDA_SOURCES,
            define_macros=[("MS_DEFORM_ATTN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", f"--threads={threads}"]},
            extra_link_args=link_flags,
        )
        print(f"ms_deform_attn: building CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = CppExtension(EXTENSION_NAME, SOURCES, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
        print(f"ms_deform_attn: building the CPU kernel only ({reason})")
    return ext, {"build_ext": BuildExtension.with_options(use_ninja=True)}
