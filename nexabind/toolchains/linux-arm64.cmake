# CMake toolchain: linux-arm64 (aarch64, glibc) cross-built on an x86_64 Linux host.
#
# Compiler: clang targeting aarch64-linux-gnu, with the GNU cross sysroot, libstdc++ and binutils
# (Debian/Ubuntu: clang gcc-aarch64-linux-gnu g++-aarch64-linux-gnu). Not GCC: llama.cpp's arm64
# CPU variants include armv9.2-a+sme, which GCC before 14 rejects in -march (clang 14 accepts it).
# `nexabind build --target linux-arm64` passes the clang it found (CMAKE_C_COMPILER and
# CMAKE_CXX_COMPILER); used on its own, this file takes the first clang on PATH.
# No OpenMP (GGML_OPENMP=OFF from nexabind): clang has no aarch64 libomp here, and ggml's own
# thread pool needs no runtime library next to the artifact.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(_triple aarch64-linux-gnu)

if(NOT CMAKE_C_COMPILER)
  find_program(CMAKE_C_COMPILER NAMES clang clang-19 clang-18 clang-17 clang-16 clang-15 clang-14
               REQUIRED)
endif()
if(NOT CMAKE_CXX_COMPILER)
  # clang -> clang++, clang-19 -> clang++-19, in the same folder. No regex back-reference: CMake
  # 3.25 (Debian 12) rejects "\1" when the optional version group did not match.
  get_filename_component(_cc_dir "${CMAKE_C_COMPILER}" DIRECTORY)
  get_filename_component(_cc_name "${CMAKE_C_COMPILER}" NAME)
  string(REPLACE "clang" "clang++" _cxx_name "${_cc_name}")
  if(_cc_dir)
    set(CMAKE_CXX_COMPILER "${_cc_dir}/${_cxx_name}")
  else()
    set(CMAKE_CXX_COMPILER "${_cxx_name}")
  endif()
endif()
set(CMAKE_C_COMPILER_TARGET ${_triple})
set(CMAKE_CXX_COMPILER_TARGET ${_triple})
set(CMAKE_ASM_COMPILER_TARGET ${_triple})

# Headers and libraries of the target only; programs (cmake's helpers) of the host.
set(CMAKE_FIND_ROOT_PATH /usr/${_triple})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# try_run and the like run target programs under user-mode qemu with the cross sysroot.
find_program(_qemu NAMES qemu-aarch64-static qemu-aarch64)
if(_qemu)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${_qemu};-L;/usr/${_triple}")
endif()
