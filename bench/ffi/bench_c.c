/*
 * bench_c: per-call cost of llmp_engine_run (make bench-ffi).
 *
 *   bench_c ROOT [N]
 *
 * Engine: conformance case 001's routing script (the seed's example), built
 * from YAML. Input: ROOT/bench/ffi/routing-input-10k.json (a request with a
 * ~10 KB body, as JSON text). Times N calls (default 100000) one by one
 * after N/10 warm-up calls and prints the median, p99 and mean in ns.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "llmproxy.h"

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)size + 1);
    if (buf && fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[size] = '\0';
        *len = (size_t)size;
    }
    return buf;
}

static int cmp_u64(const void *a, const void *b) {
    unsigned long long x = *(const unsigned long long *)a, y = *(const unsigned long long *)b;
    return x < y ? -1 : x > y;
}

static unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

/* Case 001's script (conformance/cases/001-seed-routing-viplevel-3.json). */
static const char CONFIG[] =
    "scripts:\n"
    "  routing:\n"
    "    script: |\n"
    "      local viplevel = request.body.viplevel or 0\n"
    "      if viplevel >= 3 then\n"
    "        return \"ultra\"\n"
    "      elseif viplevel >= 1 then\n"
    "        return \"high-performance\"\n"
    "      else\n"
    "        return \"standard\"\n"
    "      end\n";

int main(int argc, char **argv) {
    const char *root = argc > 1 ? argv[1] : ".";
    long n = argc > 2 ? atol(argv[2]) : 100000;
    if (n < 1) return 2;
    char path[4096];
    snprintf(path, sizeof path, "%s/bench/ffi/routing-input-10k.json", root);
    size_t input_len = 0;
    char *input = read_file(path, &input_len);
    if (!input) {
        fprintf(stderr, "cannot read %s\n", path);
        return 1;
    }
    llmp_engine *engine = NULL;
    llmp_error *err = NULL;
    if (llmp_engine_new(CONFIG, strlen(CONFIG), &engine, &err) != LLMP_OK) {
        fprintf(stderr, "engine: %s\n", llmp_error_message(err));
        return 1;
    }
    unsigned long long *ns = malloc((size_t)n * sizeof *ns);
    if (!ns) return 1;
    long failures = 0;
    for (long i = -n / 10; i < n; i++) {
        char *out = NULL;
        unsigned long long t0 = now_ns();
        llmp_result rc = llmp_engine_run(engine, "routing", input, input_len, &out, NULL, &err);
        llmp_string_free(out);
        unsigned long long t1 = now_ns();
        if (rc != LLMP_OK) {
            failures++;
            llmp_error_free(err);
            err = NULL;
        }
        if (i >= 0) ns[i] = t1 - t0;
    }
    unsigned long long total = 0;
    for (long i = 0; i < n; i++) total += ns[i];
    qsort(ns, (size_t)n, sizeof *ns, cmp_u64);
    printf("c     %-16s calls=%ld median_ns=%llu p99_ns=%llu mean_ns=%llu failures=%ld\n", "llmp_engine_run", n,
           ns[n / 2], ns[(long)((double)(n - 1) * 0.99)], total / (unsigned long long)n, failures);
    free(ns);
    free(input);
    llmp_engine_free(engine);
    return failures == 0 ? 0 : 1;
}
