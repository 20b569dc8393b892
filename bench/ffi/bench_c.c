/*
 * bench_c: per-call cost through the C ABI (make bench-ffi).
 *
 *   bench_c ROOT [N]
 *
 * Engine: conformance case 001's routing script (the seed's example), built
 * from YAML. Input: ROOT/bench/ffi/routing-input-10k.json (a request with a
 * ~10 KB body, and three backends, as JSON text). Times N calls (default
 * 100000) one by one after N/10 warm-up calls and prints the median, p99
 * and mean in ns, for:
 * - `run_prepared`: llmp_engine_run_prepared with the request (body
 *   included) parsed once by llmp_request_new and the backends once by
 *   llmp_globals_new, outside the loop: what a host pays per hook call;
 * - `new+prepared`: llmp_request_new, llmp_engine_run_prepared and
 *   llmp_request_free on every call: one hook per request, body parsed once;
 * - `engine_run`: llmp_engine_run on the whole input text (parsed on every
 *   call, 10 KB body included).
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

/* The text of the value of `key` in the top-level object `json` (a span of
 * it, not NUL-terminated): enough JSON scanning for this input. */
static const char *member(const char *json, const char *key, size_t *len) {
    size_t klen = strlen(key);
    int depth = 0;
    for (const char *p = json; *p; p++) {
        if (*p == '"') {
            const char *start = p + 1;
            for (p++; *p && *p != '"'; p++)
                if (*p == '\\' && p[1]) p++;
            if (!*p) return NULL;
            if (depth == 1 && (size_t)(p - start) == klen && memcmp(start, key, klen) == 0 && p[1] == ':') {
                const char *v = p + 2, *q = v;
                int d = 0;
                for (; *q; q++) {
                    if (*q == '"') {
                        for (q++; *q && *q != '"'; q++)
                            if (*q == '\\' && q[1]) q++;
                    } else if (*q == '{' || *q == '[') {
                        d++;
                    } else if (*q == '}' || *q == ']') {
                        if (--d == 0) {
                            *len = (size_t)(q + 1 - v);
                            return v;
                        }
                    }
                }
                return NULL;
            }
        } else if (*p == '{' || *p == '[') {
            depth++;
        } else if (*p == '}' || *p == ']') {
            depth--;
        }
    }
    return NULL;
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
    size_t req_len = 0, backends_len = 0;
    const char *req_text = member(input, "request", &req_len);
    const char *backends = member(input, "backends", &backends_len);
    if (!req_text || !backends) {
        fprintf(stderr, "%s: no request or backends object\n", path);
        return 1;
    }
    char *globals_text = malloc(backends_len + 32);
    if (!globals_text) return 1;
    int globals_len = sprintf(globals_text, "{\"backends\":%.*s}", (int)backends_len, backends);
    llmp_request *request = NULL;
    llmp_globals *globals = NULL;
    if (llmp_request_new(req_text, req_len, &request, &err) != LLMP_OK ||
        llmp_globals_new(globals_text, (size_t)globals_len, &globals, &err) != LLMP_OK) {
        fprintf(stderr, "prepare: %s\n", llmp_error_message(err));
        return 1;
    }
    unsigned long long *ns = malloc((size_t)n * sizeof *ns);
    if (!ns) return 1;
    long failures = 0;
    for (int mode = 0; mode < 3; mode++) {
        static const char *const names[] = {"run_prepared", "new+prepared", "engine_run"};
        for (long i = -n / 10; i < n; i++) {
            char *out = NULL;
            llmp_result rc;
            unsigned long long t0 = now_ns();
            if (mode == 0) {
                rc = llmp_engine_run_prepared(engine, "routing", request, globals, &out, NULL, &err);
            } else if (mode == 1) {
                llmp_request *r = NULL;
                rc = llmp_request_new(req_text, req_len, &r, &err);
                if (rc == LLMP_OK) rc = llmp_engine_run_prepared(engine, "routing", r, globals, &out, NULL, &err);
                llmp_request_free(r);
            } else {
                rc = llmp_engine_run(engine, "routing", input, input_len, &out, NULL, &err);
            }
            int ok = rc == LLMP_OK && strcmp(out, "\"ultra\"") == 0;
            llmp_string_free(out);
            unsigned long long t1 = now_ns();
            if (!ok) {
                if (failures++ == 0) fprintf(stderr, "%s: %s\n", names[mode], err ? llmp_error_message(err) : "?");
                llmp_error_free(err);
                err = NULL;
            }
            if (i >= 0) ns[i] = t1 - t0;
        }
        unsigned long long total = 0;
        for (long i = 0; i < n; i++) total += ns[i];
        qsort(ns, (size_t)n, sizeof *ns, cmp_u64);
        printf("c     %-16s calls=%ld median_ns=%llu p99_ns=%llu mean_ns=%llu failures=%ld\n", names[mode], n,
               ns[n / 2], ns[(long)((double)(n - 1) * 0.99)], total / (unsigned long long)n, failures);
        fflush(stdout);
    }
    free(ns);
    free(globals_text);
    free(input);
    llmp_request_free(request);
    llmp_globals_free(globals);
    llmp_engine_free(engine);
    return failures == 0 ? 0 : 1;
}
