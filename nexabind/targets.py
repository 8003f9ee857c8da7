"""What nexabind builds and installs: targets, variants, CMake flags, artifact and library names.

A *target* is an ``(os, arch)`` in the names :func:`nexabind.platform.target` uses; a *variant*
is the GPU backend a build carries (``cpu`` has none). Every ``(os, arch, variant)`` that CI
builds has an entry in :data:`FLAGS`; its artifact is :func:`artifact_name` and it installs into
the cache folder :func:`key`, whose ``lib/`` holds :func:`library_names`.
"""

from __future__ import annotations

import re

from nexabind import pin
from nexabind.errors import BuildError
from nexabind.platform import Platform, detect, target

__all__ = [
    "COMMON_FLAGS",
    "FLAGS",
    "LIBRARY_NAMES",
    "SERVER_FLAGS",
    "OSES",
    "VARIANTS",
    "ARM64_CPU_VARIANTS",
    "X86_CPU_VARIANTS",
    "artifact_name",
    "cmake_flags",
    "cpu_variant_of",
    "cpu_variant_scores",
    "key",
    "library_names",
    "parse_target",
    "variant_order",
    "variant_order_here",
    "variants_for",
]

#: Operating systems artifacts are built for.
OSES = ("linux", "macos", "windows")
#: Every variant, in the order they are preferred when usable.
VARIANTS = ("cuda", "vulkan", "metal", "cpu")

#: The libraries every ``lib/`` folder holds, per os, in the order they are loaded:
#: ggml-base, ggml, llama (the ggml backend modules come beside them).
LIBRARY_NAMES: dict[str, tuple[str, str, str]] = {
    "linux": ("libggml-base.so", "libggml.so", "libllama.so"),
    "macos": ("libggml-base.dylib", "libggml.dylib", "libllama.dylib"),
    "windows": ("ggml-base.dll", "ggml.dll", "llama.dll"),
}

#: CMake flags every build gets.
COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_CURL=OFF",
    f"-DLLAMA_BUILD_COMMIT={pin.LLAMA_COMMIT}",
    # The RPC backend (one more backend module): remote devices over TCP, and the server side
    # that `nexabind rpc-server` runs.
    "-DGGML_RPC=ON",
)

_CPU_ALL = ("-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF")
_CUDA = (*_CPU_ALL, "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=61;70;75;80;86;89;90")
_VULKAN = (*_CPU_ALL, "-DGGML_VULKAN=ON")

#: Extra CMake flags per (os, arch, variant); a missing key is an unsupported combination.
#: CMake flags a llama-server build adds to its variant's (``nexabind build --with-server``):
#: llama-server and what it needs (the common library, the tools folder), without the web UI
#: (it would be downloaded or built with npm) and without HTTPS (it listens on loopback behind
#: nexabind's gateway). Later ``-D`` values win over the ``OFF`` ones of :data:`COMMON_FLAGS`.
#: No ggml backend is built: llama-server loads them at run time (``GGML_BACKEND_DL``) and gets
#: the library build's own, so it runs on the very libraries nexabind loads.
SERVER_FLAGS = (
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CPU=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
)

FLAGS: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("linux", "x86_64", "cpu"): _CPU_ALL,
    ("linux", "x86_64", "vulkan"): _VULKAN,
    ("linux", "x86_64", "cuda"): _CUDA,
    ("linux", "arm64", "cpu"): _CPU_ALL,
    ("linux", "arm64", "vulkan"): _VULKAN,
    ("windows", "x86_64", "cpu"): _CPU_ALL,
    ("windows", "x86_64", "vulkan"): _VULKAN,
    ("windows", "x86_64", "cuda"): _CUDA,
    # llama.cpp has no runtime-dispatch CPU variants for Windows on arm64 yet.
    ("windows", "arm64", "cpu"): ("-DGGML_BACKEND_DL=ON", "-DGGML_NATIVE=OFF"),
    ("macos", "x86_64", "cpu"): ("-DGGML_METAL=OFF", *_CPU_ALL),
    ("macos", "arm64", "metal"): (
        "-DGGML_METAL=ON",
        "-DGGML_METAL_EMBED_LIBRARY=ON",
        "-DGGML_BACKEND_DL=ON",
        "-DGGML_NATIVE=OFF",
    ),  # fmt: skip
}

