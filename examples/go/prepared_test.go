package llmproxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"testing"
)

// splitInput splits a case's input as a host would: its request, and the
// other globals (nil when there is none).
func splitInput(t *testing.T, input json.RawMessage) (request json.RawMessage, globals map[string]json.RawMessage) {
	t.Helper()
	var all map[string]json.RawMessage
	if err := json.Unmarshal(input, &all); err != nil {
		t.Fatalf("input is not an object: %v", err)
	}
	request = all["request"]
	delete(all, "request")
	if len(all) > 0 {
		globals = all
	}
	return request, globals
}

// TestConformancePrepared runs every case through NewRequest, NewGlobals
// and RunPrepared; a failure while preparing counts as the call's outcome.
func TestConformancePrepared(t *testing.T) {
	ctx := context.Background()
	for file, c := range loadCases(t) {
		c := c
		t.Run(file, func(t *testing.T) {
			engine, err := New(c.config())
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			defer engine.Close()
			reqJSON, globalsMap := splitInput(t, c.Input)
			var req *Request
			var g *Globals
			var got json.RawMessage
			if reqJSON != nil {
				req, err = NewRequest(reqJSON)
			}
			if err == nil && globalsMap != nil {
				g, err = NewGlobals(globalsMap)
			}
			if err == nil {
				got, err = engine.RunPrepared(ctx, c.Hook, req, g)
			}
			if req != nil {
				req.Close()
			}
			if g != nil {
				g.Close()
			}
			switch {
			case c.Expect.Error != "":
				var e *Error
				if !errors.As(err, &e) || e.Kind != wantKind(c.Expect.Error) {
					t.Fatalf("%s: expected error %s, got result %s, error %v", c.Name, c.Expect.Error, got, err)
				}
			case err != nil:
				t.Fatalf("%s: expected result %s, got error %v", c.Name, c.Expect.Result, err)
			case !sameJSON(got, c.Expect.Result):
				t.Fatalf("%s: expected result %s, got %s", c.Name, c.Expect.Result, got)
			}
		})
	}
}

var routingBackends = map[string]any{
	"backends": map[string]any{
		"ultra": map[string]any{"url": "http://u"},
		"high":  map[string]any{"url": "http://h"},
	},
}

func TestRoutePrepared(t *testing.T) {
	engine, err := New(routingYAML)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	g, err := NewGlobals(routingBackends)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	ctx := context.Background()
	for vip, want := range map[int]string{0: "", 1: "high", 2: "high", 3: "ultra", 9: "ultra"} {
		r, err := NewRequest(map[string]any{"id": "r1", "body": map[string]any{"viplevel": vip}})
		if err != nil {
			t.Fatal(err)
		}
		// Several calls on one request: parsed once.
		for i := 0; i < 3; i++ {
			got, err := engine.RoutePrepared(ctx, r, g)
			if err != nil || got != want {
				t.Errorf("viplevel %d: got %q, %v; want %q", vip, got, err, want)
			}
		}
		r.Close()
	}
	// body_raw as JSON text, the request given as text too.
	r, err := NewRequest(`{"id": "r2", "body_raw": "{\"viplevel\": 3}"}`)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got, err := engine.RoutePrepared(ctx, r, g); err != nil || got != "ultra" {
		t.Errorf("body_raw: got %q, %v", got, err)
	}
	// The same request through Run and RunPrepared gives the same result.
	viaRun, err1 := engine.Run(ctx, HookRouting, map[string]any{
		"request": map[string]any{"id": "r2", "body_raw": `{"viplevel": 3}`}, "backends": routingBackends["backends"],
	})
	viaPrepared, err2 := engine.RunPrepared(ctx, HookRouting, r, g)
	if err1 != nil || err2 != nil || !sameJSON(viaRun, viaPrepared) {
		t.Errorf("Run %s (%v) vs RunPrepared %s (%v)", viaRun, err1, viaPrepared, err2)
	}
}

