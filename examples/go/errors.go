package llmproxy

/*
#include "llmproxy.h"
*/
import "C"

import "fmt"

// Kind classifies a failure. It is an error itself, so that
// errors.Is(err, llmproxy.KindTimeout) works on any error from this package.
type Kind string

// The kinds of failure (llmp_error_kind).
const (
	// KindInvalidArgument: an unknown or disabled hook, input that is not a
	// JSON object, not UTF-8, or past the size and nesting limits.
	KindInvalidArgument Kind = "invalid_argument"
	// KindConfig: the config is invalid, unreadable, or a script does not compile.
	KindConfig Kind = "config"
	// KindTimeout: the script ran past its time limit.
	KindTimeout Kind = "timeout"
	// KindMemory: the script allocated past its memory limit.
	KindMemory Kind = "memory"
	// KindScriptError: the script raised an error.
	KindScriptError Kind = "script_error"
	// KindBadOutput: the script's result does not fit the hook's contract.
	KindBadOutput Kind = "bad_output"
	// KindInternal: no VM became free in time, or LuaJIT failed.
	KindInternal Kind = "internal"
	// KindPanic: a bug in libllmproxy, caught at its boundary.
	KindPanic Kind = "panic"
)

func (k Kind) Error() string { return "llmproxy: " + string(k) }

// Error is a failed call: its kind, a message for the operator and, for a
// hook failure, where it happened.
type Error struct {
	Kind    Kind
	Message string
	Hook    string // "" when not tied to a hook
	Script  string // "" when unknown
	Line    int    // 0 when unknown
}

func (e *Error) Error() string {
	return fmt.Sprintf("llmproxy: %s: %s", e.Kind, e.Message)
}

// Is reports whether target is this error's Kind.
func (e *Error) Is(target error) bool {
	k, ok := target.(Kind)
	return ok && k == e.Kind
}

// takeError converts and frees a C error (which may be NULL).
func takeError(rc C.llmp_result, cerr *C.llmp_error) error {
	if cerr == nil {
		return &Error{Kind: KindInternal, Message: fmt.Sprintf("llmp_result %d without an error object", uint32(rc))}
	}
	defer C.llmp_error_free(cerr)
	e := &Error{
		Kind:    Kind(C.GoString(C.llmp_error_kind(cerr))),
		Message: C.GoString(C.llmp_error_message(cerr)),
		Line:    int(C.llmp_error_line(cerr)),
	}
	if h := C.llmp_error_hook(cerr); h != nil {
		e.Hook = C.GoString(h)
	}
	if s := C.llmp_error_script(cerr); s != nil {
		e.Script = C.GoString(s)
	}
	return e
}
