/*
 * handle: a C host driving one request's life through a request handle
 * (llmp_handle_*): the seed's routing, request_transform,
 * response_transform and usage scripts over one parse of each body, a
 * stream, each hook's failure policy, and wrong calls.
 *
 *   handle            (run from the repository root: the scripts are
 *                      the scripts under examples/scripts)
 *
 * Prints one line per check and exits 1 when any failed. Run it under
 * valgrind too: nothing here may leak.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llmproxy.h"

static int failures = 0;

static void check(int ok, const char *what) {
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) failures++;
}

static int contains(const char *p, size_t len, const char *needle) {
    if (p == NULL) return 0;
    size_t n = strlen(needle);
    for (size_t i = 0; i + n <= len; i++) {
        if (memcmp(p + i, needle, n) == 0) return 1;
    }
    return 0;
}

static llmp_engine *engine_of(const char *yaml) {
    llmp_engine *engine = NULL;
    llmp_error *err = NULL;
    if (llmp_engine_new(yaml, strlen(yaml), &engine, &err) != LLMP_OK) {
        fprintf(stderr, "engine: %s\n", llmp_error_message(err));
        llmp_error_free(err);
        return NULL;
    }
    return engine;
}

static llmp_handle *handle_of(const llmp_engine *engine, const char *body) {
    static const char REQUEST[] = "{\"id\":\"r-1\",\"user_id\":\"user_001\",\"path\":\"/v1/chat/completions\"}";
    llmp_handle *h = NULL;
    llmp_error *err = NULL;
    if (llmp_handle_new(engine, REQUEST, strlen(REQUEST), body, strlen(body), &h, &err) != LLMP_OK) {
        fprintf(stderr, "handle: %s\n", llmp_error_message(err));
        llmp_error_free(err);
        return NULL;
    }
    return h;
}

static const char SEED_YAML[] =
    "scripts:\n"
    "  routing: {script_file: examples/scripts/routing.lua}\n"
    "  request_transform: {script_file: examples/scripts/request_transform.lua}\n"
    "  response_transform: {script_file: examples/scripts/response_transform.lua}\n"
    "  usage: {script_file: examples/scripts/usage.lua}\n";

static const char BACKENDS[] =
    "{\"backends\":{\"standard\":{\"url\":\"http://127.0.0.1:9001\"},"
    "\"high-performance\":{\"url\":\"http://127.0.0.1:9002\"},\"ultra\":{\"url\":\"http://127.0.0.1:9003\"}}}";

static const char COMPLETION[] =
    "{\"id\":\"c-1\",\"object\":\"chat.completion\",\"model\":\"llama-3-70b-instruct\","
    "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":\"stop\"}],"
    "\"usage\":{\"prompt_tokens\":15,\"completion_tokens\":42,\"total_tokens\":57}}";

/* The four seed hooks on one request, and then a stream. */
static void seed_request(const llmp_engine *engine, const llmp_globals *globals) {
    llmp_handle *h = handle_of(engine, "{\"model\":\"gpt-4\",\"viplevel\":3,\"messages\":[]}");
    check(h != NULL, "llmp_handle_new parses the request and its body");
    if (h == NULL) return;
    const char *backend = NULL;
    llmp_result r = llmp_handle_route(engine, h, globals, &backend, NULL);
    check(r == LLMP_OK && backend && strcmp(backend, "ultra") == 0, "route: viplevel 3 goes to ultra");

    const char *body = NULL, *headers = NULL;
    size_t body_len = 0;
    int stream = -1;
    r = llmp_handle_upstream(engine, h, "http://127.0.0.1:9003", &body, &body_len, &headers, &stream, NULL);
    check(r == LLMP_OK && contains(body, body_len, "\"model\":\"llama-3-70b-instruct\"") &&
              contains(body, body_len, "\"viplevel\":3") && stream == 0,
          "upstream: the model is mapped, every other field kept");
    check(headers && strstr(headers, "\"X-Original-Model\":\"gpt-4\"") && strstr(headers, "\"X-User-ID\":\"user_001\""),
          "upstream: the script's headers");
    check(llmp_handle_fell_back(h) == NULL, "upstream: no hook failed");

    uint16_t status = 0;
    const char *out = NULL, *out_headers = NULL;
    size_t out_len = 0;
    const char *resp_headers = "{\"Content-Type\":\"application/json\"}";
    r = llmp_handle_respond(engine, h, 200, resp_headers, strlen(resp_headers), COMPLETION, strlen(COMPLETION), 12.5,
                            &status, &out, &out_len, &out_headers, NULL);
    check(r == LLMP_OK && status == 200 && contains(out, out_len, "\"model\":\"gpt-4\"") &&
              contains(out, out_len, "\"content\":\"hi\""),
          "respond: the model is mapped back, the answer kept");

    const char *billing = NULL;
    size_t billing_len = 0;
    r = llmp_handle_usage(engine, h, &billing, &billing_len, NULL);
    check(r == LLMP_OK && contains(billing, billing_len, "\"billable_tokens\":28") &&
              contains(billing, billing_len, "\"limit_tokens\":57") &&
              contains(billing, billing_len, "\"discount\":0.5"),
          "usage: VIP 3 pays half of 57 tokens");
    llmp_handle_free(h);

    h = handle_of(engine, "{\"model\":\"gpt-3.5\",\"stream\":true,\"viplevel\":1}");
    if (h == NULL) return;
    r = llmp_handle_upstream(engine, h, "http://127.0.0.1:9002", &body, &body_len, &headers, &stream, NULL);
    check(r == LLMP_OK && stream == 1 && contains(body, body_len, "\"include_usage\":true"),
          "stream: the backend is asked for usage");
    const char *sse_headers = "{\"Content-Type\":\"text/event-stream\"}";
    check(llmp_handle_stream(h, 200, sse_headers, strlen(sse_headers), NULL) == LLMP_OK, "stream: the answer begins");
    const char *chunk = "{\"model\":\"qwen-72b-chat\",\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}";
    int drop = -1;
    uint16_t head_status = 1;
    const char *head_headers = NULL;
    r = llmp_handle_event(engine, h, chunk, strlen(chunk), 3.0, &out, &out_len, &drop, &head_status, &head_headers,
                          NULL);
    check(r == LLMP_OK && drop == 0 && contains(out, out_len, "\"model\":\"gpt-3.5\"") &&
              !contains(out, out_len, "usage"),
          "event: transformed, the forced usage:null gone");
    check(head_status == 200 && head_headers == NULL,
          "event: the seed returns the response's status, and its headers as they were (no header changes)");
    const char *usage_chunk =
        "{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":9,\"total_tokens\":10}}";
    r = llmp_handle_event(engine, h, usage_chunk, strlen(usage_chunk), 4.0, &out, &out_len, &drop, &head_status,
                          &head_headers, NULL);
    check(r == LLMP_OK && drop == 1, "event: the usage chunk the client did not ask for is dropped");
    r = llmp_handle_event(engine, h, "[DONE]", 6, 4.0, &out, &out_len, &drop, &head_status, &head_headers, NULL);
    check(r == LLMP_OK && drop == 0 && out == NULL && head_status == 0 && head_headers == NULL,
          "event: [DONE] goes as it came");
    r = llmp_handle_usage(engine, h, &billing, &billing_len, NULL);
    check(r == LLMP_OK && contains(billing, billing_len, "\"billable_tokens\":8"),
          "stream usage: VIP 1 pays 80% of 10 tokens");
    llmp_handle_free(h);
}

