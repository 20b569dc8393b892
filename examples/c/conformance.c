/*
 * conformance: run every conformance case through the C ABI.
 *
 *   conformance CASES_DIR
 *
 * LLMP_TIMEOUT_SCALE=N (environment) multiplies every case's time limit
 * except where a timeout is the expected outcome; `make test-ffi` sets it
 * under valgrind, which runs scripts ~20x slower.
 *
 * For each case: build an engine from a config enabling the case's hook,
 * run the hook on the case's input, compare the result (or the error kind)
 * with the case's expectation, free everything. Prints one line per case
 * and "N passed, N failed"; exits 1 when a case failed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "casefile.h"
#include "llmproxy.h"

/* The C ABI reports the core's "bad_input" as "invalid_argument". */
static const char *c_kind(const char *core_kind) {
    return strcmp(core_kind, "bad_input") == 0 ? "invalid_argument" : core_kind;
}

/* Run one case; returns 1 when it passed, printing why when it did not. */
static int run_case(const char *path, int timeout_scale) {
    json_error_t jerr;
    json_t *c = json_load_file(path, 0, &jerr);
    if (!c) {
        printf("FAIL %s: cannot read case: %s (line %d)\n", path, jerr.text, jerr.line);
        return 0;
    }
    const char *name = json_string_value(json_object_get(c, "name"));
    const char *hook = json_string_value(json_object_get(c, "hook"));
    json_t *expect = json_object_get(c, "expect");
    json_t *want_result = json_object_get(expect, "result");
    const char *want_error = json_string_value(json_object_get(expect, "error"));
    int passed = 0;

    char *config = case_config(c, timeout_scale);
    char *input = json_dumps(json_object_get(c, "input"), JSON_COMPACT | JSON_ENCODE_ANY);
    llmp_engine *engine = NULL;
    llmp_error *err = NULL;
    char *out = NULL;
    size_t out_len = 0;

    if (!config || !input || !hook) {
        printf("FAIL %s: malformed case\n", path);
    } else if (llmp_engine_new(config, strlen(config), &engine, &err) != LLMP_OK) {
        printf("FAIL %s: engine: %s: %s\n", path, llmp_error_kind(err), llmp_error_message(err));
    } else {
        llmp_result rc = llmp_engine_run(engine, hook, input, strlen(input), &out, &out_len, &err);
        if (rc == LLMP_OK) {
            json_t *got = json_loadb(out, out_len, JSON_DECODE_ANY, &jerr);
            if (!got) {
                printf("FAIL %s: result is not JSON: %s\n", path, out);
            } else if (want_result && json_same(want_result, got)) {
                passed = 1;
            } else {
                char *want = want_result ? json_dumps(want_result, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
                printf("FAIL %s: expected %s%s, got result %s\n", path, want ? "result " : "error ",
                       want ? want : (want_error ? want_error : "?"), out);
                free(want);
            }
            json_decref(got);
        } else if (want_error && strcmp(llmp_error_kind(err), c_kind(want_error)) == 0) {
            passed = 1;
        } else {
            printf("FAIL %s: got error %s (%s)\n", path, llmp_error_kind(err), llmp_error_message(err));
        }
    }
    if (passed) printf("ok   %s  (%s)\n", strrchr(path, '/') ? strrchr(path, '/') + 1 : path, name ? name : "");

    llmp_string_free(out);
    llmp_error_free(err);
    llmp_engine_free(engine);
    free(input);
    free(config);
    json_decref(c);
    return passed;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CASES_DIR\n", argv[0]);
        return 2;
    }
    size_t count = 0;
    char **paths = list_cases(argv[1], &count);
    if (!paths || count == 0) {
        fprintf(stderr, "no cases in %s\n", argv[1]);
        free_paths(paths, count);
        return 2;
    }
    const char *scale_env = getenv("LLMP_TIMEOUT_SCALE");
    int scale = scale_env ? atoi(scale_env) : 1;
    printf("libllmproxy %s: %zu conformance cases (time limits x%d)\n", llmp_version(), count, scale < 1 ? 1 : scale);
    size_t passed = 0, failed = 0;
    for (size_t i = 0; i < count; i++) {
        if (run_case(paths[i], scale))
            passed++;
        else
            failed++;
    }
    free_paths(paths, count);
    printf("%zu passed, %zu failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
