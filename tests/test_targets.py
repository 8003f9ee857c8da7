"""nexabind.targets: variants and their order, CMake flags, artifact and library names."""

from __future__ import annotations

import pytest

from nexabind import pin
from nexabind.errors import BuildError
from nexabind.platform import Platform, target
from nexabind.targets import (
    FLAGS,
    OSES,
    VARIANTS,
    artifact_name,
    cmake_flags,
    key,
    library_names,
    variant_order,
    variants_for,
)

LINUX = Platform("linux", "x86_64", "glibc", "2.36")


def test_variant_order() -> None:
    assert variant_order(LINUX) == ("cpu",)
    gpu = Platform("linux", "x86_64", "glibc", "2.36", cuda_driver="12.4", vulkan=True)
    assert variant_order(gpu) == ("cuda", "vulkan", "cpu")
    assert variant_order(Platform("macos", "arm64", macos_version="14.5", metal=True)) == (
        "metal",
        "cpu",
    )
    assert variant_order(gpu, "cpu") == ("cpu",)
    with pytest.raises(ValueError, match="unknown variant 'rocm'; choose one of cuda, vulkan"):
        variant_order(LINUX, "rocm")
    assert VARIANTS == ("cuda", "vulkan", "metal", "cpu")


def test_every_built_target_is_a_known_os_and_variant() -> None:
    assert {o for o, _, _ in FLAGS} == set(OSES)
    assert {v for _, _, v in FLAGS} == set(VARIANTS)
    assert variants_for("linux", "x86_64") == ["cpu", "cuda", "vulkan"]
    assert variants_for("linux", "riscv64") == []


def test_cmake_flags_of_a_build() -> None:
    flags = cmake_flags("linux", "x86_64", "cuda")
    assert flags[0] == "-DCMAKE_BUILD_TYPE=Release"
    assert f"-DLLAMA_BUILD_COMMIT={pin.LLAMA_COMMIT}" in flags
    assert "-DGGML_CUDA=ON" in flags and "-DGGML_CPU_ALL_VARIANTS=ON" in flags
    assert flags[-2:] == ("-DCMAKE_INSTALL_RPATH=$ORIGIN", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON")
    assert not any("RPATH" in f for f in cmake_flags("windows", "arm64", "cpu"))
    with pytest.raises(BuildError, match=r"'metal' is not built for linux-x86_64; choose one of"):
        cmake_flags("linux", "x86_64", "metal")


def test_names() -> None:
    assert key("linux", "arm64", "vulkan") == "linux-arm64-vulkan"
    assert artifact_name("windows", "x86_64", "cuda") == (
        f"nexabind-llama-{pin.ARTIFACT_VERSION}-windows-x86_64-cuda.zip"
    )
    assert artifact_name("macos", "arm64", "metal").endswith("-macos-arm64-metal.tar.gz")
    assert library_names("windows")[-1] == "llama.dll"
    assert library_names("macos")[0] == "libggml-base.dylib"
    assert library_names("freebsd") == library_names("linux")
    assert library_names() == library_names(target()[0])


def test_cpu_variant_scores_follow_ggmls_weights() -> None:
    """ggml's score tables (cpu-feats.cpp), on flags of a few known CPUs."""
    from nexabind.targets import cpu_variant_scores

    graviton3 = {"fp", "asimd", "asimddp", "asimdhp", "sve", "i8mm", "bf16"}
    arm = cpu_variant_scores("arm64", graviton3)
    assert list(arm) == ["armv8.6_1", "armv8.2_3", "armv8.2_2", "armv8.2_1", "armv8.0_1"]
    assert arm["armv8.6_1"] == 1 + 2 + 4 + 8 + 16 and arm["armv8.0_1"] == 1
    haswell = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
    x86 = cpu_variant_scores("x86_64", haswell)
    assert next(iter(x86)) == "haswell" and list(x86)[-1] == "x64"
    assert "skylakex" not in x86  # no AVX-512
    spr = haswell | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi",
                     "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"}  # fmt: skip
    assert next(iter(cpu_variant_scores("x86_64", spr))) == "sapphirerapids"
    assert cpu_variant_scores("riscv64", haswell) == {}
