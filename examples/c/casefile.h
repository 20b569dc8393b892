/*
 * casefile.h: read conformance cases (conformance/cases/NNN-name.json) and compare
 * JSON values, for the C host programs. Uses jansson (libjansson-dev).
 *
 * A case is {name, hook, script: [lines], input, limits?, expect: {result |
 * error}} (core/src/conformance.rs). The config for a case is written as
 * JSON, which is also YAML: {"scripts": {HOOK: {"script": ..., limits}}}.
 */
#ifndef LLMPROXY_EXAMPLES_CASEFILE_H
#define LLMPROXY_EXAMPLES_CASEFILE_H

#include <jansson.h>
#include <stddef.h>

#include "llmproxy.h"

/* Sorted list of "*.json" paths in dir; *count set. Free with free_paths. */
char **list_cases(const char *dir, size_t *count);
void free_paths(char **paths, size_t count);

/* The YAML (JSON) config text that enables the case's hook with its script
 * and limits. timeout_scale > 1 multiplies the case's time limit (default
 * 100 ms) unless the case expects a timeout: under valgrind scripts run
 * ~20x slower. malloc'd; free() it. */
char *case_config(json_t *c, int timeout_scale);

/* Split a case's input as a host would and parse both parts once: its
 * `request` through llmp_request_new, its other globals through
 * llmp_globals_new. *request and *globals are left NULL when the input has
 * no such part (and on failure); free them with llmp_request_free and
 * llmp_globals_free. */
llmp_result case_prepare(json_t *input, llmp_request **request, llmp_globals **globals, llmp_error **err);

/* Deep equality: numbers compare by value (integer 3 == real 3.0), arrays and
 * objects must match in kind, length and keys. */
int json_same(json_t *a, json_t *b);

#endif
