"""Fixtures and loopback protocol fakes shared by test_imagen.py.

Every fake listens on 127.0.0.1 only, on a port the OS picks, and records what it got.
Nothing here sleeps to wait for something: `poll()` checks a condition until a deadline.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGEN = os.path.join(HERE, "imagen.py")
sys.path.insert(0, HERE)


def poll(condition, timeout=10.0, interval=0.01, message="condition"):
    """Return condition()'s first truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


def need_tool(command, package):
    """Skip (outside CI) when a Debian-packaged tool is missing; under CI, fail."""
    if shutil.which(command):
        return
    message = "%s is missing: install the Debian package %s (make test does)" % (command, package)
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# ----- running imagen -----

@pytest.fixture
def env(tmp_path):
    """A clean environment: private HOME and XDG dirs, no imagen/Supabase/tmux variables."""
    home = tmp_path / "home"
    home.mkdir()
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith(("IMAGEN_", "SUPABASE_", "MAI_", "REPLICATE_", "TMUX", "XDG_"))}
    clean.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                 XDG_DATA_HOME=str(home / ".local" / "share"), USER="tester",
                 PYTHONDONTWRITEBYTECODE="1")
    return clean


class Run:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    @property
    def lines(self):
        return self.out.splitlines()

    def __repr__(self):
        return "Run(code=%r, out=%r, err=%r)" % (self.code, self.out[:500], self.err[:500])


@pytest.fixture
def cli(env, tmp_path):
    """Run `python imagen.py ARGS` as a subprocess in tmp_path; returns Run."""
    def run(*args, stdin=None, extra_env=None, timeout=60, cwd=None):
        proc = subprocess.run([sys.executable, IMAGEN] + [str(a) for a in args],
                              input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=dict(env, **(extra_env or {})), cwd=str(cwd or tmp_path))
        return Run(proc.returncode, proc.stdout, proc.stderr)
    return run


@pytest.fixture
def run_main(env, tmp_path, capsys, monkeypatch):
    """Call imagen.main() in-process (fast); returns Run."""
    import imagen
    monkeypatch.chdir(tmp_path)

    def run(*args, extra_env=None):
        code = imagen.main([str(a) for a in args], env=dict(env, **(extra_env or {})))
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)
    return run


@pytest.fixture
def write_config(tmp_path):
    """Write a YAML config file and return its path."""
    def write(text, name="imagen.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


# ----- a loopback HTTP server to build protocol fakes on -----

class FakeRequest:
    def __init__(self, method, path, headers, body):
        self.method, self.headers, self.body = method, headers, body
        parts = urlsplit(path)
        self.path, self.query = parts.path, parse_qs(parts.query)
        self.raw_path = path

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class FakeHTTPServer:
    """A threaded HTTP/1.1 server on 127.0.0.1. `handler(request)` returns
    (status, headers, body); body may be bytes, str, or a JSON-able value."""

    def __init__(self, handler):
        self.handler = handler
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = FakeRequest(self.command, self.path,
                                      {k.lower(): v for k, v in self.headers.items()}, body)
                fake.requests.append(request)
                status, headers, payload = fake.handler(request)
                if not isinstance(payload, (bytes, str)):
                    payload = json.dumps(payload)
                    headers = dict({"Content-Type": "application/json"}, **headers)
                if isinstance(payload, str):
                    payload = payload.encode("utf-8")
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_fake():
    """Start FakeHTTPServer(handler) servers that stop at the end of the test."""
    servers = []

    def start(handler):
        server = FakeHTTPServer(handler)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()
