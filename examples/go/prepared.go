package llmproxy

/*
#include <stdlib.h>
#include "llmproxy.h"
*/
import "C"

import (
	"context"
	"encoding/json"
	"runtime"
	"sync"
	"unsafe"
)

// Request is a client request parsed once (its body included), for every
// hook that runs on it: build it when the request arrives, pass it to
// RunPrepared as many times as needed, Close it when the request is done.
// It is immutable and safe for concurrent use, with any Engine.
type Request struct {
	mu     sync.RWMutex // Close waits for calls using it
	handle *C.llmp_request
}

// NewRequest parses the `request` global once: a json.RawMessage, []byte or
// string is taken as JSON text, anything else is encoded with
// encoding/json. The body may be given parsed ("body") or as JSON text
// ("body_raw", what a server usually holds); either way it is parsed here.
// Errors are *Error with Kind KindInvalidArgument.
//
// The hook's limits (max_depth, max_input_bytes) are checked on every
// RunPrepared call, so a hook accepts a Request exactly when it would
// accept the same JSON through Run.
func NewRequest(request any) (*Request, error) {
	data, err := encode(request)
	if err != nil {
		return nil, &Error{Kind: KindInvalidArgument, Message: "request: " + err.Error()}
	}
	var handle *C.llmp_request
	var cerr *C.llmp_error
	rc := C.llmp_request_new(bytesPtr(data), C.size_t(len(data)), &handle, &cerr)
	runtime.KeepAlive(data)
	if rc != C.LLMP_OK {
		return nil, takeError(rc, cerr)
	}
	r := &Request{handle: handle}
	runtime.SetFinalizer(r, (*Request).Close)
	return r, nil
}

// Close frees the request. It waits for calls using it; later calls with
// it return ErrClosed. Closing twice is harmless.
func (r *Request) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.handle != nil {
		C.llmp_request_free(r.handle)
		r.handle = nil
		runtime.SetFinalizer(r, nil)
	}
	return nil
}

// Globals is a hook's other globals ("backends" for routing, "key_info"
// for auth, "usage", "response", ...) parsed once: build it when they
// change (the backend set, say), not on every call. It is immutable and
// safe for concurrent use, with any Engine.
type Globals struct {
	mu     sync.RWMutex // Close waits for calls using it
	handle *C.llmp_globals
}

// NewGlobals parses a JSON object of globals once, given as for
// NewRequest. It may not hold "request" (that is a Request). Errors are
// *Error with Kind KindInvalidArgument.
func NewGlobals(globals any) (*Globals, error) {
	data, err := encode(globals)
	if err != nil {
		return nil, &Error{Kind: KindInvalidArgument, Message: "globals: " + err.Error()}
	}
	var handle *C.llmp_globals
	var cerr *C.llmp_error
	rc := C.llmp_globals_new(bytesPtr(data), C.size_t(len(data)), &handle, &cerr)
	runtime.KeepAlive(data)
	if rc != C.LLMP_OK {
		return nil, takeError(rc, cerr)
	}
	g := &Globals{handle: handle}
	runtime.SetFinalizer(g, (*Globals).Close)
	return g, nil
}

// Close frees the globals. It waits for calls using them; later calls with
// them return ErrClosed. Closing twice is harmless.
func (g *Globals) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.handle != nil {
		C.llmp_globals_free(g.handle)
		g.handle = nil
		runtime.SetFinalizer(g, nil)
	}
	return nil
}

// RunPrepared runs hook on a request and globals parsed once (either may
// be nil: no `request` global, no other globals), with the result, errors
// and context handling of Run. It does what Run does with the same JSON as
// one input, without parsing it again: the per-call cost of a host that
// runs several hooks on one request.
func (e *Engine) RunPrepared(ctx context.Context, hook string, req *Request, g *Globals) (json.RawMessage, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	chook, ok := hookNames[hook]
	if !ok {
		chook = C.CString(hook)
		defer C.free(unsafe.Pointer(chook))
	}
	var creq *C.llmp_request
	if req != nil {
		req.mu.RLock()
		defer req.mu.RUnlock()
		if req.handle == nil {
			return nil, ErrClosed
		}
		creq = req.handle
	}
	var cglob *C.llmp_globals
	if g != nil {
		g.mu.RLock()
		defer g.mu.RUnlock()
		if g.handle == nil {
			return nil, ErrClosed
		}
		cglob = g.handle
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.handle == nil {
		return nil, ErrClosed
	}
	var out *C.char
	var outLen C.size_t
	var cerr *C.llmp_error
	if rc := C.llmp_engine_run_prepared(e.handle, chook, creq, cglob, &out, &outLen, &cerr); rc != C.LLMP_OK {
		return nil, takeError(rc, cerr)
	}
	result := C.GoBytes(unsafe.Pointer(out), C.int(outLen))
	C.llmp_string_free(out)
	return json.RawMessage(result), nil
}

// RoutePrepared runs the routing hook through RunPrepared and returns the
// chosen backend's name, or "" when the script returned nil.
func (e *Engine) RoutePrepared(ctx context.Context, req *Request, g *Globals) (string, error) {
	raw, err := e.RunPrepared(ctx, HookRouting, req, g)
	if err != nil {
		return "", err
	}
	return backendName(raw)
}

// bytesPtr is data's first byte, or a valid pointer for empty data (the C
// ABI reads no byte of it, but rejects NULL).
func bytesPtr(data []byte) *C.char {
	if len(data) == 0 {
		return empty
	}
	return (*C.char)(unsafe.Pointer(&data[0]))
}
