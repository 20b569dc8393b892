// The README's Go example: build an engine from YAML, route one request.
package main

import (
	"context"
	"fmt"
	"log"

	"llmproxy.example/llmproxy"
)

const config = `
scripts:
  routing:
    script: |
      if (request.body.viplevel or 0) >= 3 then return "ultra" end
      return nil
`

func main() {
	engine, err := llmproxy.New(config) // or llmproxy.NewFromFile(path)
	if err != nil {
		log.Fatal(err) // *llmproxy.Error, Kind "config"
	}
	defer engine.Close()
	backend, err := engine.Route(context.Background(), map[string]any{
		"request":  map[string]any{"id": "req-1", "body_raw": `{"model":"gpt-4","viplevel":3}`},
		"backends": map[string]any{"ultra": map[string]any{"url": "http://127.0.0.1:9003"}},
	}) // "" = use the default balancer
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(backend)
}
