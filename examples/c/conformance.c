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
 * then run the hook twice and compare each result (or error kind) with the
 * case's expectation:
 * - `run`: llmp_engine_run on the case's whole input as JSON text;
 * - `prepared`: the input split as a host would: its `request` through
 *   llmp_request_new, its other globals through llmp_globals_new (each NULL
 *   when absent), then llmp_engine_run_prepared. A failure while preparing
 *   counts as the call's outcome.
 * Frees everything. Prints one line per case and path, and "N passed, N
 * failed" (counting both paths); exits 1 when a check failed.
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

/* Run the case's hook on its input through one path; returns the llmp_result
 * and, on success, the result text in *out (llmp_string_free). */
static llmp_result run_path(int prepared, const llmp_engine *engine, const char *hook, json_t *input, char **out,
                            size_t *out_len, llmp_error **err) {
    if (!prepared) {
        char *text = json_dumps(input, JSON_COMPACT | JSON_ENCODE_ANY);
        llmp_result rc = llmp_engine_run(engine, hook, text, strlen(text), out, out_len, err);
        free(text);
        return rc;
    }
    llmp_request *request = NULL;
    llmp_globals *globals = NULL;
    llmp_result rc = case_prepare(input, &request, &globals, err);
    if (rc == LLMP_OK) rc = llmp_engine_run_prepared(engine, hook, request, globals, out, out_len, err);
    llmp_globals_free(globals);
    llmp_request_free(request);
    return rc;
}

static const char *const PATHS[] = {"run", "prepared"};

/* Run one case through both paths; returns how many paths passed (0..2),
 * printing why when one did not. */
static int run_case(const char *path, int timeout_scale) {
    json_error_t jerr;
    json_t *c = json_load_file(path, 0, &jerr);
    if (!c) {
        printf("FAIL %s: cannot read case: %s (line %d)\n", path, jerr.text, jerr.line);
        return 0;
    }
    const char *name = json_string_value(json_object_get(c, "name"));
    const char *hook = json_string_value(json_object_get(c, "hook"));
    const char *file = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    json_t *input = json_object_get(c, "input");
    json_t *expect = json_object_get(c, "expect");
    json_t *want_result = json_object_get(expect, "result");
    const char *want_error = json_string_value(json_object_get(expect, "error"));
    int passed = 0;

    char *config = case_config(c, timeout_scale);
    llmp_engine *engine = NULL;
    llmp_error *err = NULL;

    if (!config || !json_is_object(input) || !hook) {
        printf("FAIL %s: malformed case\n", path);
    } else if (llmp_engine_new(config, strlen(config), &engine, &err) != LLMP_OK) {
        printf("FAIL %s: engine: %s: %s\n", path, llmp_error_kind(err), llmp_error_message(err));
    } else {
        for (int prepared = 0; prepared < 2; prepared++) {
            char *out = NULL;
            size_t out_len = 0;
            llmp_error *e = NULL;
            int ok = 0;
            llmp_result rc = run_path(prepared, engine, hook, input, &out, &out_len, &e);
            if (rc == LLMP_OK) {
                json_t *got = json_loadb(out, out_len, JSON_DECODE_ANY, &jerr);
                if (!got) {
                    printf("FAIL %s [%s]: result is not JSON: %s\n", path, PATHS[prepared], out);
                } else if (want_result && json_same(want_result, got)) {
                    ok = 1;
                } else {
                    char *want = want_result ? json_dumps(want_result, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
                    printf("FAIL %s [%s]: expected %s%s, got result %s\n", path, PATHS[prepared],
                           want ? "result " : "error ", want ? want : (want_error ? want_error : "?"), out);
                    free(want);
                }
                json_decref(got);
            } else if (want_error && strcmp(llmp_error_kind(e), c_kind(want_error)) == 0) {
                ok = 1;
            } else {
                printf("FAIL %s [%s]: got error %s (%s)\n", path, PATHS[prepared], llmp_error_kind(e),
                       llmp_error_message(e));
            }
            if (ok) printf("ok   %s [%s]  (%s)\n", file, PATHS[prepared], name ? name : "");
            passed += ok;
            llmp_string_free(out);
            llmp_error_free(e);
        }
    }

    llmp_error_free(err);
    llmp_engine_free(engine);
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
    printf("libllmproxy %s: %zu conformance cases x 2 paths (run, prepared; time limits x%d)\n", llmp_version(), count,
           scale < 1 ? 1 : scale);
    size_t passed = 0, failed = 0;
    for (size_t i = 0; i < count; i++) {
        int ok = run_case(paths[i], scale);
        passed += (size_t)ok;
        failed += (size_t)(2 - ok);
    }
    free_paths(paths, count);
    printf("%zu passed, %zu failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
