package llmproxy_test

import (
	"context"
	"fmt"

	"llmproxy.example/llmproxy"
)

func Example() {
	engine, err := llmproxy.New(`
scripts:
  routing:
    script: |
      if (request.body.viplevel or 0) >= 3 then return "ultra" end
      return nil
`)
	if err != nil {
		panic(err)
	}
	defer engine.Close()

	backend, err := engine.Route(context.Background(), map[string]any{
		"request":  map[string]any{"id": "req-1", "body_raw": `{"model": "gpt-4", "viplevel": 3}`},
		"backends": map[string]any{"ultra": map[string]any{"url": "http://ultra:8000"}},
	})
	fmt.Println(backend, err)
	// Output: ultra <nil>
}

// A host that runs several hooks on one request parses it once, and the
// backends once per change.
func ExampleEngine_RoutePrepared() {
	engine, err := llmproxy.New(`
scripts:
  routing:
    script: |
      if (request.body.viplevel or 0) >= 3 then return "ultra" end
      return nil
`)
	if err != nil {
		panic(err)
	}
	defer engine.Close()

	backends, err := llmproxy.NewGlobals(map[string]any{
		"backends": map[string]any{"ultra": map[string]any{"url": "http://ultra:8000"}},
	})
	if err != nil {
		panic(err)
	}
	defer backends.Close()

	req, err := llmproxy.NewRequest(map[string]any{"id": "req-1", "body_raw": `{"model": "gpt-4", "viplevel": 3}`})
	if err != nil {
		panic(err)
	}
	defer req.Close()

	backend, err := engine.RoutePrepared(context.Background(), req, backends)
	fmt.Println(backend, err)
	// Output: ultra <nil>
}
