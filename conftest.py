"""Fixtures and loopback protocol fakes shared by test_imagen.py.

Every fake listens on 127.0.0.1 only, on a port the OS picks, and records what it got.
Nothing here sleeps to wait for something: `poll()` checks a condition until a deadline.
"""

import base64
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGEN = os.path.join(HERE, "imagen.py")
sys.path.insert(0, HERE)


# How often a fake's serve_forever() looks for shutdown(): each fake is shut down at the
# end of its test, which waits up to this long (0.05 s cost the suite about 9 s).
SHUTDOWN_POLL = 0.005


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
    message = "%s is missing: install the Debian package %s (make deps does)" % (command, package)
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# ----- running imagen -----

@pytest.fixture
def env(tmp_path):
    """A clean environment: private HOME and XDG dirs, no imagen/Supabase/tmux variables."""
    return clean_env(tmp_path)


def clean_env(directory):
    home = directory / "home"
    home.mkdir()
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith(("IMAGEN_", "SUPABASE_", "MAI_", "REPLICATE_", "OPENAI_",
                                    "TMUX", "XDG_"))}
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


# imagen as its installed launcher starts it (make install): imported, so from the bytecode
# cache when there is one (under make test, this run's own import of imagen writes it),
# not compiled anew in each process (0.1 s of CPU). `python imagen.py` (IMAGEN) stays for
# the tests of that way in: the quick start, the zipapp's version, a closed stdout.
LAUNCHER = [sys.executable, "-c", "import sys; sys.path[:1] == [''] and sys.path.pop(0); "
            "sys.path.insert(0, sys.argv.pop(1)); import imagen; sys.exit(imagen.main())", HERE]


@pytest.fixture
def cli(env, tmp_path):
    """Run imagen ARGS (the LAUNCHER) as a subprocess in tmp_path; returns Run."""
    def run(*args, stdin=None, extra_env=None, timeout=60, cwd=None):
        proc = subprocess.run(LAUNCHER + [str(a) for a in args],
                              input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=dict(env, **(extra_env or {})), cwd=str(cwd or tmp_path))
        return Run(proc.returncode, proc.stdout, proc.stderr)
    return run


def popen_imagen(args, **kwargs):
    """Popen imagen ARGS (the LAUNCHER) for a test that will signal it. The child's SIGINT is
    set back to its default: under a pytest run as a background job (`make test &`) it
    would inherit SIGINT ignored, Python would leave it so, and Ctrl-C would do nothing."""
    return subprocess.Popen(LAUNCHER + [str(a) for a in args], preexec_fn=_default_sigint,
                            **kwargs)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


class FakeClock:
    """imagen's clock (imagen.clock), driven by the test: monotonic() and time() are the
    real clock plus an offset; sleep(s) adds s to the offset at once, records s in
    `slept` and yields to other threads, so a backoff, a Retry-After or a poll interval
    costs no real time. Real socket waits stay real: they are bounded by deadlines read
    from this same clock. run() stands in for a hung process's timeout (`real_wait`)."""

    def __init__(self):
        self.offset = 0.0
        self.slept = []
        self.timeouts, self.expired = [], []    # of the processes imagen ran (run())
        self.real_wait = None    # seconds: a process running longer has run out its timeout
        self._lock = threading.Lock()

    def monotonic(self):
        return time.monotonic() + self.offset

    def time(self):
        return time.time() + self.offset

    def sleep(self, seconds):
        with self._lock:
            self.slept.append(seconds)
            self.offset += max(0.0, seconds)
        time.sleep(0)

    def run(self, argv, timeout, **kwargs):
        """A process as imagen runs it, its timeout recorded in `timeouts`. One still
        running after `real_wait` real seconds (when set: a test of a hung process) has
        run out its whole timeout: the clock moves on by the rest, and `expired` says so."""
        self.timeouts.append(timeout)
        wait = timeout if self.real_wait is None else min(timeout, self.real_wait)
        try:
            return subprocess.run(argv, timeout=wait, **kwargs)
        except subprocess.TimeoutExpired:
            self.expired.append(timeout)
            self.advance(timeout - wait)
            raise subprocess.TimeoutExpired(argv, timeout) from None

    def advance(self, seconds):
        with self._lock:
            self.offset += seconds

    def advance_to(self, moment):
        """Move monotonic() on to `moment` if it is not there yet (several fakes holding
        requests at once end at the latest of their moments, not at their sum)."""
        with self._lock:
            self.offset += max(0.0, moment - (time.monotonic() + self.offset))


# The clock the fakes run their jobs on (FakeReplicate's predictions, FakeComfyUI's lost
# end message): real time, or the test's FakeClock once it asks for `fake_clock`, so a
# poll interval imagen sleeps through that clock moves the fake's job on as well.
fakes_clock = time


@pytest.fixture
def fake_clock(monkeypatch):
    """Install a FakeClock as imagen's clock for in-process calls (run_main, generate),
    and as the fakes' clock. Not for tests that start imagen as a process: it keeps the
    real clock, which the fakes would no longer follow."""
    import imagen
    clock = FakeClock()
    monkeypatch.setattr(imagen, "clock", clock)
    monkeypatch.setattr(sys.modules[__name__], "fakes_clock", clock)
    return clock


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
        self.received = time.monotonic()

    def json(self):
        return json.loads(self.body.decode("utf-8"))


def read_request(handler):
    """The FakeRequest a BaseHTTPRequestHandler is serving."""
    length = int(handler.headers.get("Content-Length") or 0)
    body = handler.rfile.read(length) if length else b""
    request = FakeRequest(handler.command, handler.path,
                          {k.lower(): v for k, v in handler.headers.items()}, body)
    request.client_port = handler.client_address[1]   # which connection it came on
    return request


def send_reply(handler, status, headers, payload):
    """Answer with payload: bytes, str, or a JSON-able value (sent as application/json)."""
    if not isinstance(payload, (bytes, str)):
        payload = json.dumps(payload)
        headers = dict({"Content-Type": "application/json"}, **headers)
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


class QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"     # keep-alive, as the real servers
    # headers and body go out in two writes: without this, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every response
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    """A client that hangs up (leaving a 404's body unread, or giving up on a request at
    its timeout) is not an error here."""
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            ThreadingHTTPServer.handle_error(self, request, client_address)


class Stall:
    """An answer that comes too late, for a test of a deadline that must not wait for it:
    `seconds` of silence, then the first byte of a status line and nothing more until the
    client hangs up. Under the test's FakeClock the silence costs no real time: the clock
    moves on by `seconds` at once, and the byte wakes the client from its wait in the
    kernel to find its deadline gone by on its own clock (the clock seam cannot shorten a
    wait in the kernel; a byte can end it)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def send(self, handler):
        if isinstance(fakes_clock, FakeClock):
            fakes_clock.advance(self.seconds)
        else:
            time.sleep(self.seconds)
        handler.close_connection = True
        try:
            handler.wfile.write(b"H")
            handler.connection.settimeout(30)
            while handler.connection.recv(65536):
                pass
        except OSError:
            pass


class FakeHTTPServer:
    """A threaded HTTP/1.1 server on 127.0.0.1. `handler(request)` returns
    (status, headers, body), or a Stall; body may be bytes, str, or a JSON-able value.
    With tls=(cert file, key file) it speaks HTTPS."""

    def __init__(self, handler, tls=None):
        self.handler = handler
        self.requests = []
        self.connections = 0     # TCP connections accepted: keep-alive shows as 1
        fake = self

        class Handler(QuietHandler):
            def setup(self):
                fake.connections += 1
                QuietHandler.setup(self)

            def _serve(self):
                request = read_request(self)
                fake.requests.append(request)
                answer = fake.handler(request)
                if isinstance(answer, Stall):
                    answer.send(self)
                else:
                    send_reply(self, *answer)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        if tls:
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            # the handshake happens in the connection's own thread, at its first read
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True,
                                                     do_handshake_on_connect=False)
            self.url = "https://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, args=(SHUTDOWN_POLL,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_fake():
    """Start FakeHTTPServer(handler) servers that stop at the end of the test."""
    servers = []

    def start(handler, tls=None):
        server = FakeHTTPServer(handler, tls)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


# ----- multipart/form-data (RFC 7578), as the upload routes of the fakes take it -----
# Written here from the RFC, independently of imagen's encoder, so a test of imagen's
# uploads checks its bytes against a second implementation. File bytes are kept exactly.

class FormPart:
    """One part: `name`, `filename` (None for a plain field), `content_type`, `headers`
    (lower-case names), `data` (bytes as sent)."""

    def __init__(self, headers, data):
        self.headers, self.data = headers, data
        disposition, params = header_params(headers.get("content-disposition", ""))
        if disposition.lower() != "form-data" or "name" not in params:
            raise ValueError("a part without Content-Disposition: form-data; name=...")
        self.name, self.filename = params["name"], params.get("filename")
        self.content_type = headers.get("content-type")

    def text(self):
        return self.data.decode("utf-8")


class Form:
    """The parts of a multipart/form-data body, in order."""

    def __init__(self, parts):
        self.parts = parts

    def get(self, name):
        """The first part named `name`, or None."""
        return next((p for p in self.parts if p.name == name), None)

    def value(self, name, default=None):
        """The text of the first part named `name` (aiohttp's `post().get()`), or default."""
        part = self.get(name)
        return default if part is None else part.text()


def header_params(value):
    """('type/subtype' or 'form-data', {param: value}) of a header with ;-parameters;
    quoted strings may hold ';' and backslash escapes, `filename*=UTF-8''...` is decoded."""
    head, _, rest = value.partition(";")
    params, starred = {}, {}
    for match in re.finditer(r'\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*(?:;|$)', rest):
        key, raw = match.group(1).lower(), match.group(2).strip()
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if key.endswith("*"):
            charset, _, encoded = raw.partition("''")
            starred[key[:-1]] = unquote(encoded, encoding=charset or "utf-8")
        else:
            params[key] = raw
    params.update(starred)                          # RFC 6266: the extended form wins
    return head.strip().lower(), params


def parse_multipart(content_type, body):
    """The Form of a multipart/form-data body; ValueError when it is not one."""
    kind, params = header_params(content_type or "")
    if kind != "multipart/form-data" or not params.get("boundary"):
        raise ValueError("not multipart/form-data with a boundary: %r" % content_type)
    delimiter = b"--" + params["boundary"].encode("latin-1")
    if body.startswith(delimiter):
        at = len(delimiter)
    else:                                           # a preamble before the first boundary
        at = body.find(b"\r\n" + delimiter)
        if at < 0:
            raise ValueError("no boundary in the body")
        at += 2 + len(delimiter)
    parts = []
    while True:
        while body[at:at + 1] in (b" ", b"\t"):     # transport padding after a delimiter
            at += 1
        if body[at:at + 2] == b"--":                # the close delimiter
            return Form(parts)
        if body[at:at + 2] != b"\r\n":
            raise ValueError("no CRLF after a boundary")
        end = body.find(b"\r\n" + delimiter, at + 2)
        if end < 0:
            raise ValueError("no closing boundary")
        parts.append(form_part(body[at + 2:end]))
        at = end + 2 + len(delimiter)


def form_part(raw):
    if raw.startswith(b"\r\n"):                     # no headers at all
        head, data = b"", raw[2:]
    else:
        head, sep, data = raw.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without the blank line after its headers")
    headers = {}
    for line in head.decode("utf-8").split("\r\n"):
        if line:
            name, colon, value = line.partition(":")
            if not colon:
                raise ValueError("a malformed part header: %r" % line)
            headers[name.strip().lower()] = value.strip()
    return FormPart(headers, data)


def encode_multipart(fields, boundary="fake-form-boundary-7MA4YWxkTrZu0gW"):
    """(Content-Type, body) for tests that post forms to the fakes. `fields`: (name, value)
    pairs; value is text, or (filename, bytes, content_type) for a file."""
    out = []
    for name, value in fields:
        out.append(b"--" + boundary.encode() + b"\r\n")
        if isinstance(value, tuple):
            filename, data, kind = value
            out.append(('Content-Disposition: form-data; name="%s"; filename="%s"\r\n'
                        'Content-Type: %s\r\n\r\n' % (name, filename, kind)).encode("utf-8"))
        else:
            data = value.encode("utf-8")
            out.append(('Content-Disposition: form-data; name="%s"\r\n\r\n' % name).encode("utf-8"))
        out.append(data + b"\r\n")
    out.append(b"--" + boundary.encode() + b"--\r\n")
    return "multipart/form-data; boundary=" + boundary, b"".join(out)


@pytest.fixture(autouse=True)
def no_proxy_from_the_host(monkeypatch):
    """Tests talk to loopback fakes: a proxy set on the machine running them stays out."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def no_terminal_size_from_the_host(monkeypatch):
    """imagen fits lines to $COLUMNS: the size of the terminal running the tests (which
    pytest-xdist exports to its workers) stays out; a test that wants one sets it."""
    for name in ("COLUMNS", "LINES"):
        monkeypatch.delenv(name, raising=False)


# ----- a server that drips its answer, a forward proxy, and a certificate -----

class DripServer:
    """A raw TCP server on 127.0.0.1 that answers every connection slowly: it reads the
    request head, sends `head` at once, then one byte of `fill` every `interval` seconds
    until the client hangs up, or for at most `limit` seconds (so a client that waits for
    ever still ends the test). The seconds are those of the fakes' clock: under fake_clock
    each drip moves it on by `interval` after a real pause of REAL_PAUSE, so a client's
    deadline comes after the same drips, at once. `outlasted` counts the connections the
    server ended at its limit: a client that kept reading past its own deadline."""

    REAL_PAUSE = 0.02

    def __init__(self, head, fill, interval, limit):
        import socket
        self.head, self.fill, self.interval, self.limit = head, fill, interval, limit
        self.connections, self.outlasted = 0, 0
        self.stop = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        import socket
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(connection,), daemon=True).start()

    def _drip(self, connection):
        ends = fakes_clock.monotonic() + self.limit
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = connection.recv(4096)
                if not chunk:
                    return
                head += chunk
            connection.sendall(self.head)
            index = 0
            while fakes_clock.monotonic() < ends and not self._pause():
                connection.sendall(self.fill[index % len(self.fill):][:1])
                index += 1
            self.outlasted += not self.stop.is_set()
        except OSError:
            pass                          # the client gave up: what a good client does
        finally:
            connection.close()

    def _pause(self):
        """Wait `interval` on the fakes' clock; True when the server is stopping."""
        if fakes_clock is time:
            return self.stop.wait(self.interval)
        fakes_clock.advance(self.interval)
        return self.stop.wait(self.REAL_PAUSE)

    def close(self):
        self.stop.set()
        self.listener.close()


@pytest.fixture
def drip_server():
    """Start DripServer(head, fill, interval, limit) servers that stop at the end of the
    test. By default the status line comes at once and a header line never ends."""
    servers = []

    def start(head=b"HTTP/1.1 200 OK\r\nX-Slow: ", fill=b"a", interval=0.1, limit=20.0):
        server = DripServer(head, fill, interval, limit)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


class ForwardProxy:
    """A forward HTTP proxy on 127.0.0.1 that takes every host name for 127.0.0.1, so a
    test can name a host that only the proxy can reach. It forwards absolute-URI requests
    (plain http) and tunnels CONNECT, and records each as "METHOD target" in `seen` with
    its request headers in `headers`."""

    HOP_BY_HOP = ("connection", "keep-alive", "proxy-authorization", "proxy-connection",
                  "transfer-encoding", "te", "upgrade")

    def __init__(self):
        import http.client
        import socket
        proxy = self
        self.seen, self.headers = [], []

        class Handler(QuietHandler):
            def _record(self):
                proxy.seen.append("%s %s" % (self.command, self.path))
                proxy.headers.append({k.lower(): v for k, v in self.headers.items()})

            def do_CONNECT(self):
                self._record()
                port = int(self.path.rsplit(":", 1)[1])
                upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
                self.send_response(200, "Connection established")
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                pipe = threading.Thread(target=proxy._pipe, args=(upstream, self.connection),
                                        daemon=True)
                pipe.start()
                proxy._pipe(self.connection, upstream)
                pipe.join(10)
                upstream.close()

            def _forward(self):
                self._record()
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ForwardProxy.HOP_BY_HOP}
                upstream = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=10)
                try:
                    upstream.request(self.command, parts.path + ("?" + parts.query
                                                                 if parts.query else ""),
                                     body=body, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in ForwardProxy.HOP_BY_HOP + ("content-length",):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(SHUTDOWN_POLL,),
                                       daemon=True)
        self.thread.start()

    @staticmethod
    def _pipe(source, sink):
        import socket
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def forward_proxy():
    proxy = ForwardProxy()
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory):
    """(certificate file, key file) of a self-signed certificate for tls-test.invalid,
    localhost and 127.0.0.1, made by openssl; a client trusts it through $SSL_CERT_FILE."""
    need_tool("openssl", "openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=tls-test.invalid", "-addext",
                    "subjectAltName=DNS:tls-test.invalid,DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


# ===== A real PostgreSQL, and the PostgREST fake's rows in it =====
# The Debian package `postgresql` (make deps installs it). One server per test session, in
# a temp directory, listening only on a unix socket there. initdb refuses to run as root,
# so as root the server runs as `nobody`; the tests talk to it with psql as `postgres`.

PG_PACKAGE = "postgresql"
PG_PORT = 5432           # only names the socket file: the server opens no TCP port
PG_START_TIMEOUT = 60.0


class PgError(Exception):
    """An error PostgreSQL reported, with its SQLSTATE (psql VERBOSITY=verbose)."""

    def __init__(self, sqlstate, message, detail=None, hint=None):
        super().__init__("%s: %s" % (sqlstate, message))
        self.sqlstate, self.message, self.detail, self.hint = sqlstate, message, detail, hint


def postgres_bindir():
    """Debian's newest /usr/lib/postgresql/N/bin, else the directory of initdb on PATH."""
    import glob
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    initdb = found[-1] if found else shutil.which("initdb")
    need_tool(initdb or "initdb", PG_PACKAGE)
    return os.path.dirname(initdb)


def unprivileged_user():
    """(uid, gid) to run the server as when we are root (initdb refuses root), else None."""
    if os.geteuid() != 0:
        return None
    import pwd
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.fail("running as root, and there is no user `nobody` to run PostgreSQL as")
    return entry.pw_uid, entry.pw_gid


class PostgresServer:
    """initdb + postgres in `base`, as `user` (uid, gid) or ourselves."""

    def __init__(self, bindir, base, user):
        self.bindir, self.base, self.user = bindir, base, user
        self.data = os.path.join(base, "data")
        self.process = None
        self.log_path = os.path.join(base, "server.log")

    def _as_server_user(self):
        if self.user:
            os.setgroups([])
            os.setgid(self.user[1])
            os.setuid(self.user[0])

    def _client_env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST=self.base, PGPORT=str(PG_PORT), PGUSER="postgres", PGTZ="UTC")
        return env

    def start(self):
        if self.user:
            os.chown(self.base, *self.user)
        init = subprocess.run([os.path.join(self.bindir, "initdb"), "-D", self.data,
                               "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "-N"],
                              capture_output=True, text=True, preexec_fn=self._as_server_user,
                              env=self._client_env(), cwd=self.base)
        if init.returncode != 0:      # e.g. `nobody` cannot reach a private $TMPDIR
            pytest.fail("initdb in %s failed:\n%s" % (self.base, init.stderr[-2000:]))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [os.path.join(self.bindir, "postgres"), "-D", self.data, "-k", self.base,
                 "-p", str(PG_PORT), "-c", "listen_addresses=", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._as_server_user,
                env=self._client_env(), cwd=self.base)
        poll(self._ready, timeout=PG_START_TIMEOUT, interval=0.05, message="PostgreSQL to start")

    def _ready(self):
        if self.process.poll() is not None:
            with open(self.log_path, errors="replace") as log:
                raise AssertionError("PostgreSQL exited at start:\n" + log.read()[-2000:])
        return subprocess.run([os.path.join(self.bindir, "pg_isready"), "-q"],
                              env=self._client_env()).returncode == 0

    def stop(self):
        if self.process and self.process.poll() is None:
            import signal
            self.process.send_signal(signal.SIGINT)     # "fast" shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def psql(self, sql, db="postgres", user="postgres"):
        """Run SQL (one transaction or many statements); stdout of psql -At. Raises PgError."""
        return self.psql_output(sql, db, user)[0]

    def psql_output(self, sql, db="postgres", user="postgres"):
        """(stdout, stderr with its notices and warnings) of running SQL with psql."""
        proc = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t", "-d", db, "-U", user,
             "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"],
            input=sql, capture_output=True, text=True, env=self._client_env(), timeout=60)
        if proc.returncode != 0:
            raise parse_pg_error(proc.stderr)
        return proc.stdout, proc.stderr

    def dump_schema(self, db):
        """pg_dump --schema-only, without the random \\restrict key newer pg_dumps add."""
        out = subprocess.run([os.path.join(self.bindir, "pg_dump"), "-s", db],
                             capture_output=True, text=True, check=True,
                             env=self._client_env()).stdout
        return "".join(line for line in out.splitlines(True)
                       if not line.startswith(("\\restrict", "\\unrestrict")))