/* A failing request_transform: `standard` sends the client's body and says
 * what failed; `deny` fails the step. */
static void failure_policy(void) {
    static const char *const YAML[2] = {
        "scripts:\n  request_transform: {on_error: standard, script: \"error('boom')\"}\n",
        "scripts:\n  request_transform: {on_error: deny, script: \"error('boom')\"}\n",
    };
    for (int deny = 0; deny < 2; deny++) {
        llmp_engine *engine = engine_of(YAML[deny]);
        llmp_handle *h = engine ? handle_of(engine, "{\"model\":\"gpt-4\"}") : NULL;
        if (h == NULL) {
            check(0, "failure policy: engine and handle");
            llmp_engine_free(engine);
            continue;
        }
        const char *body = (const char *)1, *headers = NULL;
        size_t body_len = 0;
        int stream = 0;
        llmp_error *err = NULL;
        llmp_result r = llmp_handle_upstream(engine, h, "http://b", &body, &body_len, &headers, &stream, &err);
        if (deny) {
            check(r == LLMP_SCRIPT_ERROR && err && strstr(llmp_error_message(err), "boom") &&
                      body == (const char *)1,
                  "on_error deny: the step fails with the script's error");
        } else {
            const llmp_error *fell = llmp_handle_fell_back(h);
            check(r == LLMP_OK && body == NULL && body_len == 0 && fell &&
                      strcmp(llmp_error_kind(fell), "script_error") == 0,
                  "on_error standard: the client's body goes, the failure is told");
        }
        llmp_error_free(err);
        llmp_handle_free(h);
        llmp_engine_free(engine);
    }
}

