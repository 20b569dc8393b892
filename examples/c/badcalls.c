/*
 * badcalls: what the C ABI does with wrong calls and failing scripts.
 *
 *   badcalls
 *
 * Every check calls one function in a way a careless or hostile host
 * might, and states the llmp_result it must return. The program prints a
 * Markdown table (call, expected, returned, kind, message) and exits 1 when
 * any check got something else, or when an out-parameter was written on
 * failure. Run it under valgrind: none of these may crash or leak.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llmproxy.h"

static const char ROUTING_YAML[] =
    "scripts:\n"
    "  routing:\n"
    "    script: |\n"
    "      local v = request.body.viplevel or 0\n"
    "      if v == 'boom' then error('boom') end\n"
    "      if v == 'nul' then error('a\\0b') end\n"
    "      if v == 'loop' then while true do end end\n"
    "      if v == 'big' then local t = {} for i = 1, 1e8 do t[i] = i end end\n"
    "      if v == 'nope' then return 'no-such-backend' end\n"
    "      return v >= 3 and 'ultra' or 'standard'\n"
    "    timeout_ms: 50\n"
    "    memory_mb: 2\n";

static const char GOOD_INPUT[] =
    "{\"request\":{\"id\":\"r1\",\"body\":{\"viplevel\":3}},"
    "\"backends\":{\"ultra\":{\"url\":\"http://u\"},\"standard\":{\"url\":\"http://s\"}}}";

static int failures = 0;
static int row = 0;

/* Print one row and free err. `broken` is 1 when the call broke the ABI's
 * contract some other way (an out-parameter written on failure, no error
 * object although one was asked for). */
static void report(const char *call, llmp_result want, llmp_result got, llmp_error *err, int broken) {
    const char *kind = err ? llmp_error_kind(err) : "-";
    const char *msg = err ? llmp_error_message(err) : "-";
    int ok = got == want && !broken && (err == NULL || llmp_error_code(err) == got);
    if (!ok) failures++;
    printf("| %2d | `%s` | %u | %u | %s | %s%s |\n", ++row, call, (unsigned)want, (unsigned)got, kind, msg,
           ok ? "" : " **UNEXPECTED**");
    llmp_error_free(err);
}

/* Run a hook with an input of explicit length and check the outcome. */
static void check_run(const char *call, const llmp_engine *engine, const char *hook, const char *input, size_t len,
                      llmp_result want) {
    char *const sentinel = (char *)(uintptr_t)0x1;
    char *out = sentinel;
    size_t out_len = 12345;
    llmp_error *err = NULL;
    llmp_result got = llmp_engine_run(engine, hook, input, len, &out, &out_len, &err);
    int wrote = got != LLMP_OK && (out != sentinel || out_len != 12345 || err == NULL);
    if (got == LLMP_OK) llmp_string_free(out);
    report(call, want, got, err, wrote);
}

/* Run a hook on prepared inputs and check the outcome. */
static void check_prepared(const char *call, const llmp_engine *engine, const char *hook, const llmp_request *request,
                           const llmp_globals *globals, llmp_result want) {
    char *const sentinel = (char *)(uintptr_t)0x1;
    char *out = sentinel;
    size_t out_len = 12345;
    llmp_error *err = NULL;
    llmp_result got = llmp_engine_run_prepared(engine, hook, request, globals, &out, &out_len, &err);
    int wrote = got != LLMP_OK && (out != sentinel || out_len != 12345 || err == NULL);
    if (got == LLMP_OK) llmp_string_free(out);
    report(call, want, got, err, wrote);
}

static void check_request_new(const char *call, const char *json, size_t len, llmp_result want) {
    llmp_request *sentinel = (llmp_request *)(uintptr_t)0x1;
    llmp_request *request = sentinel;
    llmp_error *err = NULL;
    llmp_result got = llmp_request_new(json, len, &request, &err);
    int wrote = got != LLMP_OK && (request != sentinel || err == NULL);
    if (got == LLMP_OK) llmp_request_free(request);
    report(call, want, got, err, wrote);
}