#: Rpath flags so the libraries in ``lib/`` find each other wherever the folder lands.
_RPATH = {
    "linux": ("-DCMAKE_INSTALL_RPATH=$ORIGIN", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON"),
    "macos": ("-DCMAKE_INSTALL_RPATH=@loader_path", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON"),
    "windows": (),
}


def key(os_name: str, arch: str, variant: str) -> str:
    """``<os>-<arch>-<variant>``: the name of an installed entry (and of an artifact's lock)."""
    return f"{os_name}-{arch}-{variant}"


def library_names(os_name: str | None = None) -> tuple[str, str, str]:
    """The ggml-base, ggml and llama library file names, in load order.

    Args:
        os_name: ``linux``, ``macos`` or ``windows``; default: this process's os (another
            Unix gets the Linux names).
    """
    return LIBRARY_NAMES.get(os_name or target()[0], LIBRARY_NAMES["linux"])


# libggml-cpu-haswell.so, ggml-cpu-armv8.2_1.dll (dots in the tag), or the plain libggml-cpu.so.
_CPU_MODULE = re.compile(r"(?:lib)?ggml-cpu(?:-([\w.]+?))?\.(?:so|dylib|dll)")

#: The x86 CPU variants that ``GGML_CPU_ALL_VARIANTS`` builds and the features each needs,
#: from ggml/src/CMakeLists.txt at the pinned commit; the names of /proc/cpuinfo's flags.
X86_CPU_VARIANTS: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"),
    "skylakex": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512"),
    "cannonlake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512", "avx512vbmi"),
    "cascadelake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512", "avx512_vnni"),
    "icelake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512", "avx512vbmi",
                "avx512_vnni"),
    "cooperlake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512", "avx512_vnni",
                   "avx512_bf16"),
    "zen4": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512", "avx512vbmi",
             "avx512_vnni", "avx512_bf16"),
    "alderlake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni"),
    "sapphirerapids": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512", "avx512vbmi",
                       "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
}  # fmt: skip
# ggml's score weights, lowest first (ggml-cpu/arch/x86/cpu-feats.cpp); "avx512" is ggml's
# AVX512 level: F, CD, VL, DQ and BW together.
_X86_SCORE = ("fma", "f16c", "sse4_2", "bmi2", "avx", "avx2", "avx_vnni", "avx512",
              "avx512vbmi", "avx512_bf16", "avx512_vnni", "amx_int8")  # fmt: skip
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")


def cpu_variant_of(filename: str) -> str | None:
    """The CPU variant a ggml CPU module's file name says (``cpu`` for the plain one), or None
    for another file."""
    m = _CPU_MODULE.fullmatch(filename)
    return (m.group(1) or "cpu") if m else None


#: The Linux arm64 CPU variants and the features each needs (/proc/cpuinfo's names:
#: asimddp = DOTPROD, asimdhp = FP16_VECTOR_ARITHMETIC, i8mm = MATMUL_INT8).
ARM64_CPU_VARIANTS: dict[str, tuple[str, ...]] = {
    "armv8.0_1": (),
    "armv8.2_1": ("asimddp",),
    "armv8.2_2": ("asimddp", "asimdhp"),
    "armv8.2_3": ("asimddp", "asimdhp", "sve"),
    "armv8.6_1": ("asimddp", "asimdhp", "sve", "i8mm"),
    "armv8.6_2": ("asimddp", "asimdhp", "sve", "i8mm", "sve2"),
    "armv9.2_1": ("asimddp", "asimdhp", "sve", "i8mm", "sme"),
    "armv9.2_2": ("asimddp", "asimdhp", "sve", "i8mm", "sve2", "sme"),
}
# ggml's score weights from bit 1 up (ggml-cpu/arch/arm/cpu-feats.cpp).
_ARM64_SCORE = ("", "asimddp", "asimdhp", "sve", "i8mm", "sve2", "sme")