// TestPreparedConcurrent shares one Globals and a few Requests between 64
// goroutines; each request must give its own answer, so crossed wires
// would show.
func TestPreparedConcurrent(t *testing.T) {
	engine, err := New(routingYAML)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	g, err := NewGlobals(routingBackends)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	want := []string{"", "high", "high", "ultra"}
	reqs := make([]*Request, len(want))
	for vip := range want {
		if reqs[vip], err = NewRequest(map[string]any{"body": map[string]any{"viplevel": vip}}); err != nil {
			t.Fatal(err)
		}
		defer reqs[vip].Close()
	}
	ctx := context.Background()
	const goroutines, calls = 64, 200
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	start := make(chan struct{})
	for i := 0; i < goroutines; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			for j := 0; j < calls; j++ {
				vip := (i + j) % len(want)
				got, err := engine.RoutePrepared(ctx, reqs[vip], g)
				if err != nil || got != want[vip] {
					errs <- fmt.Errorf("goroutine %d call %d: viplevel %d gave %q, %v", i, j, vip, got, err)
					return
				}
			}
		}(i)
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestPreparedErrors(t *testing.T) {
	ctx := context.Background()
	engine, err := New(routingYAML)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	check := func(name string, err error, kind Kind) {
		t.Helper()
		var e *Error
		if !errors.As(err, &e) || e.Kind != kind || !errors.Is(err, kind) {
			t.Errorf("%s: want kind %s, got %v", name, kind, err)
		}
	}

	_, err = NewRequest(json.RawMessage(`{"body": `))
	check("truncated request", err, KindInvalidArgument)
	_, err = NewRequest([]byte{})
	check("empty request", err, KindInvalidArgument)
	_, err = NewRequest("[1]")
	check("request not an object", err, KindInvalidArgument)
	_, err = NewRequest(map[string]any{"body_raw": "{oops"})
	check("body_raw not JSON", err, KindInvalidArgument)
	_, err = NewRequest(func() {})
	check("unencodable request", err, KindInvalidArgument)
	_, err = NewGlobals(`{"request": {}}`)
	check("request in globals", err, KindInvalidArgument)
	_, err = NewGlobals("null")
	check("globals not an object", err, KindInvalidArgument)
	_, err = NewGlobals(map[string]any{"response": map[string]any{"status_code": "x"}})
	check("bad response", err, KindInvalidArgument)

	g, err := NewGlobals(routingBackends)
	if err != nil {
		t.Fatal(err)
	}
	loop, _ := NewRequest(map[string]any{"body": map[string]any{"viplevel": "loop"}})
	boom, _ := NewRequest(map[string]any{"body": map[string]any{"viplevel": "boom"}})
	ok, _ := NewRequest(map[string]any{"body": map[string]any{"viplevel": 3}})
	_, err = engine.RunPrepared(ctx, HookRouting, loop, g)
	check("timeout", err, KindTimeout)
	_, err = engine.RunPrepared(ctx, HookRouting, boom, g)
	check("script error", err, KindScriptError)
	var e *Error
	if errors.As(err, &e) && (e.Hook != "routing" || e.Script != "scripts.routing" || e.Line != 3) {
		t.Errorf("script error location: %+v", e)
	}
	_, err = engine.RunPrepared(ctx, HookRouting, nil, g)
	check("no request", err, KindScriptError)
	_, err = engine.RunPrepared(ctx, HookRouting, ok, nil)
	check("no backends", err, KindBadOutput)
	_, err = engine.RunPrepared(ctx, "nope", ok, g)
	check("unknown hook", err, KindInvalidArgument)
	_, err = engine.RunPrepared(ctx, HookAuth, ok, g)
	check("hook not enabled", err, KindInvalidArgument)

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := engine.RunPrepared(cancelled, HookRouting, ok, g); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: got %v", err)
	}

	for _, r := range []*Request{loop, boom, ok} {
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := ok.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := engine.RunPrepared(ctx, HookRouting, ok, g); !errors.Is(err, ErrClosed) {
		t.Errorf("closed request: got %v", err)
	}
	g.Close()
	g.Close()
	fresh, _ := NewRequest(map[string]any{"body": map[string]any{"viplevel": 3}})
	defer fresh.Close()
	if _, err := engine.RunPrepared(ctx, HookRouting, fresh, g); !errors.Is(err, ErrClosed) {
		t.Errorf("closed globals: got %v", err)
	}
}