static void check_globals_new(const char *call, const char *json, size_t len, llmp_result want) {
    llmp_globals *sentinel = (llmp_globals *)(uintptr_t)0x1;
    llmp_globals *globals = sentinel;
    llmp_error *err = NULL;
    llmp_result got = llmp_globals_new(json, len, &globals, &err);
    int wrote = got != LLMP_OK && (globals != sentinel || err == NULL);
    if (got == LLMP_OK) llmp_globals_free(globals);
    report(call, want, got, err, wrote);
}

/* A request handle for the test (exits on failure: a setup error). */
static llmp_request *request_of(const char *json) {
    llmp_request *r = NULL;
    llmp_error *err = NULL;
    if (llmp_request_new(json, strlen(json), &r, &err) != LLMP_OK) {
        fprintf(stderr, "setup: request %s: %s\n", json, llmp_error_message(err));
        exit(1);
    }
    return r;
}

static llmp_globals *globals_of(const char *json) {
    llmp_globals *g = NULL;
    llmp_error *err = NULL;
    if (llmp_globals_new(json, strlen(json), &g, &err) != LLMP_OK) {
        fprintf(stderr, "setup: globals %s: %s\n", json, llmp_error_message(err));
        exit(1);
    }
    return g;
}

static void check_new(const char *call, const char *yaml, size_t len, llmp_result want) {
    llmp_engine *sentinel = (llmp_engine *)(uintptr_t)0x1;
    llmp_engine *engine = sentinel;
    llmp_error *err = NULL;
    llmp_result got = llmp_engine_new(yaml, len, &engine, &err);
    int wrote = got != LLMP_OK && (engine != sentinel || err == NULL);
    if (got == LLMP_OK) llmp_engine_free(engine);
    report(call, want, got, err, wrote);
}

static void check_file(const char *call, const char *path, llmp_result want) {
    llmp_engine *sentinel = (llmp_engine *)(uintptr_t)0x1;
    llmp_engine *engine = sentinel;
    llmp_error *err = NULL;
    llmp_result got = llmp_engine_new_from_file(path, &engine, &err);
    int wrote = got != LLMP_OK && (engine != sentinel || err == NULL);
    if (got == LLMP_OK) llmp_engine_free(engine);
    report(call, want, got, err, wrote);
}

static void check_input(const char *call, const llmp_engine *engine, const char *vip, llmp_result want) {
    char input[512];
    snprintf(input, sizeof input,
             "{\"request\":{\"id\":\"r1\",\"body\":{\"viplevel\":\"%s\"}},"
             "\"backends\":{\"ultra\":{\"url\":\"http://u\"}}}",
             vip);
    check_run(call, engine, "routing", input, strlen(input), want);
}

