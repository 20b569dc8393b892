module example.com/hello

go 1.19

require llmproxy.example/llmproxy v0.0.0

// The bindings are not published: point the module path at a checkout.
replace llmproxy.example/llmproxy => ../go
