# Included after each project() of a windows-x86_64 cross build (CMAKE_PROJECT_INCLUDE): DLLs get
# MSVC's names (llama.dll, ggml-cpu-haswell.dll), not MinGW's lib-prefixed ones, because the
# loader and ggml_backend_load_all_from_path look for those. ggml does this for its own targets.
set(CMAKE_SHARED_LIBRARY_PREFIX "")
set(CMAKE_SHARED_MODULE_PREFIX "")
set(CMAKE_IMPORT_LIBRARY_PREFIX "")