def cpu_variant_scores(arch: str, cpu_flags: set[str]) -> dict[str, int]:
    """ggml's score of each CPU variant of ``arch`` (``x86_64``, ``arm64``) on a CPU with
    ``cpu_flags`` (/proc/cpuinfo's names), for the variants it can run, best first; empty for
    another arch."""
    have = set(cpu_flags)
    weights: tuple[str, ...]
    if arch == "x86_64":
        if all(f in have for f in _AVX512):
            have.add("avx512")
        table, weights, first = X86_CPU_VARIANTS, _X86_SCORE, 0
    elif arch == "arm64":
        table, weights, first = ARM64_CPU_VARIANTS, _ARM64_SCORE, 1
    else:
        return {}
    scores = {}
    for name, needs in table.items():
        if all(f in have for f in needs):
            bits = (1 << i for i, f in enumerate(weights) if f in needs and i >= first)
            scores[name] = 1 + sum(bits)
    return dict(sorted(scores.items(), key=lambda kv: -kv[1]))


def artifact_name(os_name: str, arch: str, variant: str) -> str:
    """The file name of the artifact of one target and variant (``.zip`` on Windows)."""
    ext = "zip" if os_name == "windows" else "tar.gz"
    return f"nexabind-llama-{pin.ARTIFACT_VERSION}-{key(os_name, arch, variant)}.{ext}"


def parse_target(text: str) -> tuple[str, str]:
    """Split a target name such as ``linux-arm64`` into ``(os, arch)``, checking it is known.

    Raises:
        BuildError: Not an ``os-arch`` pair that any variant is built for.
    """
    known = sorted({f"{o}-{a}" for (o, a, _v) in FLAGS})
    os_name, _, arch = text.partition("-")
    if f"{os_name}-{arch}" not in known:
        msg = f"unknown target {text!r}; choose one of {known}"
        raise BuildError(msg)
    return os_name, arch


def variants_for(os_name: str, arch: str) -> list[str]:
    """The variants built for a target, sorted (empty for a target nothing is built for)."""
    return sorted(v for (o, a, v) in FLAGS if (o, a) == (os_name, arch))


def cmake_flags(os_name: str, arch: str, variant: str) -> tuple[str, ...]:
    """Every CMake flag of a build: the common ones, the variant's and the rpath ones.

    Raises:
        BuildError: Nothing is built for that variant on that target; names the ones that are.
    """
    extra = FLAGS.get((os_name, arch, variant))
    if extra is None:
        known = variants_for(os_name, arch)
        msg = f"variant {variant!r} is not built for {os_name}-{arch}; choose one of {known}"
        raise BuildError(msg)
    return (*COMMON_FLAGS, *extra, *_RPATH.get(os_name, ()))


def variant_order(platform: Platform, variant: str | None = None) -> tuple[str, ...]:
    """Return the variants to try, best first.

    Args:
        platform: The platform (its GPU fields decide).
        variant: An explicit variant; then only it is tried.

    Returns:
        ``(variant,)`` when given; else cuda (a CUDA driver was found), vulkan (a Vulkan loader
        was found), metal (macOS on arm64), then cpu.

    Raises:
        ValueError: ``variant`` is not one of :data:`VARIANTS`.
    """
    if variant is not None:
        if variant not in VARIANTS:
            msg = f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}"
            raise ValueError(msg)
        return (variant,)
    usable = {
        "cuda": platform.cuda_driver is not None,
        "vulkan": platform.vulkan,
        "metal": platform.metal,
        "cpu": True,
    }
    return tuple(v for v in VARIANTS if usable[v])


def variant_order_here() -> tuple[str, ...]:
    """:func:`variant_order` for this process (probes its GPU runtimes once, in a child)."""
    return variant_order(detect())
