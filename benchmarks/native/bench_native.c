// The native baseline: the same greedy loop as nexabind's Llama.generate, in C, on the same
// library. Compiled by benchmarks/harness.py against the library's include/ folder, linked to
// its lib/ folder with an rpath.
//
// Usage:
//   bench_native MODE MODEL LIBDIR THREADS N_CTX N_BATCH N_GEN [TOKENS_FILE]
//
// MODE is "generate" (prompt from TOKENS_FILE, then up to N_GEN greedy tokens), "cycles"
// (load and free the model and a context N_GEN times) or "startup" (load once, report the
// time from main() to a ready context). TOKENS_FILE holds the prompt's token ids, separated
// by white space. In "generate" mode the program loads the model once, then reads commands
// from stdin, one a line: "RUN" runs the prompt and the loop once (the KV cache is cleared
// first) and prints one JSON line; "QUIT" prints the peak RSS and exits. The Python workers in
// benchmarks/worker.py speak the same protocol, so the harness can interleave them.

#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-backend.h"
#include "llama.h"

static double clock_s(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double now_s(void) { return clock_s(CLOCK_MONOTONIC); }

// VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a program started by a big
// parent would report the parent's peak.
static long peak_rss_kib(void) {
    char line[256];
    long kib = -1;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmHWM:", 6) == 0) kib = atol(line + 6);
    fclose(f);
    return kib;
}

static long current_rss_kib(void) {
    long pages = 0, rss = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = -1;
    fclose(f);
    return rss < 0 ? -1 : rss * 4;  // 4 KiB pages
}

static void quiet_log(enum ggml_log_level level, const char *text, void *ud) {
    (void)ud;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int read_tokens(const char *path, llama_token **out) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int cap = 1024, n = 0;
    llama_token *toks = malloc(sizeof(llama_token) * cap);
    long v;
    while (fscanf(f, "%ld", &v) == 1) {
        if (n == cap) {
            cap *= 2;
            toks = realloc(toks, sizeof(llama_token) * cap);
        }
        toks[n++] = (llama_token)v;
    }
    fclose(f);
    *out = toks;
    return n;
}

static struct llama_context *make_context(struct llama_model *model, int threads, int n_ctx,
                                          int n_batch) {
    // The same settings nexabind's Context uses: everything else stays at llama.cpp's defaults
    // (flash attention "auto", f16 KV cache).
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch < (int)cp.n_ubatch ? n_batch : cp.n_ubatch;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.no_perf = true;
    return llama_init_from_model(model, cp);
}

static int run_generate(struct llama_model *model, int threads, int n_ctx, int n_batch,
                        int n_gen, const char *tokens_file) {
    llama_token *prompt = NULL;
    int n_prompt = read_tokens(tokens_file, &prompt);
    if (n_prompt <= 0) {
        fprintf(stderr, "bench_native: no tokens in %s\n", tokens_file);
        return 1;
    }
    struct llama_context *ctx = make_context(model, threads, n_ctx, n_batch);
    if (!ctx) {
        fprintf(stderr, "bench_native: llama_init_from_model failed (n_ctx=%d)\n", n_ctx);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    struct llama_sampler *chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(chain, llama_sampler_init_greedy());
    llama_token *out = malloc(sizeof(llama_token) * (n_gen > 0 ? n_gen : 1));
    llama_batch one = llama_batch_init(1, 0, 1);
    char piece[256];
    char line[64];
    printf("{\"ready\": true}\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "QUIT", 4) == 0) break;
        if (strncmp(line, "RUN", 3) != 0) continue;
        llama_memory_clear(llama_get_memory(ctx), true);
        llama_sampler_reset(chain);
        double t_decode = 0.0, c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID), t0 = now_s(), t1;
        int pos = 0, rc = 0;
        for (int i = 0; i < n_prompt && rc == 0; i += n_batch) {
            int n = n_prompt - i < n_batch ? n_prompt - i : n_batch;
            llama_batch b = llama_batch_get_one(prompt + i, n);
            rc = llama_decode(ctx, b);
            pos += n;
        }
        double t_prefill = now_s() - t0;
        int n_out = 0;
        long n_bytes = 0;
        while (rc == 0) {
            llama_token tok = llama_sampler_sample(chain, ctx, -1);
            if (llama_vocab_is_eog(vocab, tok)) break;
            int n = llama_token_to_piece(vocab, tok, piece, sizeof piece, 0, false);
            n_bytes += n > 0 ? n : 0;
            out[n_out++] = tok;
            if (n_out >= n_gen) break;
            one.n_tokens = 1;
            one.token[0] = tok;
            one.pos[0] = pos++;
            one.n_seq_id[0] = 1;
            one.seq_id[0][0] = 0;
            one.logits[0] = 1;
            t1 = now_s();
            rc = llama_decode(ctx, one);
            t_decode += now_s() - t1;
        }
        double t_total = now_s() - t0, c_total = clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0;
        if (rc != 0) {
            printf("{\"error\": \"llama_decode returned %d\"}\n", rc);
            fflush(stdout);
            continue;
        }
        printf("{\"n_prompt\": %d, \"n_gen\": %d, \"seconds\": %.9f, \"cpu_s\": %.9f, "
               "\"prefill_s\": %.9f, \"decode_s\": %.9f, \"n_bytes\": %ld, \"tokens\": [",
               n_prompt, n_out, t_total, c_total, t_prefill, t_decode, n_bytes);
        for (int i = 0; i < n_out; i++) printf(i ? ",%d" : "%d", out[i]);
        printf("]}\n");
        fflush(stdout);
    }
    printf("{\"peak_rss_kib\": %ld, \"rss_kib\": %ld}\n", peak_rss_kib(), current_rss_kib());
    fflush(stdout);
    llama_batch_free(one);
    free(out);
    free(prompt);
    llama_sampler_free(chain);
    llama_free(ctx);
    return 0;
}

static int run_cycles(const char *model_path, int threads, int n_ctx, int n_batch, int n) {
    long rss_first = -1;
    for (int i = 0; i < n; i++) {
        struct llama_model *model =
            llama_model_load_from_file(model_path, llama_model_default_params());
        if (!model) return 1;
        struct llama_context *ctx = make_context(model, threads, n_ctx, n_batch);
        if (!ctx) return 1;
        llama_free(ctx);
        llama_model_free(model);
        if (i == 9 || (n < 10 && i == n - 1)) rss_first = current_rss_kib();
    }
    printf("{\"cycles\": %d, \"rss_after_10_kib\": %ld, \"rss_kib\": %ld, \"peak_rss_kib\": %ld}\n",
           n, rss_first, current_rss_kib(), peak_rss_kib());
    return 0;
}

int main(int argc, char **argv) {
    double t_start = now_s();
    if (argc < 8) {
        fprintf(stderr,
                "usage: %s generate|cycles|startup MODEL LIBDIR THREADS N_CTX N_BATCH N_GEN "
                "[TOKENS_FILE]\n",
                argv[0]);
        return 2;
    }
    const char *mode = argv[1], *model_path = argv[2], *libdir = argv[3];
    int threads = atoi(argv[4]), n_ctx = atoi(argv[5]), n_batch = atoi(argv[6]);
    int n_gen = atoi(argv[7]);
    llama_log_set(quiet_log, NULL);
    ggml_backend_load_all_from_path(libdir);
    llama_backend_init();
    if (strcmp(mode, "cycles") == 0) return run_cycles(model_path, threads, n_ctx, n_batch, n_gen);
    struct llama_model *model = llama_model_load_from_file(model_path, llama_model_default_params());
    if (!model) {
        fprintf(stderr, "bench_native: cannot load %s\n", model_path);
        return 1;
    }
    int rc;
    if (strcmp(mode, "startup") == 0) {
        struct llama_context *ctx = make_context(model, threads, n_ctx, n_batch);
        printf("{\"seconds\": %.9f}\n", now_s() - t_start);
        llama_free(ctx);
        rc = ctx ? 0 : 1;
    } else if (strcmp(mode, "generate") == 0 && argc >= 9) {
        rc = run_generate(model, threads, n_ctx, n_batch, n_gen, argv[8]);
    } else {
        fprintf(stderr, "bench_native: unknown mode %s (or no TOKENS_FILE)\n", mode);
        rc = 2;
    }
    llama_model_free(model);
    llama_backend_free();
    return rc;
}
