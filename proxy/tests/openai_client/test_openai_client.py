"""The official `openai` Python client against the gateway.

Starts `llmproxy mock-backend` and `llmproxy serve` (binary from
$LLMPROXY_BIN) on free 127.0.0.1 ports, with the seed's routing and
model-mapping transforms, then checks a chat completion, a streamed chat
completion (arriving incrementally) and an embedding. Prints
`N passed, N failed` and exits non-zero on any failure.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

import openai

CHUNKS = 6
CHUNK_DELAY_MS = 150

ROUTING = """local viplevel = request.body.viplevel or 0
if viplevel >= 3 then
  return "ultra"
else
  return "standard"
end
"""
REQUEST_TRANSFORM = """local model_map = {["gpt-4"] = "llama-3-70b-instruct"}
local new_body = {}
for k, v in pairs(request.body) do new_body[k] = v end
new_body.model = model_map[request.body.model] or request.body.model
return {body = new_body, headers = {["X-Original-Model"] = request.body.model}}
"""
RESPONSE_TRANSFORM = """local model_map = {["llama-3-70b-instruct"] = "gpt-4"}
local new_body = {}
for k, v in pairs(response.body) do new_body[k] = v end
new_body.model = model_map[response.body.model] or response.body.model
return {status_code = response.status_code, body = new_body, headers = response.headers}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def indent(script):
    return "".join("      " + line + "\n" for line in script.splitlines())


def start(binary, tmp):
    procs = []
    backends = []
    for name in ("standard", "ultra"):
        port = free_port()
        procs.append(subprocess.Popen(
            [binary, "mock-backend", "--listen", f"127.0.0.1:{port}", "--name", name,
             "--chunks", str(CHUNKS), "--chunk-delay-ms", str(CHUNK_DELAY_MS)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        backends.append((name, port))
    gw_port = free_port()
    config = "backends:\n"
    for name, port in backends:
        config += f"  - name: {name}\n    url: http://127.0.0.1:{port}\n"
    config += "scripts:\n"
    for hook, script in (("routing", ROUTING), ("request_transform", REQUEST_TRANSFORM),
                         ("response_transform", RESPONSE_TRANSFORM)):
        config += f"  {hook}:\n    script: |\n{indent(script)}"
    path = os.path.join(tmp, "gateway.yaml")
    with open(path, "w") as f:
        f.write(config)
    env = dict(os.environ, RUST_LOG="warn")
    procs.append(subprocess.Popen(
        [binary, "serve", "--config", path, "--listen", f"127.0.0.1:{gw_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    for _, port in backends:
        wait_http(f"http://127.0.0.1:{port}/healthz")
    wait_http(f"http://127.0.0.1:{gw_port}/healthz")
    return procs, f"http://127.0.0.1:{gw_port}/v1"


def test_chat_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4", messages=[{"role": "user", "content": "hello there"}],
        extra_body={"viplevel": 3})
    assert raw.headers.get("x-llmproxy-backend") == "ultra", raw.headers
    assert raw.headers.get("x-request-id"), raw.headers
    assert raw.headers.get("x-echo-x-original-model") == "gpt-4", raw.headers
    resp = raw.parse()
    assert resp.model == "gpt-4", resp.model  # mapped there and back
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content.startswith("Hello from")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_chat_completion(client):
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "stream please"}], stream=True)
    arrivals = []
    text = ""
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        assert chunk.model == "gpt-4", chunk.model
        assert chunk.usage is None, "the gateway's usage chunk must not reach the client"
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert len(arrivals) > 1, arrivals
    # The backend spaces its events CHUNK_DELAY_MS apart; the first one must
    # have arrived well before the backend produced the last one.
    spread = arrivals[-1] - arrivals[0]
    assert spread >= (CHUNKS - 1) * CHUNK_DELAY_MS / 1000 * 0.8, arrivals
    assert text.startswith("Hello from"), text


def test_stream_with_include_usage(client):
    stream = client.chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "x"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == CHUNKS


def test_embedding(client):
    resp = client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d"])
    assert len(resp.data) == 2
    assert len(resp.data[0].embedding) == 8
    assert all(isinstance(x, float) for x in resp.data[0].embedding)
    floats = client.embeddings.create(model="m", input="a b c", encoding_format="float")
    assert [round(x, 5) for x in floats.data[0].embedding] == \
        [round(x, 5) for x in resp.data[0].embedding]
    assert resp.usage.prompt_tokens == 4


def test_errors_are_openai_errors(client):
    try:
        client.chat.completions.create(
            model="gpt-4", messages=[], extra_headers={"x-mock-status": "429"})
    except openai.RateLimitError as e:
        assert e.status_code == 429
    else:
        raise AssertionError("expected RateLimitError")


def main():
    binary = os.environ.get("LLMPROXY_BIN", "target/debug/llmproxy")
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        procs, base = start(binary, tmp)
        try:
            client = openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0, timeout=30)
            for name, fn in sorted((k, v) for k, v in globals().items() if k.startswith("test_")):
                try:
                    fn(client)
                    passed += 1
                    print(f"ok   {name}")
                except Exception:  # noqa: BLE001 - report every failure
                    failed += 1
                    print(f"FAIL {name}")
                    traceback.print_exc()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