int main(void) {
    llmp_engine *engine = NULL;
    llmp_error *err = NULL;
    if (llmp_engine_new(ROUTING_YAML, strlen(ROUTING_YAML), &engine, &err) != LLMP_OK) {
        fprintf(stderr, "cannot build the engine: %s\n", llmp_error_message(err));
        llmp_error_free(err);
        return 1;
    }
    size_t good_len = strlen(GOOD_INPUT);
    printf("libllmproxy %s\n\n", llmp_version());
    printf("| # | call | expected | returned | kind | message |\n|---|---|---|---|---|---|\n");

    /* Arguments of llmp_engine_run. */
    check_run("run(engine, \"routing\", good input)", engine, "routing", GOOD_INPUT, good_len, LLMP_OK);
    check_run("run(NULL engine)", NULL, "routing", GOOD_INPUT, good_len, LLMP_INVALID_ARGUMENT);
    check_run("run(hook = NULL)", engine, NULL, GOOD_INPUT, good_len, LLMP_INVALID_ARGUMENT);
    check_run("run(input_json = NULL, len 0)", engine, "routing", NULL, 0, LLMP_INVALID_ARGUMENT);
    check_run("run(input_json = NULL, len 10)", engine, "routing", NULL, 10, LLMP_INVALID_ARGUMENT);
    {
        llmp_error *e = NULL;
        llmp_result got = llmp_engine_run(engine, "routing", GOOD_INPUT, good_len, NULL, NULL, &e);
        report("run(out_json = NULL)", LLMP_INVALID_ARGUMENT, got, e, 0);
    }
    {
        char *out = NULL;
        llmp_error *e = NULL;
        llmp_result got = llmp_engine_run(engine, "routing", GOOD_INPUT, good_len, &out, NULL, &e);
        int bad = got != LLMP_OK || !out || strcmp(out, "\"ultra\"") != 0;
        llmp_string_free(out);
        report("run(out_len = NULL) is allowed", LLMP_OK, bad ? LLMP_PANIC : got, e, 0);
    }
    check_run("run(input = \"{not json\")", engine, "routing", "{not json", 9, LLMP_INVALID_ARGUMENT);
    check_run("run(input truncated by len)", engine, "routing", GOOD_INPUT, good_len - 7, LLMP_INVALID_ARGUMENT);
    check_run("run(input = \"\", len 0)", engine, "routing", "", 0, LLMP_INVALID_ARGUMENT);
    check_run("run(input = \"[1,2]\") (not an object)", engine, "routing", "[1,2]", 5, LLMP_INVALID_ARGUMENT);
    {
        static const char bad_utf8[] = "{\"request\":{\"id\":\"\xff\xfe\",\"body\":{}},\"backends\":{}}";
        check_run("run(input with bytes FF FE in a string)", engine, "routing", bad_utf8, strlen(bad_utf8),
                  LLMP_INVALID_ARGUMENT);
    }
    check_run("run(hook = \"rou\\xffting\") (not UTF-8)", engine, "rou\xffting", GOOD_INPUT, good_len,
              LLMP_INVALID_ARGUMENT);
    check_run("run(hook = \"nope\") (unknown)", engine, "nope", GOOD_INPUT, good_len, LLMP_INVALID_ARGUMENT);
    check_run("run(hook = \"auth\") (not enabled)", engine, "auth", GOOD_INPUT, good_len, LLMP_INVALID_ARGUMENT);
    {
        size_t depth = 100000;
        char *deep = malloc(2 * depth);
        memset(deep, '[', depth);
        memset(deep + depth, ']', depth);
        check_run("run(input = 100000 nested arrays)", engine, "routing", deep, 2 * depth, LLMP_INVALID_ARGUMENT);
        free(deep);
    }
    {
        llmp_result got = llmp_engine_run(NULL, NULL, NULL, 0, NULL, NULL, NULL);
        report("run(everything NULL, err = NULL)", LLMP_INVALID_ARGUMENT, got, NULL, 0);
    }

    /* Scripts that fail. */
    check_input("run: script calls error('boom')", engine, "boom", LLMP_SCRIPT_ERROR);
    check_input("run: script error message holds a NUL", engine, "nul", LLMP_SCRIPT_ERROR);
    check_input("run: script loops forever (timeout_ms 50)", engine, "loop", LLMP_TIMEOUT);
    check_input("run: script allocates past memory_mb 2", engine, "big", LLMP_MEMORY);
    check_input("run: script names a backend not in backends", engine, "nope", LLMP_BAD_OUTPUT);
    check_run("run: good input again (engine still healthy)", engine, "routing", GOOD_INPUT, good_len, LLMP_OK);

    /* The prepared path: llmp_request_new, llmp_globals_new. */
    {
        static const char req[] = "{\"id\":\"r1\",\"body\":{\"viplevel\":3}}";
        size_t req_len = strlen(req);
        check_request_new("request_new(good request)", req, req_len, LLMP_OK);
        check_request_new("request_new(body_raw)", "{\"body_raw\":\"{\\\"viplevel\\\":3}\"}", 31, LLMP_OK);
        check_request_new("request_new(\"{}\") (no field is required)", "{}", 2, LLMP_OK);
        check_request_new("request_new(json = NULL)", NULL, 0, LLMP_INVALID_ARGUMENT);
        check_request_new("request_new(json = NULL, len 10)", NULL, 10, LLMP_INVALID_ARGUMENT);
        {
            llmp_error *e = NULL;
            llmp_result got = llmp_request_new(req, req_len, NULL, &e);
            report("request_new(out = NULL)", LLMP_INVALID_ARGUMENT, got, e, 0);
        }
        check_request_new("request_new(\"{not json\")", "{not json", 9, LLMP_INVALID_ARGUMENT);
        check_request_new("request_new(truncated by len)", req, req_len - 3, LLMP_INVALID_ARGUMENT);
        check_request_new("request_new(\"\", len 0)", "", 0, LLMP_INVALID_ARGUMENT);
        check_request_new("request_new(\"[1]\") (not an object)", "[1]", 3, LLMP_INVALID_ARGUMENT);
        check_request_new("request_new(body_raw = \"{oops\") (body not JSON)", "{\"body_raw\":\"{oops\"}", 20,
                          LLMP_INVALID_ARGUMENT);
        check_request_new("request_new(bytes FF FE in a string)", "{\"id\":\"\xff\xfe\"}", 11, LLMP_INVALID_ARGUMENT);
        {
            size_t depth = 100000;
            char *deep = malloc(2 * depth);
            memset(deep, '[', depth);
            memset(deep + depth, ']', depth);
            check_request_new("request_new(100000 nested arrays)", deep, 2 * depth, LLMP_INVALID_ARGUMENT);
            free(deep);
        }
        {
            llmp_result got = llmp_request_new(NULL, 0, NULL, NULL);
            report("request_new(everything NULL, err = NULL)", LLMP_INVALID_ARGUMENT, got, NULL, 0);
        }

        static const char glob[] = "{\"backends\":{\"ultra\":{\"url\":\"http://u\"},\"standard\":{\"url\":\"http://s\"}}}";
        size_t glob_len = strlen(glob);
        check_globals_new("globals_new(good backends)", glob, glob_len, LLMP_OK);
        check_globals_new("globals_new(\"{}\")", "{}", 2, LLMP_OK);
        check_globals_new("globals_new(response object)", "{\"response\":{\"status_code\":200,\"body\":{}}}", 42,
                          LLMP_OK);
        check_globals_new("globals_new(json = NULL)", NULL, 0, LLMP_INVALID_ARGUMENT);
        {
            llmp_error *e = NULL;
            llmp_result got = llmp_globals_new(glob, glob_len, NULL, &e);
            report("globals_new(out = NULL)", LLMP_INVALID_ARGUMENT, got, e, 0);
        }
        check_globals_new("globals_new(\"{\\\"backends\\\": \")", "{\"backends\": ", 13, LLMP_INVALID_ARGUMENT);
        check_globals_new("globals_new(\"[]\") (not an object)", "[]", 2, LLMP_INVALID_ARGUMENT);
        check_globals_new("globals_new(\"null\")", "null", 4, LLMP_INVALID_ARGUMENT);
        check_globals_new("globals_new(with a request key)", "{\"request\":{}}", 14, LLMP_INVALID_ARGUMENT);
        check_globals_new("globals_new(response.status_code = \"x\")", "{\"response\":{\"status_code\":\"x\"}}", 32,
                          LLMP_INVALID_ARGUMENT);
        check_globals_new("globals_new(bytes FF in a key)", "{\"\xff\":1}", 7, LLMP_INVALID_ARGUMENT);

        /* llmp_engine_run_prepared. */
        llmp_request *r = request_of(req);
        llmp_globals *g = globals_of(glob);
        check_prepared("run_prepared(engine, \"routing\", request, globals)", engine, "routing", r, g, LLMP_OK);
        check_prepared("run_prepared(NULL engine)", NULL, "routing", r, g, LLMP_INVALID_ARGUMENT);
        check_prepared("run_prepared(hook = NULL)", engine, NULL, r, g, LLMP_INVALID_ARGUMENT);
        check_prepared("run_prepared(hook = \"nope\") (unknown)", engine, "nope", r, g, LLMP_INVALID_ARGUMENT);
        check_prepared("run_prepared(hook = \"auth\") (not enabled)", engine, "auth", r, g, LLMP_INVALID_ARGUMENT);
        check_prepared("run_prepared(request = NULL): script indexes nil", engine, "routing", NULL, g,
                       LLMP_SCRIPT_ERROR);
        check_prepared("run_prepared(globals = NULL): no backends to name", engine, "routing", r, NULL,
                       LLMP_BAD_OUTPUT);
        check_prepared("run_prepared(NULL, NULL)", engine, "routing", NULL, NULL, LLMP_SCRIPT_ERROR);
        {
            llmp_error *e = NULL;
            llmp_result got = llmp_engine_run_prepared(engine, "routing", r, g, NULL, NULL, &e);
            report("run_prepared(out_json = NULL)", LLMP_INVALID_ARGUMENT, got, e, 0);
        }
        {
            char *out = NULL;
            llmp_error *e = NULL;
            llmp_result got = llmp_engine_run_prepared(engine, "routing", r, g, &out, NULL, &e);
            int bad = got != LLMP_OK || !out || strcmp(out, "\"ultra\"") != 0;
            llmp_string_free(out);
            report("run_prepared(out_len = NULL) is allowed", LLMP_OK, bad ? LLMP_PANIC : got, e, 0);
        }
        {
            llmp_result got = llmp_engine_run_prepared(NULL, NULL, NULL, NULL, NULL, NULL, NULL);
            report("run_prepared(everything NULL, err = NULL)", LLMP_INVALID_ARGUMENT, got, NULL, 0);
        }
        {
            llmp_request *boom = request_of("{\"id\":\"r2\",\"body\":{\"viplevel\":\"boom\"}}");
            llmp_request *loop = request_of("{\"id\":\"r3\",\"body_raw\":\"{\\\"viplevel\\\":\\\"loop\\\"}\"}");
            check_prepared("run_prepared: script calls error('boom')", engine, "routing", boom, g, LLMP_SCRIPT_ERROR);
            check_prepared("run_prepared: script loops forever (timeout_ms 50)", engine, "routing", loop, g,
                           LLMP_TIMEOUT);
            check_prepared("run_prepared: good call again (handles still usable)", engine, "routing", r, g, LLMP_OK);
            llmp_request_free(boom);
            llmp_request_free(loop);
        }
        {
            /* The hook's own limits apply to prepared inputs on every call. */
            static const char small[] =
                "scripts:\n  routing:\n    script: return 'ultra'\n    max_depth: 3\n    max_input_bytes: 1024\n";
            llmp_engine *tight = NULL;
            llmp_error *e = NULL;
            if (llmp_engine_new(small, strlen(small), &tight, &e) != LLMP_OK) {
                fprintf(stderr, "setup: %s\n", llmp_error_message(e));
                return 1;
            }
            llmp_request *deep = request_of("{\"body\":{\"a\":{\"b\":{\"c\":1}}}}");
            char big[1200];
            int n = snprintf(big, sizeof big, "{\"body\":{\"pad\":\"%01100d\"}}", 0);
            llmp_request *large = NULL;
            if (llmp_request_new(big, (size_t)n, &large, &e) != LLMP_OK) return 1;
            check_prepared("run_prepared: request within the hook's limits", tight, "routing", r, g, LLMP_OK);
            check_prepared("run_prepared: request deeper than the hook's max_depth 3", tight, "routing", deep, g,
                           LLMP_INVALID_ARGUMENT);
            check_prepared("run_prepared: request over the hook's max_input_bytes 1024", tight, "routing", large, g,
                           LLMP_INVALID_ARGUMENT);
            check_prepared("run_prepared: the same deep request, default limits", engine, "routing", deep, g,
                           LLMP_OK);
            llmp_request_free(deep);
            llmp_request_free(large);
            llmp_engine_free(tight);
        }
        llmp_request_free(r);
        llmp_globals_free(g);
    }

    /* Building engines. */
    check_new("engine_new(yaml = NULL)", NULL, 0, LLMP_INVALID_ARGUMENT);
    {
        llmp_error *e = NULL;
        llmp_result got = llmp_engine_new(ROUTING_YAML, strlen(ROUTING_YAML), NULL, &e);
        report("engine_new(out = NULL)", LLMP_INVALID_ARGUMENT, got, e, 0);
    }
    check_new("engine_new(\"scripts: [\") (invalid YAML)", "scripts: [", 10, LLMP_CONFIG);
    check_new("engine_new(unknown key)", "scriptz: {}\n", 12, LLMP_CONFIG);
    check_new("engine_new(yaml with byte FF)", "listen: \"\xff\"\n", 12, LLMP_INVALID_ARGUMENT);
    {
        static const char syntax[] = "scripts:\n  routing:\n    script: \"return (\"\n";
        check_new("engine_new(script with a syntax error)", syntax, strlen(syntax), LLMP_CONFIG);
    }
    {
        static const char missing[] = "scripts:\n  routing:\n    script_file: /nonexistent/route.lua\n";
        check_new("engine_new(missing script_file)", missing, strlen(missing), LLMP_CONFIG);
    }
    check_new("engine_new(\"\", len 0) (empty config: no hooks)", "", 0, LLMP_OK);
    check_file("engine_new_from_file(NULL)", NULL, LLMP_INVALID_ARGUMENT);
    check_file("engine_new_from_file(\"/nonexistent.yaml\")", "/nonexistent.yaml", LLMP_CONFIG);
    check_file("engine_new_from_file(\"/\") (a directory)", "/", LLMP_CONFIG);

    /* NULL to the accessors and the _free functions. */
    {
        int ok = llmp_error_kind(NULL) == NULL && llmp_error_message(NULL) == NULL && llmp_error_hook(NULL) == NULL &&
                 llmp_error_script(NULL) == NULL && llmp_error_line(NULL) == 0 &&
                 llmp_error_code(NULL) == LLMP_INVALID_ARGUMENT;
        report("error accessors(NULL): NULL, NULL, NULL, NULL, 0, 1000", LLMP_OK, ok ? LLMP_OK : LLMP_PANIC, NULL, 0);
    }
    llmp_engine_free(NULL);
    llmp_error_free(NULL);
    llmp_string_free(NULL);
    llmp_request_free(NULL);
    llmp_globals_free(NULL);
    report("engine_free(NULL); error_free(NULL); string_free(NULL); request_free(NULL); globals_free(NULL)", LLMP_OK,
           LLMP_OK, NULL, 0);
    report("version() = non-NULL", LLMP_OK, llmp_version() ? LLMP_OK : LLMP_PANIC, NULL, 0);

    /* Error details of a script failure. */
    {
        static const char input[] =
            "{\"request\":{\"id\":\"r1\",\"body\":{\"viplevel\":\"boom\"}},\"backends\":{}}";
        char *out = NULL;
        llmp_error *e = NULL;
        llmp_result got = llmp_engine_run(engine, "routing", input, strlen(input), &out, NULL, &e);
        const char *hook = llmp_error_hook(e);
        const char *script = llmp_error_script(e);
        int ok = got == LLMP_SCRIPT_ERROR && hook && strcmp(hook, "routing") == 0 && script &&
                 strcmp(script, "scripts.routing") == 0 && llmp_error_line(e) == 2;
        printf("| %2d | `error details: hook, script, line` | routing, scripts.routing, 2 | %s, %s, %u | %s | %s%s |\n",
               ++row, hook ? hook : "NULL", script ? script : "NULL", llmp_error_line(e), llmp_error_kind(e),
               llmp_error_message(e), ok ? "" : " **UNEXPECTED**");
        if (!ok) failures++;
        llmp_error_free(e);
    }

    llmp_engine_free(engine);
    printf("\n%d passed, %d failed\n", row - failures, failures);
    return failures == 0 ? 0 : 1;
}
