/*
 * greedy: load an artifact's libraries the way nexabind's loader does, and decode greedily.
 *
 *   greedy LIBDIR MODEL N_TOKENS PROMPT [--force=ID,ID,...] [--logits=FILE]
 *
 * Windows: AddDllDirectory(LIBDIR), then LoadLibraryExW of ggml-base.dll, ggml.dll, llama.dll
 * by full path with LOAD_LIBRARY_SEARCH_DEFAULT_DIRS | LOAD_LIBRARY_SEARCH_DLL_LOAD_DIR, which is
 * what os.add_dll_directory and ctypes.CDLL do. Elsewhere: dlopen(RTLD_NOW | RTLD_GLOBAL) of
 * libggml-base, libggml, libllama. Then ggml_backend_load_all_from_path(LIBDIR) picks the best
 * CPU variant, and the model decodes N_TOKENS tokens by argmax.
 *
 * --force feeds the given tokens instead of the argmax (teacher forcing, to compare logits of
 * two platforms at the same positions); --logits writes every step's logits as float32.
 * Prints one JSON object: backends, devices, the CPU variant module that was loaded, system
 * info, prompt tokens, generated (argmax) tokens and each step's top logit.
 *
 * Built by build_scripts/cross.py for each target (mingw-w64 for Windows, run under wine).
 */
#if !defined(_WIN32) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* dl_iterate_phdr */
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"
#include "ggml-backend.h"

#ifdef _WIN32
#include <windows.h>
#include <psapi.h>
typedef HMODULE lib_t;
static const char *NAMES[3] = {"ggml-base.dll", "ggml.dll", "llama.dll"};

static wchar_t *widen(const char *s) {
    int n = MultiByteToWideChar(CP_UTF8, 0, s, -1, NULL, 0);
    wchar_t *w = malloc(sizeof(wchar_t) * n);
    MultiByteToWideChar(CP_UTF8, 0, s, -1, w, n);
    return w;
}

static lib_t open_lib(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s\\%s", dir, name);
    wchar_t *w = widen(path);
    lib_t h = LoadLibraryExW(w, NULL, LOAD_LIBRARY_SEARCH_DEFAULT_DIRS | LOAD_LIBRARY_SEARCH_DLL_LOAD_DIR);
    free(w);
    if (!h) fprintf(stderr, "greedy: LoadLibraryExW(%s) failed: error %lu\n", path, GetLastError());
    return h;
}

static void *sym(lib_t h, const char *name) { return (void *) GetProcAddress(h, name); }

static void add_dir(const char *dir) {
    wchar_t *w = widen(dir);
    if (!AddDllDirectory(w)) fprintf(stderr, "greedy: AddDllDirectory(%s) failed\n", dir);
    free(w);
}

/* The file name of the loaded ggml-cpu-*.dll: the variant ggml chose. */
static void cpu_variant(char *out, size_t size) {
    HMODULE mods[512];
    DWORD needed = 0;
    out[0] = 0;
    if (!EnumProcessModules(GetCurrentProcess(), mods, sizeof mods, &needed)) return;
    for (DWORD i = 0; i < needed / sizeof(HMODULE) && i < 512; i++) {
        char name[MAX_PATH];
        if (GetModuleBaseNameA(GetCurrentProcess(), mods[i], name, sizeof name) &&
            strncmp(name, "ggml-cpu", 8) == 0) {
            snprintf(out, size, "%s", name);
        }
    }
}
#else
#include <dlfcn.h>
#include <link.h>
typedef void *lib_t;
static const char *NAMES[3] = {"libggml-base.so", "libggml.so", "libllama.so"};

static lib_t open_lib(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    lib_t h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (!h) fprintf(stderr, "greedy: dlopen(%s) failed: %s\n", path, dlerror());
    return h;
}

static void *sym(lib_t h, const char *name) { return dlsym(h, name); }

static void add_dir(const char *dir) { (void) dir; }

static int phdr_cb(struct dl_phdr_info *info, size_t size, void *data) {
    (void) size;
    const char *slash = strrchr(info->dlpi_name, '/');
    const char *base = slash ? slash + 1 : info->dlpi_name;
    if (strncmp(base, "libggml-cpu", 11) == 0) snprintf((char *) data, 256, "%s", base);
    return 0;
}