def parse_pg_error(stderr):
    import re
    error = re.search(r"ERROR:\s+([0-9A-Z]{5}): (.*)", stderr)
    if not error:
        return PgError("XX000", stderr.strip() or "psql failed")
    detail = re.search(r"^DETAIL:\s+(.*)$", stderr, re.M)
    hint = re.search(r"^HINT:\s+(.*)$", stderr, re.M)
    return PgError(error.group(1), error.group(2), detail and detail.group(1),
                   hint and hint.group(1))


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the whole session, stopped and deleted at the end."""
    import tempfile
    bindir = postgres_bindir()
    server = PostgresServer(bindir, tempfile.mkdtemp(prefix="imagen-pg-"), unprivileged_user())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)


# What a Supabase project has before `imagen schema` runs: the API roles (service_role
# bypasses RLS), auth.users and auth.uid() reading the JWT claims PostgREST sets per
# request, and Storage's buckets and objects tables with RLS on.
SUPABASE_STUB_SQL = """
do $$ begin
  if not exists (select from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit; end if;
  if not exists (select from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit; end if;
  if not exists (select from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls; end if;
end $$;
create schema auth;
create table auth.users (id uuid primary key, email text);
create function auth.uid() returns uuid language sql stable as $$
  select nullif(coalesce(current_setting('request.jwt.claim.sub', true),
                         (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')), '')::uuid
$$;
grant usage on schema auth to anon, authenticated, service_role;
create schema storage;
create table storage.buckets (
  id text primary key, name text not null, public boolean default false, owner_id text,
  file_size_limit bigint, allowed_mime_types text[],
  created_at timestamptz default now(), updated_at timestamptz default now());
create table storage.objects (
  id uuid primary key default gen_random_uuid(),
  bucket_id text references storage.buckets (id), name text, owner_id text,
  metadata jsonb, created_at timestamptz default now(), updated_at timestamptz default now(),
  unique (bucket_id, name));
alter table storage.objects enable row level security;
grant usage on schema storage to anon, authenticated, service_role;
grant all on storage.buckets, storage.objects to anon, authenticated, service_role;
"""


class Database:
    """One database of the session's server, with SQL run as a PostgREST request would."""

    def __init__(self, server, name):
        self.server, self.name = server, name

    def sql(self, sql, role=None, claims=None):
        """Run `sql` in one transaction; with `role` as PostgREST does it: SET LOCAL ROLE
        and the request's JWT claims in request.jwt.claims."""
        head = "begin;\n"
        if role:
            head += "set local role %s;\n" % sql_ident(role)
            head += "set local request.jwt.claims to %s;\n" % sql_literal(json.dumps(claims or {}))
        return self.server.psql(head + sql.rstrip().rstrip(";") + ";\ncommit;\n", db=self.name)

    def value(self, sql, role=None, claims=None):
        return self.sql(sql, role, claims).strip()

    def json(self, sql, role=None, claims=None):
        return json.loads(self.value(sql, role, claims))


def sql_ident(name):
    return '"%s"' % name.replace('"', '""')


def sql_literal(text):
    return "'%s'" % text.replace("'", "''")


@pytest.fixture(scope="session")
def supabase_template(postgres):
    """A database that looks like a fresh Supabase project; copy it with new_database()."""
    postgres.psql("create database supabase_template")
    postgres.psql(SUPABASE_STUB_SQL, db="supabase_template")
    return "supabase_template"


@pytest.fixture(scope="session")
def new_database(postgres, supabase_template):
    """new_database() -> a fresh Database copied from the Supabase-like template."""
    counter = []

    def create():
        counter.append(1)
        name = "project_%d" % len(counter)
        postgres.psql("create database %s template %s" % (name, supabase_template))
        return Database(postgres, name)
    return create


@pytest.fixture(scope="session")
def supabase_db(new_database):
    """A Supabase-like database with `imagen schema` applied (twice: it must be idempotent).
    Shared by the session: tests use their own ids and owners."""
    import imagen
    db = new_database()
    sql = imagen.schema_sql(imagen.DEFAULT_CLOUD)
    db.server.psql(sql, db=db.name)
    db.server.psql(sql, db=db.name)
    return db


class PostgrestError(Exception):
    """An error PostgREST would answer with: HTTP status and its JSON error object."""

    def __init__(self, status, code, message, details=None, hint=None):
        super().__init__(message)
        self.status = status
        self.body = {"code": code, "message": message, "details": details, "hint": hint}


# PostgREST's SQLSTATE -> HTTP status (its Error module); everything else is 400.
PG_STATUS_EXACT = {"23503": 409, "23505": 409, "25006": 405, "42883": 404, "42P01": 404,
                   "P0001": 400}
PG_STATUS_CLASS = {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403,
                   "2D": 500, "38": 500, "39": 500, "3B": 500, "40": 500, "53": 503,
                   "54": 500, "55": 500, "57": 500, "58": 500, "F0": 500, "HV": 500,
                   "P0": 500, "XX": 500}


def postgrest_status(sqlstate, has_jwt):
    if sqlstate == "42501":
        return 403 if has_jwt else 401
    return PG_STATUS_EXACT.get(sqlstate) or PG_STATUS_CLASS.get(sqlstate[:2]) or 400


class PostgresTables:
    """A PostgREST fake's row storage on a real database: insert() and select() run the
    statements PostgREST would, in one transaction as `role` with the JWT's `claims` in
    request.jwt.claims, so types, constraints, grants and RLS are the database's own.
    Database errors come out as PostgrestError with PostgREST's status for the SQLSTATE."""

    OPERATORS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}

    def __init__(self, db, role="service_role", claims=None, schema_cache=None):
        self.db, self.role = db, role
        self.claims = dict({"role": role}, **(claims or {}))
        self._columns = {} if schema_cache is None else schema_cache   # (schema, table) -> [names]
        self.rows = _StoredRows(self)

    def as_role(self, role, claims=None):
        """The same tables as another request's role (sharing the schema cache)."""
        return PostgresTables(self.db, role, claims, self._columns)

    def columns(self, schema, table):
        if (schema, table) not in self._columns:
            found = self.db.json(
                "select coalesce(json_agg(attname order by attnum), '[]') from pg_attribute "
                "where attrelid = to_regclass(%s) and attnum > 0 and not attisdropped"
                % sql_literal(sql_name(schema, table)))
            if not found:
                raise PostgrestError(404, "PGRST205", "Could not find the table '%s.%s' in the "
                                     "schema cache" % (schema, table))
            self._columns[(schema, table)] = found
        return self._columns[(schema, table)]

    def _run(self, sql):
        try:
            return self.db.json(sql, self.role, self.claims)
        except PgError as exc:
            raise PostgrestError(postgrest_status(exc.sqlstate, self.role != "anon"),
                                 exc.sqlstate, exc.message, exc.detail, exc.hint) from None

    def insert(self, schema, table, rows, on_conflict, ignore_duplicates):
        """INSERT ... SELECT FROM json_populate_recordset, ON CONFLICT DO NOTHING when
        ignoring duplicates; returns the rows inserted (as PostgREST's representation)."""
        columns = self.columns(schema, table)
        keys = []
        for row in rows:
            keys.extend(key for key in row if key not in keys)
        for key in keys:
            if key not in columns:
                raise PostgrestError(400, "PGRST204", "Could not find the '%s' column of '%s' "
                                     "in the schema cache" % (key, table))
        names = ", ".join(sql_ident(key) for key in keys)
        sql = "insert into %s (%s) select %s from json_populate_recordset(null::%s, %s)" % (
            sql_name(schema, table), names, names, sql_name(schema, table),
            sql_literal(json.dumps(rows)))
        if ignore_duplicates:
            sql += " on conflict (%s) do nothing" % ", ".join(
                sql_ident(c) for c in (on_conflict or "id").split(","))
        return self._run("with inserted as (%s returning *) select coalesce(json_agg(inserted), "
                         "'[]') from inserted" % sql)

    def select(self, schema, table, columns, filters, order, offset, limit):
        """(rows, total matching) for filters [(column, op, value)] and order
        [(column, descending)], rows cut to `columns` (None = all)."""
        self.columns(schema, table)
        where = []
        for column, op, value in filters:
            if op == "is" and value in ("null", "true", "false"):
                where.append("%s is %s" % (sql_ident(column), value))
            elif op in self.OPERATORS:
                where.append("%s %s %s" % (sql_ident(column), self.OPERATORS[op],
                                           sql_literal(value)))
            else:
                raise PostgrestError(400, "PGRST100", "failed to parse filter (%s.%s)" % (op, value))
        source = "%s%s" % (sql_name(schema, table),
                           " where " + " and ".join(where) if where else "")
        wanted = "*" if columns is None else ", ".join(sql_ident(c) for c in columns)
        ordering = ", ".join("%s %s" % (sql_ident(c), "desc" if down else "asc")
                             for c, down in order)
        found = self._run(
            "select json_build_array((select coalesce(json_agg(page), '[]') from (select %s "
            "from %s%s limit %d offset %d) page), (select count(*) from %s))" % (
                wanted, source, " order by " + ordering if ordering else "", limit, offset,
                source))
        return found[0], found[1]


class _StoredRows:
    """tables.rows[(schema, table)]: every stored row, read past RLS (as the service role)."""

    def __init__(self, tables):
        self.tables = tables

    def __getitem__(self, name):
        rows, _ = self.tables.as_role("service_role").select(
            name[0], name[1], None, [], [("created_at", False), ("id", False)], 0, 10 ** 9)
        return rows


def sql_name(schema, table):
    return "%s.%s" % (sql_ident(schema), sql_ident(table))


def parse_prefer(header):
    """{"return": "minimal", "resolution": "ignore-duplicates", ...} from a Prefer header."""
    found = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key:
            found[key] = value
    return found


# ===== tmux: a real server on a private socket, and a recording preview tool =====

def write_script(path, text):
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


@pytest.fixture
def preview_tool(tmp_path):
    """A `tmux-img` stand-in in its own bin dir: it writes its arguments, NUL-separated,
    to `argv_file` (atomically, so a poll never reads half of them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_file = tmp_path / "preview-argv"
    write_script(bin_dir / "tmux-img",
                 'for arg in "$@"; do printf "%%s\\0" "$arg"; done > "%s.tmp" && mv "%s.tmp" "%s"\n'
                 % (argv_file, argv_file, argv_file))

    class Tool:
        bin = str(bin_dir)

        @staticmethod
        def argv(timeout=10.0):
            poll(argv_file.exists, timeout=timeout, message="the preview tool to run")
            return argv_file.read_bytes().decode("utf-8").split("\0")[:-1]

        @staticmethod
        def ran():
            return argv_file.exists()
    return Tool


class TmuxServer:
    """`tmux -L <unique name>`: session `work` holds the pane imagen runs in; session
    `other`, made later, is the one tmux would pick if imagen did not say which."""

    def __init__(self, env):
        self.name = "imagen-test-%d-%s" % (os.getpid(), os.urandom(4).hex())
        self.env = env
        # where `tmux -L` puts it (the env fixture leaves TMUX_TMPDIR out)
        self.socket = os.path.join("/tmp", "tmux-%d" % os.getuid(), self.name)

    def start(self, tmp_path):
        conf = tmp_path / "tmux.conf"
        # remain-on-exit: the window stays listable after the preview tool has exited
        conf.write_text("set -g remain-on-exit on\nset -g default-shell /bin/sh\n")
        self.tmux("-f", str(conf), "new-session", "-d", "-s", "work", "-x", "80", "-y", "24")
        self.tmux("new-session", "-d", "-s", "other", "-x", "80", "-y", "24")
        pid, session, self.pane = self.tmux(
            "display-message", "-p", "-t", "work:0.0",
            "#{pid}\t#{session_id}\t#{pane_id}").split("\t")
        # what tmux itself puts into the environment of a pane's processes
        self.caller_env = {"TMUX": "%s,%s,%s" % (self.socket, pid, session.lstrip("$")),
                           "TMUX_PANE": self.pane}

    def tmux(self, *args):
        done = subprocess.run(["tmux", "-L", self.name] + list(args), env=self.env,
                              capture_output=True, text=True, timeout=10)
        if done.returncode:
            raise AssertionError("tmux %s: %s" % (" ".join(args), done.stderr.strip()))
        return done.stdout.rstrip("\n")

    def windows(self, session="work"):
        """[{index, active, name, command}] of a session's windows."""
        out = self.tmux("list-windows", "-t", session, "-F",
                        "#{window_index}\t#{window_active}\t#{window_name}\t#{pane_start_command}")
        rows = [line.split("\t", 3) for line in out.splitlines()]
        return [{"index": int(i), "active": a == "1", "name": n, "command": c}
                for i, a, n, c in rows]

    def set_caller_name(self, name):
        self.tmux("set-option", "-p", "-t", self.pane, "@mai-name", name)

    def close(self):
        subprocess.run(["tmux", "-L", self.name, "kill-server"], env=self.env,
                       capture_output=True, timeout=10)
        if os.path.exists(self.socket):
            os.unlink(self.socket)   # tmux leaves its socket file behind


@pytest.fixture
def tmux(env, tmp_path, preview_tool):
    """A real tmux server for one test; its windows find the preview tool on PATH.
    `tmux.caller_env` is what makes imagen believe it runs in the `work` pane."""
    need_tool("tmux", "tmux")
    env["PATH"] = preview_tool.bin + os.pathsep + env.get("PATH", os.defpath)
    server = TmuxServer(env)
    try:
        server.start(tmp_path)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def tmux_server_of_the_module(tmp_path_factory):
    need_tool("tmux", "tmux")
    base = tmp_path_factory.mktemp("tmux")
    server = TmuxServer(clean_env(base))
    try:
        server.start(base)
        yield server
    finally:
        server.close()


@pytest.fixture
def shared_tmux(tmux_server_of_the_module, env, preview_tool):
    """The tmux fixture on one server for the module, for a test of many cases that only
    counts windows (a server takes about 60 ms to start): every window of `work` but the
    pane imagen runs in is closed first. Its preview windows find no preview tool."""
    env["PATH"] = preview_tool.bin + os.pathsep + env.get("PATH", os.defpath)
    tmux_server_of_the_module.tmux("kill-window", "-a", "-t", "work:0")
    return tmux_server_of_the_module


# ===== Fake Supabase: Storage and PostgREST on one loopback server =====
# Speaks APIS.md sections 3 and 4: /storage/v1 and /rest/v1 behind one "gateway" that
# wants `apikey`; Storage errors are HTTP 400 with the real code in `statusCode`;
# PostgREST errors are {code, message, details, hint}; reads are capped at `max_rows`
# (the project's db-max-rows: 1,000 by default, lower on many projects) as PostgREST does,
# with its Content-Range header and, under `Prefer: count=exact`, its 206 and 416.
# Tests script failures with `script()`; the rows live in a pluggable `tables` object.

SERVICE_KEY = "fake-service-role-key-7f3a9c"     # tests grep every output for it
OWNER_ID = "0b6f4a1e-3c2d-4e5f-9a8b-7c6d5e4f3a2b"
STORAGE_KEY_RE = re.compile(r"^[A-Za-z0-9_/!.*'() &$=@;:+,?-]+$")
HANG = "hang"      # a scripted response that never comes (until the test ends; a Stall
                   # under the test's FakeClock)

# The columns of SPEC section 8, per (schema, table).
SUPABASE_TABLES = {
    ("imagen", "images"): ("id", "owner_user_id", "storage_path", "prompt", "prompt_sha256",
                           "backend", "model", "seed", "steps", "width", "height",
                           "latency_ms", "cost_usd", "sidecar", "tags", "created_at"),
    ("mai", "imagen_usage"): ("id", "created_at", "backend", "model", "latency_ms",
                              "cost_usd", "prompt_sha256", "caller"),
}


class MemoryTables:
    """The fake PostgREST's row storage, in memory. Any object with the same `insert`
    and `select` can replace it (FakeSupabase(tables=...)): one that runs the statements
    on a real PostgreSQL lets the database check types, constraints and RLS."""

    def __init__(self, tables=None):
        self.columns = dict(tables or SUPABASE_TABLES)
        self.rows = {name: [] for name in self.columns}
        self._ids = {name: set() for name in self.columns}
        self._sorted = {}

    def _table(self, schema, table):
        if (schema, table) not in self.columns:
            raise PostgrestError(404, "PGRST205", "Could not find the table '%s.%s' in the "
                                 "schema cache" % (schema, table))
        return self.columns[(schema, table)]

    def insert(self, schema, table, rows, on_conflict, ignore_duplicates):
        """Insert dict rows; a duplicate `on_conflict` value is skipped when
        ignore_duplicates, else 409/23505. Returns the rows inserted."""
        columns = self._table(schema, table)
        for row in rows:
            for column in row:
                if column not in columns:
                    raise PostgrestError(400, "PGRST204", "Could not find the '%s' column of "
                                         "'%s' in the schema cache" % (column, table))
        inserted = []
        for row in rows:
            value = row.get(on_conflict)
            if value in self._ids[(schema, table)]:
                if ignore_duplicates:
                    continue
                raise PostgrestError(409, "23505", 'duplicate key value violates unique '
                                     'constraint "%s_pkey"' % table,
                                     "Key (%s)=(%s) already exists." % (on_conflict, value))
            self._ids[(schema, table)].add(value)
            full = {column: row.get(column) for column in columns}
            self.rows[(schema, table)].append(full)
            inserted.append(full)
        self._sorted.clear()
        return inserted

    def select(self, schema, table, columns, filters, order, offset, limit):
        """(rows, total matching) for filters [(column, op, value)] and order
        [(column, descending)], rows cut to `columns` (None = all)."""
        self._table(schema, table)
        key = (schema, table, tuple(order))
        rows = self._sorted.get(key)
        if rows is None:
            rows = list(self.rows[(schema, table)])
            for column, descending in reversed(order):
                rows.sort(key=lambda r: (r[column] is None, r[column]), reverse=descending)
            self._sorted[key] = rows
        for column, op, value in filters:
            rows = [r for r in rows if _compare(r[column], op, value)]
        page = rows[offset:offset + limit]
        if columns is not None:
            page = [{c: r[c] for c in columns} for r in page]
        return page, len(rows)


def _compare(stored, op, value):
    if stored is None:
        return op == "is" and value == "null"
    if isinstance(stored, (int, float)) and not isinstance(stored, bool):
        value = float(value)
    return {"eq": stored == value, "neq": stored != value, "gt": stored > value,
            "gte": stored >= value, "lt": stored < value, "lte": stored <= value}[op]


class FakeSupabase:
    """Storage (/storage/v1) and PostgREST (/rest/v1) of one project on 127.0.0.1."""

    def __init__(self, http_fake, tables=None, key=SERVICE_KEY,
                 buckets=("imagen-generated",), exposed=("public", "imagen", "mai"),
                 max_rows=1000):
        self.key, self.exposed, self.max_rows = key, exposed, max_rows
        self.tables = tables if tables is not None else MemoryTables()
        self.buckets = {name: {} for name in buckets}   # bucket -> {key: (bytes, type)}
        self.tokens = {}                         # signed-URL token -> (bucket, key, exp)
        self.scripts = []                                # [(method, prefix, response)]
        self.released = threading.Event()
        self.server = http_fake(self.handle)
        self.url = self.server.url
        self.requests = self.server.requests
        self.env = {"SUPABASE_URL": self.url, "SUPABASE_SERVICE_KEY": key}

    # ----- scripting -----

    def script(self, method, prefix, *responses):
        """The next requests matching METHOD and path prefix get these answers, in order:
        (status, headers, body) tuples or HANG."""
        for response in responses:
            self.scripts.append((method, prefix, response))

    def objects(self, bucket="imagen-generated"):
        return self.buckets[bucket]

    def rows(self, table):
        return self.tables.rows[tuple(table.split("."))]

    def handle(self, request):
        for index, (method, prefix, response) in enumerate(self.scripts):
            if request.method == method and request.path.startswith(prefix):
                del self.scripts[index]
                if response == HANG and isinstance(fakes_clock, FakeClock):
                    return Stall(60)         # on the test's clock: silent past any deadline
                if response == HANG:
                    self.released.wait(60)
                    return 503, {}, {"message": "released"}
                return response
        if request.path.startswith("/storage/v1/object/sign/") and request.method == "GET":
            return self._download_signed(request)      # signed URLs need no key
        if request.headers.get("apikey") != self.key:
            return 401, {}, {"message": "Invalid API key"}
        if request.path.startswith("/storage/v1/"):
            return self._storage(request)
        if request.path.startswith("/rest/v1/"):
            return self._rest(request)
        return 404, {}, {"message": "no Route matched with those values"}

    # ----- Storage -----

    def _storage(self, request):
        if request.headers.get("authorization") != "Bearer " + self.key:
            return storage_error("403", "Unauthorized", "invalid signature")
        path = unquote(request.path[len("/storage/v1"):])
        batch = re.match(r"^/object/sign/([^/]+)/?$", path)
        if batch and request.method == "POST":
            return self._sign_many(request, batch.group(1))
        for prefix, action in (("/object/sign/", self._sign),
                               ("/object/authenticated/", self._download),
                               ("/object/", self._upload)):
            if path.startswith(prefix):
                bucket, _, key = path[len(prefix):].partition("/")
                if bucket not in self.buckets:
                    return storage_error("404", "Bucket not found", "Bucket not found",
                                         "NoSuchBucket")
                if not STORAGE_KEY_RE.match(key) or any(
                        part in ("", ".", "..") for part in key.split("/")):
                    return storage_error("400", "InvalidKey", "Invalid key: %s" % key,
                                         "InvalidKey")
                return action(request, bucket, key)
        return storage_error("404", "not_found", "Route not found")

    def _upload(self, request, bucket, key):
        if request.method not in ("POST", "PUT"):
            return storage_error("405", "Method not allowed", request.method)
        objects = self.buckets[bucket]
        upsert = request.headers.get("x-upsert") == "true" or request.method == "PUT"
        if key in objects and not upsert:
            return storage_error("409", "Duplicate", "The resource already exists",
                                 "KeyAlreadyExists")
        content_type = request.headers.get("content-type") or "application/octet-stream"
        objects[key] = (request.body, content_type)
        return 200, {}, {"Key": "%s/%s" % (bucket, key), "Id": _fake_uuid(bucket + key)}

    def _sign(self, request, bucket, key):
        """The single-key form: it signs the key as it stands in the request path after a
        partial decode (APIS.md), so `a%26b.png` is signed as `a%26b.png`, and the
        signed URL of such a key never works."""
        if key not in self.buckets[bucket]:
            return storage_error("404", "not_found", "Object not found", "NoSuchKey")
        expires = self._expires_in(request)
        if expires is None:
            return storage_error("400", "InvalidRequest", "expiresIn must be a number")
        raw_key = request.path[len("/storage/v1/object/sign/"):].partition("/")[2]
        signed = partial_unquote(raw_key)
        # relative to /storage/v1, path not percent-encoded (APIS.md)
        return 200, {}, {"signedURL": self._signed_path(bucket, signed, expires)}

    def _sign_many(self, request, bucket):
        """The batch form: raw keys from the body, one answer per path, a missing object
        is an `error` in its entry (the HTTP status stays 200)."""
        if bucket not in self.buckets:
            return storage_error("404", "Bucket not found", "Bucket not found", "NoSuchBucket")
        expires = self._expires_in(request)
        paths = self._body(request).get("paths")
        if expires is None or not isinstance(paths, list) or not paths or not all(
                isinstance(path, str) for path in paths):
            return storage_error("400", "Bad Request",
                                 "body must have required property 'paths'")
        answers = []
        for path in paths:
            if path in self.buckets[bucket]:
                answers.append({"error": None, "path": path,
                                "signedURL": self._signed_path(bucket, path, expires)})
            else:
                answers.append({"error": "Either the object does not exist or you do not "
                                "have access to it", "path": path, "signedURL": None})
        return 200, {}, answers

    @staticmethod
    def _body(request):
        try:
            body = json.loads(request.body.decode("utf-8") or "{}")
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def _expires_in(self, request):
        expires = self._body(request).get("expiresIn")
        if not isinstance(expires, int) or isinstance(expires, bool) or expires < 1:
            return None
        return expires

    def _signed_path(self, bucket, key, expires):
        exp = int(time.time()) + expires
        claims = base64.urlsafe_b64encode(json.dumps(
            {"url": "%s/%s" % (bucket, key), "exp": exp}).encode())
        token = "eyJhbGciOiJIUzI1NiJ9.%s.%s" % (claims.decode().rstrip("="),
                                                os.urandom(8).hex())
        self.tokens[token] = (bucket, key, exp)
        return "/object/sign/%s/%s?token=%s" % (bucket, key, token)

    def _download(self, request, bucket, key):
        if key not in self.buckets[bucket]:
            return storage_error("404", "not_found", "Object not found", "NoSuchKey")
        data, content_type = self.buckets[bucket][key]
        return 200, {"Content-Type": content_type}, data

    def _download_signed(self, request):
        token = (request.query.get("token") or [""])[0]
        if token not in self.tokens:
            return storage_error("400", "InvalidJWT", "invalid signature")
        bucket, key, exp = self.tokens[token]
        if time.time() >= exp:
            return storage_error("400", "InvalidJWT", '"exp" claim timestamp check failed')
        if unquote(request.path) != "/storage/v1/object/sign/%s/%s" % (bucket, key):
            return storage_error("400", "InvalidSignature", "The url do not match the signature")
        return self._download(request, bucket, key)

    # ----- PostgREST -----

    def _rest(self, request):
        if request.headers.get("authorization") != "Bearer " + self.key:
            return postgrest_error(PostgrestError(401, "PGRST301", "JWSError JWSInvalidSignature"))
        table = request.path[len("/rest/v1/"):]
        writes = request.method in ("POST", "PATCH", "PUT")
        schema = request.headers.get("content-profile" if writes else "accept-profile", "public")
        if schema not in self.exposed:
            return postgrest_error(PostgrestError(
                406, "PGRST106", "Invalid schema: %s" % schema,
                hint="Only the following schemas are exposed: %s" % ", ".join(self.exposed)))
        try:
            if request.method == "POST":
                return self._insert(request, schema, table)
            if request.method == "GET":
                return self._select(request, schema, table)
        except PostgrestError as error:
            return postgrest_error(error)
        return postgrest_error(PostgrestError(405, "PGRST117", "Unsupported HTTP method"))

    def _insert(self, request, schema, table):
        if not (request.headers.get("content-type") or "").startswith("application/json"):
            raise PostgrestError(415, "PGRST107", "None of these media types are available")
        try:
            body = request.json()
        except ValueError:
            raise PostgrestError(400, "PGRST102", "Empty or invalid json")
        rows = body if isinstance(body, list) else [body]
        prefer = parse_prefer(request.headers.get("prefer", ""))
        on_conflict = (request.query.get("on_conflict") or ["id"])[0]
        inserted = self.tables.insert(schema, table, rows, on_conflict,
                                      prefer.get("resolution") == "ignore-duplicates")
        if prefer.get("return") == "representation":
            return 201, {}, inserted
        return 201, {}, b""

    def _select(self, request, schema, table):
        query = dict((k, v[0]) for k, v in request.query.items())
        columns = None
        if query.get("select", "*") != "*":
            columns = query["select"].split(",")
        order = []
        for term in filter(None, query.get("order", "").split(",")):
            column, _, direction = term.partition(".")
            order.append((column, direction.startswith("desc")))
        filters = []
        for column, values in request.query.items():
            if column in ("select", "order", "limit", "offset"):
                continue
            for value in values:
                op, _, operand = value.partition(".")
                filters.append((column, op, operand))
        offset = int(query.get("offset", 0))
        limit = min(int(query.get("limit", self.max_rows)), self.max_rows)   # db-max-rows
        rows, total = self.tables.select(schema, table, columns, filters, order, offset, limit)
        exact = parse_prefer(request.headers.get("prefer", "")).get("count") == "exact"
        if exact and offset > total:
            return 416, {"Content-Range": "*/%d" % total}, {
                "code": "PGRST103", "message": "Requested range not satisfiable",
                "details": "An offset of %d was requested, but there are only %d rows."
                % (offset, total), "hint": None}
        shown_total = str(total) if exact else "*"
        span = "%d-%d" % (offset, offset + len(rows) - 1) if rows else "*"
        status = 206 if exact and len(rows) < total else 200
        return status, {"Content-Range": "%s/%s" % (span, shown_total)}, rows


def partial_unquote(text):
    """A path decoded the way Storage's router does before the single-key sign: every
    escape but those of the reserved `# $ & + , / : ; = ? @` (JavaScript's decodeURI)."""
    parts = re.split(r"(%(?:2[346BCFbcf]|3[ABDFabdf]|40))", text)
    return "".join(part if index % 2 else unquote(part) for index, part in enumerate(parts))


def storage_error(code, error, message, name=None, http=400):
    body = {"statusCode": code, "error": error, "message": message}
    if name:
        body["code"] = name
    return http, {}, body


def postgrest_error(error):
    return error.status, {}, error.body


def _fake_uuid(seed):
    import hashlib
    text = hashlib.sha1(seed.encode("utf-8")).hexdigest()
    return "%s-%s-4%s-8%s-%s" % (text[:8], text[8:12], text[13:16], text[17:20], text[20:32])


@pytest.fixture
def supabase(http_fake):
    """A FakeSupabase on loopback; `supabase.env` holds SUPABASE_URL and the key."""
    fake = FakeSupabase(http_fake)
    yield fake
    fake.released.set()
# ===== imagen serve: the server in this process or as a subprocess, and a small client =====

def free_port():
    """A loopback port nobody listens on right now."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "Answer(%d, %r)" % (self.status, self.body[:300])


class ServeClient:
    """A small client of an imagen server listening on 127.0.0.1:`port`."""

    port, token = None, None

    def connect(self, timeout=30):
        import http.client
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, conn=None, auth=True):
        """One request (JSON-encoding a non-bytes body, sent as application/json unless a
        Content-Type is given; None leaves a header out), with the server's token (UTF-8)
        unless auth is False or an Authorization header is given."""
        headers = dict(headers or {})
        if self.token and auth and "Authorization" not in headers:
            headers["Authorization"] = ("Bearer %s" % self.token).encode("utf-8")
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        headers = {key: value for key, value in headers.items() if value is not None}
        own = conn is None
        conn = conn or self.connect()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                          response.read())
        finally:
            if own:
                conn.close()

    def generate(self, **fields):
        return self.request("POST", "/v1/generate", fields)

    def backend(self, name):
        rows = self.request("GET", "/v1/backends").json()["backends"]
        return next(row for row in rows if row["name"] == name)


class ServeProcess(ServeClient):
    """`imagen serve` on a free loopback port, ready once /healthz answers."""

    def __init__(self, args, env, cwd, token=None):
        self.port, self.token = free_port(), token
        self.log_path = os.path.join(str(cwd), "serve-%d.log" % self.port)
        with open(self.log_path, "wb") as log:
            self.proc = popen_imagen(
                ["serve", "--addr", "127.0.0.1:%d" % self.port] + list(args), env=env,
                cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        poll(self.ready, timeout=30, message="imagen serve to answer /healthz")

    def ready(self):
        if self.proc.poll() is not None:
            raise AssertionError("imagen serve exited with %s: %s" % (self.proc.returncode, self.log()))
        try:
            return self.request("GET", "/healthz").status == 200
        except OSError:
            return False

    def stop(self, sig=signal.SIGTERM, timeout=30):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()


class ServeThread(ServeClient):
    """`imagen serve ARGS` run by imagen.main() in this process, up to where it would wait
    for a signal; its server then runs in a thread. The same routes, checks and limits,
    without a process start per test. What it writes to stderr (its console and access
    log) goes to log() instead, so a test's capsys holds only what the test ran."""

    def __init__(self, args, env, monkeypatch, token=None):
        import contextlib
        import io
        import imagen
        self.token, self.logged, started = token, io.StringIO(), []
        monkeypatch.setattr(imagen, "serve_until_signalled",
                            lambda api, server: started.append((api, server)))
        with contextlib.redirect_stderr(self.logged):     # its console keeps this stream
            code = imagen.main(["serve", "--addr", "127.0.0.1:0"] + [str(a) for a in args],
                               env=env)
        assert code == 0 and started, "imagen serve exited with %s: %s" % (code, self.log())
        [(self.api, self.server)] = started
        self.api.log = lambda line: self.logged.write(line + "\n")
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(SHUTDOWN_POLL,),
                         daemon=True).start()

    def log(self):
        return self.logged.getvalue()

    def close(self):
        self.api.stop_accepting()
        self.server.shutdown()
        self.server.server_close()


def _serve_config(tmp_path, config_text):
    config = tmp_path / "serve.yaml"
    config.write_text(config_text or "output:\n  dir: %s\n" % (tmp_path / "out"))
    return config


def _serve_env(env, token, extra_env):
    server_env = dict(env, **(extra_env or {}))
    if token:
        server_env["IMAGEN_SERVE_TOKEN"] = token
    return server_env


@pytest.fixture
def serve(env, tmp_path, monkeypatch):
    """start(config_text=None, *args, token=None, extra_env=None) -> ServeThread: `imagen
    serve` in this process, for tests of what it answers; output.dir is tmp_path/out unless
    the config sets it. Every server is stopped after the test."""
    servers = []

    def start(config_text=None, *args, token=None, extra_env=None):
        server = ServeThread(["--config", _serve_config(tmp_path, config_text)] + list(args),
                             _serve_env(env, token, extra_env), monkeypatch, token)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


@pytest.fixture
def serve_process(env, tmp_path):
    """start(config_text=None, *args, token=None, extra_env=None) -> ServeProcess: `imagen
    serve` as a process, for tests of the process itself (signals, exit code, its log)."""
    servers = []

    def start(config_text=None, *args, token=None, extra_env=None):
        server = ServeProcess(["--config", _serve_config(tmp_path, config_text)] + list(args),
                              _serve_env(env, token, extra_env), tmp_path, token)
        servers.append(server)
        return server
    yield start
    kill_left_running(servers)


def kill_left_running(processes):
    """Kill what a test left running (each has .proc, a Popen)."""
    for process in processes:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(30)


# ===== A real browser: headless Chromium over the DevTools protocol =====
# The Debian package `chromium` (make deps installs it). One browser for the whole session,
# a fresh tab per test (the last test's cookies and localStorage cleared), driven
# over the Chrome DevTools Protocol with imagen's own WebSocket client: no Selenium, no new
# test dependency. The browser can reach 127.0.0.1 and nothing else: every other host goes
# to a proxy that refuses connections, and host names do not resolve.

class BrowserError(Exception):
    """The browser answered a command with an error, crashed, or a page threw."""


# key name -> (code, Windows virtual key code, text it types)
BROWSER_KEYS = {
    "Escape": ("Escape", 27, ""), "Enter": ("Enter", 13, "\r"), "Tab": ("Tab", 9, ""),
    "Backspace": ("Backspace", 8, ""), "ArrowLeft": ("ArrowLeft", 37, ""),
    "ArrowUp": ("ArrowUp", 38, ""), "ArrowRight": ("ArrowRight", 39, ""),
    "ArrowDown": ("ArrowDown", 40, ""), "Home": ("Home", 36, ""), "End": ("End", 35, ""),
    "PageUp": ("PageUp", 33, ""), "PageDown": ("PageDown", 34, ""), "/": ("Slash", 191, "/"),
}


def browser_key(key):
    """(code, keyCode, text) of a key name of BROWSER_KEYS, a letter or a digit."""
    if key in BROWSER_KEYS:
        return BROWSER_KEYS[key]
    if len(key) == 1 and key.isascii() and key.isalnum():
        code = ("Digit" if key.isdigit() else "Key") + key.upper()
        return code, ord(key.upper()), key
    raise ValueError("press(): unknown key %r" % key)


def is_loopback_url(url):
    """True for URLs that stay on this machine: 127.0.0.1, or no network at all."""
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname == "127.0.0.1"


class Browser:
    """A headless Chromium and one DevTools WebSocket to it; pages share it through
    flattened sessions (each message carries its page's sessionId). They also share one
    browser context, so that a test's page can use the renderer process the last one left
    (a context of its own per test cost the browser tests a third of their time); a closed
    page's cookies, and the localStorage of the origins it loaded, are cleared."""

    START_TIMEOUT = 30.0

    def __init__(self, executable, folder):
        import socket
        self.folder = folder
        self.profile = os.path.join(folder, "profile")
        os.mkdir(self.profile)
        # bound but never listening: a connection to it is refused at once
        self._dead_proxy = socket.socket()
        self._dead_proxy.bind(("127.0.0.1", 0))
        proxy = "http://127.0.0.1:%d" % self._dead_proxy.getsockname()[1]
        self.log_path = os.path.join(folder, "chromium.log")
        self.args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--no-default-browser-check",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--disable-extensions", "--mute-audio",
                     "--remote-debugging-port=0", "--user-data-dir=" + self.profile,
                     "--window-size=1280,800",
                     "--proxy-server=" + proxy, "--proxy-bypass-list=<-loopback>;127.0.0.1",
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                     "about:blank"]
        # its own HOME: nothing (an NSS database, crash reports) lands in the user's
        home = os.path.join(folder, "home")
        os.mkdir(home)
        env = {key: value for key, value in os.environ.items()
               if not key.lower().endswith("_proxy") and not key.startswith("XDG_")}
        env.update(HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"),
                   XDG_CACHE_HOME=os.path.join(home, ".cache"))
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.ws = None
        self.context = None       # the browserContextId every page opens in
        self._spare = None        # targetId of a tab opened ahead for new_page()
        self._next_id = 0
        self._pages = {}          # sessionId -> Page
        self._answers = {}        # id -> answer not collected by results() yet
        self._methods = {}        # id -> method of a command not answered yet
        self._unawaited = set()   # ids whose answers nobody collects
        try:
            import imagen
            self.ws = imagen.WebSocket.connect(self._devtools_url(), timeout=self.START_TIMEOUT)
            self.context = self.call("Target.createBrowserContext")["browserContextId"]
            # the copy buttons write to the clipboard, and a test reads it back
            self.call("Browser.grantPermissions", {
                "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
                "browserContextId": self.context})
            self._spare = self._blank_target()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - self.started

    def _devtools_url(self):
        """The browser's DevTools URL, from the DevToolsActivePort file it writes."""
        path = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + self.START_TIMEOUT
        while True:
            try:
                with open(path, encoding="ascii", errors="replace") as handle:
                    text = handle.read(4096)
            except FileNotFoundError:
                text = ""
            found = re.match(r"(\d+)\r?\n(/devtools/browser/[0-9a-f-]{36})\s*$", text)
            if found:
                return "ws://127.0.0.1:%s%s" % found.groups()
            if self.proc.poll() is not None:
                raise BrowserError("chromium exited with %d before it listened:\n%s"
                                   % (self.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                raise BrowserError("chromium wrote no DevToolsActivePort within %.0fs:\n%s"
                                   % (self.START_TIMEOUT, self.log_tail()))
            time.sleep(0.01)

    def log_tail(self, size=4000):
        with open(self.log_path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(self.log_path) - size))
            return handle.read().decode("utf-8", "replace")

    def call(self, method, params=None, session=None, timeout=10.0):
        """Send one command and return its result; events that arrive meanwhile go to
        their pages. Raises BrowserError on an error answer or at the deadline."""
        return self.results([self.send(method, params, session)], timeout)[0]

    def send(self, method, params=None, session=None):
        """Send one command without waiting; results() collects its answer."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._send(message)
        self._methods[self._next_id] = method
        return self._next_id

    def results(self, idents, timeout=10.0):
        """The results of the commands sent as `idents`, in order, within `timeout`."""
        deadline = time.monotonic() + timeout
        while not all(ident in self._answers for ident in idents):
            if not self.pump(deadline - time.monotonic()) and time.monotonic() >= deadline:
                late = [self._methods[i] for i in idents if i not in self._answers]
                raise BrowserError("%s: no answer within %.1fs" % (", ".join(late), timeout))
        answers = [self._answers.pop(ident) for ident in idents]
        for ident, answer in zip(idents, answers):
            method = self._methods.pop(ident)
            if "error" in answer:
                raise BrowserError("%s: %s" % (method, answer["error"].get("message")))
        return [answer.get("result", {}) for answer in answers]

    def _send(self, message):
        import imagen
        try:
            self.ws.send(json.dumps(message))
        except imagen.WebSocketError as exc:
            raise BrowserError("the browser connection broke: %s\n%s"
                               % (exc.message, self.log_tail())) from None

    def pump(self, timeout):
        """Read one message within `timeout` seconds (False when none came): an answer is
        kept for results(), an event is handed to its page."""
        import imagen
        try:
            message = self.ws.recv(timeout=max(0.0, timeout))
        except imagen.WebSocketError as exc:
            raise BrowserError("the browser connection broke: %s\n%s"
                               % (exc.message, self.log_tail())) from None
        if message is None:
            return False
        data = json.loads(message[1])
        if "id" in data:
            if data["id"] in self._unawaited:
                self._unawaited.discard(data["id"])
                self._methods.pop(data["id"], None)
            else:
                self._answers[data["id"]] = data
        else:
            page = self._pages.get(data.get("sessionId"))
            if page is not None:
                page._on_event(data["method"], data.get("params", {}))
        return True

    def new_page(self):
        """A blank page (a tab of its own: its own sessionStorage), with its events
        recorded."""
        target = self._spare or self._blank_target()
        self._spare = None
        session = self.call("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
        page = Page(self, session, target)
        self._pages[session] = page
        self.results([self.send(domain + ".enable", None, session)
                      for domain in ("Page", "Runtime", "Network", "Log")])
        return page

    def _blank_target(self):
        """The targetId of a new about:blank tab."""
        return self.call("Target.createTarget", {"url": "about:blank",
                                                 "browserContextId": self.context})["targetId"]

    def close_page(self, page):
        """Close the page, clear its cookies and localStorage, and open the next test's tab
        already: its renderer starts while pytest sets up that test (a third of a second
        saved)."""
        self._pages.pop(page.session, None)
        try:
            self.results([self.send("Storage.clearDataForOrigin",
                                    {"origin": origin, "storageTypes": "local_storage"},
                                    page.session) for origin in page.origins()])
            self.call("Storage.clearCookies", {"browserContextId": self.context})
            self.call("Target.closeTarget", {"targetId": page.target})
            self._spare = self._blank_target()
        except BrowserError:
            if self.proc.poll() is None:
                raise

    def close(self):
        """Ask the browser to quit; kill it (its own process group) if it does not."""
        if self.ws is not None and self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=5.0)
            except BrowserError:
                pass
            self.ws.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._dead_proxy.close()


class Page:
    """One browser tab. It records, from the moment it opens:
    console_errors  texts of console.error() calls, uncaught exceptions and browser log
                    errors (a failed load, a CSP violation), each as "source: text";
    requests        the URL of every request the page made (WebSockets included), in order;
    failed          {url: net error} of the requests that failed;
    dialogs         the messages of the alert(), confirm() and prompt() it accepted."""

    def __init__(self, browser, session, target):
        self.browser, self.session, self.target = browser, session, target
        self.console_errors = []
        self.requests = []
        self.failed = {}
        self.dialogs = []
        self._urls = {}           # requestId -> URL
        self._loaded = False

    def call(self, method, params=None, timeout=10.0):
        return self.browser.call(method, params, self.session, timeout)

    def origins(self):
        """The http(s) origins of the URLs the page requested, in order."""
        found = []
        for url in self.requests:
            parts = urlsplit(url)
            origin = "%s://%s" % (parts.scheme, parts.netloc)
            if parts.scheme in ("http", "https") and origin not in found:
                found.append(origin)
        return found

    def _on_event(self, method, params):
        if method == "Page.loadEventFired":
            self._loaded = True
        elif method == "Page.javascriptDialogOpening":
            # an open alert() or confirm() would stall every later command: accept it
            self.dialogs.append(params.get("message", ""))
            self.browser._unawaited.add(self.browser.send(
                "Page.handleJavaScriptDialog", {"accept": True}, self.session))
        elif method == "Network.requestWillBeSent":
            self._urls[params["requestId"]] = params["request"]["url"]
            self.requests.append(params["request"]["url"])
        elif method == "Network.webSocketCreated":
            self.requests.append(params["url"])
        elif method == "Network.loadingFailed":
            url = self._urls.get(params["requestId"], params["requestId"])
            self.failed[url] = params.get("errorText", "")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append("console: " + " ".join(
                _remote_text(arg) for arg in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            exception = details.get("exception") or {}
            self.console_errors.append("exception: " + (exception.get("description")
                                                        or details.get("text", "")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.console_errors.append("%s: %s%s" % (
                entry.get("source"), entry.get("text"),
                " (%s)" % entry["url"] if entry.get("url") else ""))

    # The page's clock seam, installed by drive_timers() before its scripts run.
    PAGE_CLOCK = """(() => {
      const setReal = window.setTimeout.bind(window), clearReal = window.clearTimeout.bind(window);
      const held = new Map();
      let next = -1;
      window.__pageClock = { held, asked: [] };
      window.setTimeout = (handler, delay, ...args) => {
        const ms = Number(delay) || 0;
        window.__pageClock.asked.push(ms);
        if (ms < %(hold)d) return setReal(handler, ms / %(speed)d, ...args);
        held.set(next, [handler, args, ms]);
        return next--;
      };
      window.clearTimeout = (id) => { if (held.has(id)) held.delete(id); else clearReal(id); };
    })();"""

    def drive_timers(self, speed=10, hold=1000):
        """Put the page's timers on a clock the test drives, from the next document loaded:
        a delay under `hold` ms passes `speed` times faster (a debounce, a progress poll),
        a longer one waits for fire_timers() (a refresh every few seconds), and
        timer_delays() lists every delay the page asked for. Nothing else of the page's
        time changes."""
        self.call("Page.addScriptToEvaluateOnNewDocument",
                  {"source": self.PAGE_CLOCK % {"speed": speed, "hold": hold}})

    def timer_delays(self, held=False):
        """The delays (ms) the page has asked for, or those of its timers held now."""
        return self.evaluate("Array.from(window.__pageClock.%s)"
                             % ("held.values(), (timer) => timer[2]" if held else "asked"))

    def fire_timers(self):
        """Run the held timers now, as if their delays had passed; returns how many ran."""
        return self.evaluate("(() => { const due = Array.from(window.__pageClock.held.values());"
                             " window.__pageClock.held.clear();"
                             " for (const [handler, args] of due) handler(...args);"
                             " return due.length; })()")

    def foreign_requests(self):
        """The recorded request URLs that went (or tried to go) anywhere but 127.0.0.1."""
        return [url for url in self.requests if not is_loopback_url(url)]

    def goto(self, url, timeout=10.0):
        """Navigate and wait for the load event. Raises BrowserError when the navigation
        fails (a refused or blocked host) or does not load in time."""
        self._loaded = False
        result = self.call("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise BrowserError("goto %s: %s" % (url, result["errorText"]))
        if not result.get("loaderId"):
            return              # the same document (a #fragment): no load event comes
        deadline = time.monotonic() + timeout
        while not self._loaded:
            if time.monotonic() >= deadline:
                raise BrowserError("goto %s: not loaded within %.1fs" % (url, timeout))
            self.browser.pump(deadline - time.monotonic())

    def evaluate(self, expression, timeout=10.0):
        """The value of a JavaScript expression (a promise is awaited), as JSON gives it:
        undefined is None. A thrown error raises BrowserError with its description."""
        result = self.call("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True,
            "userGesture": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            exception = details.get("exception") or {}
            raise BrowserError("evaluate %s: %s" % (
                expression[:200], exception.get("description") or details.get("text")))
        return result["result"].get("value")

    def wait_for(self, condition, timeout=20.0, interval=0.02):
        """Evaluate the JavaScript `condition` until it is truthy and return its value;
        fail the test at the deadline. Events keep arriving while it waits. The default
        deadline only catches a page that never gets there (a loaded CI machine takes
        seconds for what takes milliseconds here); a test of how fast passes its own."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(condition)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError("timed out after %.1fs waiting for %s (last value %r)"
                                     % (timeout, condition, value))
            pause = time.monotonic() + interval
            while time.monotonic() < pause:
                self.browser.pump(pause - time.monotonic())

    def wait_until(self, predicate, timeout=20.0, message="condition"):
        """Take the browser's events in until the Python predicate() is truthy (on what
        the page recorded: console_errors, requests, failed) and return its value; fail
        the test at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
            self.browser.pump(min(0.05, deadline - time.monotonic()))

    def _element_center(self, selector):
        found = self.evaluate(
            "(() => { const e = document.querySelector(%s); if (!e) return null;"
            " e.scrollIntoView({block: 'center', inline: 'center', behavior: 'instant'});"
            " const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2, r.width, r.height]; })()"
            % json.dumps(selector))
        if found is None:
            raise BrowserError("no element matches %s" % selector)
        x, y, width, height = found
        if not width or not height:
            raise BrowserError("%s is not visible (it has no size)" % selector)
        return x, y

    def click(self, selector):
        """Click the middle of the first element matching the CSS selector with the
        mouse, as a user does (scrolled into view first; whatever lies on top gets it)."""
        x, y = self._element_center(selector)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                   "button": "left", "clickCount": 1})

    def type(self, selector, text):
        """Focus the element and type `text` at its cursor (input events, no key events)."""
        self.evaluate("(() => { const e = document.querySelector(%s);"
                      " if (!e) throw new Error('no element matches ' + %s); e.focus(); })()"
                      % (json.dumps(selector), json.dumps(selector)))
        self.call("Input.insertText", {"text": text})

    def choose_files(self, selector, paths):
        """Put files on the <input type="file"> matching the CSS selector, as a user's
        choice in the file dialog does (its change event included)."""
        root = self.call("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise BrowserError("no element matches %s" % selector)
        self.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(p) for p in paths]})

    def press(self, key):
        """Press and release one key where the focus is: a name of BROWSER_KEYS
        (Escape, Enter, ArrowLeft, ArrowRight, ArrowUp, ArrowDown, Tab, "/", ...) or
        a letter or digit."""
        code, key_code, text = browser_key(key)
        down = {"type": "keyDown" if text else "rawKeyDown", "key": key, "code": code,
                "windowsVirtualKeyCode": key_code, "nativeVirtualKeyCode": key_code}
        if text:
            down.update(text=text, unmodifiedText=text)
        self.call("Input.dispatchKeyEvent", down)
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "code": code,
                                             "windowsVirtualKeyCode": key_code,
                                             "nativeVirtualKeyCode": key_code})

    def screenshot(self, path, full_page=False):
        """Save what the viewport shows (or the whole page) as a PNG file; returns path."""
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"],
                              "height": size["height"], "scale": 1}
        data = base64.b64decode(self.call("Page.captureScreenshot", params, 30.0)["data"])
        with open(str(path), "wb") as handle:
            handle.write(data)
        return path

    def set_viewport(self, width, height, mobile=False, scale=1):
        """Emulate a window of width x height CSS pixels (a phone: mobile=True)."""
        self.call("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile})

    def emulate_color_scheme(self, scheme):
        """Make prefers-color-scheme match 'dark' or 'light'."""
        if scheme not in ("dark", "light"):
            raise ValueError("emulate_color_scheme(): 'dark' or 'light', not %r" % scheme)
        self.call("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": scheme}]})


def _remote_text(arg):
    """A console argument as DevTools shows it."""
    if "value" in arg:
        return arg["value"] if isinstance(arg["value"], str) else json.dumps(arg["value"])
    return arg.get("description") or arg.get("type", "")


def chromium_executable():
    """Chromium's path; skips the test (outside CI) or fails it (under CI) when missing."""
    need_tool("chromium", "chromium")
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """One headless Chromium for the session (skips outside CI when the Debian package
    chromium is missing; fails under CI). browser.new_page() -> Page; prefer `page`."""
    started = Browser(chromium_executable(), str(tmp_path_factory.mktemp("chromium")))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def page(browser):
    """A fresh Page (own cookies and storage) for this test, closed after it."""
    opened = browser.new_page()
    try:
        yield opened
    finally:
        browser.close_page(opened)


# ===== imagen mcp: the server as a subprocess, spoken to in JSON lines =====

class McpProcess:
    """`imagen mcp` as a subprocess. Messages go to its stdin one a line; a thread reads its
    stdout, where every line must be one JSON object (`lines` keeps them raw, `messages`
    parsed)."""

    def __init__(self, argv, env, cwd):
        self.proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines, self.messages, self.err = [], [], b""
        self.cond = threading.Condition()
        self.next_id, self.eof = 1, False
        self.reader = threading.Thread(target=self._read_stdout, daemon=True)
        self.reader.start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.messages.append(json.loads(line.decode("utf-8")))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def _read_stderr(self):
        for line in self.proc.stderr:
            with self.cond:
                self.err += line

    @property
    def stderr(self):
        with self.cond:
            return self.err.decode("utf-8", "replace")

    def send(self, message):
        """A dict (sent as one JSON line) or raw bytes (sent as they are)."""
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def request(self, method, params=None, ident=None):
        """Send a request; returns its id (a fresh integer unless given)."""
        if ident is None:
            ident, self.next_id = self.next_id, self.next_id + 1
        message = {"jsonrpc": "2.0", "id": ident, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return ident

    def wait_for(self, predicate, timeout=10.0, what="a message"):
        """The first message that satisfies predicate, waiting for it until timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof:
                    raise AssertionError("no %s within %.1fs; got %r; stderr: %s" % (
                        what, timeout, self.messages[-5:], self.err[-2000:]))
                self.cond.wait(min(remaining, 0.05))

    def answer(self, ident, timeout=10.0):
        """The answer (result or error) to request `ident`."""
        return self.wait_for(lambda m: m.get("id") == ident and ("result" in m or "error" in m)
                             and "method" not in m, timeout, "answer to %r" % (ident,))

    def call(self, method, params=None, timeout=10.0):
        return self.answer(self.request(method, params), timeout)

    def close(self, timeout=10.0):
        """Close stdin (the client's way to end it) and return the exit code, once all
        it wrote has been read."""
        self.proc.stdin.close()
        code = self.proc.wait(timeout)
        self.reader.join(timeout)
        return code


@pytest.fixture
def mcp(env, tmp_path):
    """start(config_text=None, extra_env=None, argv=None) -> McpProcess running `imagen
    mcp` (output.dir is tmp_path/out unless the config sets it); killed after the test."""
    processes = []

    def start(config_text=None, extra_env=None, argv=None):
        config = tmp_path / "mcp.yaml"
        config.write_text(config_text or "output:\n  dir: %s\n" % (tmp_path / "out"))
        command = argv or LAUNCHER + ["--config", str(config), "mcp"]
        process = McpProcess(command, dict(env, **(extra_env or {})), tmp_path)
        processes.append(process)
        return process
    yield start
    kill_left_running(processes)


# ===== Fake Replicate API (APIS.md §2) =====
# Predictions run on the fake's clock: `starting`, then `processing` with a tqdm-style
# percentage in `logs`, then the scripted outcome after `duration` seconds. A create with
# `Prefer: wait=N` is held until the prediction is done or N seconds have passed.

REPLICATE_TOKEN = "r8_FaKeT0kenThatMustNeverLeak0123456789"
FLUX_MODELS = ("flux-schnell", "flux-dev", "flux-pro", "flux-1.1-pro", "flux-1.1-pro-ultra",
               "flux-kontext-pro", "flux-kontext-max", "flux-kontext-dev",
               "flux-2-pro", "flux-2-flex", "flux-2-dev")
STRING_OUTPUT = ("flux-pro", "flux-1.1-pro", "flux-1.1-pro-ultra", "flux-kontext-pro",
                 "flux-kontext-max", "flux-kontext-dev", "flux-2-pro", "flux-2-flex",
                 "flux-2-dev")   # the others give lists
# The image inputs each model has (APIS.md §2, "Image inputs"): "one" file, a "list" of up
# to 8, or a "number"; any other of these names is a 422, as Replicate answers a field the
# model lacks.
IMAGE_INPUTS = {"flux-dev": {"image": "one", "prompt_strength": "number"},
                "flux-1.1-pro": {"image_prompt": "one"},
                "flux-kontext-pro": {"input_image": "one"}, "flux-kontext-max": {"input_image": "one"},
                "flux-kontext-dev": {"input_image": "one"},
                "flux-2-pro": {"input_images": "list"}, "flux-2-flex": {"input_images": "list"},
                "flux-2-dev": {"input_images": "list"}}
IMAGE_INPUT_NAMES = ("image", "prompt_strength", "image_prompt", "input_image", "input_images")
FAKE_VERSION = "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637"
ASPECT_SIZES = {"1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640),
                "3:2": (1216, 832), "2:3": (832, 1216), "4:5": (896, 1088), "5:4": (1088, 896),
                "3:4": (896, 1152), "4:3": (1152, 896), "9:16": (768, 1344), "9:21": (640, 1536)}
STEP_LIMITS = {"flux-schnell": 4, "flux-dev": 50}


@functools.lru_cache(maxsize=16)
def solid_png(width, height):
    """A plain RGB PNG written from the spec (independent of imagen's encoder); cached,
    as a real server serves a file that already exists."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = (b"\x00" + b"\x40\x80\xc0" * width) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))


def header_only_image(fmt, width, height):
    """JPEG and WebP files as far as their headers: enough for a size check."""
    import struct
    if fmt == "jpg":
        sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
        return b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9 + sof + b"\xff\xd9"
    body = b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def problem(status, detail, title=None, **extra):
    body = dict({"detail": detail, "status": status}, **extra)
    if title:
        body["title"] = title
    return status, {"Content-Type": "application/problem+json"}, json.dumps(body)


class FakeReplicate:
    """Scripted per test through its attributes:
    duration   seconds a prediction runs (0);  outcome  succeeded|failed|canceled|aborted|
    error      the `error` of a failed one;                 stalled (processing, output complete)
    scheme     http (files served here) | data | anything else, used literally
    made       how many outputs a prediction makes (default num_outputs)
    file_body  bytes served for every output file (default: a real image)
    hold_create seconds a create answers late, ignoring Prefer: wait (a slow server)
    stall_create seconds after which a create's answer begins, never to end (a Stall): the
                prediction exists, its id never reaches the client
    echo       text the server echoes into each prediction's id, logs and urls (a token)
    override   fields laid over every prediction it shows (wrong types, odd values)
    script(method, path_prefix, *responses): canned answers, used first, in order.
    The files API (POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET .../download) keeps
    uploads in `files`; add_deployment(...) makes a deployment (GET /v1/deployments/{o}/{n},
    POST /v1/deployments/{o}/{n}/predictions) whose predictions queue `starting` while
    max_instances of them run."""

    def __init__(self, http_fake):
        self.token = REPLICATE_TOKEN
        self.duration, self.outcome, self.error = 0.0, "succeeded", None
        self.scheme, self.made, self.file_body, self.hold_create = "http", None, None, 0.0
        self.stall_create = None
        self.echo, self.override = None, {}
        self.predictions = {}
        self.files, self.deleted_files = {}, {}      # id -> file; id -> monotonic time deleted
        self.deployments, self.slots = {}, {}        # "owner/name" -> deployment; -> free times
        self.owner = "imagen-tests"                  # the account the token belongs to
        self.log = []                      # (monotonic time, request)
        self.scripts = []
        self.cond = threading.Condition()
        self.server = http_fake(self.handle)
        # a client that gave up on a held create leaves a closed socket: not worth a traceback
        self.server.server.handle_error = lambda request, address: None
        self.url = self.server.url + "/v1"

    # ----- what the tests look at -----

    def requests_to(self, method, suffix=""):
        return [r for _, r in self.log if r.method == method and r.path.endswith(suffix)]

    @property
    def creates(self):
        return [r for _, r in self.log if r.method == "POST" and r.path.endswith("/predictions")]

    @property
    def polls(self):
        return [r for _, r in self.log if r.method == "GET" and r.path.startswith("/v1/predictions/")]

    @property
    def cancels(self):
        return self.requests_to("POST", "/cancel")

    @property
    def file_uploads(self):
        return [r for _, r in self.log if r.method == "POST" and r.path == "/v1/files"]

    @property
    def file_deletes(self):
        return [r for _, r in self.log if r.method == "DELETE" and r.path.startswith("/v1/files/")]

    @property
    def deployment_creates(self):
        return [r for _, r in self.log if r.method == "POST" and r.path.startswith("/v1/deployments/")
                and r.path.endswith("/predictions")]

    def add_deployment(self, name, model="black-forest-labs/flux-schnell", version=FAKE_VERSION,
                       hardware="gpu-l40s", min_instances=0, max_instances=2):
        """A deployment "owner/name" as GET /v1/deployments/{owner}/{name} shows it."""
        owner, short = name.split("/")
        self.deployments[name] = {
            "owner": owner, "name": short, "current_release": {
                "number": 1, "model": model, "version": version, "created_at": _now_iso(),
                "created_by": {"type": "organization", "username": owner, "name": owner,
                               "github_url": "https://github.com/" + owner},
                "configuration": {"hardware": hardware, "min_instances": min_instances,
                                  "max_instances": max_instances}}}
        return self.deployments[name]

    def max_running(self, deployment=None):
        """The most predictions (of one deployment, or all) that ran at the same moment."""
        with self.cond:
            spans = [(p["t0"], p["canceled"] or p["t0"] + p["duration"])
                     for p in self.predictions.values()
                     if deployment is None or p.get("deployment") == deployment]
        return max([sum(1 for s, e in spans if s <= start < e) for start, _ in spans] or [0])

    def early_deletes(self):
        """Input files deleted while a prediction that names them had not ended yet."""
        with self.cond:
            return sorted({ident for p in self.predictions.values() for ident in p["input_files"]
                           if ident in self.deleted_files and self.deleted_files[ident]
                           < (p["canceled"] or p["t0"] + p["duration"])})

    def script(self, method, prefix, *responses):
        self.scripts.append([method, prefix, list(responses)])

    # ----- the API -----

    def handle(self, request):
        self.log.append((fakes_clock.monotonic(), request))
        for method, prefix, responses in self.scripts:
            if request.method == method and request.path.startswith(prefix) and responses:
                return responses.pop(0)
        if request.path.startswith("/files/"):
            return self.serve_file(request)          # output files need no token
        parts = request.path.split("/")[2:]          # after /v1
        if request.method == "GET" and parts[:1] == ["files"] and parts[2:] == ["download"] \
                and self.signed(request.query, parts[1]):
            return self.download(parts[1])          # a signed URL needs no token
        if request.headers.get("authorization") != "Bearer " + self.token:
            return problem(401, "You did not pass a valid authentication token", "Unauthenticated")
        if parts[:1] == ["files"]:
            return self.files_route(request, parts[1:])
        if parts[:1] == ["deployments"]:
            return self.deployments_route(request, parts[1:])
        if request.method == "POST" and parts[:1] == ["models"] and parts[3:] == ["predictions"]:
            return self.create(request, "/".join(parts[1:3]), official=True)
        if request.method == "POST" and parts == ["predictions"]:
            return self.create(request, None, official=False)
        if request.method == "GET" and parts == ["predictions"]:
            with self.cond:
                newest = sorted(self.predictions.values(), key=lambda p: -p["t0"])
                return 200, {}, {"next": None, "previous": None,
                                 "results": [self.view(p) for p in newest]}
        if request.method == "GET" and len(parts) == 2 and parts[0] == "predictions":
            return self.get(parts[1])
        if request.method == "POST" and len(parts) == 3 and parts[2] == "cancel":
            return self.cancel(parts[1])
        return problem(404, "The requested resource could not be found.")

    def create(self, request, model, official, deployment=None):
        body = request.json()
        if deployment is not None:
            extra = sorted(set(body) - {"input", "webhook", "webhook_events_filter", "stream"})
            if extra:
                return problem(422, "- (root): Additional property %s is not allowed\n" % extra[0],
                               "Input validation failed")
            model = self.deployments[deployment]["current_release"]["model"]
        elif official:
            if model.split("/")[0] != "black-forest-labs" or model.split("/")[1] not in FLUX_MODELS:
                return problem(404, "The requested resource could not be found.")
            extra = sorted(set(body) - {"input", "webhook", "webhook_events_filter"})
            if extra:
                return problem(422, "- (root): Additional property %s is not allowed\n" % extra[0],
                               "Input validation failed")
        else:
            if body.get("version") != FAKE_VERSION:
                return problem(422, "Invalid version or not permitted", "Invalid version")
            model = "acme/sdxl-like"
        model_input = body.get("input") or {}
        family = model.split("/")[1]
        steps = model_input.get("num_inference_steps")
        if family in STEP_LIMITS and isinstance(steps, int) and steps > STEP_LIMITS[family]:
            return problem(422, "- input.num_inference_steps: Must be less than or equal to %d\n"
                           % STEP_LIMITS[family], "Input validation failed",
                           invalid_fields=[{"type": "number_lte", "field": "input.num_inference_steps"}])
        bad = self.bad_image_input(family, model_input)
        if bad:
            return bad
        ident = ("pid-%s-" % self.echo if self.echo else "fake") + "%08d" % (len(self.predictions) + 1)
        with self.cond:
            now = fakes_clock.monotonic()
            self.predictions[ident] = {
                "id": ident, "model": model, "family": family, "official": official,
                "input": model_input, "t0": now, "duration": self.duration,
                "outcome": self.outcome, "canceled": None, "created_at": _now_iso(),
                "created": now, "input_files": self.files_named_in(model_input),
                "first_input": self.first_input(model_input)}
            if deployment is not None:
                self.predictions[ident].update(
                    deployment=deployment, t0=self.deployment_start(deployment, self.duration),
                    version=self.deployments[deployment]["current_release"]["version"])
        wait = self.prefer_wait(request)
        prediction = self.predictions[ident]
        if self.stall_create is not None:
            return Stall(self.stall_create)
        if self.hold_create and isinstance(fakes_clock, FakeClock):
            fakes_clock.advance(self.hold_create)    # the test's clock: late at no real cost
        elif self.hold_create:
            time.sleep(self.hold_create)             # a slow server, not a test waiting
        elif wait:
            end = min(prediction["created"] + wait, prediction["t0"] + prediction["duration"])
            if isinstance(fakes_clock, FakeClock):
                fakes_clock.advance_to(end)          # the test's clock: held, at no real cost
            with self.cond:
                self.cond.wait_for(lambda: prediction["canceled"] or fakes_clock.monotonic() >= end,
                                   timeout=max(0.0, end - fakes_clock.monotonic()) + 0.002)
        view = self.view(prediction)
        status = 201 if not wait or view["status"] in ("succeeded", "failed", "canceled", "aborted") else 202
        headers = {"Preference-Applied": "wait=%d" % wait} if wait else {}
        return status, headers, view

    def bad_image_input(self, family, model_input):
        """The 422 for an image input the model does not have, or one it cannot read (not
        a URL or data: URI, a list over 8, a file of ours that is gone); else None."""
        fields = IMAGE_INPUTS.get(family, {})
        for name in IMAGE_INPUT_NAMES:
            if name not in model_input:
                continue
            kind, value = fields.get(name), model_input[name]
            if kind is None:
                return problem(422, "- input: Additional property %s is not allowed\n" % name,
                               "Input validation failed")
            if kind == "number":
                ok = isinstance(value, (int, float)) and 0 <= value <= 1
            elif kind == "list":
                ok = isinstance(value, list) and 0 < len(value) <= 8 and all(map(self.readable, value))
            else:
                ok = self.readable(value)
            if not ok:
                return problem(422, "- input.%s: cannot read the image(s) given\n" % name,
                               "Input validation failed")
        return None

    def readable(self, value):
        """An input file the model could fetch: a data: URI of an image, one of our files
        that still exists, or another http(s) URL."""
        if not isinstance(value, str):
            return False
        if value.startswith("data:"):
            return self.input_bytes(value) is not None
        ids = re.findall(r"/v1/files/([a-z0-9]+)", value)
        if ids:
            with self.cond:
                return ids[0] in self.files
        return value.startswith(("http://", "https://"))

    def first_input(self, model_input):
        """The bytes of the first input image, read when the prediction starts (as the
        model reads it): what `match_input_image` sizes the output by."""
        first = model_input.get("input_image") or (model_input.get("input_images") or [None])[0] \
            or model_input.get("image") or model_input.get("image_prompt")
        return self.input_bytes(first) if isinstance(first, str) else None

    def input_bytes(self, value):
        if value.startswith("data:"):
            header, _, payload = value.partition(",")
            try:
                return base64.b64decode(payload, validate=True) if header.endswith(";base64") else None
            except ValueError:
                return None
        ids = re.findall(r"/v1/files/([a-z0-9]+)", value)
        with self.cond:
            stored = self.files.get(ids[0]) if ids else None
        return stored["data"] if stored else None

    @staticmethod
    def prefer_wait(request):
        value = (request.headers.get("prefer") or "").strip()
        if value == "wait":
            return 60
        if value.startswith("wait="):
            return max(1, min(60, int(value[5:])))
        return 0

    def get(self, ident):
        with self.cond:
            prediction = self.predictions.get(ident)
            if prediction is None:
                return problem(404, "The requested resource could not be found.")
            return 200, {}, self.view(prediction)

    def cancel(self, ident):
        with self.cond:
            prediction = self.predictions.get(ident)
            if prediction is None:
                return problem(404, "The requested resource could not be found.")
            if self.view(prediction)["status"] not in ("succeeded", "failed", "canceled", "aborted"):
                prediction["canceled"] = fakes_clock.monotonic()
                self.cond.notify_all()
            return 200, {}, self.view(prediction)

    # ----- a prediction as the API shows it at this moment -----

    def view(self, prediction):
        ident, now = prediction["id"], prediction["canceled"] or fakes_clock.monotonic()
        elapsed, duration = now - prediction["t0"], prediction["duration"]
        status, output, error = "processing", None, None
        if prediction["canceled"]:
            status = "canceled"
        elif elapsed < min(0.02, duration / 4):
            status = "starting"
        elif elapsed >= duration:
            status = prediction["outcome"]
            if status in ("succeeded", "stalled"):
                output = self.outputs(prediction)
                status = "processing" if status == "stalled" else status
            elif status == "failed":
                error = self.error
        percent = max(0, min(100, int(100 * elapsed / duration))) if duration else 100
        base = "%s/predictions/%s" % (self.url, ident)
        view = {"id": ident, "model": prediction["model"],
                "version": prediction.get("version") or ("hidden" if prediction["official"] else FAKE_VERSION),
                "input": prediction["input"], "output": output, "error": error, "status": status,
                "data_removed": False, "source": "api", "created_at": prediction["created_at"],
                "logs": "Using seed: %s\n%3d%%|%s| %d/4 [00:01<00:01]\n" % (
                    prediction["input"].get("seed"), percent, "#" * (percent // 10), percent // 25),
                "urls": {"get": base, "cancel": base + "/cancel",
                         "web": "https://replicate.com/p/" + ident}}
        if status in ("succeeded", "failed", "canceled"):
            view["metrics"] = {"predict_time": round(min(elapsed, duration), 3),
                               "total_time": round(elapsed, 3)}
        if self.echo:
            view["logs"] += "token: %s\n" % self.echo
            view["urls"]["web"] += "?t=" + self.echo
        view.update(self.override)
        return view

    def outputs(self, prediction):
        model_input = prediction["input"]
        count = self.made if self.made is not None else model_input.get("num_outputs", 1)
        fmt = model_input.get("output_format") or (
            "jpg" if prediction["family"] == "flux-1.1-pro-ultra" else "webp")
        urls = []
        for index in range(count):
            if self.scheme == "http":
                urls.append("%s/files/%s/out-%d.%s" % (self.server.url, prediction["id"], index, fmt))
            elif self.scheme == "data":
                urls.append("data:application/octet-stream;base64,"
                            + base64.b64encode(self.image(prediction)).decode("ascii"))
            else:
                urls.append(self.scheme + "out-%d.%s" % (index, fmt))
        if prediction["family"] in STRING_OUTPUT:
            return urls[0] if urls else None
        return urls

    def image(self, prediction):
        if self.file_body is not None:
            return self.file_body
        model_input = prediction["input"]
        if model_input.get("aspect_ratio") == "match_input_image":
            width, height = png_size(prediction.get("first_input") or b"") or (1024, 1024)
        elif "aspect_ratio" in model_input and model_input["aspect_ratio"] != "custom":
            width, height = ASPECT_SIZES[model_input["aspect_ratio"]]
            if model_input.get("megapixels") == "0.25":
                width, height = width // 2, height // 2
        else:
            width, height = model_input.get("width", 1024), model_input.get("height", 1024)
        fmt = model_input.get("output_format") or "webp"
        return solid_png(width, height) if fmt == "png" else header_only_image(fmt, width, height)

    # ----- the files API (APIS.md §2, "Image inputs and the files API") -----

    def files_route(self, request, rest):
        if request.method == "POST" and not rest:
            return self.create_file(request)
        if request.method == "GET" and not rest:
            with self.cond:
                newest = sorted(self.files.values(), key=lambda f: -f["t0"])
                return 200, {}, {"next": None, "previous": None,
                                 "results": [self.file_view(f) for f in newest]}
        with self.cond:
            stored = self.files.get(rest[0])
        if stored is None or len(rest) > 2 or rest[1:] not in ([], ["download"]):
            return problem(404, "The requested resource could not be found.")
        if request.method == "GET" and rest[1:] == ["download"]:
            return self.download(rest[0])
        if request.method == "GET":
            return 200, {}, self.file_view(stored)
        if request.method == "DELETE":
            with self.cond:
                del self.files[rest[0]]
                self.deleted_files[rest[0]] = fakes_clock.monotonic()
            return 204, {}, b""
        return problem(405, "Method not allowed")

    def create_file(self, request):
        import hashlib
        try:
            form = parse_multipart(request.headers.get("content-type"), request.body)
        except ValueError as error:
            return problem(400, "Invalid multipart form: %s" % error)
        content = form.get("content")
        if content is None:
            return problem(422, "- content: content is required\n", "Input validation failed")
        name = form.value("filename") or content.filename
        if not name or len(name.encode("utf-8")) > 255:
            return problem(422, "- filename: a filename of 1 to 255 bytes is required\n",
                           "Input validation failed")
        try:
            metadata = json.loads(form.value("metadata", "{}"))
        except ValueError:
            return problem(422, "- metadata: must be valid JSON\n", "Input validation failed")
        data = content.data
        with self.cond:
            seed = ("%d:%s" % (len(self.files) + len(self.deleted_files), name)).encode() + data
            ident = base64.b32encode(hashlib.sha256(seed).digest()[:16]).decode().lower().rstrip("=")
            stored = self.files[ident] = {
                "id": ident, "name": name, "data": data, "metadata": metadata,
                "content_type": form.value("type") or content.content_type or "application/octet-stream",
                "etag": hashlib.md5(data).hexdigest(), "t0": fakes_clock.monotonic(),
                "checksums": {"sha256": hashlib.sha256(data).hexdigest(),
                              "md5": hashlib.md5(data).hexdigest()},
                "created_at": _now_iso(),
                "expires_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(time.time() + 86400))}
        return 201, {}, self.file_view(stored)

    def file_view(self, stored):
        view = {k: stored[k] for k in ("id", "name", "content_type", "etag", "checksums",
                                       "metadata", "created_at", "expires_at")}
        expiry = int(time.time()) + 3600
        view.update(size=len(stored["data"]), urls={"get": "%s/files/%s/download?%s" % (
            self.url, stored["id"], urlencode({"expiry": expiry, "owner": self.owner,
                                               "signature": self.signature(stored["id"], expiry)}))})
        return view

    def signature(self, ident, expiry):
        import hashlib
        digest = hashlib.sha256(("%s:%s:%s" % (self.owner, ident, expiry)).encode()).digest()
        return base64.b64encode(digest).decode()

    def signed(self, query, ident):
        expiry = (query.get("expiry") or [""])[0]
        return (expiry.isdigit() and int(expiry) >= time.time()
                and (query.get("owner") or [""])[0] == self.owner
                and (query.get("signature") or [""])[0] == self.signature(ident, expiry))

    def download(self, ident):
        with self.cond:
            stored = self.files.get(ident)
        if stored is None:
            return problem(404, "The requested resource could not be found.")
        return 200, {"Content-Type": stored["content_type"]}, stored["data"]

    def files_named_in(self, model_input):
        """The ids of uploaded files whose URLs a prediction's input carries."""
        found = re.findall(r"/v1/files/([a-z0-9]+)", json.dumps(model_input))
        return sorted(set(found))

    # ----- deployments (APIS.md §2, "Requests") -----

    def deployments_route(self, request, rest):
        if request.method == "GET" and not rest:
            return 200, {}, {"next": None, "previous": None, "results": list(self.deployments.values())}
        name = "/".join(rest[:2])
        if len(rest) < 2 or name not in self.deployments:
            return problem(404, "The requested resource could not be found.")
        if request.method == "GET" and len(rest) == 2:
            return 200, {}, self.deployments[name]
        if request.method == "POST" and rest[2:] == ["predictions"]:
            return self.create(request, None, official=False, deployment=name)
        return problem(404, "The requested resource could not be found.")

    def deployment_start(self, name, duration):
        """When a new prediction of the deployment starts (call with self.cond held): at
        once while fewer than max_instances run, else when the first of them ends; until
        then it shows `starting`. A canceled one keeps its instance to its planned end."""
        wanted = max(1, self.deployments[name]["current_release"]["configuration"]["max_instances"])
        slots = (self.slots.get(name, []) + [0.0] * wanted)[:wanted]
        index = min(range(wanted), key=lambda i: slots[i])
        start = max(fakes_clock.monotonic(), slots[index])
        slots[index] = start + duration
        self.slots[name] = slots
        return start

    def serve_file(self, request):
        ident = request.path.split("/")[2]
        with self.cond:
            prediction = self.predictions.get(ident)
        if prediction is None:
            return 404, {}, b""
        return 200, {"Content-Type": "application/octet-stream"}, self.image(prediction)


def _now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


@pytest.fixture
def replicate_api(http_fake):
    """A fresh FakeReplicate on 127.0.0.1; its API base URL is `.url`."""
    return FakeReplicate(http_fake)


# ===== Fake OpenAI Images API =====
# Answers as APIS.md §5 and the official `openai` package's types say: JSON
# {created, data: [{b64_json} | {url, revised_prompt}], usage, size, quality,
# output_format, background}; errors {"error": {message, type, param, code}} with an
# x-request-id on every answer; /images/edits as multipart/form-data (`image`, `image[]`,
# `mask`). dall-e `url` outputs live on a second server, as OpenAI's blob storage does.

OPENAI_KEY = "sk-proj-FaKeKeyThatMustNeverLeak0123456789abcdefXYZ"
OPENAI_SIZES = {"gpt-image": ("1024x1024", "1536x1024", "1024x1536", "auto"),
                "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
                "dall-e-2": ("256x256", "512x512", "1024x1024")}
OPENAI_FAMILY = {"gpt-image-1": "gpt-image", "gpt-image-1-mini": "gpt-image",
                 "gpt-image-1.5": "gpt-image", "dall-e-3": "dall-e-3", "dall-e-2": "dall-e-2"}
OPENAI_MAX_N = {"gpt-image": 10, "dall-e-3": 1, "dall-e-2": 10}
# output tokens of one gpt-image image by quality, square / portrait or landscape
OPENAI_OUTPUT_TOKENS = {"low": (272, 408), "medium": (1056, 1584), "high": (4160, 6240)}
OPENAI_GPT_OPTIONS = ("quality", "background", "output_format", "output_compression",
                      "moderation", "user", "safety_identifier", "input_fidelity", "partial_images",
                      "stream")
OPENAI_DALLE_OPTIONS = ("quality", "style", "response_format", "user")


def openai_error(status, message, kind="invalid_request_error", param=None, code=None,
                 headers=None):
    return status, dict(headers or {}), {"error": {"message": message, "type": kind,
                                                   "param": param, "code": code}}


class FakeOpenAI:
    """Scripted per test through its attributes:
    delay       seconds an answer takes (the images exist when it comes)
    made        images per answer (default n)
    image_body  bytes of every image (default: a real image of the size asked for)
    refuse      a word that, in a prompt, gets a moderation refusal
    drop        close the connection after reading a create, without an answer
    echo        text put into each answer's revised_prompt and error messages (a key)
    script(method, path_prefix, *responses): canned answers, used first, in order.
    `creates` are the create requests (generations and edits), `edits` the parsed
    multipart ones, `blob_requests` what the URL server got."""

    def __init__(self, http_fake):
        self.key = OPENAI_KEY
        self.delay, self.made, self.image_body, self.refuse = 0.0, None, None, "forbidden"
        self.drop, self.echo = False, None
        self.log, self.scripts, self.edits, self.blobs = [], [], [], {}
        self.lock = threading.Lock()
        self.server = http_fake(self.handle)
        self.url = self.server.url + "/v1"
        self.blob_server = http_fake(self.serve_blob)
        self.blob_requests = self.blob_server.requests

    @property
    def creates(self):
        return [r for _, r in self.log if r.method == "POST"]

    def script(self, method, prefix, *responses):
        self.scripts.append([method, prefix, list(responses)])

    def _request_id(self):
        return "req_%032x" % len(self.log)

    def handle(self, request):
        with self.lock:
            self.log.append((fakes_clock.monotonic(), request))
            request_id = self._request_id()
        answer = self._answer(request)
        if isinstance(answer, Stall):
            return answer
        status, headers, body = answer
        headers = dict({"x-request-id": request_id, "openai-processing-ms": "%d" % (
            self.delay * 1000), "openai-version": "2020-10-01"}, **headers)
        return status, headers, body

    def _answer(self, request):
        for method, prefix, responses in self.scripts:
            if request.method == method and request.path.startswith(prefix) and responses:
                return responses.pop(0)
        auth = request.headers.get("authorization")
        if not auth:
            return openai_error(401, "You didn't provide an API key. You need to provide your "
                                "API key in an Authorization header using Bearer auth (i.e. "
                                "Authorization: Bearer YOUR_KEY).")
        if auth != "Bearer " + self.key:
            given = auth.split(" ", 1)[-1]
            return openai_error(401, "Incorrect API key provided: %s***%s. You can find your API "
                                "key at https://platform.openai.com/account/api-keys."
                                % (given[:6], given[-4:]), code="invalid_api_key")
        if request.method == "POST" and request.path == "/v1/images/generations":
            try:
                fields = request.json()
            except ValueError:
                return openai_error(400, "We could not parse the JSON body of your request.")
            return self.create(fields, [], request)
        if request.method == "POST" and request.path == "/v1/images/edits":
            try:
                parts = parse_multipart(request.headers.get("content-type"), request.body).parts
            except ValueError:
                return openai_error(400, "We could not parse the multipart body of your request.")
            fields = {part.name: part.text() for part in parts if part.filename is None}
            files = [(part.name, part.filename, part.content_type, part.data) for part in parts
                     if part.filename is not None]
            self.edits.append({"fields": fields, "files": files})
            if "n" in fields:
                fields["n"] = int(fields["n"])
            return self.create(fields, files, request)
        return openai_error(404, "Invalid URL (%s %s)" % (request.method, request.path))

    def create(self, fields, files, request):
        model = fields.get("model") or "dall-e-2"       # the API's default
        family = OPENAI_FAMILY.get(model)
        if family is None:
            return openai_error(400, "Invalid value: '%s'. Supported values are: %s." % (
                model, ", ".join("'%s'" % m for m in OPENAI_FAMILY)), param="model",
                code="invalid_value")
        if files and family == "dall-e-3":
            return openai_error(400, "Invalid value: 'dall-e-3'. Value must be 'dall-e-2' or a "
                                "GPT image model.", param="model", code="invalid_value")
        known = OPENAI_GPT_OPTIONS if family == "gpt-image" else OPENAI_DALLE_OPTIONS
        for key in fields:
            if key not in ("model", "prompt", "n", "size") + known:
                return openai_error(400, "Unknown parameter: '%s'." % key, param=key,
                                    code="unknown_parameter")
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return openai_error(400, "Missing required parameter: 'prompt'.", param="prompt",
                                code="missing_required_parameter")
        n = fields.get("n", 1)
        if not isinstance(n, int) or n < 1 or n > OPENAI_MAX_N[family]:
            return openai_error(400, "Invalid 'n': integer above maximum value. Expected a "
                                "value <= %d, but got %s instead." % (OPENAI_MAX_N[family], n),
                                param="n", code="integer_above_max_value")
        size = fields.get("size") or ("auto" if family == "gpt-image" else "1024x1024")
        if size not in OPENAI_SIZES[family]:
            return openai_error(400, "Invalid value: '%s'. Supported values are: %s." % (
                size, ", ".join("'%s'" % s for s in OPENAI_SIZES[family])), param="size",
                code="invalid_value")
        if files and not [f for f in files if f[0] in ("image", "image[]")]:
            return openai_error(400, "Missing required parameter: 'image'.", param="image",
                                code="missing_required_parameter")
        for name, filename, _, content in files:
            if not content.startswith((b"\x89PNG", b"\xff\xd8\xff", b"RIFF")):
                return openai_error(400, "Invalid file '%s': unsupported mimetype. Supported "
                                    "file formats are 'image/jpeg', 'image/png', and "
                                    "'image/webp'." % name, param=name,
                                    code="invalid_image_format")
        if self.refuse and self.refuse in prompt:
            if family == "gpt-image":
                return openai_error(400, "Your request was rejected by the safety system. If you "
                                    "believe this is an error, contact us at help.openai.com "
                                    "and include the request ID %s." % self._request_id(),
                                    kind="image_generation_user_error", code="moderation_blocked")
            return openai_error(400, "Your request was rejected as a result of our safety "
                                "system. Your prompt may contain text that is not allowed by "
                                "our safety system.", code="content_policy_violation")
        if self.drop:
            raise ConnectionAbortedError("the fake drops this create without an answer")
        if self.delay:
            time.sleep(self.delay)           # a slow model, not a test waiting
        return 200, {}, self.answer(family, model, fields, files, n, size)

    def answer(self, family, model, fields, files, n, size):
        if size == "auto":
            size = "1024x1024"
        width, height = (int(side) for side in size.split("x"))
        fmt = fields.get("output_format") or "png"
        image = self.image_body if self.image_body is not None else (
            solid_png(width, height) if fmt == "png"
            else header_only_image("jpg" if fmt == "jpeg" else fmt, width, height))
        made = n if self.made is None else self.made
        answer = {"created": int(time.time())}
        if family != "gpt-image":
            items = []
            for _ in range(made):
                if fields.get("response_format") == "b64_json":
                    item = {"b64_json": base64.b64encode(image).decode("ascii")}
                else:
                    name = "img-%s.png" % os.urandom(6).hex()
                    with self.lock:
                        self.blobs[name] = image
                    item = {"url": "%s/private/org-fake/user-fake/%s?st=2026-12-02T05%%3A00%%3A00Z"
                                   "&se=2026-12-02T07%%3A00%%3A00Z&sp=r&sig=c2lnbmF0dXJl"
                                   % (self.blob_server.url, name)}
                if family == "dall-e-3":
                    item["revised_prompt"] = "A detailed illustration of %s%s" % (
                        fields["prompt"], " " + self.echo if self.echo else "")
                items.append(item)
            answer["data"] = items
            return answer
        quality = fields.get("quality") or "auto"
        resolved = "high" if quality == "auto" else quality
        per_image = OPENAI_OUTPUT_TOKENS[resolved][0 if width == height else 1]
        text_tokens = max(1, len(fields["prompt"].split()))
        image_tokens = 323 * len([f for f in files if f[0] in ("image", "image[]")])
        answer.update({
            "background": "transparent" if fields.get("background") == "transparent" else "opaque",
            "data": [{"b64_json": base64.b64encode(image).decode("ascii")} for _ in range(made)],
            "output_format": fmt, "quality": resolved, "size": size,
            "usage": {"input_tokens": text_tokens + image_tokens,
                      "input_tokens_details": {"image_tokens": image_tokens,
                                               "text_tokens": text_tokens},
                      "output_tokens": per_image * made,
                      "total_tokens": text_tokens + image_tokens + per_image * made,
                      "output_tokens_details": {"image_tokens": per_image * made,
                                                "text_tokens": 0}}})
        return answer

    def serve_blob(self, request):
        name = request.path.rsplit("/", 1)[-1]
        with self.lock:
            image = self.blobs.get(name)
        if image is None or "sig" not in request.query:
            return 403, {"Content-Type": "application/xml"}, (
                '<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed'
                '</Code></Error>')
        return 200, {"Content-Type": "image/png"}, image


@pytest.fixture
def openai_api(http_fake):
    """A fresh FakeOpenAI on 127.0.0.1; its API base URL is `.url`."""
    return FakeOpenAI(http_fake)


# ===== Fake ComfyUI =====
# Speaks ComfyUI 0.8.0 as APIS.md §1 records it: every route also under /api/, a real
# WebSocket on /ws (server side written here, independently of imagen's client), the
# message sequence of a run, {} from /history while queued or running, 400 bodies with
# node_errors, 500 text/plain for a malformed body, cached resubmissions, the `executing`
# without prompt_id after a reconnect. By default it also has the jobs routes of ComfyUI
# 0.33 (`jobs = False` makes it an older server, where they are 404). Tests script it
# through its attributes.

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TROUBLE = "500 Internal Server Error\n\nServer got itself in trouble"
COMFY_NODES = {   # class_type -> required inputs (a subset of the real ones)
    "CheckpointLoaderSimple": ("ckpt_name",), "CLIPTextEncode": ("text", "clip"),
    "EmptySD3LatentImage": ("width", "height", "batch_size"),
    "KSampler": ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                 "negative", "latent_image", "denoise"),
    "VAEDecode": ("samples", "vae"), "SaveImage": ("filename_prefix", "images"),
    "EmptyImage": ("width", "height", "batch_size", "color"), "PreviewImage": ("images",),
    "ImageBlur": ("image", "blur_radius", "sigma"),
    "LoadImage": ("image",), "VAEEncode": ("pixels", "vae"),
    "ImageScale": ("image", "upscale_method", "width", "height", "crop"),
}
COMFY_INT_MAX = {"seed": 2 ** 64 - 1, "steps": 10000, "width": 16384, "height": 16384,
                 "batch_size": 4096, "color": 0xFFFFFF}


def ws_frame(opcode, payload, fin=True):
    """One unmasked server frame."""
    import struct as st
    head = bytes((0x80 * fin | opcode,))
    n = len(payload)
    if n < 126:
        head += bytes((n,))
    elif n < 65536:
        head += bytes((126,)) + st.pack(">H", n)
    else:
        head += bytes((127,)) + st.pack(">Q", n)
    return head + payload


def ws_read_frame(rfile):
    """(fin, opcode, payload, masked) of one client frame from a file-like socket reader."""
    import struct as st
    head = rfile.read(2)
    if len(head) < 2:
        return None
    fin, opcode, masked, n = head[0] >> 7, head[0] & 0x0F, head[1] >> 7, head[1] & 0x7F
    if n == 126:
        (n,) = st.unpack(">H", rfile.read(2))
    elif n == 127:
        (n,) = st.unpack(">Q", rfile.read(8))
    key = rfile.read(4) if masked else b"\x00" * 4
    data = rfile.read(n)
    return fin, opcode, bytes(b ^ key[i % 4] for i, b in enumerate(data)), masked


def png_size(data):
    """(width, height) from a PNG's IHDR, or None for anything else."""
    import struct as st
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return st.unpack(">II", data[16:24])


def is_canonical_uuid(text):
    """A lowercase 8-4-4-4-12 hex UUID, the only job id ComfyUI 0.33 takes."""
    import re
    pattern = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    return re.fullmatch(pattern, text) is not None


def ws_accept_for(key):
    import base64
    import hashlib
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode("ascii")


class FakeSocketPeer:
    """The server side of one WebSocket connection."""

    def __init__(self, client_id, wfile, connection):
        self.client_id, self.wfile, self.connection = client_id, wfile, connection
        self.lock = threading.Lock()
        self.alive = True

    def send(self, data, opcode=0x1):
        with self.lock:
            if not self.alive:
                return
            try:
                self.wfile.write(data if isinstance(data, bytes) and opcode == -1 else ws_frame(opcode, data))
                self.wfile.flush()
            except OSError:
                self.alive = False

    def send_raw(self, data):
        self.send(data, -1)

    def drop(self):
        """Cut the connection without a close frame, as a restarting server does."""
        import socket as sk
        with self.lock:
            self.alive = False
            try:
                self.connection.shutdown(sk.SHUT_RDWR)
            except OSError:
                pass


class FakeComfyUI:
    """One fake ComfyUI server on 127.0.0.1. Scripting attributes (set them in a test):
    job_seconds   how long a prompt runs (split over the KSampler's steps)
    websocket     False: /ws answers 404, like a proxy that passes no upgrades
    fail          (node_id, exception_type, message): that node raises execution_error
    reject        a JSON body for POST /prompt to answer 400 with
    trouble       True: POST /prompt answers the 500 text/plain of a malformed body
    load          extra queue_remaining GET /prompt reports (other users' jobs)
    view_body     bytes /view answers instead of the file (e.g. an HTML error page)
    filename      the output filename reported (e.g. one with path parts)
    drop_at_step  cut the WebSocket once at this sampler step (the client reconnects)
    lose_end      never send the final `executing` node=null (a message lost in transit)
    hang          accept connections but never answer
    checkpoints   the model files the server has
    jobs          False: no /api/jobs routes (404), like servers older than 0.33
    odd_messages  (type, data) pairs sent to the prompt's client when it starts
    history_patch fields that replace those of every /history entry
    reject_upload (status, body) that POST /upload/image answers instead of storing the file
    gate          a function of the prompt id: the prompt's nodes run once it returns True
                  (a test releases a prompt when it has seen what it waits for)
    on_queue      a function of the prompt id, called once the prompt is queued, before the
                  POST /prompt that queued it is answered (someone else acting on it at once)
    Uploads (POST /upload/image, ComfyUI 0.33) are stored in `files` like outputs, so /view
    serves them and a LoadImage naming one validates; `uploads` records each one.
    """

    def __init__(self):
        self.job_seconds, self.websocket, self.fail, self.reject = 0.0, True, None, None
        self.trouble, self.load, self.view_body, self.filename = False, 0, None, None
        self.drop_at_step, self.hang, self.lose_end = None, False, False
        self.checkpoints = ["flux1-schnell-fp8.safetensors"]
        self.jobs, self.odd_messages, self.history_patch, self.gate = True, [], None, None
        self.on_queue = None
        self.requests, self.ws_connects, self.pongs, self.unmasked = [], [], [], 0
        self.deleted, self.interrupts, self.cleared, self.job_cancels = [], [], False, []
        self.history_empty_answers = 0
        self.reject_upload, self.uploads = None, []
        self.prompts, self.pending, self.running, self.history = {}, [], None, {}
        self.files, self.cache, self.peers, self.last_node = {}, {}, {}, {}
        self.counter, self.file_counter = 0, 0
        self.cond = threading.Condition()
        self.closing = threading.Event()
        self.interrupt_flag = threading.Event()
        fake = self

        class Handler(QuietHandler):
            def _serve(self):
                if fake.hang and isinstance(fakes_clock, FakeClock):
                    return Stall(60).send(self)     # on the test's clock: silent past any deadline
                if fake.hang:
                    fake.closing.wait(60)
                    self.close_connection = True
                    return
                request = read_request(self)
                if request.path.startswith("/api/"):
                    request.path = request.path[4:]
                fake.requests.append(request)
                if request.path == "/ws" and fake.websocket and \
                        "websocket" in self.headers.get("Upgrade", "").lower():
                    return fake.serve_socket(self, request)
                send_reply(self, *fake.route(request))

            do_GET = do_POST = _serve

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        threading.Thread(target=self.server.serve_forever, args=(SHUTDOWN_POLL,), daemon=True).start()
        threading.Thread(target=self.work, daemon=True).start()

    def close(self):
        self.closing.set()
        self.interrupt_flag.set()
        with self.cond:
            self.cond.notify_all()
        for peer in list(self.peers.values()):
            peer.drop()
        self.server.shutdown()
        self.server.server_close()

    # ----- what tests look at -----

    def posted_prompts(self):
        return [r.json() for r in self.requests if r.method == "POST" and r.path == "/prompt"]

    def workflow(self, index=-1):
        return self.posted_prompts()[index]["prompt"]

    def submit(self, workflow, client_id=None):
        """Queue a prompt as another user would (straight in, no HTTP)."""
        return self.accept({"prompt": workflow, "client_id": client_id})["prompt_id"]

    # ----- HTTP routes -----

    def route(self, request):
        path, method = request.path, request.method
        if method == "POST" and path == "/prompt":
            return self.post_prompt(request.body)
        if method == "GET" and path == "/prompt":
            with self.cond:
                remaining = len(self.pending) + (self.running is not None) + self.load
            return 200, {}, {"exec_info": {"queue_remaining": remaining}}
        if method == "GET" and path == "/queue":
            with self.cond:
                running = [self.queue_entry(self.running)] if self.running else []
                pending = [self.queue_entry(p) for p in self.pending]
            return 200, {}, {"queue_running": running, "queue_pending": pending}
        if method == "POST" and path == "/queue":
            data = request.json()
            changed = False
            with self.cond:
                for prompt_id in data.get("delete") or []:
                    self.deleted.append(prompt_id)
                    if prompt_id in self.pending:
                        self.pending.remove(prompt_id)
                        changed = True
                if data.get("clear"):
                    self.cleared = changed = True
                    del self.pending[:]
            if changed:          # the real queue tells every socket when it changes
                self.broadcast_status()
            return 200, {}, b""
        if path == "/jobs" or path.startswith("/jobs/"):
            if not self.jobs:
                return 404, {"Content-Type": "text/plain"}, "404: Not Found"
            return self.jobs_route(method, path[len("/jobs"):], request)
        if method == "POST" and path == "/interrupt":
            data = request.json() if request.body else {}
            self.interrupts.append(data.get("prompt_id"))
            if data.get("prompt_id") in (None, self.running):
                self.interrupt_flag.set()
            return 200, {}, b""
        if method == "GET" and path.startswith("/history/"):
            prompt_id = path[len("/history/"):]
            with self.cond:
                entry = self.history.get(prompt_id)
            if entry is None:
                self.history_empty_answers += 1
                return 200, {}, {}
            return 200, {}, {prompt_id: dict(entry, **(self.history_patch or {}))}
        if method == "GET" and path == "/view":
            return self.view(request.query)
        if method == "POST" and path == "/upload/image":
            return self.upload_image(request)
        if method == "GET" and path == "/system_stats":
            version = "0.33.0" if self.jobs else "0.8.0"
            return 200, {}, {"system": {"comfyui_version": version}, "devices": []}
        return 404, {"Content-Type": "text/plain"}, "404: Not Found"

    # ----- the jobs routes of ComfyUI 0.33 (APIS.md §1, "Newer servers") -----

    JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")

    def jobs_route(self, method, rest, request):
        if method == "GET" and rest == "":
            return self.list_jobs(request.query)
        if method == "POST" and rest == "/cancel":
            ids = request.json().get("job_ids") if request.body else None
            if not isinstance(ids, list) or not all(isinstance(i, str) and is_canonical_uuid(i)
                                                    for i in ids):
                return 400, {}, {"error": "job_ids must be a list of job ids"}
            return 200, {}, {"cancelled": any([self.cancel_job(i) for i in ids])}
        job_id, _, action = rest[1:].partition("/")
        if method == "GET" and job_id and not action:
            with self.cond:
                job = self.job(job_id, full=True)
            return (200, {}, job) if job else (404, {}, {"error": "Job not found"})
        if method == "POST" and job_id and action == "cancel":
            if not is_canonical_uuid(job_id):
                return 400, {}, {"error": "invalid job_id"}
            return 200, {}, {"cancelled": self.cancel_job(job_id)}
        return 404, {"Content-Type": "text/plain"}, "404: Not Found"

    def list_jobs(self, query):
        wanted = ",".join(query.get("status") or []).split(",") if query.get("status") else None
        if wanted and not set(wanted) <= set(self.JOB_STATUSES):
            return 400, {}, {"error": "Invalid status filter: %s" % ",".join(wanted)}
        try:
            offset = max(0, int((query.get("offset") or ["0"])[0]))
            limit = int(query["limit"][0]) if "limit" in query else None
        except ValueError:
            return 400, {}, {"error": "limit and offset must be integers"}
        with self.cond:
            ids = [self.running] if self.running else []
            ids += list(self.pending) + list(self.history)
            jobs = [self.job(i) for i in ids]
        jobs = sorted((j for j in jobs if not wanted or j["status"] in wanted),
                      key=lambda j: j["create_time"], reverse=True)
        page = jobs[offset:] if limit is None else jobs[offset:offset + limit]
        return 200, {}, {"jobs": page, "pagination": {
            "offset": offset, "limit": limit, "total": len(jobs),
            "has_more": offset + len(page) < len(jobs)}}

    def job(self, prompt_id, full=False):
        """The job record of a prompt (call with self.cond held), or None when the server
        does not know it: history first, then the running one, then the queue."""
        p = self.prompts.get(prompt_id)
        if p is None:
            return None
        job = {"id": prompt_id, "priority": p["number"], "create_time": p["create_time"],
               "outputs_count": 0}
        entry = self.history.get(prompt_id)
        if entry is None:
            if prompt_id != self.running and prompt_id not in self.pending:
                return None       # deleted from the queue before it ran
            return dict(job, status="in_progress" if prompt_id == self.running else "pending")
        messages = dict((kind, data) for kind, data in entry["status"]["messages"])
        ended = [data for kind, data in messages.items() if kind in (
            "execution_success", "execution_error", "execution_interrupted")]
        job.update(status="completed" if entry["status"]["status_str"] == "success" else
                   "cancelled" if "execution_interrupted" in messages else "failed",
                   outputs_count=sum(len(o.get("images") or []) for o in entry["outputs"].values()))
        if "execution_start" in messages:
            job["execution_start_time"] = messages["execution_start"]["timestamp"]
        if ended:
            job["execution_end_time"] = ended[0]["timestamp"]
        if "execution_error" in messages:
            job["execution_error"] = messages["execution_error"]
        if full:
            job.update(outputs=entry["outputs"], execution_status=entry["status"])
        return job

    def cancel_job(self, prompt_id):
        """What POST /api/jobs/{id}/cancel does: interrupt it when running, drop it when
        pending; False when there was nothing to cancel."""
        with self.cond:
            self.job_cancels.append(prompt_id)
            if prompt_id == self.running:
                self.interrupt_flag.set()
                return True
            if prompt_id not in self.pending:
                return False
            self.pending.remove(prompt_id)
        self.broadcast_status()
        return True

    def post_prompt(self, raw):
        if self.trouble:
            return 500, {"Content-Type": "text/plain; charset=utf-8"}, TROUBLE
        try:
            body = json.loads(raw.decode("utf-8"))
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return 500, {"Content-Type": "text/plain; charset=utf-8"}, TROUBLE
        if "prompt" not in body:
            return 400, {}, {"error": {"type": "no_prompt", "message": "No prompt provided",
                                       "details": "No prompt provided", "extra_info": {}},
                             "node_errors": []}
        if not isinstance(body["prompt"], dict):
            return 500, {"Content-Type": "text/plain; charset=utf-8"}, TROUBLE
        if self.reject is not None:
            return 400, {}, self.reject
        problem = self.validate(body["prompt"])
        if problem:
            return 400, {}, problem
        return 200, {}, self.accept(body)

    def validate(self, workflow):
        node_errors = {}
        for node, info in workflow.items():
            kind = info.get("class_type")
            if kind not in COMFY_NODES:
                return {"error": {"type": "invalid_prompt", "message": "Cannot execute because "
                                  "node %s does not exist." % kind, "details": "Node ID '#%s'" % node,
                                  "extra_info": {}}, "node_errors": {}}
            errors = []
            inputs = info.get("inputs") or {}
            for name in COMFY_NODES[kind]:
                value = inputs.get(name)
                if name not in inputs:
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": name, "extra_info": {"input_name": name}})
                elif name in COMFY_INT_MAX and not isinstance(value, list):
                    try:
                        number = int(value)     # numeric strings are accepted for INT inputs
                    except (TypeError, ValueError):
                        errors.append({"type": "invalid_input_type", "message": "Failed to convert an input value to a INT value",
                                       "details": "%s, %s, invalid literal" % (name, value),
                                       "extra_info": {"input_name": name, "received_value": value}})
                        continue
                    if number > COMFY_INT_MAX[name]:
                        errors.append({"type": "value_bigger_than_max", "message": "Value %d bigger than max of %d" % (number, COMFY_INT_MAX[name]),
                                       "details": "%s" % name, "extra_info": {"input_name": name}})
                elif kind == "LoadImage" and not isinstance(value, list) and \
                        self.input_image(str(value)) is None:
                    # LoadImage.VALIDATE_INPUTS, reported as execution.py words it
                    errors.append({"type": "custom_validation_failed",
                                   "message": "Custom validation failed for node",
                                   "details": "image - Invalid image file: %s" % value,
                                   "extra_info": {"input_name": "image"}})
                elif name == "ckpt_name" and value not in self.checkpoints:
                    errors.append({"type": "value_not_in_list", "message": "Value not in list",
                                   "details": "ckpt_name: '%s' not in %s" % (value, self.checkpoints),
                                   "extra_info": {"input_name": "ckpt_name", "received_value": value}})
            if errors:
                node_errors[node] = {"errors": errors, "dependent_outputs": [], "class_type": kind}
        if node_errors:
            return {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                              "details": "", "extra_info": {}}, "node_errors": node_errors}
        if not any(info["class_type"] in ("SaveImage", "PreviewImage") for info in workflow.values()):
            return {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                              "details": "", "extra_info": {}}, "node_errors": []}
        return None

    def accept(self, body):
        import uuid
        prompt_id = body.get("prompt_id") or str(uuid.uuid4())
        with self.cond:
            number = self.counter
            self.counter += 1
            self.prompts[prompt_id] = {"workflow": body["prompt"], "client_id": body.get("client_id"),
                                       "number": number, "create_time": int(time.time() * 1000)}
            self.pending.append(prompt_id)
            self.cond.notify_all()
        self.broadcast_status()
        if self.on_queue:
            self.on_queue(prompt_id)
        return {"prompt_id": prompt_id, "number": number, "node_errors": {}}

    def queue_entry(self, prompt_id):
        p = self.prompts[prompt_id]
        return [p["number"], prompt_id, p["workflow"], {"client_id": p["client_id"]}, []]

    def view(self, query):
        kind = (query.get("type") or ["output"])[0]
        if kind not in ("output", "input", "temp"):
            return 400, {}, b""
        if self.view_body is not None:
            return 200, {"Content-Type": "text/html"}, self.view_body
        key = ((query.get("filename") or [""])[0], (query.get("subfolder") or [""])[0], kind)
        data = self.files.get(key)
        if data is None:
            return 404, {}, b""
        return 200, {"Content-Type": "image/png",
                     "Content-Disposition": 'filename="%s"' % key[0]}, data

    # ----- the WebSocket -----

    def serve_socket(self, handler, request):
        client_id = (request.query.get("clientId") or [None])[0]
        handler.send_response(101, "Switching Protocols")
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", ws_accept_for(handler.headers["Sec-WebSocket-Key"]))
        handler.end_headers()
        handler.wfile.flush()
        peer = FakeSocketPeer(client_id, handler.wfile, handler.connection)
        self.ws_connects.append(client_id)
        with self.cond:
            self.peers[client_id] = peer
            remaining = len(self.pending) + (self.running is not None)
            replay = self.last_node.get(client_id) if self.running and \
                self.prompts[self.running]["client_id"] == client_id else None
        peer.send(json.dumps({"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": remaining}}, "sid": client_id}}).encode())
        if replay is not None:   # the reconnect quirk: no prompt_id
            peer.send(json.dumps({"type": "executing", "data": {"node": replay, "display_node": replay}}).encode())
        while not self.closing.is_set():
            try:
                frame = ws_read_frame(handler.rfile)
            except OSError:
                frame = None
            if frame is None:
                break
            fin, opcode, payload, masked = frame
            self.unmasked += not masked
            if opcode == 0x8:
                peer.send(payload[:2], 0x8)
                break
            if opcode == 0xA:
                self.pongs.append(payload)
            elif opcode == 0x9:
                peer.send(payload, 0xA)
        peer.alive = False
        handler.close_connection = True

    def wake_clients(self):
        """A ping on every socket: a client waiting on one reads its clock again at once
        (a test has moved it on) instead of at the end of its wait in the kernel."""
        for peer in list(self.peers.values()):
            peer.send(b"", 0x9)

    def emit(self, client_id, kind, data):
        if client_id is None:
            return      # without client_id, no execution messages at all
        peer = self.peers.get(client_id)
        if peer is not None:
            peer.send(json.dumps({"type": kind, "data": data}).encode())

    def emit_in_pieces(self, client_id, kind, data):
        """Text split over three frames with a ping between them (RFC 6455 allows it)."""
        peer = self.peers.get(client_id) if client_id else None
        if peer is None:
            return
        text = json.dumps({"type": kind, "data": data}).encode()
        third = len(text) // 3
        peer.send_raw(ws_frame(0x1, text[:third], fin=False) + ws_frame(0x9, b"are you there")
                      + ws_frame(0x0, text[third:2 * third], fin=False)
                      + ws_frame(0x0, text[2 * third:]))

    def broadcast_status(self):
        with self.cond:
            remaining = len(self.pending) + (self.running is not None)
            peers = list(self.peers.values())
        for peer in peers:
            peer.send(json.dumps({"type": "status", "data": {"status": {"exec_info": {
                "queue_remaining": remaining}}}}).encode())

    # ----- the worker: one prompt at a time, like ComfyUI's -----

    def work(self):
        while not self.closing.is_set():
            with self.cond:
                while not self.pending and not self.closing.is_set():
                    self.cond.wait()
                if self.closing.is_set():
                    return
                prompt_id = self.pending.pop(0)
                self.running = prompt_id
                self.interrupt_flag.clear()
            try:
                self.run(prompt_id)
            finally:
                with self.cond:
                    self.running = None
                    self.cond.notify_all()
                self.broadcast_status()
                if not self.lose_end:
                    self.emit(self.prompts[prompt_id]["client_id"], "executing",
                              {"node": None, "prompt_id": prompt_id})

    def run(self, prompt_id):
        p = self.prompts[prompt_id]
        workflow, client_id = p["workflow"], p["client_id"]
        messages = []

        def say(kind, data, pieces=False):
            data = dict(data, prompt_id=prompt_id)
            if kind.startswith("execution_"):
                messages.append([kind, dict(data, timestamp=int(time.time() * 1000))])
            (self.emit_in_pieces if pieces else self.emit)(client_id, kind, data)

        def finish(status_str, outputs):
            with self.cond:
                self.history[prompt_id] = {
                    "prompt": self.queue_entry(prompt_id), "outputs": outputs,
                    "status": {"status_str": status_str, "completed": status_str == "success",
                               "messages": messages}, "meta": {}}

        say("execution_start", {})
        for kind, data in self.odd_messages:   # ours when they are objects, else as they are
            self.emit(client_id, kind,
                      dict(data, prompt_id=prompt_id) if isinstance(data, dict) else data)
        key = json.dumps(workflow, sort_keys=True)
        if key in self.cache:      # an identical resubmission: everything cached
            say("execution_cached", {"nodes": list(workflow)})
            for node, output in self.cache[key].items():
                say("executed", {"node": node, "display_node": node, "output": output})
            say("execution_success", {})
            return finish("success", self.cache[key])
        say("execution_cached", {"nodes": []})
        say("progress_state", {"nodes": {node: {"value": 0.0, "max": 1.0, "state": "pending",
                                                "node_id": node, "display_node_id": node}
                                         for node in workflow}})
        while self.gate and not self.gate(prompt_id) and not self.interrupt_flag.is_set() \
                and not self.closing.wait(0.005):
            pass
        outputs = {}
        for node, info in workflow.items():
            if self.interrupt_flag.is_set():
                say("execution_interrupted", {"node_id": node, "node_type": info["class_type"], "executed": []})
                return finish("error", {})
            self.last_node[client_id] = node
            say("executing", {"node": node, "display_node": node})
            if self.fail and self.fail[0] == node:
                say("execution_error", {"node_id": node, "node_type": info["class_type"], "executed": [],
                                        "exception_message": self.fail[2], "exception_type": self.fail[1],
                                        "traceback": ["Traceback ..."], "current_inputs": {},
                                        "current_outputs": {}})
                return finish("error", {})
            if info["class_type"] == "KSampler" or (info["class_type"] == "EmptyImage"
                                                    and not self.has_sampler(workflow)):
                if not self.sample(node, info, say, client_id, workflow):
                    say("execution_interrupted", {"node_id": node, "node_type": info["class_type"], "executed": []})
                    return finish("error", {})
            if info["class_type"] in ("SaveImage", "PreviewImage"):
                output = {"images": [self.save_image(info, workflow)]}
                outputs[node] = output
                say("executed", {"node": node, "display_node": node, "output": output}, pieces=True)
        self.cache[key] = outputs
        say("execution_success", {})
        finish("success", outputs)

    @staticmethod
    def sample_workflow(width=64, height=64):
        """A model-free workflow, as used against the real server: EmptyImage -> SaveImage."""
        return {"1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height,
                                                             "batch_size": 1, "color": 0}},
                "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "other",
                                                            "images": ["1", 0]}}}

    @staticmethod
    def has_sampler(workflow):
        return any(info["class_type"] == "KSampler" for info in workflow.values())

    def sample(self, node, info, say, client_id, workflow):
        """Spend job_seconds over the sampler's steps; False when interrupted."""
        steps = int(info["inputs"].get("steps", 1)) if info["class_type"] == "KSampler" else 1
        for step in range(1, steps + 1):
            if self.interrupt_flag.wait(self.job_seconds / steps):
                return False
            say("progress", {"value": step, "max": steps, "node": node})
            peer = self.peers.get(client_id)
            if peer is not None:     # a preview: event 1, format 2 (PNG), then the bytes
                peer.send(b"\x00\x00\x00\x01\x00\x00\x00\x02" + solid_png(8, 8), 0x2)
                if self.drop_at_step == step:
                    self.drop_at_step = None
                    peer.drop()
                    try:
                        poll(lambda: self.peers.get(client_id) is not peer, timeout=10)
                    except AssertionError:
                        pass     # it did not come back (it may poll instead): carry on
        return True

    def save_image(self, info, workflow):
        width, height = self.image_size(workflow, info)
        prefix = info["inputs"].get("filename_prefix", "ComfyUI")
        with self.cond:
            self.file_counter += 1
            name = self.filename or "%s_%05d_.png" % (prefix, self.file_counter)
        image = {"filename": name, "subfolder": "", "type": "output"}
        self.files[(name, "", "output")] = solid_png(width, height)
        return image

    def image_size(self, workflow, info):
        """The size of the image a node receives: follow its links back to the source."""
        if info["class_type"] in ("EmptySD3LatentImage", "EmptyImage"):
            return int(info["inputs"]["width"]), int(info["inputs"]["height"])
        if info["class_type"] == "LoadImage":
            return png_size(self.input_image(str(info["inputs"]["image"])) or b"") or (64, 64)
        if info["class_type"] == "ImageScale":     # 0 keeps the source's aspect ratio
            width, height = int(info["inputs"]["width"]), int(info["inputs"]["height"])
            if not (width and height):
                source = self.image_size(workflow, workflow[info["inputs"]["image"][0]])
                width = width or max(1, source[0] * height // source[1])
                height = height or max(1, source[1] * width // source[0])
            return width, height
        for name in ("images", "samples", "latent_image", "image", "pixels"):
            link = info["inputs"].get(name)
            if isinstance(link, list) and link[0] in workflow:
                return self.image_size(workflow, workflow[link[0]])
        return 64, 64

    # ----- image input: POST /upload/image and what LoadImage finds (ComfyUI 0.33) -----

    def upload_image(self, request):
        """server.py's image_upload: a different file under a taken name becomes
        `name (1).ext`, the same bytes keep the name, overwrite=true|1 replaces."""
        import hashlib
        import posixpath
        if self.reject_upload is not None:
            return self.reject_upload[0], {}, self.reject_upload[1]
        try:
            form = parse_multipart(request.headers.get("content-type"), request.body)
        except ValueError:
            return 500, {"Content-Type": "text/plain; charset=utf-8"}, TROUBLE
        image, kind = form.get("image"), form.value("type", "input")
        if image is None or image.filename is None:
            return 400, {}, b""      # a missing or plain-text `image` part: no file
        if not image.filename:
            return 400, {}, b""
        if kind not in ("input", "temp", "output"):
            return 500, {"Content-Type": "text/plain; charset=utf-8"}, TROUBLE
        subfolder, overwrite = form.value("subfolder", ""), form.value("overwrite")
        folder = posixpath.normpath(subfolder or ".")
        path = posixpath.normpath(posixpath.join(folder, image.filename))
        if path.startswith("../") or path == ".." or path.startswith("/"):
            return 400, {}, b""      # outside the type's directory
        folder, name = posixpath.split(path)
        stem, ext = posixpath.splitext(name)
        outcome, counter = "new", 1
        with self.cond:
            if overwrite in ("true", "1"):
                outcome = "overwritten" if (name, folder, kind) in self.files else "new"
            else:
                while (name, folder, kind) in self.files:
                    if self.files[(name, folder, kind)] == image.data:
                        outcome = "duplicate"
                        break
                    name = "%s (%d)%s" % (stem, counter, ext)
                    counter += 1
            if outcome != "duplicate":
                self.files[(name, folder, kind)] = image.data
            self.uploads.append({"filename": image.filename, "name": name, "subfolder": subfolder,
                                 "type": kind, "overwrite": overwrite, "outcome": outcome,
                                 "size": len(image.data),
                                 "sha256": hashlib.sha256(image.data).hexdigest()})
        return 200, {}, {"name": name, "subfolder": subfolder, "type": kind}

    def input_image(self, annotated):
        """The bytes a LoadImage `image` value names (folder_paths.annotated_filepath:
        `sub/name.png`, `name.png [output]`), or None."""
        import posixpath
        kind = "input"
        for tag in ("input", "output", "temp"):
            if annotated.endswith(" [%s]" % tag):
                annotated, kind = annotated[:-len(tag) - 3], tag
        folder, name = posixpath.split(posixpath.normpath(annotated or "."))
        with self.cond:
            return self.files.get((name, folder, kind))


@pytest.fixture
def comfyui():
    """Start FakeComfyUI servers that stop at the end of the test."""
    servers = []

    def start(**script):
        server = FakeComfyUI()
        for key, value in script.items():
            setattr(server, key, value)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


def refused_url():
    """An http:// URL on 127.0.0.1 where nothing listens."""
    return "http://127.0.0.1:%d" % free_port()
