# CMake toolchain: windows-x86_64 cross-built with mingw-w64 on a Linux host.
#
# Compiler: GCC's mingw-w64 cross compilers with the POSIX thread model (Debian/Ubuntu:
# g++-mingw-w64-x86-64-posix), which std::thread and std::mutex in ggml need with GCC < 13.
# The C/C++ runtimes (libgcc, libstdc++, winpthread) are linked statically and OpenMP is off
# (GGML_OPENMP=OFF from nexabind: libgomp would need libgomp-1.dll), so the DLLs import nothing
# but Windows system DLLs and need no MinGW runtime next to them.
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR AMD64)
set(_triple x86_64-w64-mingw32)

if(NOT CMAKE_C_COMPILER)
  find_program(CMAKE_C_COMPILER NAMES ${_triple}-gcc-posix ${_triple}-gcc REQUIRED)
  find_program(CMAKE_CXX_COMPILER NAMES ${_triple}-g++-posix ${_triple}-g++ REQUIRED)
endif()
find_program(CMAKE_RC_COMPILER NAMES ${_triple}-windres REQUIRED)

set(CMAKE_FIND_ROOT_PATH /usr/${_triple})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

set(CMAKE_C_FLAGS_INIT "-include ${CMAKE_CURRENT_LIST_DIR}/mingw-compat.h")
set(CMAKE_CXX_FLAGS_INIT "-include ${CMAKE_CURRENT_LIST_DIR}/mingw-compat.h")
set(CMAKE_PROJECT_INCLUDE "${CMAKE_CURRENT_LIST_DIR}/windows-names.cmake")

# --exclude-libs: the static runtimes' symbols (e.g. _Unwind_Resume) are not exported from
# ggml-base.dll, which exports all of its own; else the next DLL's link sees them twice.
set(CMAKE_SHARED_LINKER_FLAGS_INIT "-static -Wl,--exclude-libs,ALL")
set(CMAKE_MODULE_LINKER_FLAGS_INIT "-static -Wl,--exclude-libs,ALL")
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static")

# try_run and the like run target programs under wine.
find_program(_wine NAMES wine64 wine PATHS /usr/lib/wine)
if(_wine)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${_wine}")
endif()
