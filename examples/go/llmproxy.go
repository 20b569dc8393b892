// Package llmproxy runs LLMProxy hook scripts from Go through libllmproxy's
// C ABI (include/llmproxy.h).
//
// An Engine is built once from a YAML config and is safe for concurrent use:
// any number of goroutines may call Run on it at once (each call checks a
// sandboxed LuaJIT state out of the engine's pool). Inputs and results are
// JSON: a hook's input is the object of its globals ({"request": ...,
// "backends": ...} for routing), its result what the script returned.
//
//	engine, err := llmproxy.New(yamlText)
//	if err != nil { ... }
//	defer engine.Close()
//	backend, err := engine.Route(ctx, map[string]any{"request": req, "backends": backends})
//
// A host that runs several hooks on one request parses it once, and its
// other globals once per change, with NewRequest and NewGlobals (both safe
// for concurrent use), then calls RunPrepared or RoutePrepared:
//
//	r, err := llmproxy.NewRequest(map[string]any{"id": id, "body_raw": body})
//	defer r.Close()
//	backend, err := engine.RoutePrepared(ctx, r, globals)
//
// Build: the package links libllmproxy (which brings its own LuaJIT) through pkg-config
// (`llmproxy.pc`, installed by `make install`; `make test-ffi` points
// PKG_CONFIG_PATH at an in-tree one).
package llmproxy

/*
#cgo pkg-config: llmproxy
#include <stdlib.h>
#include "llmproxy.h"
*/
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"runtime"
	"sync"
	"unsafe"
)

// The hooks' config names.
const (
	HookRouting           = "routing"
	HookAuth              = "auth"
	HookRequestTransform  = "request_transform"
	HookResponseTransform = "response_transform"
	HookRateLimit         = "rate_limit"
	HookUsage             = "usage"
	HookErrorHandler      = "error_handler"
)

// hookNames holds C copies of the hook names, made once, so a call does not
// allocate one.
var hookNames = func() map[string]*C.char {
	m := make(map[string]*C.char)
	for _, h := range []string{HookRouting, HookAuth, HookRequestTransform, HookResponseTransform,
		HookRateLimit, HookUsage, HookErrorHandler} {
		m[h] = C.CString(h)
	}
	return m
}()

// ErrClosed is returned by calls on an Engine, or with a Request or
// Globals, after its Close.
var ErrClosed = errors.New("llmproxy: engine, request or globals used after Close")

// Version is the version of the linked libllmproxy.
func Version() string {
	return C.GoString(C.llmp_version())
}

// Engine is a compiled configuration. It is safe for concurrent use.
type Engine struct {
	mu     sync.RWMutex // Close waits for running calls
	handle *C.llmp_engine
}

// New builds an engine from YAML configuration text, compiling every
// enabled script. Relative script_file paths are resolved against the
// current directory. Errors are *Error with Kind KindConfig (bad config,
// script that does not compile) or KindInvalidArgument.
func New(cfg string) (*Engine, error) {
	text := C.CString(cfg)
	defer C.free(unsafe.Pointer(text))
	var handle *C.llmp_engine
	var cerr *C.llmp_error
	if rc := C.llmp_engine_new(text, C.size_t(len(cfg)), &handle, &cerr); rc != C.LLMP_OK {
		return nil, takeError(rc, cerr)
	}
	return wrap(handle), nil
}

// NewFromFile builds an engine from a YAML config file; relative
// script_file paths are resolved against the file's directory.
func NewFromFile(path string) (*Engine, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var handle *C.llmp_engine
	var cerr *C.llmp_error
	if rc := C.llmp_engine_new_from_file(cpath, &handle, &cerr); rc != C.LLMP_OK {
		return nil, takeError(rc, cerr)
	}
	return wrap(handle), nil
}

func wrap(handle *C.llmp_engine) *Engine {
	e := &Engine{handle: handle}
	// A safety net for engines that are never closed.
	runtime.SetFinalizer(e, (*Engine).Close)
	return e
}

// Close frees the engine. It waits for calls in flight; later calls return
// ErrClosed. Closing twice is harmless.
func (e *Engine) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.handle != nil {
		C.llmp_engine_free(e.handle)
		e.handle = nil
		runtime.SetFinalizer(e, nil)
	}
	return nil
}

// empty backs the input pointer of a zero-length input (the C ABI reads
// no byte of it, but rejects NULL).
var empty = C.CString("")

// Run runs hook (HookRouting, ...) with input, the hook's globals: a
// json.RawMessage or []byte is passed as is, anything else is encoded with
// encoding/json. It returns the script's result as JSON ("null" when the
// script returned nil), validated against the hook's contract.
//
// ctx is checked before the call; once started, a call is bounded by the
// hook's own time limit (timeout_ms), not by ctx. Script failures are
// *Error with Kind KindTimeout, KindMemory, KindScriptError or
// KindBadOutput (apply the hook's on_error policy); a wrong hook or input
// is KindInvalidArgument.
func (e *Engine) Run(ctx context.Context, hook string, input any) (json.RawMessage, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	data, err := encode(input)
	if err != nil {
		return nil, &Error{Kind: KindInvalidArgument, Message: "input: " + err.Error()}
	}
	chook, ok := hookNames[hook]
	if !ok {
		chook = C.CString(hook)
		defer C.free(unsafe.Pointer(chook))
	}
	in := bytesPtr(data)

	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.handle == nil {
		return nil, ErrClosed
	}
	var out *C.char
	var outLen C.size_t
	var cerr *C.llmp_error
	rc := C.llmp_engine_run(e.handle, chook, in, C.size_t(len(data)), &out, &outLen, &cerr)
	runtime.KeepAlive(data)
	if rc != C.LLMP_OK {
		return nil, takeError(rc, cerr)
	}
	result := C.GoBytes(unsafe.Pointer(out), C.int(outLen))
	C.llmp_string_free(out)
	return json.RawMessage(result), nil
}

// Route runs the routing hook and returns the chosen backend's name, or ""
// when the script returned nil (use the default balancer).
func (e *Engine) Route(ctx context.Context, input any) (string, error) {
	raw, err := e.Run(ctx, HookRouting, input)
	if err != nil {
		return "", err
	}
	return backendName(raw)
}

// backendName decodes a routing result: a name, or "" for null.
func backendName(raw json.RawMessage) (string, error) {
	var name *string
	if err := json.Unmarshal(raw, &name); err != nil {
		return "", &Error{Kind: KindBadOutput, Hook: HookRouting, Message: "routing result is not a string: " + string(raw)}
	}
	if name == nil {
		return "", nil
	}
	return *name, nil
}

func encode(input any) ([]byte, error) {
	switch v := input.(type) {
	case json.RawMessage:
		return v, nil
	case []byte:
		return v, nil
	case string:
		return []byte(v), nil
	default:
		return json.Marshal(v)
	}
}
