/* Force-included into every C and C++ file of a windows-x86_64 cross build: what mingw-w64's
 * headers and GCC before 13 lack or get wrong for Windows, which llama.cpp's MSVC builds do not
 * meet.
 *
 * 1. mingw-w64 before 11 (Debian 12, Ubuntu 22.04) does not declare
 *    THREAD_POWER_THROTTLING_STATE, which ggml-cpu.c uses to keep Windows 11 from parking its
 *    threads. The thread structure and constants are the process ones', field for field
 *    (SetThreadInformation with ThreadPowerThrottling, which these headers do declare).
 * 2. GCC before 13 casts the stride of the AMX tile load/store intrinsics to `long`, 32 bits on
 *    Windows, and emits (%rax,%edi,1), which the assembler rejects (the sapphirerapids variant's
 *    amx/mmq.cpp). GCC 13 casts to a pointer-sized integer; so do these definitions. */
#include <_mingw_mac.h>
#if __MINGW64_VERSION_MAJOR < 11
#define THREAD_POWER_THROTTLING_STATE PROCESS_POWER_THROTTLING_STATE
#define THREAD_POWER_THROTTLING_CURRENT_VERSION 1
#define THREAD_POWER_THROTTLING_EXECUTION_SPEED 0x1
#endif

#if defined(__cplusplus) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ < 13
#include <immintrin.h>
#undef _tile_loadd_internal
#undef _tile_stream_loadd_internal
#undef _tile_stored_internal
#define _tile_loadd_internal(dst, base, stride)                                      \
    __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm" #dst "|tileloadd\t%%tmm" #dst    \
                     ", [%0+%1*1]}" ::"r"((const void *) (base)),                     \
                     "r"((__PTRDIFF_TYPE__) (stride)))
#define _tile_stream_loadd_internal(dst, base, stride)                               \
    __asm__ volatile("{tileloaddt1\t(%0,%1,1), %%tmm" #dst "|tileloaddt1\t%%tmm" #dst \
                     ", [%0+%1*1]}" ::"r"((const void *) (base)),                     \
                     "r"((__PTRDIFF_TYPE__) (stride)))
#define _tile_stored_internal(src, base, stride)                                     \
    __asm__ volatile("{tilestored\t%%tmm" #src ", (%0,%1,1)|tilestored\t[%0+%1*1], %%tmm" \
                     #src "}" ::"r"((void *) (base)),                                 \
                     "r"((__PTRDIFF_TYPE__) (stride))                                 \
                     : "memory")
#endif
