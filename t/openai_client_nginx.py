"""The official `openai` Python client against nginx + resty.llmproxy.

Runs the standalone gateway's client tests (proxy/tests/openai_client/
test_openai_client.py: chat, a streamed chat whose chunks must arrive
incrementally, a stream with include_usage, embeddings, an upstream error
as an openai exception) against nginx, on the same YAML config and the same
`llmproxy mock-backend` backends. Then checks that the error bodies nginx
writes itself are byte for byte the standalone gateway's, by sending the
same bad requests to both.

    LLMPROXY_BIN=target/debug/llmproxy LLMP_LIB_DIR=ffi/target/release \
        .venv/bin/python t/openai_client_nginx.py

(`make test-openai-client-nginx` does this.) nginx runs from a temporary
prefix with two workers, on free 127.0.0.1 ports, with its own copy of
libllmproxy.so. Prints `N passed, N failed`; exits non-zero on a failure.
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request

import openai

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT_TESTS = os.path.join(REPO, "proxy", "tests", "openai_client", "test_openai_client.py")
MODULES = os.environ.get("TEST_NGINX_MODULES", "/usr/lib/nginx/modules")
NGINX = os.environ.get("TEST_NGINX_BINARY", shutil.which("nginx") or "/usr/sbin/nginx")


def load_client_tests():
    sys.dont_write_bytecode = True  # leave no __pycache__ in proxy/
    spec = importlib.util.spec_from_file_location("openai_client_tests", CLIENT_TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NGINX_CONF = """
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;
{user}
worker_processes 2;
pid logs/nginx.pid;
error_log logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path temp/client_body;
    proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi;
    scgi_temp_path temp/scgi;
    lua_package_path "{repo}/openresty/lib/?.lua;;";
    lua_package_cpath "{prefix}/lib/lib?.so;;";
    lua_shared_dict llmproxy_metrics 1m;
    init_worker_by_lua_block {{
        require("resty.llmproxy").init_worker("{config}")
    }}
    upstream llmproxy_backends {{
        server 0.0.0.1;
        balancer_by_lua_block {{ require("resty.llmproxy").balancer() }}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 20m;
        client_body_buffer_size 20m;
        location /v1/ {{
            access_by_lua_block        {{ require("resty.llmproxy").access() }}
            header_filter_by_lua_block {{ require("resty.llmproxy").header_filter() }}
            body_filter_by_lua_block   {{ require("resty.llmproxy").body_filter() }}
            log_by_lua_block           {{ require("resty.llmproxy").log() }}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Accept-Encoding "";
            proxy_buffering off;
            proxy_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent;
            proxy_pass http://llmproxy_backends;
        }}
        location = /metrics {{
            content_by_lua_block {{ require("resty.llmproxy").metrics() }}
        }}
    }}
}}
"""


def start(binary, lib_dir, tmp, tests):
    """Mock backends, nginx, and the standalone gateway on the same config."""
    procs = []
    backends = []
    for name in ("standard", "ultra"):
        port = tests.free_port()
        procs.append(subprocess.Popen(
            [binary, "mock-backend", "--listen", f"127.0.0.1:{port}", "--name", name,
             "--chunks", str(tests.CHUNKS), "--chunk-delay-ms", str(tests.CHUNK_DELAY_MS)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        backends.append((name, port))
    config = "backends:\n"
    for name, port in backends:
        config += f"  - name: {name}\n    url: http://127.0.0.1:{port}\n"
    config += "gateway:\n  max_body_bytes: 4096\n"
    config += "scripts:\n"
    for hook, script in (("routing", tests.ROUTING), ("request_transform", tests.REQUEST_TRANSFORM),
                         ("response_transform", tests.RESPONSE_TRANSFORM)):
        config += f"  {hook}:\n    script: |\n{tests.indent(script)}"
    config_path = os.path.join(tmp, "llmproxy.yaml")
    with open(config_path, "w") as f:
        f.write(config)

    prefix = os.path.join(tmp, "nginx")
    for d in ("conf", "logs", "temp", "lib"):
        os.makedirs(os.path.join(prefix, d))
    # nginx keeps the library mapped: load a private copy, never the build's.
    shutil.copy(os.path.join(lib_dir, "libllmproxy.so"), os.path.join(prefix, "lib", ".libllmproxy.so"))
    os.rename(os.path.join(prefix, "lib", ".libllmproxy.so"), os.path.join(prefix, "lib", "libllmproxy.so"))
    nginx_port = tests.free_port()
    with open(os.path.join(prefix, "conf", "nginx.conf"), "w") as f:
        f.write(NGINX_CONF.format(modules=MODULES, user="user root;" if os.geteuid() == 0 else "",
                                  repo=REPO, prefix=prefix, config=config_path, port=nginx_port))
    subprocess.run([NGINX, "-p", prefix + "/", "-c", "conf/nginx.conf"], check=True)

    gw_port = tests.free_port()
    procs.append(subprocess.Popen(
        [binary, "serve", "--config", config_path, "--listen", f"127.0.0.1:{gw_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn")))
    for _, port in backends:
        tests.wait_http(f"http://127.0.0.1:{port}/healthz")
    tests.wait_http(f"http://127.0.0.1:{nginx_port}/metrics")
    tests.wait_http(f"http://127.0.0.1:{gw_port}/healthz")
    return procs, prefix, f"http://127.0.0.1:{nginx_port}", f"http://127.0.0.1:{gw_port}"


def stop_nginx(prefix):
    pidfile = os.path.join(prefix, "logs", "nginx.pid")
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    os.kill(pid, signal.SIGQUIT)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def post(url, body, headers=None):
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def error_bodies_match(nginx, gateway):
    """The error bodies nginx writes itself are the standalone gateway's."""
    cases = [
        ("/v1/chat/completions", b'{"model": oops'),
        ("/v1/chat/completions", b""),
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/embeddings", b'"just a string"'),
        ("/v1/chat/completions", b'{"model":"gpt-4","messages":[{"role":"user","content":"' + b"x" * 5000 + b'"}]}'),
    ]
    for path, body in cases:
        got = post(nginx + path, body, {"Content-Type": "application/json"})
        want = post(gateway + path, body, {"Content-Type": "application/json"})
        assert got == want, f"{path} {body[:40]!r}: nginx {got!r} != gateway {want!r}"
        assert json.loads(got[1])["error"]["code"], got


