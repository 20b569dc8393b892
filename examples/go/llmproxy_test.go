package llmproxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
)

// casesDir is the shared conformance suite (override with LLMP_CASES).
func casesDir() string {
	if d := os.Getenv("LLMP_CASES"); d != "" {
		return d
	}
	return filepath.Join("..", "..", "conformance", "cases")
}

type conformanceCase struct {
	Name   string          `json:"name"`
	Hook   string          `json:"hook"`
	Script []string        `json:"script"`
	Input  json.RawMessage `json:"input"`
	Limits map[string]int  `json:"limits"`
	Expect struct {
		Result json.RawMessage `json:"result"`
		Error  string          `json:"error"`
	} `json:"expect"`
}

func loadCases(t *testing.T) map[string]conformanceCase {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(casesDir(), "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no conformance cases in %s (%v)", casesDir(), err)
	}
	cases := make(map[string]conformanceCase)
	for _, f := range files {
		text, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var c conformanceCase
		if err := json.Unmarshal(text, &c); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		cases[filepath.Base(f)] = c
	}
	return cases
}

// config enables the case's hook with its script and limits. It is JSON,
// which is also YAML.
func (c conformanceCase) config() string {
	hook := map[string]any{"script": strings.Join(c.Script, "\n")}
	for k, v := range c.Limits {
		hook[k] = v
	}
	text, _ := json.Marshal(map[string]any{"scripts": map[string]any{c.Hook: hook}})
	return string(text)
}

// sameJSON compares two JSON texts by value (3 == 3.0; [] != {}).
func sameJSON(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}

// The C ABI reports the core's bad_input as invalid_argument.
func wantKind(kind string) Kind {
	if kind == "bad_input" {
		return KindInvalidArgument
	}
	return Kind(kind)
}

func TestConformance(t *testing.T) {
	ctx := context.Background()
	for file, c := range loadCases(t) {
		c := c
		t.Run(file, func(t *testing.T) {
			engine, err := New(c.config())
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			defer engine.Close()
			got, err := engine.Run(ctx, c.Hook, c.Input)
			switch {
			case c.Expect.Error != "":
				var e *Error
				if !errors.As(err, &e) || e.Kind != wantKind(c.Expect.Error) {
					t.Fatalf("%s: expected error %s, got result %s, error %v", c.Name, c.Expect.Error, got, err)
				}
				if !errors.Is(err, wantKind(c.Expect.Error)) {
					t.Fatalf("errors.Is(err, %s) is false for %v", c.Expect.Error, err)
				}
			case err != nil:
				t.Fatalf("%s: expected result %s, got error %v", c.Name, c.Expect.Result, err)
			case !sameJSON(got, c.Expect.Result):
				t.Fatalf("%s: expected result %s, got %s", c.Name, c.Expect.Result, got)
			}
		})
	}
}

const routingYAML = `
scripts:
  routing:
    script: |
      local v = request.body.viplevel or 0
      if v == "loop" then while true do end end
      if v == "boom" then error("boom") end
      if v >= 3 then return "ultra" elseif v >= 1 then return "high" end
      return nil
    timeout_ms: 50
`

func routingInput(vip any) map[string]any {
	return map[string]any{
		"request": map[string]any{"id": "r1", "body": map[string]any{"viplevel": vip}},
		"backends": map[string]any{
			"ultra": map[string]any{"url": "http://u"},
			"high":  map[string]any{"url": "http://h"},
		},
	}
}

func TestRoute(t *testing.T) {
	engine, err := New(routingYAML)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	ctx := context.Background()
	for vip, want := range map[int]string{0: "", 1: "high", 2: "high", 3: "ultra", 9: "ultra"} {
		got, err := engine.Route(ctx, routingInput(vip))
		if err != nil || got != want {
			t.Errorf("viplevel %d: got %q, %v; want %q", vip, got, err, want)
		}
	}
	// body_raw: the body as JSON text, parsed once by the engine.
	raw := map[string]any{
		"request":  map[string]any{"id": "r2", "body_raw": `{"viplevel": 3}`},
		"backends": map[string]any{"ultra": map[string]any{"url": "http://u"}},
	}
	if got, err := engine.Route(ctx, raw); err != nil || got != "ultra" {
		t.Errorf("body_raw: got %q, %v", got, err)
	}
}

// TestConcurrent calls one engine from 64 goroutines at once, each with
// inputs that must give different answers, so crossed wires would show.
func TestConcurrent(t *testing.T) {
	engine, err := New(routingYAML)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	ctx := context.Background()
	const goroutines, calls = 64, 200
	want := []string{"", "high", "high", "ultra"}
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	start := make(chan struct{})
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			<-start
			for i := 0; i < calls; i++ {
				vip := (g + i) % 4
				got, err := engine.Route(ctx, routingInput(vip))
				if err != nil || got != want[vip] {
					errs <- fmt.Errorf("goroutine %d call %d: viplevel %d gave %q, %v", g, i, vip, got, err)
					return
				}
			}
		}(g)
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestErrors(t *testing.T) {
	ctx := context.Background()
	engine, err := New(routingYAML)
	if err != nil {
		t.Fatal(err)
	}

	check := func(name string, err error, kind Kind) {
		t.Helper()
		var e *Error
		if !errors.As(err, &e) || e.Kind != kind || !errors.Is(err, kind) {
			t.Errorf("%s: want kind %s, got %v", name, kind, err)
		}
	}
	_, err = engine.Route(ctx, routingInput("loop"))
	check("timeout", err, KindTimeout)
	_, err = engine.Route(ctx, routingInput("boom"))
	check("script error", err, KindScriptError)
	var e *Error
	if errors.As(err, &e) && (e.Hook != "routing" || e.Script != "scripts.routing" || e.Line != 3) {
		t.Errorf("script error location: %+v", e)
	}
	_, err = engine.Run(ctx, "nope", routingInput(1))
	check("unknown hook", err, KindInvalidArgument)
	_, err = engine.Run(ctx, HookAuth, routingInput(1))
	check("hook not enabled", err, KindInvalidArgument)
	_, err = engine.Run(ctx, HookRouting, json.RawMessage(`{"request": `))
	check("truncated JSON", err, KindInvalidArgument)
	_, err = engine.Run(ctx, HookRouting, []byte{})
	check("empty input", err, KindInvalidArgument)
	_, err = engine.Run(ctx, HookRouting, []byte("{\"request\": {\"id\": \"\xff\"}}"))
	check("non-UTF-8 input", err, KindInvalidArgument)
	_, err = engine.Run(ctx, HookRouting, func() {})
	check("unencodable input", err, KindInvalidArgument)

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := engine.Route(cancelled, routingInput(3)); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: got %v", err)
	}

	if err := engine.Close(); err != nil {
		t.Fatal(err)
	}
	if err := engine.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := engine.Route(ctx, routingInput(3)); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close: got %v", err)
	}

	_, err = New("scripts: [")
	check("invalid YAML", err, KindConfig)
	_, err = New("scripts:\n  routing:\n    script: \"return (\"\n")
	check("syntax error", err, KindConfig)
	_, err = NewFromFile("/nonexistent.yaml")
	check("missing file", err, KindConfig)
	if v := Version(); v == "" {
		t.Error("empty Version()")
	}
}