static void cpu_variant(char *out, size_t size) {
    (void) size;
    out[0] = 0;
    dl_iterate_phdr(phdr_cb, out);
}
#endif

#define DECL(name) static __typeof__(&name) p_##name
/* A Windows DLL exports only its own functions (GetProcAddress does not look into its
 * imports as dlsym does): ggml_backend_dev_name is in ggml-base.dll, not ggml.dll. So each
 * symbol is looked up in llama, ggml and ggml-base, in that order. */
static lib_t LIBS[3];

static void *sym_any(const char *name) {
    for (int i = 2; i >= 0; i--) {
        void *p = sym(LIBS[i], name);
        if (p) return p;
    }
    return NULL;
}

#define LOAD(name)                                                             \
    do {                                                                       \
        p_##name = (__typeof__(&name)) sym_any(#name);                         \
        if (!p_##name) {                                                       \
            fprintf(stderr, "greedy: symbol %s not found\n", #name);           \
            return 0;                                                          \
        }                                                                      \
    } while (0)

DECL(ggml_backend_load_all_from_path);
DECL(ggml_backend_reg_count);
DECL(ggml_backend_reg_get);
DECL(ggml_backend_reg_name);
DECL(ggml_backend_dev_count);
DECL(ggml_backend_dev_get);
DECL(ggml_backend_dev_name);
DECL(ggml_backend_dev_description);
DECL(llama_backend_init);
DECL(llama_log_set);
DECL(llama_print_system_info);
DECL(llama_model_default_params);
DECL(llama_context_default_params);
DECL(llama_model_load_from_file);
DECL(llama_model_get_vocab);
DECL(llama_vocab_n_tokens);
DECL(llama_tokenize);
DECL(llama_init_from_model);
DECL(llama_batch_get_one);
DECL(llama_decode);
DECL(llama_get_logits_ith);
DECL(llama_free);
DECL(llama_model_free);

static int load_symbols(void) {
    LOAD(ggml_backend_load_all_from_path);
    LOAD(ggml_backend_reg_count);
    LOAD(ggml_backend_reg_get);
    LOAD(ggml_backend_reg_name);
    LOAD(ggml_backend_dev_count);
    LOAD(ggml_backend_dev_get);
    LOAD(ggml_backend_dev_name);
    LOAD(ggml_backend_dev_description);
    LOAD(llama_backend_init);
    LOAD(llama_log_set);
    LOAD(llama_print_system_info);
    LOAD(llama_model_default_params);
    LOAD(llama_context_default_params);
    LOAD(llama_model_load_from_file);
    LOAD(llama_model_get_vocab);
    LOAD(llama_vocab_n_tokens);
    LOAD(llama_tokenize);
    LOAD(llama_init_from_model);
    LOAD(llama_batch_get_one);
    LOAD(llama_decode);
    LOAD(llama_get_logits_ith);
    LOAD(llama_free);
    LOAD(llama_model_free);
    return 1;
}

static void quiet_log(enum ggml_log_level level, const char *text, void *ud) {
    (void) ud;
    if (level >= GGML_LOG_LEVEL_WARN && level != GGML_LOG_LEVEL_CONT) fputs(text, stderr);
}

static void json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') printf("\\%c", *s);
        else if ((unsigned char) *s < 0x20) printf("\\u%04x", *s);
        else putchar(*s);
    }
    putchar('"');
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: greedy LIBDIR MODEL N_TOKENS PROMPT [--force=ID,...] [--logits=FILE]\n");
        return 2;
    }
    const char *dir = argv[1], *model_path = argv[2], *prompt = argv[4];
    int n_tokens = atoi(argv[3]);
    const char *force = NULL, *logits_path = NULL;
    for (int i = 5; i < argc; i++) {
        if (strncmp(argv[i], "--force=", 8) == 0) force = argv[i] + 8;
        else if (strncmp(argv[i], "--logits=", 9) == 0) logits_path = argv[i] + 9;
        else {
            fprintf(stderr, "greedy: unknown argument %s\n", argv[i]);
            return 2;
        }
    }

    add_dir(dir);
    for (int i = 0; i < 3; i++) {
        LIBS[i] = open_lib(dir, NAMES[i]);
        if (!LIBS[i]) return 3;
    }
    if (!load_symbols()) return 3;
    p_llama_log_set(quiet_log, NULL);
    p_ggml_backend_load_all_from_path(dir);
    p_llama_backend_init();

    struct llama_model_params mp = p_llama_model_default_params();
    struct llama_model *model = p_llama_model_load_from_file(model_path, mp);
    if (!model) {
        fprintf(stderr, "greedy: cannot load model %s\n", model_path);
        return 4;
    }
    const struct llama_vocab *vocab = p_llama_model_get_vocab(model);
    int n_vocab = p_llama_vocab_n_tokens(vocab);
    struct llama_context_params cp = p_llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_batch = 256;
    cp.n_threads = cp.n_threads_batch = 2;
    struct llama_context *ctx = p_llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "greedy: cannot create a context\n");
        return 4;
    }

    llama_token prompt_tokens[256];
    int n_prompt = p_llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), prompt_tokens, 256, true, false);
    if (n_prompt <= 0 || n_prompt + n_tokens > 256) {
        fprintf(stderr, "greedy: the prompt tokenized to %d tokens; keep prompt + N_TOKENS within 256\n", n_prompt);
        return 2;
    }

    FILE *lf = logits_path ? fopen(logits_path, "wb") : NULL;
    llama_token *out = calloc(n_tokens > 0 ? n_tokens : 1, sizeof(llama_token));
    float *top = calloc(n_tokens > 0 ? n_tokens : 1, sizeof(float));
    llama_token next = 0;
    int rc = p_llama_decode(ctx, p_llama_batch_get_one(prompt_tokens, n_prompt));
    for (int i = 0; i < n_tokens && rc == 0; i++) {
        const float *logits = p_llama_get_logits_ith(ctx, -1);
        int best = 0;
        for (int t = 1; t < n_vocab; t++) {
            if (logits[t] > logits[best]) best = t;
        }
        if (lf) fwrite(logits, sizeof(float), n_vocab, lf);
        out[i] = best;
        top[i] = logits[best];
        next = best;
        if (force && *force) {
            next = (llama_token) strtol(force, (char **) &force, 10);
            if (*force == ',') force++;
        }
        rc = p_llama_decode(ctx, p_llama_batch_get_one(&next, 1));
    }
    if (lf) fclose(lf);
    if (rc != 0) {
        fprintf(stderr, "greedy: llama_decode returned %d\n", rc);
        return 5;
    }

    char variant[256];
    cpu_variant(variant, sizeof variant);
    printf("{\"backends\": [");
    for (size_t i = 0; i < p_ggml_backend_reg_count(); i++) {
        printf(i ? ", " : "");
        json_string(p_ggml_backend_reg_name(p_ggml_backend_reg_get(i)));
    }
    printf("], \"devices\": [");
    for (size_t i = 0; i < p_ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t dev = p_ggml_backend_dev_get(i);
        printf(i ? ", " : "");
        printf("{\"name\": ");
        json_string(p_ggml_backend_dev_name(dev));
        printf(", \"description\": ");
        json_string(p_ggml_backend_dev_description(dev));
        printf("}");
    }
    printf("], \"cpu_variant\": ");
    json_string(variant);
    printf(", \"system_info\": ");
    json_string(p_llama_print_system_info());
    printf(", \"n_vocab\": %d, \"prompt_tokens\": [", n_vocab);
    for (int i = 0; i < n_prompt; i++) printf(i ? ", %d" : "%d", prompt_tokens[i]);
    printf("], \"tokens\": [");
    for (int i = 0; i < n_tokens; i++) printf(i ? ", %d" : "%d", out[i]);
    printf("], \"top_logits\": [");
    for (int i = 0; i < n_tokens; i++) printf(i ? ", %.9g" : "%.9g", top[i]);
    printf("]}\n");
    fflush(stdout);

    p_llama_free(ctx);
    p_llama_model_free(model);
    free(out);
    free(top);
    return 0;
}