def metrics_counted(nginx):
    """The client's requests show up in nginx's /metrics."""
    with urllib.request.urlopen(nginx + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'llmproxy_requests_total{backend="ultra",status="200"}' in text, text[:2000]
    assert "llmproxy_active_streams 0" in text, text[:2000]
    assert 'llmproxy_hook_calls_total{hook="response_transform"}' in text


def main():
    binary = os.environ.get("LLMPROXY_BIN", os.path.join(REPO, "target", "debug", "llmproxy"))
    lib_dir = os.environ.get("LLMP_LIB_DIR", os.path.join(REPO, "ffi", "target", "release"))
    tests = load_client_tests()
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        procs, prefix, nginx, gateway = start(binary, lib_dir, tmp, tests)
        try:
            client = openai.OpenAI(base_url=nginx + "/v1", api_key="sk-test", max_retries=0, timeout=30)
            checks = sorted((k, v) for k, v in vars(tests).items() if k.startswith("test_"))
            checks.append(("error_bodies_match_the_gateway", lambda _c: error_bodies_match(nginx, gateway)))
            checks.append(("metrics_counted", lambda _c: metrics_counted(nginx)))
            for name, fn in checks:
                try:
                    fn(client)
                    passed += 1
                    print(f"ok   {name}")
                except Exception:  # noqa: BLE001 - report every failure
                    failed += 1
                    print(f"FAIL {name}")
                    traceback.print_exc()
        finally:
            stop_nginx(prefix)
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            if failed:
                with open(os.path.join(prefix, "logs", "error.log"), errors="replace") as f:
                    print("---- nginx error.log (last 40 lines)")
                    print("".join(f.readlines()[-40:]))
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
