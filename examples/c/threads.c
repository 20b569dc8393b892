/*
 * threads: one engine, many threads calling it at once.
 *
 *   threads CASE_FILE [THREADS] [CALLS_PER_THREAD]
 *
 * Builds one engine for the case's hook and script, then runs the case from
 * THREADS threads (default 16), CALLS_PER_THREAD times each (default 2000),
 * and checks every result against the case's expectation. Even-numbered
 * threads call llmp_engine_run with the input as JSON text; odd-numbered
 * ones call llmp_engine_run_prepared with one request and one globals
 * object, built once and shared by all of them. Prints "N passed, N
 * failed" (one per call) and exits 1 on any mismatch.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "casefile.h"
#include "llmproxy.h"

struct shared {
    const llmp_engine *engine;
    const char *hook;
    const char *input;
    const llmp_request *request;
    const llmp_globals *globals;
    json_t *want;
    long calls;
};

struct job {
    struct shared *shared;
    int prepared;
};

struct outcome {
    long passed, failed;
};

static void *worker(void *arg) {
    struct job *job = arg;
    struct shared *s = job->shared;
    struct outcome *o = calloc(1, sizeof *o);
    if (!o) return NULL;
    size_t input_len = strlen(s->input);
    for (long i = 0; i < s->calls; i++) {
        char *out = NULL;
        size_t out_len = 0;
        llmp_error *err = NULL;
        int ok = 0;
        llmp_result rc = job->prepared ? llmp_engine_run_prepared(s->engine, s->hook, s->request, s->globals, &out,
                                                                  &out_len, &err)
                                       : llmp_engine_run(s->engine, s->hook, s->input, input_len, &out, &out_len, &err);
        if (rc == LLMP_OK) {
            json_t *got = json_loadb(out, out_len, JSON_DECODE_ANY, NULL);
            ok = got && json_same(s->want, got);
            json_decref(got);
        } else if (o->failed == 0) {
            fprintf(stderr, "call failed: %s: %s\n", llmp_error_kind(err), llmp_error_message(err));
        }
        llmp_string_free(out);
        llmp_error_free(err);
        if (ok)
            o->passed++;
        else
            o->failed++;
    }
    return o;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CASE_FILE [THREADS] [CALLS_PER_THREAD]\n", argv[0]);
        return 2;
    }
    int nthreads = argc > 2 ? atoi(argv[2]) : 16;
    long calls = argc > 3 ? atol(argv[3]) : 2000;
    if (nthreads < 1 || nthreads > 1024 || calls < 1) return 2;

    json_t *c = json_load_file(argv[1], 0, NULL);
    json_t *want = c ? json_object_get(json_object_get(c, "expect"), "result") : NULL;
    if (!want) {
        fprintf(stderr, "%s: not a case with an expected result\n", argv[1]);
        json_decref(c);
        return 2;
    }
    /* LLMP_TIMEOUT_SCALE=N stretches the case's time limit, as in
     * conformance.c: under valgrind the threads take turns. */
    const char *scale_env = getenv("LLMP_TIMEOUT_SCALE");
    char *config = case_config(c, scale_env ? atoi(scale_env) : 1);
    char *input = json_dumps(json_object_get(c, "input"), JSON_COMPACT);
    llmp_engine *engine = NULL;
    llmp_error *err = NULL;
    if (llmp_engine_new(config, strlen(config), &engine, &err) != LLMP_OK) {
        fprintf(stderr, "engine: %s\n", llmp_error_message(err));
        return 1;
    }

    llmp_request *request = NULL;
    llmp_globals *globals = NULL;
    if (case_prepare(json_object_get(c, "input"), &request, &globals, &err) != LLMP_OK) {
        fprintf(stderr, "prepare: %s\n", llmp_error_message(err));
        return 1;
    }
    struct shared s = {engine, json_string_value(json_object_get(c, "hook")), input, request, globals, want, calls};
    pthread_t *threads = calloc((size_t)nthreads, sizeof *threads);
    struct job *jobs = calloc((size_t)nthreads, sizeof *jobs);
    for (int i = 0; i < nthreads; i++) {
        jobs[i] = (struct job){&s, i % 2};
        pthread_create(&threads[i], NULL, worker, &jobs[i]);
    }
    long passed = 0, failed = 0;
    for (int i = 0; i < nthreads; i++) {
        struct outcome *o = NULL;
        pthread_join(threads[i], (void **)&o);
        if (o) {
            passed += o->passed;
            failed += o->failed;
            free(o);
        } else {
            failed += calls;
        }
    }
    printf("%d threads x %ld calls on one engine (%d with llmp_engine_run, %d with llmp_engine_run_prepared on"
           " shared handles)\n",
           nthreads, calls, (nthreads + 1) / 2, nthreads / 2);
    printf("%ld passed, %ld failed\n", passed, failed);

    free(threads);
    free(jobs);
    llmp_request_free(request);
    llmp_globals_free(globals);
    llmp_engine_free(engine);
    free(input);
    free(config);
    json_decref(c);
    return failed == 0 ? 0 : 1;
}
