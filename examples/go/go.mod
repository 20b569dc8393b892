module llmproxy.example/llmproxy

go 1.19
