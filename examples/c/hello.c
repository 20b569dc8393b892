/* The README's C example: build an engine from YAML, run the routing hook. */
#include <stdio.h>
#include <string.h>
#include <llmproxy.h>

int main(void) {
    const char *yaml =
        "scripts:\n"
        "  routing:\n"
        "    script: |\n"
        "      if (request.body.viplevel or 0) >= 3 then return \"ultra\" end\n"
        "      return nil\n";
    const char *input =
        "{\"request\": {\"id\": \"req-1\", \"body\": {\"model\": \"gpt-4\", \"viplevel\": 3}},"
        " \"backends\": {\"ultra\": {\"url\": \"http://127.0.0.1:9003\"}}}";
    llmp_engine *engine = NULL;
    llmp_error *err = NULL;
    if (llmp_engine_new(yaml, strlen(yaml), &engine, &err) != LLMP_OK) {
        fprintf(stderr, "%s: %s\n", llmp_error_kind(err), llmp_error_message(err));
        llmp_error_free(err);
        return 1;
    }
    char *out = NULL;
    size_t out_len = 0;
    int status = 0;
    if (llmp_engine_run(engine, "routing", input, strlen(input), &out, &out_len, &err) == LLMP_OK) {
        printf("%.*s\n", (int)out_len, out); /* "ultra", or null for the default balancer */
        llmp_string_free(out);
    } else {
        fprintf(stderr, "%s: %s\n", llmp_error_kind(err), llmp_error_message(err));
        llmp_error_free(err);
        status = 1;
    }
    llmp_engine_free(engine);
    return status;
}