/* The answer's headers as scripts see them, as in every host: Title-Case
 * names, a repeated header joined, no Content-Length nor hop-by-hop
 * header (a script may not set them); headers of the wrong shape refused. */
static void answer_headers(void) {
    llmp_engine *engine = engine_of(
        "scripts:\n"
        "  response_transform:\n"
        "    script: |\n"
        "      local seen = {}\n"
        "      for name, value in pairs(response.headers) do seen[#seen + 1] = name .. '=' .. value end\n"
        "      table.sort(seen)\n"
        "      return {headers = {['X-Seen'] = table.concat(seen, ';')}}\n");
    llmp_handle *h = engine ? handle_of(engine, "{\"model\":\"gpt-4\"}") : NULL;
    if (h == NULL) {
        check(0, "answer headers: engine and handle");
        llmp_engine_free(engine);
        return;
    }
    const char *given = "{\"content-type\":\"application/json\",\"content-length\":\"120\","
                        "\"connection\":\"keep-alive\",\"transfer-encoding\":\"chunked\","
                        "\"x-trace\":[\"a\",\"b\"],\"x-count\":3}";
    uint16_t status = 0;
    const char *out = NULL, *out_headers = NULL;
    size_t out_len = 0;
    llmp_result r = llmp_handle_respond(engine, h, 200, given, strlen(given), COMPLETION, strlen(COMPLETION), 1.0,
                                        &status, &out, &out_len, &out_headers, NULL);
    check(r == LLMP_OK && out_headers &&
              strstr(out_headers, "\"X-Seen\":\"Content-Type=application/json;X-Count=3;X-Trace=a, b\""),
          "respond: scripts see the answer's headers as every host shows them");
    static const char *const WRONG[] = {"[]", "{\"x-a\":{}}", "{\"x-a\":[1]}", "{\"x-a\":true}"};
    for (size_t i = 0; i < sizeof WRONG / sizeof WRONG[0]; i++) {
        llmp_error *err = NULL;
        r = llmp_handle_stream(h, 200, WRONG[i], strlen(WRONG[i]), &err);
        char what[96];
        snprintf(what, sizeof what, "stream refuses the headers %s", WRONG[i]);
        check(r == LLMP_INVALID_ARGUMENT && err != NULL, what);
        llmp_error_free(err);
    }
    llmp_handle_free(h);
    llmp_engine_free(engine);
}

/* The path as the core reads it: canonical, what the host sends upstream;
 * a path with no canonical form is refused. */
static void canonical_paths(const llmp_engine *engine) {
    static const char *const CASES[][3] = {
        /* request fields, the canonical path (NULL: refused), what */
        {"{\"path\":\"/v1/chat/completions\"}", "/v1/chat/completions", "a canonical path stays"},
        {"{\"path\":\"/v1//x/../chat/./%63ompletions\"}", "/v1/chat/completions",
         "slashes, dot segments and unreserved escapes are the core's"},
        {"{\"path\":\"/v1/chat%2Fcompletions\"}", NULL, "an encoded '/' is refused"},
        {"{\"path\":\"/v1/../../chat/completions\"}", NULL, "a '..' above the root is refused"},
    };
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
        llmp_handle *h = NULL;
        llmp_error *err = NULL;
        static const char BODY[] = "{\"model\":\"gpt-4\"}";
        llmp_result r = llmp_handle_new(engine, CASES[i][0], strlen(CASES[i][0]), BODY, strlen(BODY), &h, &err);
        char what[160];
        snprintf(what, sizeof what, "path: %s", CASES[i][2]);
        if (CASES[i][1]) {
            const char *path = r == LLMP_OK ? llmp_handle_path(h) : NULL;
            check(path && strcmp(path, CASES[i][1]) == 0, what);
        } else {
            check(r == LLMP_INVALID_ARGUMENT && h == NULL && err && strstr(llmp_error_message(err), "path"), what);
        }
        llmp_error_free(err);
        llmp_handle_free(h);
    }
    check(llmp_handle_path(NULL) == NULL, "llmp_handle_path(NULL) is NULL");
}

