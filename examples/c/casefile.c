/* casefile.c: see casefile.h. */
#define _POSIX_C_SOURCE 200809L
#include "casefile.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_paths(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

char **list_cases(const char *dir, size_t *count) {
    DIR *d = opendir(dir);
    size_t n = 0, cap = 16;
    char **paths = malloc(cap * sizeof *paths);
    *count = 0;
    if (!d || !paths) {
        if (d) closedir(d);
        free(paths);
        return NULL;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len < 6 || strcmp(e->d_name + len - 5, ".json") != 0) continue;
        if (n == cap) {
            char **grown = realloc(paths, 2 * cap * sizeof *paths);
            if (!grown) break;
            paths = grown;
            cap *= 2;
        }
        size_t size = strlen(dir) + len + 2;
        paths[n] = malloc(size);
        if (!paths[n]) break;
        snprintf(paths[n], size, "%s/%s", dir, e->d_name);
        n++;
    }
    closedir(d);
    qsort(paths, n, sizeof *paths, cmp_paths);
    *count = n;
    return paths;
}

void free_paths(char **paths, size_t count) {
    for (size_t i = 0; i < count; i++) free(paths[i]);
    free(paths);
}

char *case_config(json_t *c, int timeout_scale) {
    json_t *lines = json_object_get(c, "script");
    size_t size = 1, i;
    json_t *line;
    json_array_foreach(lines, i, line) size += json_string_length(line) + 1;
    char *src = calloc(1, size);
    if (!src) return NULL;
    char *p = src;
    json_array_foreach(lines, i, line) {
        if (i > 0) *p++ = '\n';
        memcpy(p, json_string_value(line), json_string_length(line));
        p += json_string_length(line);
    }
    json_t *hook_cfg = json_pack("{s:s}", "script", src);
    free(src);
    json_t *limits = json_object_get(c, "limits");
    const char *key;
    json_t *value;
    json_object_foreach(limits, key, value) json_object_set(hook_cfg, key, value);
    const char *want_error = json_string_value(json_object_get(json_object_get(c, "expect"), "error"));
    if (timeout_scale > 1 && !(want_error && strcmp(want_error, "timeout") == 0)) {
        json_t *t = json_object_get(hook_cfg, "timeout_ms");
        json_int_t ms = json_is_integer(t) ? json_integer_value(t) : 100;
        json_object_set_new(hook_cfg, "timeout_ms", json_integer(ms * timeout_scale));
    }
    json_t *cfg = json_pack("{s:{s:o}}", "scripts", json_string_value(json_object_get(c, "hook")), hook_cfg);
    char *text = json_dumps(cfg, JSON_INDENT(2));
    json_decref(cfg);
    return text;
}

int json_same(json_t *a, json_t *b) {
    if (json_is_number(a) && json_is_number(b)) return json_number_value(a) == json_number_value(b);
    if (json_typeof(a) != json_typeof(b)) return 0;
    switch (json_typeof(a)) {
    case JSON_ARRAY: {
        if (json_array_size(a) != json_array_size(b)) return 0;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!json_same(json_array_get(a, i), json_array_get(b, i))) return 0;
        return 1;
    }
    case JSON_OBJECT: {
        if (json_object_size(a) != json_object_size(b)) return 0;
        const char *key;
        json_t *value;
        json_object_foreach(a, key, value) {
            json_t *other = json_object_get(b, key);
            if (!other || !json_same(value, other)) return 0;
        }
        return 1;
    }
    default:
        return json_equal(a, b);
    }
}

llmp_result case_prepare(json_t *input, llmp_request **request, llmp_globals **globals, llmp_error **err) {
    llmp_result rc = LLMP_OK;
    *request = NULL;
    *globals = NULL;
    json_t *req = json_object_get(input, "request");
    json_t *rest = json_deep_copy(input);
    json_object_del(rest, "request");
    if (req) {
        char *text = json_dumps(req, JSON_COMPACT | JSON_ENCODE_ANY);
        rc = llmp_request_new(text, strlen(text), request, err);
        free(text);
    }
    if (rc == LLMP_OK && json_object_size(rest) > 0) {
        char *text = json_dumps(rest, JSON_COMPACT);
        rc = llmp_globals_new(text, strlen(text), globals, err);
        free(text);
    }
    if (rc != LLMP_OK) {
        llmp_request_free(*request);
        *request = NULL;
    }
    json_decref(rest);
    return rc;
}