static void wrong_calls(const llmp_engine *engine) {
    static const char *const CASES[][3] = {
        /* request fields, body, what */
        {"{\"path\":\"/v1/models\"}", "{}", "a path that is not an API endpoint"},
        {"{\"id\":\"r\"}", "{}", "no path"},
        {"{\"path\":\"/v1/chat/completions\",\"body\":{}}", "{}", "a body among the request's fields"},
        {"{\"path\":\"/v1/chat/completions\"}", "{\"model\":", "a body that is not JSON"},
        {"{\"path\":\"/v1/chat/completions\"}", "[1]", "a body that is not an object"},
        {"{\"path\":\"/v1/chat/completions\"}", "{\"stream\":\"yes\"}", "a stream flag that is not a boolean"},
        {"[]", "{}", "request fields that are not an object"},
    };
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
        llmp_handle *h = NULL;
        llmp_error *err = NULL;
        llmp_result r = llmp_handle_new(engine, CASES[i][0], strlen(CASES[i][0]), CASES[i][1], strlen(CASES[i][1]),
                                        &h, &err);
        char what[160];
        snprintf(what, sizeof what, "llmp_handle_new refuses %s", CASES[i][2]);
        check(r == LLMP_INVALID_ARGUMENT && h == NULL && err != NULL, what);
        llmp_error_free(err);
    }
    const char *backend = NULL;
    check(llmp_handle_route(engine, NULL, NULL, &backend, NULL) == LLMP_INVALID_ARGUMENT, "route on a NULL handle");
    llmp_handle *h = handle_of(engine, "{}");
    check(llmp_handle_route(NULL, h, NULL, &backend, NULL) == LLMP_INVALID_ARGUMENT, "route with a NULL engine");
    check(llmp_handle_route(engine, h, NULL, &backend, NULL) == LLMP_INVALID_ARGUMENT, "route without backends");
    check(llmp_handle_fell_back(NULL) == NULL, "llmp_handle_fell_back(NULL) is NULL");
    llmp_handle_free(h);
    llmp_handle_free(NULL);
}

/* The library brings its own LuaJIT, built so that compiled loops stop at
 * the deadline: scripts are compiled unless LLMPROXY_SANDBOX_JIT lowers it. */
static void sandbox_jit(void) {
    const char *want = getenv("LLMPROXY_SANDBOX_JIT");
    const char *mode = llmp_sandbox_jit();
    if (want == NULL || want[0] == '\0') want = "everything";
    printf("     sandbox_jit() = %s\n", mode ? mode : "(null)");
    check(mode != NULL && strcmp(mode, want) == 0, "sandbox_jit() names what the sandbox compiles");
}

int main(void) {
    llmp_engine *engine = engine_of(SEED_YAML);
    llmp_globals *globals = NULL;
    llmp_error *err = NULL;
    if (engine == NULL || llmp_globals_new(BACKENDS, strlen(BACKENDS), &globals, &err) != LLMP_OK) {
        fprintf(stderr, "setup failed%s%s\n", err ? ": " : "", err ? llmp_error_message(err) : "");
        llmp_error_free(err);
        llmp_engine_free(engine);
        return 1;
    }
    sandbox_jit();
    seed_request(engine, globals);
    failure_policy();
    answer_headers();
    canonical_paths(engine);
    wrong_calls(engine);
    llmp_globals_free(globals);
    llmp_engine_free(engine);
    printf("%s\n", failures ? "handle: FAILED" : "handle: all checks passed");
    return failures ? 1 : 0;
}
