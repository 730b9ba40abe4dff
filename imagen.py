#!/usr/bin/env python3
"""imagen: turn a prompt into an image file through pluggable backends.

    imagen generate "a red fox in the snow" --backend mock

Backends are adapters behind one small interface (mock, comfyui, replicate, openai).
After an image is written, best-effort steps record it (ledger, usage, cloud) and
preview it.

Stable surface for scripts and agents that `import imagen`:
    generate(prompt, *, backend=None, size=None, seed=None, steps=None, style=None,
             negative=None, count=1, timeout=None, output=None, sidecar=None,
             preview=None, cloud=None, max_cost=None, images=None, strength=None,
             config=None, env=None, console=None, quiet=False, interactive=False,
             post_steps=True)
        -> list of result records (dicts, see README "Sidecar"). Keyword-only: an
        unknown keyword is a TypeError. `config` is a path or a loaded Config.
        `images` is a list of input image paths (up to 8, as --image), `strength`
        0 < F <= 1 (as --strength).
    main(argv=None) -> exit code
    ImagenError(message, code)
Everything else is internal and may change.

Standard library only, plus PyYAML when a config file is read.
"""

__version__ = "0.1.0"
__all__ = ["generate", "main", "ImagenError", "__version__"]

import io
import os
import sys
import time


# ===== Constants, errors and output =====

DEFAULT_TIMEOUT = 600.0          # seconds, when neither --timeout nor the backend sets one
MAX_PROMPT_CHARS = 20000
MAX_SEED = 2 ** 63 - 1           # must fit a Postgres bigint
RANDOM_SEED_MAX = 2 ** 32 - 1    # drawn seeds stay in a range every backend accepts
SIZE_MIN, SIZE_MAX = 64, 4096
MAX_STEPS = 200
MAX_COUNT = 100
MAX_INPUT_IMAGES = 8             # --image, repeated
MAX_INPUT_BYTES = 20 * 1024 * 1024
RECORD_SCHEMA = "imagen/1"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class ImagenError(Exception):
    """The one error type: a message for `imagen: ...` and the exit code to end with."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.message = message
        self.code = code


def usage_error(message):
    return ImagenError(message, EXIT_USAGE)


# What json.load(s) raises on bad input: deep nesting ("[[[[...") overflows the
# interpreter's stack as RecursionError, not as the ValueError of any other malformed JSON.
JSON_ERRORS = (ValueError, RecursionError)


class Console:
    """Everything that is not the result goes through here, to stderr."""

    def __init__(self, quiet=False, stream=None, on_progress=None):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.live = not quiet and _isatty(self.stream)
        self.on_progress = on_progress     # fn(message, done, total), e.g. MCP progress
        self._dirty = False

    @property
    def watched(self):
        """Whether anyone sees progress: worth a request to find out more to show."""
        return self.live or self.on_progress is not None

    def warn(self, message):
        self.clear()
        self._write("imagen: %s\n" % message)

    def progress(self, message, done=None, total=None):
        """A transient status line, shown only on a terminal and without --quiet; also
        handed to on_progress, with `done` of `total` when the backend counts."""
        if self.on_progress is not None:
            self.on_progress(message, done, total)
        if self.live:
            self._write("\r\x1b[2K%s" % message[:200])
            self._dirty = True

    def clear(self):
        if self._dirty:
            self._write("\r\x1b[2K")
            self._dirty = False

    def _write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must never fail a generation


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


SECRET_ENV_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def scrub_secrets(text, env):
    """Text with the value of every secret-looking environment variable blanked: the last
    guard for messages imagen did not write itself (exceptions, tracebacks)."""
    for name, value in env.items():
        if len(value) >= 6 and any(word in name.upper() for word in SECRET_ENV_WORDS):
            text = text.replace(value, "[redacted]")
    return text


def redact_url(url):
    """A URL safe to print: no query string (signed tokens live there) and no userinfo."""
    head, _, _ = url.partition("?")
    scheme, sep, rest = head.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return scheme + sep + rest


class Clock:
    """Time as imagen reads it. Every deadline, sleep and timestamp goes through the one
    `clock` below, so a test can drive time (conftest's fake_clock) instead of waiting."""

    def monotonic(self):
        return time.monotonic()

    def time(self):
        return time.time()

    def sleep(self, seconds):
        time.sleep(seconds)

    def run(self, argv, timeout, **kwargs):
        """subprocess.run ending by `timeout`: waiting for a process is time too."""
        import subprocess
        return subprocess.run(argv, timeout=timeout, **kwargs)


clock = Clock()


def wait_until(deadline, seconds):
    """Sleep for `seconds`, but never past the monotonic `deadline`; False if it was hit."""
    remaining = deadline - clock.monotonic()
    if remaining <= 0:
        return False
    clock.sleep(min(seconds, remaining))
    return seconds < remaining


def dollars(amount):
    """0.1 -> "0.10", 0.003 -> "0.003": cents always, smaller digits when there are any."""
    text = "%.6f" % amount
    return text.rstrip("0") if len(text.rstrip("0").split(".")[1]) > 2 else "%.2f" % amount


def to_json(value, indent=None):
    import json
    return json.dumps(value, indent=indent, ensure_ascii=False, sort_keys=False)


def emit(text):
    """The one place results reach stdout. A closed pipe is main()'s quiet exit 1; any other
    failure (a full disk, a closed stdout) is an `imagen: stdout: ...` line."""
    if sys.stdout is None:      # started with stdout closed (`>&-`): fd 1 may be another file
        raise ImagenError("stdout is closed")
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as exc:
        _silence_stdout()     # what could not be written must not fail again at exit
        raise ImagenError("stdout: %s" % (getattr(exc, "strerror", None) or exc)) from None


def _silence_stdout():
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _debug_traceback(env):
    if env.get("IMAGEN_DEBUG") == "1":
        import traceback
        sys.stderr.write(scrub_secrets(traceback.format_exc(), env))


def _raise_on_sigterm():
    """SIGTERM takes the Ctrl-C path, so adapters cancel remote jobs before we exit."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:     # not the main thread (imagen used as a library)
        return None


def _restore_sigterm(previous):
    if previous is not None:
        import signal
        signal.signal(signal.SIGTERM, previous)


def new_uuid():
    """A random (version 4) UUID; the uuid module costs about 2 ms to import on every
    generate, more than this (`make bench` prints it)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    text = raw.hex()
    return "%s-%s-%s-%s-%s" % (text[:8], text[8:12], text[12:16], text[16:20], text[20:])


def _home(env):
    return env.get("HOME") or os.path.expanduser("~")


def expand_home(path, home):
    """expanduser against the given home (the caller's env), not the process's."""
    if path == "~" or path.startswith("~/"):
        return home + path[1:]
    return os.path.expanduser(path)


def slugify(text, limit=40):
    import re
    import unicodedata
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower())[:limit].strip("-")
    return slug or "image"


_version_string = None


def version_string():
    """`X.Y.Z (crc32 of the source)`, so any copy identifies itself: the same for
    imagen.py, its installed copy and the zipapp, whatever bytecode runs."""
    global _version_string
    if _version_string is None:
        import zlib
        source = _own_source()
        _version_string = __version__ if source is None else \
            "%s (%08x)" % (__version__, zlib.crc32(source) & 0xFFFFFFFF)
    return _version_string


def _own_source():
    """The bytes of imagen.py, also when the module was loaded from imagen.pyc (the
    zipapp ships the source next to it), or None."""
    path = __file__[:-1] if __file__.endswith(".pyc") else __file__
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        try:   # inside a zipapp
            return __loader__.get_data(path)
        except (OSError, AttributeError):
            return None


# ===== HTTP with retry =====
# One small client for every remote (ComfyUI, Replicate, Storage, PostgREST): keep-alive
# connections per host, one deadline per request whatever the server drips, proxies from
# the environment, and capped exponential backoff that honours Retry-After.

RETRY_STATUSES = frozenset((429, 500, 502, 503, 504))
# What a server may get twice without harm (RFC 9110 9.2.2): only these are sent again
# when a kept-alive connection drops without an answer.
IDEMPOTENT_METHODS = frozenset(("GET", "HEAD", "PUT", "DELETE", "OPTIONS"))


def bad_port(url):
    """What is wrong with the port of a URL (`:99999`, `:abc`), or None."""
    from urllib.parse import urlsplit
    try:
        urlsplit(url).port
    except ValueError:
        return "has a bad port (%s)" % redact_url(url)
    return None


class HttpResponse:
    __slots__ = ("status", "headers", "body", "url")

    def __init__(self, status, headers, body, url):
        self.status, self.headers, self.body, self.url = status, headers, body, url

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def json(self):
        import json
        try:
            return json.loads(self.body.decode("utf-8") or "null")
        except JSON_ERRORS:
            return None

    def text(self, limit=300):
        return self.body[:limit].decode("utf-8", "replace").strip()


class RetryPolicy:
    """When to try a request again. `transport`: 'all', 'connect' (only when the request
    cannot have reached the server) or 'none'."""

    def __init__(self, attempts=5, statuses=RETRY_STATUSES, transport="all",
                 base=0.5, cap=8.0, retry_after=None):
        self.attempts, self.statuses, self.transport = attempts, statuses, transport
        self.base, self.cap = base, cap
        self.retry_after = retry_after  # optional fn(response) -> seconds or None

    def should_retry(self, response):
        """Is this answer worth another try? A subclass may read the body (Storage does)."""
        return response.status in self.statuses

    def backoff(self, attempt):
        import random
        delay = min(self.cap, self.base * (2 ** attempt))
        return delay * (0.5 + random.random() / 2)


NO_RETRY = RetryPolicy(attempts=1)


def retry_after_seconds(response):
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), else None. A
    negative or endless number is no advice: the caller's own backoff applies then."""
    value = response.header("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - clock.time())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return seconds if 0 <= seconds < float("inf") else None


# ----- proxies: $https_proxy, $http_proxy and $no_proxy, as urllib and curl read them -----

class Proxy:
    __slots__ = ("host", "port", "authorization", "url")

    def __init__(self, host, port, authorization, url):
        self.host, self.port, self.authorization, self.url = host, port, authorization, url


def proxy_for(url, env=None):
    """The Proxy a request to `url` goes through, or None. https and wss use $https_proxy,
    http and ws $http_proxy (the lowercase name wins, an empty one means none); loopback
    hosts and hosts in $no_proxy go direct."""
    from urllib.parse import urlsplit
    env = os.environ if env is None else env
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    name, value = _proxy_variable(env, scheme + "_proxy")
    if not value or not parts.hostname or _goes_direct(parts, env):
        return None
    return parse_proxy(name, value)


def _proxy_variable(env, name):
    """(name as set, value) of a proxy variable: the lowercase form first, as urllib does."""
    for spelling in (name, name.upper()):
        if spelling in env:
            return spelling, env[spelling].strip()
    return name.upper(), ""


def _goes_direct(parts, env):
    """Loopback, or matched by $no_proxy: `*`, or comma-separated names that match the
    host, host:port, or any name under them (urllib.request.proxy_bypass_environment)."""
    host = parts.hostname
    if is_loopback(host):
        return True
    _, no_proxy = _proxy_variable(env, "no_proxy")
    if no_proxy == "*":
        return True
    with_port = host if parts.port is None else "%s:%d" % (host, parts.port)
    for entry in no_proxy.split(","):
        entry = entry.strip().lstrip(".").lower()
        if entry and (entry in (host, with_port) or host.endswith("." + entry)
                      or with_port.endswith("." + entry)):
            return True
    return False


def is_loopback(host):
    """localhost or a loopback address (never a proxy's business; serve needs no token
    there). Any other name could resolve to anything."""
    if host == "localhost":
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_proxy(name, value):
    """A Proxy from the value of variable `name` (`http://user:password@host:port`, the
    scheme optional). imagen speaks plain HTTP to the proxy, as urllib does."""
    import base64
    from urllib.parse import unquote, urlsplit
    text = value if "://" in value else "http://" + value
    if bad_port(text):
        raise usage_error("$%s %s" % (name, bad_port(text)))
    parts = urlsplit(text)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise usage_error("$%s: imagen can use only an http:// proxy (got %s)"
                          % (name, redact_url(text)))
    authorization = None
    if parts.username is not None:
        pair = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
        authorization = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return Proxy(parts.hostname, parts.port or 80, authorization, redact_url(text))


# ----- sockets that keep a deadline -----

class _DeadlineSocket:
    """A connected socket whose reads and writes all end by one monotonic `deadline`: each
    call gets what is left of it as its timeout, so a server that drips its answer a byte
    at a time holds a request no longer than a silent one."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline

    def _arm(self):
        left = self.deadline - clock.monotonic()
        if left <= 0:
            import socket
            raise socket.timeout("timed out")
        self.sock.settimeout(left)

    def recv(self, size):
        self._arm()
        return self.sock.recv(size)

    def recv_into(self, buffer):
        self._arm()
        return self.sock.recv_into(buffer)

    def sendall(self, data):
        # not sock.sendall: on a TLS socket each of its sends gets the whole timeout again
        view = memoryview(data).cast("B")
        while len(view):
            self._arm()
            view = view[self.sock.send(view):]

    def makefile(self, mode="rb"):
        return io.BufferedReader(_SocketReader(self))

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()


class _SocketReader(io.RawIOBase):
    def __init__(self, sock):
        super().__init__()
        self.sock = sock

    def readable(self):
        return True

    def readinto(self, buffer):
        return self.sock.recv_into(buffer)


def open_socket(host, port, deadline, tls=False, proxy=None):
    """A _DeadlineSocket connected to host:port by `deadline`: through a CONNECT tunnel of
    `proxy` when one is given, and with TLS on top when `tls`."""
    import socket
    address = (proxy.host, proxy.port) if proxy else (host, port)
    left = deadline - clock.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    sock = _DeadlineSocket(socket.create_connection(address, timeout=left), deadline)
    try:
        sock.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if proxy:
            _open_tunnel(sock, host, port, proxy)
        if tls:
            import ssl
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            sock._arm()            # the handshake, all of it, has what is left
            sock.sock = context.wrap_socket(sock.sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return sock


def _open_tunnel(sock, host, port, proxy):
    """Ask the proxy at the other end of `sock` for a tunnel to host:port (CONNECT)."""
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise OSError("cannot resolve host") from None
    target = ("[%s]:%d" if ":" in name else "%s:%d") % (name, port)
    lines = ["CONNECT %s HTTP/1.1" % target, "Host: " + target]
    if proxy.authorization:
        lines.append("Proxy-Authorization: " + proxy.authorization)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    status, _, rest = read_response_head(sock, 64 * 1024)
    if status != 200:
        raise OSError("the proxy answered CONNECT %s with HTTP %d" % (target, status))
    if rest:
        raise OSError("the proxy sent data into the tunnel before it was used")


def read_response_head(sock, limit):
    """(status, {header: value}, bytes after the head) of an HTTP response on `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed before the response head ended")
        data += chunk
        if len(data) > limit:
            raise OSError("response head larger than %d bytes" % limit)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise OSError("not an HTTP response: %r" % lines[0][:80]) from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def _peer_spoke(sock):
    """Is there anything to read on an idle kept-alive connection? Then the server closed
    it (or broke the protocol): a request sent on it would be lost."""
    import select
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


_CONNECTION_CLASS = []


def _connection_class():
    """http.client.HTTPConnection whose socket comes from open_socket. Made on first use,
    so that `import imagen` does not load http.client."""
    if not _CONNECTION_CLASS:
        import http.client

        class Connection(http.client.HTTPConnection):
            """`forward`: host and port are the proxy's, and requests carry absolute URIs
            (plain http through a proxy); else a tunnel through `proxy`, if any."""

            def __init__(self, host, port, tls, proxy, forward):
                self.default_port = 443 if tls else 80      # the Host header leaves it out
                super().__init__(host, port)
                self.tls, self.proxy, self.forward = tls, proxy, forward
                self.deadline = None

            def connect(self):
                self.sock = open_socket(self.host, self.port, self.deadline, self.tls,
                                        None if self.forward else self.proxy)

        _CONNECTION_CLASS.append(Connection)
    return _CONNECTION_CLASS[0]


class HttpClient:
    """Keep-alive connections, one per (scheme, host, port), reused across requests.
    Proxies come from `env` (default: the process environment)."""

    # reached through a proxy by a CONNECT tunnel; plain http goes to it as absolute URIs
    TUNNELLED = frozenset(("https",))

    def __init__(self, timeout=30.0, max_body=256 * 1024 * 1024, env=None):
        self.timeout = timeout
        self.max_body = max_body
        self.env = env
        self._connections = {}

    def close(self):
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def request(self, method, url, body=None, headers=None, deadline=None,
                retry=None, timeout=None, context=None):
        """Send a request, retrying as `retry` allows; returns HttpResponse for any status.
        The monotonic `deadline` bounds the whole call, retries included; each attempt
        (connect, send, status line, headers, body) ends within `timeout` seconds, by
        default the client's, however slowly the server answers."""
        retry = retry or RetryPolicy()
        context = context or redact_url(url)
        attempt, failed = 0, None
        while True:
            if failed and deadline is not None and clock.monotonic() >= deadline:
                # a retry the deadline overtook while it slept (a loaded machine sleeps
                # long): what failed is the attempt before, not "timed out"
                raise ImagenError("%s: %s" % (context, failed))
            try:
                response = self._once(method, url, body, headers or {}, deadline, timeout)
            except _TransportError as exc:
                delay = retry.backoff(attempt)
                # a retry cut short by the deadline times out: keep what failed first
                failed = exc.reason if not failed or exc.reason != "timed out" else failed
                if not self._may_retry_transport(retry, exc, attempt) or (
                        deadline is not None and clock.monotonic() + delay >= deadline):
                    # say what failed: a refused connection is not "timed out"
                    raise ImagenError("%s: %s" % (context, failed)) from None
            else:
                if not retry.should_retry(response) or attempt + 1 >= retry.attempts:
                    return response
                delay = (retry.retry_after and retry.retry_after(response))
                if delay is None:
                    delay = retry_after_seconds(response)
                if delay is None:
                    delay = retry.backoff(attempt)
                limit = self.timeout if deadline is None else deadline - clock.monotonic()
                if delay >= limit:
                    return response
            attempt += 1
            clock.sleep(delay)

    @staticmethod
    def _may_retry_transport(retry, exc, attempt):
        if attempt + 1 >= retry.attempts or retry.transport == "none":
            return False
        return retry.transport != "connect" or exc.before_send

    def _once(self, method, url, body, headers, deadline, timeout):
        import http.client
        import socket
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImagenError("unsupported URL %s" % redact_url(url), EXIT_USAGE)
        if bad_port(url):
            raise ImagenError("URL %s" % bad_port(url), EXIT_USAGE)
        # one bound for the whole exchange, not for each read: a server may drip
        ends = clock.monotonic() + (timeout or self.timeout)
        if deadline is not None:
            ends = min(ends, deadline)
        if ends <= clock.monotonic():
            raise ImagenError("%s: timed out" % redact_url(url))
        key = (parts.scheme, parts.hostname, parts.port)
        conn = self._connections.pop(key, None)
        reused = conn is not None and conn.sock is not None and not _peer_spoke(conn.sock)
        if not reused:
            if conn is not None:
                conn.close()
            conn = self._connect(parts, url)
        self._connections[key] = conn
        conn.deadline = ends
        if conn.sock is not None:
            conn.sock.deadline = ends
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        if conn.forward:
            path = "%s://%s%s" % (parts.scheme, parts.netloc.rpartition("@")[2], path)
            if conn.proxy.authorization:
                headers = dict(headers, **{"Proxy-Authorization": conn.proxy.authorization})
        sent = False
        try:
            try:
                conn.request(method, path, body=body, headers=headers)
            except (ValueError, UnicodeError) as exc:
                if isinstance(exc, OSError):
                    raise           # a certificate that does not verify is a ValueError too
                # an unusable header value (a key with a newline, say): never echo it
                self._drop(key)
                raise ImagenError("%s: a request header holds characters HTTP does not "
                                  "allow (check the token and key variables)"
                                  % redact_url(url), EXIT_USAGE) from None
            sent = True
            raw = conn.getresponse()
            data = _read_body(raw, self.max_body)
        except (OSError, http.client.HTTPException) as exc:
            self._drop(key)
            dropped = isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError,
                                       ConnectionResetError))
            if reused and dropped and method.upper() in IDEMPOTENT_METHODS:
                # the server closed the kept-alive connection as the request went out;
                # anything else may have reached it, and run: only the caller knows if a
                # second one is safe (its RetryPolicy)
                return self._once(method, url, body, headers, deadline, timeout)
            refused = isinstance(exc, (ConnectionRefusedError, socket.gaierror))
            reason = _describe_oserror(exc)
            if conn.proxy is not None:
                reason += " (through the proxy %s)" % conn.proxy.url
            raise _TransportError(reason, before_send=refused or not sent)
        if len(data) > self.max_body:
            self._drop(key)
            raise ImagenError("%s: response larger than %d bytes" % (redact_url(url), self.max_body))
        if raw.will_close:
            self._drop(key)
        headers_out = {k.lower(): v for k, v in raw.getheaders()}
        return HttpResponse(raw.status, headers_out, data, url)

    def _connect(self, parts, url):
        tls = parts.scheme == "https"
        proxy = proxy_for(url, self.env)
        forward = proxy is not None and parts.scheme not in self.TUNNELLED
        if forward:
            return _connection_class()(proxy.host, proxy.port, False, proxy, True)
        port = parts.port or (443 if tls else 80)   # never None: "::1" would lose its ":1"
        return _connection_class()(parts.hostname, port, tls, proxy, False)

    def _drop(self, key):
        conn = self._connections.pop(key, None)
        if conn is not None:
            conn.close()


def _read_body(raw, limit):
    """At most limit + 1 bytes of a response. Never raw.read(limit + 1) in one call:
    Python 3.8 and 3.9 allocate a bytearray of that size for it (256 MiB per response)."""
    if raw.length is not None and raw.length <= limit:
        return raw.read()
    parts, size = [], 0
    while size <= limit:
        chunk = raw.read(min(1 << 20, limit + 1 - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


class _TransportError(Exception):
    def __init__(self, reason, before_send):
        super().__init__(reason)
        self.reason, self.before_send = reason, before_send


def _describe_oserror(exc):
    import socket
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout) or "timed out" in str(exc):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve host"
    return str(exc) or type(exc).__name__


def multipart_body(fields):
    """(Content-Type, body) of a multipart/form-data request (RFC 7578). `fields` is
    [(name, value)]: a str, or (filename, content type, bytes) for a file. The file's
    bytes are joined once, never re-read or re-encoded."""
    boundary = "imagen-" + os.urandom(12).hex()
    parts = []
    for name, value in fields:
        if isinstance(value, tuple):
            filename, content_type, data = value
            quoted = filename.replace("\\", "_").replace('"', "_").replace("\r", "_") \
                .replace("\n", "_")
            head = ('Content-Disposition: form-data; name="%s"; filename="%s"\r\n'
                    "Content-Type: %s\r\n" % (name, quoted, content_type))
        else:
            head, data = 'Content-Disposition: form-data; name="%s"\r\n' % name, \
                value.encode("utf-8")
        parts += [("--%s\r\n%s\r\n" % (boundary, head)).encode("utf-8"), data, b"\r\n"]
    parts.append(("--%s--\r\n" % boundary).encode("ascii"))
    return "multipart/form-data; boundary=" + boundary, b"".join(parts)


# ===== WebSocket client =====
# A small RFC 6455 client on a plain socket, for servers that report progress over one
# (ComfyUI): the handshake with its Sec-WebSocket-Accept check, masked client frames,
# text, binary, ping/pong and close, and messages fragmented over several frames.
# recv() takes a timeout and never loses a half-read frame when it expires.

WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketError(ImagenError):
    """The socket could not be opened, broke, or the peer broke the protocol."""


class WebSocketClosed(WebSocketError):
    """The peer closed the connection (with a close frame or without one)."""

    def __init__(self, message, status=1006):
        super().__init__(message)
        self.status = status


class WebSocket:
    MAX_MESSAGE = 64 * 1024 * 1024
    MAX_HEAD = 64 * 1024

    def __init__(self, sock, buffered=b""):
        self.sock = sock
        self._buffer = bytearray(buffered)
        self._message = None        # (opcode, [payloads]) of a fragmented message so far
        self._size = 0
        self.closed = False

    @classmethod
    def connect(cls, url, timeout=10.0, env=None):
        """Open ws:// or wss:// URL, all of it within `timeout` seconds, through the proxy
        the environment names (see proxy_for); raises WebSocketError naming the URL when
        it cannot."""
        import base64
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise WebSocketError("unsupported WebSocket URL %s" % redact_url(url))
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        proxy = proxy_for(url, env)
        via = " (through the proxy %s)" % proxy.url if proxy else ""

        def failed(exc):
            return WebSocketError("%s: %s%s" % (redact_url(url), _describe_oserror(exc), via))
        try:
            sock = open_socket(parts.hostname, port, clock.monotonic() + timeout, secure, proxy)
        except OSError as exc:
            raise failed(exc) from None
        try:
            key = base64.b64encode(os.urandom(16))
            host = parts.hostname if ":" not in parts.hostname else "[%s]" % parts.hostname
            if parts.port:
                host += ":%d" % parts.port
            lines = ["GET %s HTTP/1.1" % ((parts.path or "/") + ("?" + parts.query if parts.query else "")),
                     "Host: " + host, "Upgrade: websocket", "Connection: Upgrade",
                     "Sec-WebSocket-Key: " + key.decode("ascii"), "Sec-WebSocket-Version: 13"]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            status, response_headers, rest = read_response_head(sock, cls.MAX_HEAD)
            _check_upgrade(status, response_headers, key)
        except OSError as exc:
            sock.close()
            raise failed(exc) from None
        except WebSocketError as exc:
            sock.close()
            raise WebSocketError("%s: %s" % (redact_url(url), exc.message)) from None
        return cls(sock.sock, rest)

    def send(self, payload, opcode=WS_TEXT):
        """Send one message (str as text, bytes as binary unless opcode says otherwise)."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        elif opcode == WS_TEXT:
            opcode = WS_BINARY
        self._send_frame(opcode, payload)

    def ping(self, payload=b""):
        self._send_frame(WS_PING, payload)

    def recv(self, timeout=None):
        """The next whole message as (WS_TEXT, str) or (WS_BINARY, bytes), or None when
        nothing complete arrived within `timeout` seconds. Pings are answered on the way;
        a close frame is answered and raises WebSocketClosed."""
        deadline = None if timeout is None else clock.monotonic() + timeout
        while True:
            frame = self._next_frame(deadline)
            if frame is None:
                return None
            message = self._on_frame(*frame)
            if message is not None:
                return message

    def close(self, status=1000):
        """Say goodbye (best effort) and close the socket."""
        import struct
        if self.closed:
            return
        self.closed = True
        try:
            self._send_frame(WS_CLOSE, struct.pack(">H", status))
        except OSError:
            pass
        self.sock.close()

    # ----- frames -----

    def _send_frame(self, opcode, payload):
        import struct
        if self.closed and opcode != WS_CLOSE:
            raise WebSocketClosed("the WebSocket is closed")
        length = len(payload)
        if length < 126:
            header = struct.pack(">BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)      # every client frame is masked with a fresh key
        try:
            self.sock.sendall(header + mask + ws_mask(payload, mask))
        except OSError as exc:
            raise WebSocketError("send failed: %s" % _describe_oserror(exc)) from None

    def _on_frame(self, fin, opcode, payload):
        """A whole message when this frame ends one, else None."""
        import struct
        if opcode >= 0x8:
            if not fin or len(payload) > 125:
                raise WebSocketError("protocol error: fragmented or oversized control frame")
            if opcode == WS_PING:
                self._send_frame(WS_PONG, payload)
            elif opcode == WS_CLOSE:
                status = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                reason = payload[2:].decode("utf-8", "replace")
                self.close(status if status not in (1005, 1006) else 1000)
                raise WebSocketClosed("closed by the server (%d%s)" % (
                    status, ": " + reason if reason else ""), status)
            elif opcode != WS_PONG:
                raise WebSocketError("protocol error: unknown control opcode %d" % opcode)
            return None
        if opcode == WS_CONTINUATION:
            if self._message is None:
                raise WebSocketError("protocol error: continuation frame without a message")
            self._message[1].append(payload)
        elif opcode in (WS_TEXT, WS_BINARY):
            if self._message is not None:
                raise WebSocketError("protocol error: new message inside a fragmented one")
            self._message, self._size = (opcode, [payload]), 0
        else:
            raise WebSocketError("protocol error: unknown opcode %d" % opcode)
        self._size += len(payload)
        if self._size > self.MAX_MESSAGE:
            raise WebSocketError("message larger than %d bytes" % self.MAX_MESSAGE)
        if not fin:
            return None
        kind, parts = self._message
        self._message = None
        data = b"".join(parts)
        if kind == WS_TEXT:
            try:
                return WS_TEXT, data.decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketError("protocol error: text message is not UTF-8") from None
        return WS_BINARY, data

    def _next_frame(self, deadline):
        while True:
            frame = self._parse_frame()
            if frame is not None:
                return frame
            if not self._read_more(deadline):
                return None

    def _parse_frame(self):
        """(fin, opcode, payload) taken off the buffer, or None while it is incomplete."""
        import struct
        buf = self._buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        if first & 0x70:
            raise WebSocketError("protocol error: reserved bits set (no extension was agreed)")
        if second & 0x80:
            raise WebSocketError("protocol error: the server masked a frame")
        length, start = second & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,), start = struct.unpack_from(">H", buf, 2), 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,), start = struct.unpack_from(">Q", buf, 2), 10
        if length > self.MAX_MESSAGE:
            raise WebSocketError("frame larger than %d bytes" % self.MAX_MESSAGE)
        if len(buf) < start + length:
            return None
        payload = bytes(buf[start:start + length])
        del buf[:start + length]
        return bool(first & 0x80), first & 0x0F, payload

    def _read_more(self, deadline):
        import socket
        if self.closed:
            raise WebSocketClosed("the WebSocket is closed")
        if deadline is None:
            self.sock.settimeout(None)
        else:
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except socket.timeout:
            return False
        except OSError as exc:
            self.closed = True
            self.sock.close()
            raise WebSocketClosed("connection lost: %s" % _describe_oserror(exc)) from None
        if not chunk:
            self.closed = True
            self.sock.close()
            raise WebSocketClosed("connection closed without a close frame")
        self._buffer += chunk
        return True


def ws_mask(payload, mask):
    """XOR payload with the 4-byte mask, as one big-integer operation (C speed)."""
    length = len(payload)
    if not length:
        return b""
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


def ws_accept(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (bytes, as sent)."""
    import base64
    import hashlib      # once per ComfyUI socket: its import is no cost worth a trick
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode("ascii")


def _check_upgrade(status, headers, key):
    if status != 101:
        raise WebSocketError("HTTP %d instead of a WebSocket upgrade" % status)
    if headers.get("upgrade", "").lower() != "websocket" \
            or "upgrade" not in headers.get("connection", "").lower():
        raise WebSocketError("the server did not agree to upgrade to a WebSocket")
    if headers.get("sec-websocket-accept") != ws_accept(key):
        raise WebSocketError("wrong Sec-WebSocket-Accept in the handshake")
    if headers.get("sec-websocket-extensions"):
        raise WebSocketError("the server enabled an extension that was not asked for")


# ===== PNG, JPEG and WebP =====
# Hand-written with zlib + struct: write RGB PNGs, check every chunk, read dimensions,
# and carry the generation record in text chunks.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind, data):
    import struct
    import zlib
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width, height, scanlines, level=6, palette=None):
    """An 8-bit PNG from `height` scanlines, each a filter-type byte and then the pixels:
    width*3 bytes of RGB, or with `palette` (up to 256 RGB triples) width palette indexes."""
    import struct
    import zlib
    packer = zlib.compressobj(level)
    parts = [packer.compress(line) for line in scanlines]
    parts.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3 if palette else 2, 0, 0, 0)
    chunks = [PNG_SIGNATURE, png_chunk(b"IHDR", ihdr)]
    if palette:
        chunks.append(png_chunk(b"PLTE", bytes(palette)))
    chunks += [png_chunk(b"IDAT", b"".join(parts)), png_chunk(b"IEND", b"")]
    return b"".join(chunks)


def png_chunks(data):
    """[(kind, payload, start offset)] of a PNG, checking the signature and every CRC."""
    import struct
    import zlib
    if not data.startswith(PNG_SIGNATURE):
        raise ImagenError("not a PNG (bad signature)")
    chunks, pos, end = [], len(PNG_SIGNATURE), len(data)
    while pos < end:
        if pos + 12 > end:
            raise ImagenError("PNG truncated at byte %d" % pos)
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        stop = pos + 12 + length
        if stop > end:
            raise ImagenError("PNG chunk %r truncated" % kind.decode("latin-1"))
        payload = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[stop - 4:stop])
        if zlib.crc32(kind + payload) & 0xFFFFFFFF != crc:
            raise ImagenError("PNG chunk %r has a bad CRC" % kind.decode("latin-1"))
        chunks.append((kind, payload, pos))
        pos = stop
        if kind == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise ImagenError("PNG does not start with a valid IHDR")
    if chunks[-1][0] != b"IEND":
        raise ImagenError("PNG has no IEND")
    if not any(kind == b"IDAT" for kind, _, _ in chunks):
        raise ImagenError("PNG has no IDAT")
    return chunks


def _png_size(chunks):
    import struct
    width, height, depth, color = struct.unpack(">IIBB", chunks[0][1][:10])
    if not width or not height or depth not in (1, 2, 4, 8, 16) or color not in (0, 2, 3, 4, 6):
        raise ImagenError("PNG has an invalid IHDR")
    return width, height


def _jpeg_size(data):
    import struct
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImagenError("JPEG is corrupt at byte %d" % pos)
        marker = data[pos + 1]
        if marker == 0xFF:            # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB,
                      0xCD, 0xCE, 0xCF) and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            if width and height:
                return width, height
            break
        if marker == 0xDA:            # start of scan before any frame header
            break
        pos += 2 + length
    raise ImagenError("JPEG has no frame header")


def _webp_size(data):
    import struct
    kind = data[12:16]
    body = data[20:]
    if kind == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
        (bits,) = struct.unpack("<I", body[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(body) >= 10:
        return (int.from_bytes(body[4:7], "little") + 1,
                int.from_bytes(body[7:10], "little") + 1)
    raise ImagenError("WebP has an unknown or truncated header")


def image_info(data):
    """(mime_type, width, height) of PNG, JPEG or WebP bytes; anything else is an error."""
    if data.startswith(PNG_SIGNATURE):
        return ("image/png",) + _png_size(png_chunks(data))
    if data.startswith(b"\xff\xd8\xff"):
        return ("image/jpeg",) + _jpeg_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("image/webp",) + _webp_size(data)
    raise ImagenError("not an image (%d bytes starting %r)" % (len(data), bytes(data[:8])))


MIME_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def png_text_chunk(keyword, text):
    """tEXt when the text is Latin-1, else iTXt (UTF-8), as image tools expect."""
    try:
        return png_chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return png_itxt_chunk(keyword, text)


def png_itxt_chunk(keyword, text):
    return png_chunk(b"iTXt", keyword.encode("latin-1") + b"\x00\x00\x00\x00\x00"
                     + text.encode("utf-8"))


def png_insert_chunks(data, extra):
    """The PNG with `extra` chunk bytes placed before its first IDAT."""
    chunks = png_chunks(data)
    first_idat = next(start for kind, _, start in chunks if kind == b"IDAT")
    return data[:first_idat] + extra + data[first_idat:]


def png_texts(data, keywords=None):
    """{keyword: text} from the tEXt, iTXt and zTXt chunks of a PNG, of the `keywords` only
    when given; the first chunk of a keyword counts, a malformed one is skipped. Compressed
    text is inflated within one budget of MAX_PNG_TEXT bytes for the whole file, so a file
    of many chunks that each inflate large costs no more than one."""
    import zlib
    texts, budget = {}, [MAX_PNG_TEXT]
    for kind, payload, _ in png_chunks(data):
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        key, _, rest = payload.partition(b"\x00")
        key = key.decode("latin-1")
        if key in texts or (keywords is not None and key not in keywords):
            continue
        try:
            if kind == b"tEXt":
                text = rest.decode("latin-1")
            elif kind == b"zTXt":
                text = _inflate(rest[1:], budget).decode("latin-1")
            else:
                compressed, rest = rest[0], rest[2:]
                _lang, _, rest = rest.partition(b"\x00")
                _translated, _, raw = rest.partition(b"\x00")
                text = (_inflate(raw, budget) if compressed else raw).decode("utf-8", "replace")
        except (IndexError, zlib.error):
            continue
        texts[key] = text
    return texts


MAX_PNG_TEXT = 16 * 1024 * 1024


def _inflate(data, budget):
    """The inflated bytes, taken from budget[0], the bytes the file may still inflate to."""
    import zlib
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, budget[0]) if budget[0] > 0 else b""
    budget[0] -= len(text)
    if inflater.unconsumed_tail or (budget[0] <= 0 and not inflater.eof):
        raise zlib.error("text chunk inflates past what is left of %d bytes" % MAX_PNG_TEXT)
    return text



# ----- pixels: decode, downscale by area averaging, encode -----
# Pure Python made fast by doing per-row work at C speed: a row of samples becomes one big
# integer, and bytewise sums, shifts and a multiply-by-reciprocal act on every sample at
# once ("SIMD within a register"); strided slices of bytes gather columns and channels.
# Only the Average and Paeth filters need a per-byte loop: a 1024x1024 RGB image stored
# with Paeth on every row (as some encoders do) takes about half a second to decode.

PNG_MAX_PIXELS = 1 << 26            # what decode_png takes (8192x8192): memory stays bounded
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}    # colour type -> samples per pixel in the file
PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}      # channels -> colour type, when encoding
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2))                          # interlace passes: x0, y0, dx, dy


class PngImage:
    """Decoded pixels: `rows` holds `height` bytes objects of width*channels 8-bit samples;
    channels 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA (alpha straight, not premultiplied).
    With `tables` (a palette image decoded with keep_palette), the rows hold width palette
    indexes instead, and row.translate(tables[c]) is channel c of each pixel."""

    __slots__ = ("width", "height", "channels", "rows", "tables")

    def __init__(self, width, height, channels, rows, tables=None):
        self.width, self.height, self.channels, self.rows = width, height, channels, rows
        self.tables = tables


def decode_png(data, keep_palette=False):
    """A PngImage from PNG bytes: every colour type, bit depth, filter and interlacing.
    16-bit samples keep their high byte; a palette becomes RGB, or RGBA with tRNS (with
    keep_palette, a palette image that is not interlaced keeps its indexes and gives the
    tables that make them RGB(A)); the tRNS colour key of gray and RGB images is not
    applied."""
    chunks = png_chunks(data)
    width, height = _png_size(chunks)
    depth, color, compression, filtering, interlace = chunks[0][1][8:13]
    if depth not in PNG_DEPTHS.get(color, ()) or compression or filtering or interlace > 1:
        raise ImagenError("PNG has an invalid IHDR (bit depth %d, colour type %d)" % (depth, color))
    if width * height > PNG_MAX_PIXELS:
        raise ImagenError("PNG is %dx%d; at most %d pixels are decoded"
                          % (width, height, PNG_MAX_PIXELS))
    palette = b"".join(payload for kind, payload, _ in chunks if kind == b"PLTE")
    alpha = b"".join(payload for kind, payload, _ in chunks if kind == b"tRNS")
    if color == 3 and not palette:
        raise ImagenError("PNG has a palette colour type but no PLTE")
    samples = PNG_SAMPLES[color]
    passes = [(0, 0, 1, 1, width, height)] if not interlace else [
        (x0, y0, dx, dy, (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy)
        for x0, y0, dx, dy in ADAM7]
    passes = [p for p in passes if p[4] and p[5]]
    strides = [(w * samples * depth + 7) // 8 for _, _, _, _, w, _ in passes]
    raw = _inflate_idat(chunks, sum((stride + 1) * p[5] for stride, p in zip(strides, passes)))
    bpp = max(1, samples * depth // 8)
    channels = (4 if alpha else 3) if color == 3 else samples
    rows = [None] * height if interlace else None
    pos = 0
    for (x0, y0, dx, dy, w, h), stride in zip(passes, strides):
        filtered, pos = _png_unfilter(raw, pos, stride, h, bpp), pos + (stride + 1) * h
        lines = _png_samples(filtered, w * samples, depth, color == 3)
        if color == 3:
            tables = _palette_tables(palette, alpha)
            if keep_palette and not interlace:
                return PngImage(width, height, channels, lines, tables)
            lines = _png_expand_palette(lines, tables)
        if not interlace:
            return PngImage(width, height, channels, lines)
        _png_scatter(rows, lines, x0, y0, dx, dy, width * channels, channels)
    return PngImage(width, height, channels, [bytes(row) for row in rows])


def _inflate_idat(chunks, size):
    """The image data, inflated to exactly the `size` bytes the header implies: more is
    ignored (no decompression bomb), less is an error."""
    import zlib
    inflater = zlib.decompressobj()
    parts, have = [], 0
    try:
        for kind, payload, _ in chunks:
            if kind == b"IDAT" and have < size:
                part = inflater.decompress(payload, size - have)
                parts.append(part)
                have += len(part)
    except zlib.error as exc:
        raise ImagenError("PNG image data is corrupt: %s" % exc) from None
    if have < size:
        raise ImagenError("PNG image data is truncated (%d of %d bytes)" % (have, size))
    return b"".join(parts)


def _png_unfilter(raw, pos, stride, count, bpp):
    """`count` rows of `stride` bytes from filtered scanlines starting at raw[pos]. A row
    the Up filter says is equal to the one above is that same object (cheap to compare
    and to cache on later)."""
    rows, zero = [], bytes(stride)
    previous = zero
    for _ in range(count):
        kind = raw[pos]
        if kind == 2 and raw.startswith(zero, pos + 1):     # compared in place, not copied
            rows.append(previous)
            pos += stride + 1
            continue
        line = raw[pos + 1:pos + 1 + stride]
        pos += stride + 1
        if kind == 0:
            row = line
        elif kind == 2:
            row = _add_bytes(line, previous)
        elif kind == 1:
            row = _unfilter_sub(line, bpp)
        elif kind == 3:
            row = _unfilter_average(line, previous, bpp)
        elif kind == 4:
            row = _unfilter_paeth(line, previous, bpp)
        else:
            raise ImagenError("PNG has an unknown filter type %d" % kind)
        rows.append(row)
        previous = row
    return rows


_SWAR_MASKS = {}


def _swar_masks(size):
    """(0x7f.., 0x80.., 0xff..) over `size` bytes, for bytewise arithmetic on big ints."""
    masks = _SWAR_MASKS.get(size)
    if masks is None:
        masks = _SWAR_MASKS[size] = tuple(int.from_bytes(byte * size, "little")
                                          for byte in (b"\x7f", b"\x80", b"\xff"))
    return masks


def _add_bytes(a, b):
    """Bytewise (a + b) mod 256: the low 7 bits add without carrying into the next byte,
    the top bit is their sum's top bit xor both top bits."""
    low, high, _ = _swar_masks(len(a))
    x, y = int.from_bytes(a, "little"), int.from_bytes(b, "little")
    return (((x & low) + (y & low)) ^ ((x ^ y) & high)).to_bytes(len(a), "little")


def _unfilter_sub(line, bpp):
    """Each byte plus the decoded one bpp to its left: a running sum, done as a
    log-step prefix sum (shift by bpp, 2 bpp, 4 bpp, ... and add bytewise)."""
    size = len(line)
    low, high, full = _swar_masks(size)
    x, shift = int.from_bytes(line, "little"), bpp
    while shift < size:
        y = (x << (8 * shift)) & full
        x = ((x & low) + (y & low)) ^ ((x ^ y) & high)
        shift *= 2
    return x.to_bytes(size, "little")


def _unfilter_average(line, previous, bpp):
    """Each byte plus the mean of its decoded left and up neighbours, one channel (every
    bpp-th byte) at a time so the running value stays in a local."""
    out = bytearray(len(line))
    for c in range(bpp):
        left, decoded = 0, []
        for x, up in zip(line[c::bpp], previous[c::bpp]):
            left = (x + ((left + up) >> 1)) & 255
            decoded.append(left)
        out[c::bpp] = bytes(decoded)
    return bytes(out)


def _unfilter_paeth(line, previous, bpp):
    """Each byte plus whichever of left, up and up-left is closest to left + up - up-left
    (ties in that order), one channel at a time."""
    out = bytearray(len(line))
    for c in range(bpp):
        left = up_left = 0
        decoded = []
        for x, up in zip(line[c::bpp], previous[c::bpp]):
            p, q = up - up_left, left - up_left      # distances of left and of up
            r = p + q                                # distance of up-left
            p, q, r = -p if p < 0 else p, -q if q < 0 else q, -r if r < 0 else r
            left = (x + (left if p <= q and p <= r else up if q <= r else up_left)) & 255
            decoded.append(left)
            up_left = up
        out[c::bpp] = bytes(decoded)
    return bytes(out)


def _png_samples(rows, count, depth, indexed):
    """Rows of `count` 8-bit samples: 16-bit ones keep their high byte, 1/2/4-bit ones are
    unpacked (gray scaled up to 0..255, palette indexes kept)."""
    if depth == 8:
        return rows
    if depth == 16:
        return [row[0::2] for row in rows]
    per_byte, top = 8 // depth, (1 << depth) - 1
    scale = 1 if indexed else 255 // top
    table = [bytes(((byte >> (8 - depth * (k + 1))) & top) * scale for k in range(per_byte))
             for byte in range(256)]
    return [b"".join(map(table.__getitem__, row))[:count] for row in rows]


def _palette_tables(palette, alpha):
    """The bytes.translate table of each channel of palette indexes: R, G, B, and A with
    tRNS. An index past the palette reads as black, as browsers show it."""
    tables = [bytes(palette[c::3][:256]).ljust(256, b"\x00") for c in range(3)]
    if alpha:
        tables.append(bytes(alpha[:256]).ljust(256, b"\xff"))
    return tables


def _png_expand_palette(rows, tables):
    """Palette indexes as RGB (RGBA with tRNS): one bytes.translate per channel."""
    channels, cache, out = len(tables), {}, []
    previous = rgb = None
    for row in rows:
        if row is previous:             # an Up-filtered repeat: no lookup either
            out.append(rgb)
            continue
        previous, rgb = row, cache.get(row)
        if rgb is None:
            buffer = bytearray(len(row) * channels)
            for c, table in enumerate(tables):
                buffer[c::channels] = row.translate(table)
            rgb = cache[row] = bytes(buffer)
        out.append(rgb)
    return out


def _png_scatter(rows, lines, x0, y0, dx, dy, row_size, channels):
    """Put the pixels of one interlace pass in their places."""
    for k, line in enumerate(lines):
        y = y0 + k * dy
        if rows[y] is None:
            rows[y] = bytearray(row_size)
        for c in range(channels):
            rows[y][x0 * channels + c::dx * channels] = line[c::channels]


def downscale_png(data, max_side, level=1):
    """PNG bytes whose longest side is at most `max_side`: `data` itself when it already
    fits, else the image shrunk by area averaging (every source pixel counts, weighted by
    how much of it each output pixel covers). Deflate `level` 1 by default: a preview is
    made for one look, and speed matters more than the last bytes."""
    width, height = _png_size(png_chunks(data))
    longest = max(width, height)
    if longest <= max_side:
        return data
    image = decode_png(data, keep_palette=True)
    small = resize_area(image, max(1, round(width * max_side / longest)),
                        max(1, round(height * max_side / longest)))
    return encode_png_image(small, level)


def resize_area(image, width, height):
    """The PngImage shrunk to width x height (neither above the original's) by area
    averaging. When the width shrinks by a whole factor, both directions are summed
    before one rounded division (exact); otherwise rows, then the columns of the
    transposed image, are averaged in turn (each rounds once, so within 1 of exact).
    The rows of palette indexes of a PngImage with tables are looked up as they are
    summed, in the first case; else they are made RGB(A) first."""
    channels, rows, tables = image.channels, image.rows, image.tables
    if image.width % width == 0 and (image.width > width or not tables):
        rows = _area_rows(rows, height, image.width // width, channels, tables)
    else:
        if tables:
            rows = _png_expand_palette(rows, tables)
        rows = _area_rows(rows, height)
        rows = _transpose(_area_rows(_transpose(rows, image.width, channels), width),
                          height, channels)
    return PngImage(width, height, channels, rows)


def _area_rows(rows, count, factor=1, channels=1, tables=None):
    """`count` rows (at most len(rows)), each the average of the rows it covers, and of
    every `factor` pixels (of `channels` samples) along it. In units where a source row
    is `unit_in` long and an output row `unit_out`, every weight is a whole number and
    they add up to `unit_out`. Equal rows come in runs (_run_ends), and each distinct
    span of them is averaged once: bytewise, without wider lanes, at a factor of 2
    (_halve_rows) or for a run alone at a factor of 4 (_quarter_row); else from sums in
    lanes wide enough for the division, weighed by how much of the span each run
    covers, and divided once. Those sums go one of two ways: with fewer runs than rows
    out (bands of equal rows), each distinct row is summed along once (_group_sums) and
    an output row adds the sums; with rows mostly distinct (a photo), an output row adds
    its rows down first and sums along that once. With `tables` (factor 2 or more), the
    rows are palette indexes (see PngImage)."""
    import math
    total = len(rows)
    if count == total and factor == 1:
        return list(rows)
    common = math.gcd(total, count)
    unit_in, unit_out = count // common, total // common
    divisor = unit_out * factor
    bits, shift, multiplier = _division_plan(divisor)
    lane = (bits + 7) // 8
    run_ends = _run_ends(rows)
    along = len(run_ends) < count
    halving = factor == 2 and unit_out == 2 * unit_in == 2      # each span a 2x2 block
    if tables and not (along or halving):       # summed down as they are: made RGB(A)
        rows, tables = _png_expand_palette(rows, tables), None
    samples = len(rows[0]) * (channels if tables else 1)        # in a source row
    lanes = samples // factor if along else samples
    ones = int.from_bytes((b"\x01" + bytes(lane - 1)) * lanes, "little")
    rounding, mask = divisor // 2 * ones, 255 * ones
    sums, halves, done, out = {}, {}, {}, []  # done: the output row for each span seen
    run, j = 0, 0
    while j < count:
        start, end = j * unit_out, (j + 1) * unit_out
        first, last = start // unit_in, (end - 1) // unit_in
        while run_ends[run] <= first:
            run += 1
        # the output rows whose spans lie within one run of a row are all the same
        times = max(1, run_ends[run] * unit_in // unit_out - j)
        j += times
        span = rows[first:last + 1]
        same = times > 1 or span.count(span[0]) == len(span)
        # the weights follow from where the span starts within its first row
        key = span[0] if same else (start - first * unit_in,) + tuple(span)
        small = done.get(key)
        if small is not None:
            out.extend([small] * times)
            continue
        if same and factor == 1:
            small = span[0]             # the average of equal rows is that row
        elif factor == 2 and (same or halving):
            small = _halve_rows(span[0], span[-1], halves, channels, tables)
        elif factor == 4 and same and _run_alone(run_ends, run, unit_in, unit_out):
            small = _quarter_row(span[0], channels, tables)
        else:
            acc, r = 0, run
            while True:         # each run of equal rows the span covers, weighed once
                low = max(start, (run_ends[r - 1] if r else 0) * unit_in)
                high = min(end, run_ends[r] * unit_in)
                row = rows[low // unit_in]
                summed = sums.get(row)
                if summed is None:
                    summed = sums[row] = (
                        _group_sums(row, factor, channels, lane, mask, tables) if along
                        else _widen(row, lane))
                acc += summed if high - low == 1 else (high - low) * summed
                if high == end:
                    break
                r += 1
            if not along:       # the rows added down; now along, in place
                down = acc
                for k in range(1, factor):
                    acc += down >> (8 * lane * channels * k)    # the pixel k to the right
            acc += rounding
            if multiplier != 1:
                acc *= multiplier
            wide = (acc >> shift).to_bytes(lanes * lane, "little")[0::lane]
            small = _interleaved(wide, channels) if along else _nth_pixels(wide, factor,
                                                                             channels)
        done[key] = small
        out.extend([small] * times)
    return out


def _run_alone(run_ends, run, unit_in, unit_out):
    """Whether a run of equal rows starts and ends where output rows do: then no output
    row mixes it with another, and it can be averaged alone, without the sums along it
    that such a mix would weigh."""
    start = run_ends[run - 1] if run else 0
    return start * unit_in % unit_out == 0 and run_ends[run] * unit_in % unit_out == 0


def _group_sums(row, factor, channels, lane, mask, tables=None):
    """The sum of each `factor` neighbouring pixels of a row, per channel, as one integer
    of `lane`-byte lanes. The row is laid out channel after channel first (_planar); then
    the samples of each group go side by side into the bytes of its lane, `lane` of them
    at a time (sample k of every group at once, by a strided slice), where masks pick
    them out and add them up."""
    if tables and factor % 2 == 0 and row[0::2] == row[1::2]:
        # each pixel the colour of the one to its right: twice the sums of half the row
        return 2 * _group_sums(row[0::2], factor // 2, channels, lane, mask, tables)
    planar = _planar(row, channels, tables)
    total, size = 0, len(planar) // factor * lane
    for first in range(0, factor, lane):
        side = min(lane, factor - first)        # samples of a group in this pass
        if side == lane == factor:
            x = int.from_bytes(planar, "little")    # they fill the lanes as they are
        else:
            buffer = bytearray(size)
            for k in range(side):
                buffer[k::lane] = planar[first + k::factor]
            x = int.from_bytes(buffer, "little")
        for k in range(side):
            total += (x >> (8 * k)) & mask
    return total


def _widen(row, lane):
    """The samples of a row as one integer, each in its own `lane`-byte field."""
    if lane == 1:
        return int.from_bytes(row, "little")
    buffer = bytearray(len(row) * lane)
    buffer[0::lane] = row
    return int.from_bytes(buffer, "little")


def _planar(row, channels, tables=None):
    """The samples of a row channel after channel: all the reds, then the greens...
    (a row of palette indexes looked up in each channel's table)."""
    if tables:
        return b"".join([row.translate(table) for table in tables])
    if channels == 1:
        return row
    return b"".join([row[c::channels] for c in range(channels)])


def _interleaved(planar, channels):
    """The row of pixels whose samples `planar` holds channel after channel."""
    if channels == 1:
        return planar
    buffer, step = bytearray(len(planar)), len(planar) // channels
    for c in range(channels):
        buffer[c::channels] = planar[c * step:(c + 1) * step]
    return bytes(buffer)


def _nth_pixels(row, n, channels):
    """Every n-th pixel of a row, from the first."""
    if n == 1:
        return row
    buffer = bytearray(len(row) // n)
    for c in range(channels):
        buffer[c::channels] = row[c::n * channels]
    return bytes(buffer)


def _halve_rows(a, b, halves, channels, tables):
    """The 2x2 area average of rows a and b (the same row or two), rounded half up, done
    bytewise on big integers without wider lanes: with h = floor((p + q) / 2) and
    r = (p + q) & 1 for each pair of pixels along a row, the average of the row is h + r,
    and that of two rows floor((hA + hB) / 2) + (((hA ^ hB) & 1) | (rA & rB)). No byte
    ever carries into the next, as each result fits in a byte."""
    ha, ra, size = _pair_halves(a, halves, channels, tables)
    if b is a or b == a:
        both = ha + ra
    else:
        hb, rb, _ = _pair_halves(b, halves, channels, tables)
        both = _average_halves(ha, ra, hb, rb, size)
    wide = both.to_bytes(size, "little")
    return _interleaved(wide, channels) if tables else _nth_pixels(wide, 2, channels)


def _pair_halves(row, halves, channels, tables):
    """_halves of each pixel and the one to its right, and their size in bytes, cached in
    `halves`: of a row of palette indexes, its even and odd pixels gathered apart,
    channel after channel (then the results come out side by side); else in place, each
    pixel against the integer shifted by one (the even pixels' results are the ones
    kept)."""
    pair = halves.get(row)
    if pair is not None:
        return pair
    if tables and row[0::2] == row[1::2]:
        # each pixel the colour of the one to its right: their average is that colour
        pair = (int.from_bytes(_planar(row[0::2], channels, tables), "little"), 0,
                len(row) // 2 * channels)
    elif tables:
        planar = _planar(row, channels, tables)
        size = len(planar) // 2
        pair = _halves(int.from_bytes(planar[0::2], "little"),
                       int.from_bytes(planar[1::2], "little"), size) + (size,)
    else:
        x = int.from_bytes(row, "little")
        pair = _halves(x, x >> (8 * channels), len(row)) + (len(row),)
    halves[row] = pair
    return pair


def _quarter_row(row, channels, tables):
    """The average of each 4 neighbouring pixels of a row, rounded half up, as the 2x2
    average of _halve_rows: pixels 4k and 4k + 1 stand for one of its rows, 4k + 2 and
    4k + 3 for the other (gathered apart as in _pair_halves, or in place)."""
    if tables and row[0::4] == row[1::4] == row[2::4] == row[3::4]:
        return _interleaved(_planar(row[0::4], channels, tables), channels)   # one colour
    if tables:
        planar = _planar(row, channels, tables)
        size = len(planar) // 4
        phases = [int.from_bytes(planar[k::4], "little") for k in range(4)]
        both = _average_halves(*_halves(phases[0], phases[1], size),
                               *_halves(phases[2], phases[3], size), size)
        return _interleaved(both.to_bytes(size, "little"), channels)
    size = len(row)
    x = int.from_bytes(row, "little")
    ha, ra = _halves(x, x >> (8 * channels), size)
    both = _average_halves(ha, ra, ha >> (16 * channels), ra >> (16 * channels), size)
    return _nth_pixels(both.to_bytes(size, "little"), 4, channels)


def _halves(x, y, size):
    """(floor((p + q) / 2), (p + q) & 1) bytewise for the `size` bytes p of x and q of y."""
    low, high, _ = _swar_masks(size)
    return (x & y) + (((x ^ y) >> 1) & low), (x ^ y) & (high >> 7)


def _average_halves(ha, ra, hb, rb, size):
    """floor((hA + hB) / 2) + (((hA ^ hB) & 1) | (rA & rB)) bytewise, for `size` bytes:
    the rounded average of the four bytes two _halves stand for."""
    low, high, _ = _swar_masks(size)
    return (ha & hb) + (((ha ^ hb) >> 1) & low) + (((ha ^ hb) & (high >> 7)) | (ra & rb))


def _run_ends(rows):
    """The index just past each run of equal rows (decode_png gives the rows the Up
    filter repeats as the same object: compared in no time)."""
    ends = [i for i in range(1, len(rows)) if rows[i] is not rows[i - 1]
            and rows[i] != rows[i - 1]]
    ends.append(len(rows))
    return ends


def _division_plan(divisor):
    """How to divide sums of up to 255*divisor by `divisor`, rounded, all at once: (bits a
    lane needs, shift, multiplier). With s = 8 + 2*bits(d) and m = ceil(2^s / d),
    (x * m) >> s == x // d for every x < 256 d (the error m*d - 2^s < d stays below one);
    a lane of s + 9 bits holds x * m, so lanes never carry into each other, and the bits
    shifted down from the lane above land above the low byte kept. A power of two needs
    no multiplier."""
    if divisor & (divisor - 1) == 0:        # a power of two: a plain shift, narrower lanes
        shift = divisor.bit_length() - 1
        return shift + 8, shift, 1
    shift = 8 + 2 * divisor.bit_length()
    return shift + 9, shift, ((1 << shift) + divisor - 1) // divisor


def _transpose(rows, width, channels):
    """`width` rows, one per pixel column of `rows` (top to bottom)."""
    flat, row_size = b"".join(rows), width * channels
    if channels == 1:
        return [flat[x::row_size] for x in range(width)]
    out = []
    for x in range(width):
        column = bytearray(len(rows) * channels)
        for c in range(channels):
            column[c::channels] = flat[x * channels + c::row_size]
        out.append(bytes(column))
    return out


def encode_png_image(image, level=6):
    """PNG bytes of a PngImage. Each row is stored with the Sub filter (computed bytewise
    on one big integer), or as Up zeros when it equals the row above."""
    import struct
    header = struct.pack(">IIBBBBB", image.width, image.height, 8,
                         PNG_COLOR_TYPES[image.channels], 0, 0, 0)
    return b"".join([PNG_SIGNATURE, png_chunk(b"IHDR", header),
                     png_chunk(b"IDAT", _deflate_runs(_scanline_runs(image), level)),
                     png_chunk(b"IEND", b"")])


def _scanline_runs(image):
    """(scanline, times) for the rows of an image: a row equal to the one above is Up
    zeros, and a run of them is one pair."""
    rows, out, filtered = image.rows, [], {}
    zero = b"\x02" + bytes(len(rows[0]))
    for y, row in enumerate(rows):
        if y and (row is rows[y - 1] or row == rows[y - 1]):
            if out[-1][0] is zero:
                out[-1][1] += 1
            else:
                out.append([zero, 1])
            continue
        line = filtered.get(row)
        if line is None:
            line = filtered[row] = b"\x01" + _filter_sub(row, image.channels)
        out.append([line, 1])
    return out


def _deflate_runs(runs, level):
    """A zlib stream of the scanlines. A line that comes back (repeating the row above, or
    a row seen before) can be compressed once: between two full flushes a deflate block
    stands alone (byte-aligned, no reference to what came before), so its bytes can be
    repeated; the checksum covers every copy. Whether that pays is weighed first
    (_blocks_pay); else, and for a line seen once, the lines are compressed in the
    stream as usual."""
    import struct
    import zlib
    seen = {}
    for line, times in runs:
        seen[line] = seen.get(line, 0) + times
    blocks_pay = _blocks_pay(runs, seen)
    packer = zlib.compressobj(level, zlib.DEFLATED, -15)
    parts, check, blocks, sums = [b"\x78\x01"], 1, {}, {}
    pending = True      # anything compressed since the last full flush (or the start)
    for line, times in runs:
        if seen[line] == 1 or not blocks_pay:
            data = line * times if times > 1 else line
            check = zlib.adler32(data, check)
            parts.append(packer.compress(data))
            pending = True
            continue
        if pending:     # what came before ends here (a second flush would add nothing)
            parts.append(packer.flush(zlib.Z_FULL_FLUSH))
            pending = False
        block = blocks.get(line)
        if block is None:
            block = blocks[line] = packer.compress(line) + packer.flush(zlib.Z_FULL_FLUSH)
        if times == 1:
            check = zlib.adler32(line, check)       # in C: cheaper than combining
        else:
            copies = sums.get((line, times))
            if copies is None:
                copies = sums[line, times] = _adler32_repeat(1, zlib.adler32(line), len(line),
                                                             times)
            check = _adler32_combine(check, copies, len(line) * times)
        parts.append(block * times)
    parts += [packer.flush(), struct.pack(">I", check)]
    return b"".join(parts)


# What a full flush costs, in the bytes deflate (level 1) takes as long to compress
DEFLATE_FLUSH_BYTES = 4096


def _blocks_pay(runs, seen):
    """Whether the lines that come back, each compressed once as a block, are estimated
    to cost less than deflating every copy: each such line takes a flush, and so does
    each turn of the stream from a line seen once to one of them."""
    flushes = sum(1 for times in seen.values() if times > 1)
    alone = total = 0           # bytes of the lines seen once, and of all lines
    pending = True
    for line, times in runs:
        total += len(line) * times
        if seen[line] == 1:
            alone += len(line)
            pending = True
        elif pending:
            flushes += 1
            pending = False
    return alone + flushes * DEFLATE_FLUSH_BYTES < total


def _adler32_repeat(check, unit, size, times):
    """adler32 continued from `check` over `times` copies of `size` bytes whose own
    checksum is `unit` (zlib's adler32_combine, by doubling)."""
    while times:
        if times & 1:
            check = _adler32_combine(check, unit, size)
        unit, size, times = _adler32_combine(unit, unit, size), size * 2, times >> 1
    return check


def _adler32_combine(first, second, size):
    """The adler32 of A + B from those of A and of B (`size` bytes long)."""
    a1, b1, a2, b2 = first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16
    return ((b1 + b2 + size * (a1 - 1)) % 65521) << 16 | (a1 + a2 - 1) % 65521


def _filter_sub(row, bpp):
    """Bytewise row[i] - row[i - bpp] mod 256 (SWAR subtraction, Hacker's Delight 2-18)."""
    size = len(row)
    low, high, full = _swar_masks(size)
    x = int.from_bytes(row, "little")
    y = (x << (8 * bpp)) & full
    return (((x | high) - (y & low)) ^ ((x ^ y ^ full) & high)).to_bytes(size, "little")


# ===== Ledger (SQLite) =====
# The embedded default: one SQLite row per generation of every backend, with its cost and
# its cloud state. WAL plus a busy timeout keep concurrent cron runs from losing a row;
# `imagen usage --local`, `imagen sync` and `imagen url` read it.

LEDGER_BUSY_SECONDS = 30.0
LEDGER_VERSION = 3
UNSYNCED_STATES = ("pending", "failed", "partial")     # what `imagen sync` finishes
LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS generations (
    id            TEXT PRIMARY KEY,   -- client UUID, also the id of the cloud rows
    path          TEXT NOT NULL,
    sha256        TEXT,
    backend       TEXT NOT NULL,
    adapter       TEXT,
    model         TEXT,
    cost_usd      REAL,
    latency_ms    INTEGER,
    prompt_sha256 TEXT,
    caller        TEXT,
    created_at    TEXT NOT NULL,      -- ISO 8601 with the local UTC offset
    seed          INTEGER,
    width         INTEGER,
    height        INTEGER,
    cloud         TEXT NOT NULL DEFAULT 'off'
                  CHECK (cloud IN ('off', 'pending', 'synced', 'failed', 'partial')),
    storage_path  TEXT,
    error         TEXT,               -- the last cloud error, never a secret
    record        TEXT NOT NULL,      -- the sidecar record, so `sync` needs no sidecar file
    rejected      INTEGER NOT NULL DEFAULT 0,
    job_key       TEXT,               -- a batch job's key: what a rerun of the batch skips
    parent        TEXT                -- the id of the generation it remixed (--from)
);
CREATE INDEX IF NOT EXISTS generations_unsynced ON generations (cloud) WHERE cloud <> 'off';
CREATE INDEX IF NOT EXISTS generations_path ON generations (path);
"""
# Columns added since version 1, which older ledgers get by ALTER TABLE. `rejected` = 1:
# Storage can never accept the image (its key), so `sync` skips it. The state reads as
# "rejected" here but is stored as 'failed' plus this flag: the CHECK above cannot change
# in an existing ledger, and an older imagen still reads the row.
LEDGER_ADDED_COLUMNS = (("rejected", "INTEGER NOT NULL DEFAULT 0"), ("job_key", "TEXT"),
                        ("parent", "TEXT"))
# Indexes on added columns: made after the columns, so an older ledger gets them too.
LEDGER_LATE_SQL = """
CREATE INDEX IF NOT EXISTS generations_job_key ON generations (job_key) WHERE job_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS generations_created ON generations (created_at)
"""


def ledger_path(env):
    base = env.get("XDG_DATA_HOME") or os.path.join(_home(env), ".local", "share")
    return os.path.join(base, "imagen", "ledger.db")


class Ledger:
    """The local SQLite ledger; use as a context manager so the connection is closed."""

    def __init__(self, path):
        sqlite3 = _sqlite3_module()
        self.path = path
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # `timeout` is SQLite's busy timeout; autocommit mode (isolation_level None):
            # each write below is its own BEGIN IMMEDIATE transaction
            self.db = sqlite3.connect(path, timeout=LEDGER_BUSY_SECONDS, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.error = sqlite3.Error
            self._prepare(sqlite3)
        except (OSError, sqlite3.Error) as exc:
            raise ImagenError("%s: %s" % (path, getattr(exc, "strerror", None) or exc)) from None

    def _prepare(self, sqlite3):
        # with WAL, NORMAL syncs at checkpoints, not at every commit: a power cut may drop
        # the last rows, but never corrupts the file (and a commit costs no fsync)
        self.db.execute("PRAGMA synchronous = NORMAL")
        # Python 3.12+: no checkpoint (and fsync) each time a process closes the ledger;
        # the WAL stays for the next one, and SQLite checkpoints it every 1000 pages
        if hasattr(self.db, "setconfig"):
            self.db.setconfig(sqlite3.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, True)  # novermin
        if self.db.execute("PRAGMA user_version").fetchone()[0] >= LEDGER_VERSION:
            return
        # WAL is a property of the file: the first process sets it, later ones find it set
        self._switch_to_wal(sqlite3)
        self._write([(statement, ()) for statement in LEDGER_SQL.split(";")
                     if statement.strip()])
        self._add_new_columns()
        self._write([(statement, ()) for statement in LEDGER_LATE_SQL.split(";")
                     if statement.strip()]
                    + [("PRAGMA user_version = %d" % LEDGER_VERSION, ())])

    def _add_new_columns(self):
        """Bring a ledger of an older imagen up to date; of two processes doing it at
        once, the second finds the column there."""
        present = {row[1] for row in self.db.execute("PRAGMA table_info(generations)")}
        for name, declaration in LEDGER_ADDED_COLUMNS:
            if name in present:
                continue
            try:
                self._write([("ALTER TABLE generations ADD COLUMN %s %s" % (name, declaration),
                              ())])
            except ImagenError as exc:
                if "duplicate column" not in exc.message:
                    raise

    def _switch_to_wal(self, sqlite3):
        """PRAGMA journal_mode ignores the busy timeout: while another connection is
        creating the ledger it fails at once with "database is locked" (two first
        generations at the same moment: cron, serve), so wait for that one here."""
        deadline = clock.monotonic() + LEDGER_BUSY_SECONDS
        while True:
            try:
                self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or not wait_until(deadline, 0.01):
                    raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.db.close()

    def _write(self, statements):
        """Run [(sql, params)] in one transaction that takes the write lock up front."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self.db.execute(sql, params)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except self.error as exc:
            raise ImagenError("%s: %s" % (self.path, exc)) from None

    def add(self, row):
        self._write([("INSERT INTO generations (%s) VALUES (%s)"
                      % (", ".join(row), ", ".join("?" * len(row))), list(row.values()))])

    def set_cloud(self, generation_id, state, storage_path=None, error=None):
        rejected = state == "rejected"
        self._write([("UPDATE generations SET cloud = ?, rejected = ?, error = ?,"
                      " storage_path = coalesce(?, storage_path) WHERE id = ?",
                      ("failed" if rejected else state, int(rejected), error, storage_path,
                       generation_id))])

    def unsynced(self):
        """Rows `sync` has to finish, and the rejected ones it skips."""
        return self._select("WHERE cloud IN (%s)" % ", ".join("?" * len(UNSYNCED_STATES)),
                            UNSYNCED_STATES)

    def synced(self):
        return self._select("WHERE cloud = 'synced' AND storage_path IS NOT NULL")

    def latest_for(self, path):
        rows = self._select("WHERE path = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
                            (path,), order="")
        return rows[0] if rows else None

    def rows(self):
        return self._select("")

    def _select(self, where, params=(), order="ORDER BY created_at, rowid"):
        cursor = self.db.execute("SELECT * FROM generations %s %s" % (where, order), params)
        found = []
        for row in cursor:
            row = dict(zip(row.keys(), row))
            row["record"] = ledger_record(row["record"])
            if row.get("rejected"):
                row["cloud"] = "rejected"
            found.append(row)
        return found


def ledger_record(text):
    """The record column as a dict, or None when it is not a JSON object (a row edited by
    hand, a damaged file): its cost still counts; only `sync` needs the record."""
    import json
    try:
        record = json.loads(text)
    except JSON_ERRORS + (TypeError,):
        return None
    return record if isinstance(record, dict) else None


def _sqlite3_module():
    """The C module behind sqlite3: the package adds only date adapters we do not use, and
    its `datetime` import costs a mock generate more than the ledger's own work (about
    2 ms, as `make bench` prints)."""
    try:
        import _sqlite3
        return _sqlite3
    except ImportError:
        import sqlite3
        return sqlite3


def open_ledger(env):
    return Ledger(ledger_path(env))


# ===== Supabase: Storage and PostgREST =====
# The protocols are in APIS.md sections 3 and 4. One client per project: every request
# carries `apikey` and the Bearer key, and goes over one keep-alive connection per host.

SUPABASE_PAGE = 1000     # rows a page asks for; the project's db-max-rows may give fewer
STORAGE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                              "0123456789_/!.*'() &$=@;:+,?-")


def supabase_credentials(env):
    """(url, service key); either may be empty."""
    url = (env.get("SUPABASE_URL") or "").strip().rstrip("/")
    key = (env.get("SUPABASE_SERVICE_KEY") or env.get("MAI_SUPABASE_KEY") or "").strip()
    return url, key


class KeyRefused(ImagenError):
    """Storage can never accept this object key (InvalidKey): no retry changes that, so
    the image's cloud sync ends here (`rejected` in the ledger)."""


def storage_key(record):
    """`<YYYY-MM-DD>/<file name>` (the local date of created_at), checked against the
    characters Storage accepts, so a bad name fails here and not after a round trip."""
    key = "%s/%s" % (record["created_at"][:10], record["file"])
    bad = sorted(set(key) - STORAGE_KEY_CHARS)
    if bad or any(part in ("", ".", "..") for part in key.split("/")):
        raise KeyRefused("%r cannot be a Storage object key (allowed: letters, digits and "
                          "_/!.*'() &$=@;:+,?-)" % key)
    return key


def storage_status(response):
    """Storage answers HTTP 400 for most errors and puts the real code in the body's
    `statusCode` string; 500 stays 500."""
    body = response.json() if response.status == 400 else None
    if isinstance(body, dict):
        try:
            return int(body.get("statusCode"))
        except (TypeError, ValueError):
            pass
    return response.status


def refuses_key(response):
    """Is this Storage's InvalidKey? (`code` is new; older servers say it in `error`.)"""
    body = response.json() if response.status == 400 else None
    return isinstance(body, dict) and "InvalidKey" in (body.get("code"), body.get("error"))


class StorageRetry(RetryPolicy):
    def should_retry(self, response):
        return response.status in self.statuses or storage_status(response) in self.statuses


class Supabase:
    """Storage and PostgREST of one project, sharing one HttpClient."""

    def __init__(self, url, key, timeout=30.0):
        self.url, self._key = url, key
        self.http = HttpClient(timeout=timeout)
        self.rest_retry = RetryPolicy()
        self.storage_retry = StorageRetry()

    @classmethod
    def from_env(cls, env, timeout=30.0):
        url, key = supabase_credentials(env)
        if not (url and key):
            return None
        if not url.startswith(("http://", "https://")):
            raise usage_error("SUPABASE_URL must start with http:// or https:// (got %s)"
                              % redact_url(url))
        if bad_port(url):
            raise usage_error("SUPABASE_URL %s" % bad_port(url))
        if any(ord(char) <= 32 or ord(char) >= 127 for char in key):
            raise usage_error("SUPABASE_SERVICE_KEY (or MAI_SUPABASE_KEY) holds spaces or "
                              "characters a key never has")
        return cls(url, key, timeout)

    def _send(self, method, url, body, headers, deadline, retry, context):
        headers = dict(headers, apikey=self._key, Authorization="Bearer " + self._key)
        try:
            return self.http.request(method, url, body=body, headers=headers,
                                     deadline=deadline, retry=retry, context=context)
        except ImagenError as exc:
            raise ImagenError(self._scrub(exc.message)) from None

    def _scrub(self, text):
        """Belt and braces: whatever a server echoes, the key never reaches a message."""
        return text.replace(self._key, "[redacted]") if self._key else text

    def _fail(self, context, response, detail):
        raise ImagenError(self._scrub("%s: %s" % (context, detail(response))))

    # ----- Storage -----

    def _object_url(self, action, bucket, key):
        from urllib.parse import quote
        return "%s/storage/v1/object/%s%s/%s" % (self.url, action, quote(bucket, safe=""),
                                                 quote(key, safe="/"))

    def upload(self, bucket, key, data, content_type, deadline):
        """Create or replace `key` in `bucket` (x-upsert: a retry never makes a second
        object); the stored content type is the one sent."""
        context = "upload %s/%s" % (bucket, key)
        response = self._send("POST", self._object_url("", bucket, key), data,
                              {"Content-Type": content_type, "x-upsert": "true"},
                              deadline, self.storage_retry, context)
        if refuses_key(response):
            raise KeyRefused(self._scrub("%s: %s" % (context, describe_storage_error(response))))
        if not 200 <= response.status < 300:
            self._fail(context, response, describe_storage_error)

    def sign(self, bucket, keys, expires, deadline):
        """{key: (signed URL, None) or (None, Storage's reason)} for `keys`, in one request.
        The batch form `POST /object/sign/<bucket>` signs raw keys; the single-key form
        signs a key as it stands percent-encoded, and its URL never works for a key that
        holds & $ = @ ; : + , ? (APIS.md section 3). A missing object is a reason, not an
        error: it is an answer about that key."""
        from urllib.parse import quote
        context = "sign in bucket %s" % bucket
        body = to_json({"expiresIn": expires, "paths": list(keys)}).encode("utf-8")
        response = self._send("POST", "%s/storage/v1/object/sign/%s" % (self.url, quote(
            bucket, safe="")), body, {"Content-Type": "application/json"}, deadline,
            self.storage_retry, context)
        if response.status != 200:
            self._fail(context, response, describe_storage_error)
        entries = response.json()
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ImagenError("%s: unexpected answer (not a list of signed URLs)" % context)
        by_key = {entry.get("path"): entry for entry in entries}
        signed = {}
        for key in keys:
            entry = by_key.get(key, {})
            relative = entry.get("signedURL")
            if isinstance(relative, str) and "?token=" in relative:
                # the answer's path is the raw key: encode the key ourselves, keep the token
                signed[key] = ("%s/storage/v1/object/sign/%s/%s?token=%s" % (
                    self.url, quote(bucket, safe=""), quote(key, safe="/"),
                    relative.rpartition("?token=")[2]), None)
            else:
                signed[key] = (None, str(entry.get("error") or "no signed URL in the answer"))
        return signed

    # ----- PostgREST: a table is (schema, name); the schema goes in a profile header -----

    def insert(self, table, rows, deadline):
        """Insert rows idempotently: a client id plus ignore-duplicates, so a retried or
        repeated insert never doubles a row."""
        schema, name = table
        url = "%s/rest/v1/%s?on_conflict=id" % (self.url, name)
        headers = {"Content-Type": "application/json", "Content-Profile": schema,
                   "Prefer": "return=minimal,resolution=ignore-duplicates"}
        context = "insert into %s.%s" % table
        response = self._send("POST", url, to_json(rows).encode("utf-8"), headers,
                              deadline, self.rest_retry, context)
        if not 200 <= response.status < 300:
            self._fail(context, response, describe_postgrest_error)

    def select_pages(self, table, query, page_timeout):
        """Yield pages of rows (lists of dicts) of `table` for a PostgREST query string that
        holds a stable `order`, by limit/offset. The project's db-max-rows (1,000 by
        default, 100 or 500 on many projects) silently shortens every page, so a short
        page is not the end: an empty one is, or one shorter than an earlier page (the cap
        is the same for every page). Each page, retries included, has `page_timeout`
        seconds."""
        import json
        schema, name = table
        headers = {"Accept": "application/json", "Accept-Profile": schema}
        context = "read %s.%s" % table
        offset = longest = 0
        while True:
            url = "%s/rest/v1/%s?%s&limit=%d&offset=%d" % (self.url, name, query,
                                                            SUPABASE_PAGE, offset)
            response = self._send("GET", url, None, headers,
                                  clock.monotonic() + page_timeout, self.rest_retry, context)
            if response.status == 416:        # asked past the end
                return
            if response.status not in (200, 206):
                self._fail(context, response, describe_postgrest_error)
            try:
                rows = json.loads(response.body)
            except ValueError:
                raise ImagenError("%s: the answer is not JSON" % context) from None
            if not isinstance(rows, list):
                raise ImagenError("%s: expected a JSON array" % context)
            if not rows:
                return
            yield rows
            if len(rows) < longest:
                return
            longest = max(longest, len(rows))
            offset += len(rows)


KEY_REFUSED_HINT = " (check the service-role key in SUPABASE_SERVICE_KEY or MAI_SUPABASE_KEY)"


def describe_storage_error(response):
    """`HTTP 400 (404 Bucket not found): Bucket not found`, from status and body."""
    body = response.json()
    hint = KEY_REFUSED_HINT if storage_status(response) in (401, 403) else ""
    if not isinstance(body, dict):
        return "HTTP %d: %s%s" % (response.status, response.text() or "(empty body)", hint)
    code = body.get("statusCode")
    label = "HTTP %d" % response.status
    if code and str(code) != str(response.status):
        label += " (statusCode %s)" % code
    words = [str(body[k]) for k in ("error", "message") if body.get(k)]
    if len(words) == 2 and words[0] == words[1]:
        words.pop()
    return "%s: %s%s" % (label, ": ".join(words) or response.text(), hint)


def describe_postgrest_error(response):
    """`HTTP 409 (23505): duplicate key ...; hint`, from PostgREST's error object."""
    body = response.json()
    if not isinstance(body, dict):
        return "HTTP %d: %s" % (response.status, response.text() or "(empty body)")
    label = "HTTP %d" % response.status + (" (%s)" % body["code"] if body.get("code") else "")
    text = str(body.get("message") or response.text())
    for extra in ("details", "hint"):
        if body.get(extra):
            text += "; %s" % body[extra]
    return "%s: %s" % (label, text)


def split_table_name(key, name):
    """(schema, table) from a config value like "imagen.images"."""
    import re
    match = re.match(r"^([a-z_][a-z0-9_]{0,62})\.([a-z_][a-z0-9_]{0,62})$", str(name))
    if not match:
        raise usage_error("%s must be schema.table in lowercase letters, digits and _ (got %r)"
                          % (key, name))
    return match.group(1), match.group(2)


# ===== tmux: preview window and caller identity =====
# A person generating inside tmux gets the image in a new window of the same session while
# the generating pane keeps focus; an agent running in a tmux pane is named by the pane's
# `@mai-name` option. tmux is asked only when $TMUX says we are inside it, and always with
# a timeout: outside tmux this section costs nothing, and a stuck server never hangs imagen.

CALLER_TIMEOUT = 1.0    # seconds: finding out who asked must never hold up a generate
TMUX_TIMEOUT = 2.0      # seconds for each tmux command of the preview (it takes a few ms)


def run_tmux(args, env, timeout):
    """stdout of `tmux ARGS`, run in the caller's environment (whose $TMUX names the
    server); ImagenError when tmux is missing, fails, or does not answer in time."""
    import subprocess
    try:
        done = clock.run(["tmux"] + args, timeout, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise ImagenError("tmux is not installed (not on PATH)") from None
    except subprocess.TimeoutExpired:
        raise ImagenError("tmux did not answer within %gs" % timeout) from None
    except OSError as exc:
        raise ImagenError("cannot run tmux: %s" % (exc.strerror or exc)) from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ImagenError("tmux %s: %s" % (args[0], lines[0] if lines
                                            else "exit status %d" % done.returncode))
    return done.stdout.decode("utf-8", "replace").strip()


def inside_tmux(env):
    return bool(env.get("TMUX"))


# ----- caller identity -----

def caller_from_tmux_pane(env):
    """The `@mai-name` option of the calling pane, as tmux reads it for that pane (so a
    value set on its window or session counts too); "" when there is none or no answer."""
    pane = env.get("TMUX_PANE")
    if not inside_tmux(env) or not pane:
        return ""
    try:
        return run_tmux(["display-message", "-p", "-t", pane, "#{@mai-name}"], env,
                        CALLER_TIMEOUT)
    except ImagenError:
        return ""      # tmux cannot say: the login name is the next best answer


# ----- preview -----

def open_preview_window(path, prompt, template, env):
    """`tmux new-window -d -n img:<slug> <command>` in the session of the calling pane."""
    import shutil
    command = preview_command(template, path)
    program = preview_program(command)
    if not shutil.which(program, path=env.get("PATH", os.defpath)):
        raise ImagenError("%s not found on PATH (output.preview_command)" % program)
    target = []
    pane = env.get("TMUX_PANE")
    if pane:
        # name the session rather than rely on how this tmux version picks a current one
        session = run_tmux(["display-message", "-p", "-t", pane, "#{session_id}"], env,
                           TMUX_TIMEOUT)
        target = ["-t", session + ":"] if session else []
    run_tmux(["new-window", "-d"] + target + ["-n", "img:" + slugify(prompt), command],
             env, TMUX_TIMEOUT)


def preview_command(template, path):
    """The shell command with `{path}` replaced by the quoted path (appended if absent)."""
    import shlex
    quoted = shlex.quote(path)
    if "{path}" not in template:
        return "%s %s" % (template, quoted)
    return template.replace("{path}", quoted)


def preview_program(command):
    """The program a preview command runs: its first word after any NAME=value."""
    import re
    import shlex
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise usage_error("cannot split %r: %s" % (command, exc)) from None
    for word in words:
        if not re.match(r"[A-Za-z_][A-Za-z0-9_]*=", word):
            return word
    raise usage_error("%r names no program" % command)


# ===== Config =====
# Built-in defaults, the YAML file, and a small schema that names every problem by its
# YAML path (and line) and offers "did you mean" for unknown keys.

SAMPLE_CONFIG = """\
# imagen.yaml: a complete sample. `imagen config init --write` puts it at
# ~/.config/imagen.yaml (or where $IMAGEN_CONFIG or --config points); edit it, then
# `imagen config validate` checks it.
# Tokens never go in this file: a backend names the environment variable that holds it.

default_backend: mock           # instance name from `backends:` below
# default_edit_backend: mock    # for `imagen edit` (default: default_backend)
owner_user_id: ""               # Supabase auth.users.id that owns cloud rows

output:
  dir: ~/Pictures/imagen        # naming is relative to this unless absolute
  naming: "{date}/{slug}-{seed}.{ext}"   # {date} {time} {slug} {seed} {backend} {ext}
  sidecar: true                 # write <image>.json next to each image
  embed_metadata: true          # carry the record inside PNGs (iTXt + tEXt parameters)
  preview: auto                 # auto | on | off (tmux preview window)
  preview_command: "tmux-img --hold {path}"
  cloud_sync: off               # auto | on | off (Supabase upload + row); auto once
                                # owner_user_id is set and Supabase is configured

cloud:
  bucket: imagen-generated
  images_table: imagen.images   # schema.table
  usage_table: mai.imagen_usage
  timeout: 30                   # seconds for one image's upload + row (then: sync later)

styles:
  blog-header:
    prompt: "{prompt}, wide editorial illustration, flat colours"   # {prompt} = your text
    negative: "text, watermark"
    size: 1536x768

backends:
  mock:                         # in-tree, no network: a deterministic gradient
    adapter: mock
  flux-schnell-local:           # FLUX-schnell on your own GPU host, through ComfyUI
    adapter: comfyui
    url: http://gpu-host:8188     # or a list of URLs: the least-loaded healthy one is used
    workflow: flux-schnell        # built-in name, or path to an API-format workflow JSON
    model: flux1-schnell-fp8.safetensors   # the checkpoint the built-in workflow loads
    # output_node: "9"            # whose image to keep (default: the first SaveImage node)
    steps: 4
    timeout: 600
  flux-dev-replicate:            # paid: needs $REPLICATE_API_TOKEN (see `imagen backends`)
    adapter: replicate
    model: black-forest-labs/flux-dev      # or owner/name:version
    api_token_env: REPLICATE_API_TOKEN
    base_url: https://api.replicate.com/v1 # default; tests point it at a loopback server
    input: {output_format: png}            # extra model inputs, passed through
    wait: 60                    # seconds the create request waits for the image (1..60)
    max_cost_usd: 0.50          # refuse a call estimated above this (or --max-cost USD)
    # hardware: a40             # time-billed models: price = predict_time x this GPU's rate
    # family: flux-dev          # input mapping when the model name does not say it
  # gpt-image-openai:            # paid: needs $OPENAI_API_KEY; uncomment to use
  #   adapter: openai
  #   model: gpt-image-1.5        # or gpt-image-1-mini, dall-e-3, ...
  #   api_key_env: OPENAI_API_KEY # default
  #   base_url: https://api.openai.com/v1   # default; or any server that speaks this API
  #   # organization_env: OPENAI_ORG_ID     # sent as OpenAI-Organization
  #   # project_env: OPENAI_PROJECT_ID      # sent as OpenAI-Project
  #   input: {quality: medium, output_format: png}   # passed through (background, ...)
  #   max_cost_usd: 0.50
  #   timeout: 180                # the default for openai: gpt-image may take a minute
"""

# Every file imagen reads whole is capped, so /dev/zero or a huge file cannot fill memory.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_RECORD_BYTES = 16 * 1024 * 1024          # a sidecar
MAX_WORKFLOW_BYTES = 16 * 1024 * 1024        # a ComfyUI workflow file
MAX_INSPECT_BYTES = 256 * 1024 * 1024        # an image `inspect` reads
MAX_STDIN_PROMPT_BYTES = 8 * MAX_PROMPT_CHARS     # `generate -`: UTF-8 and whitespace fit


def read_capped(path, cap):
    """The bytes of the regular file at `path`, at most `cap` of them, else OSError (whose
    strerror says why). The file is opened non-blocking and checked before any read, so
    a FIFO or a device never blocks or streams: a FIFO opened so returns at once."""
    import errno
    import stat
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks, size = [], 0
        while size <= cap:      # the size may change under us: read at most cap + 1
            chunk = os.read(fd, min(cap + 1 - size, max(info.st_size + 1 - size, 65536)))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > cap:
            raise OSError(errno.EFBIG, "over the %s limit" % byte_size(cap))
        return b"".join(chunks)
    finally:
        os.close(fd)


def byte_size(count):
    """1 MiB, 256 MiB, or 1000-byte: how a limit reads in a message."""
    mib = 1024 * 1024
    return "%d MiB" % (count // mib) if count % mib == 0 else "%d-byte" % count


ENUM_MODES = ("auto", "on", "off")
MODE_KEYS = ("preview", "cloud_sync")    # output.* keys that take a mode


def _is_str(value):
    return None if isinstance(value, str) else "must be a string"


def _is_bool(value):
    return None if isinstance(value, bool) else "must be true or false"


def _is_mapping(value):
    return None if isinstance(value, dict) else "must be a mapping"


def _is_str_or_list(value):
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and all(isinstance(v, str) for v in value)):
        return None
    return "must be a string or a non-empty list of strings"


def _is_mode(value):
    """auto | on | off. YAML 1.1 reads a bare on/off as a boolean: it counts as the word."""
    return None if isinstance(value, bool) or value in ENUM_MODES else (
        "must be one of %s" % ", ".join(ENUM_MODES))


def mode_word(value):
    """"on"/"off" for a boolean, anything else as it is."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def resolve_mode(config_value, env_value, flag, env_var, option):
    """(mode, "config" | "env" | "flag"): the config's auto/on/off, then the environment
    variable's, then the flag's (later wins). Python callers may pass the flag as
    True/False."""
    mode, source = config_value, "config"
    value = (env_value or "").strip().lower()
    if value:
        if value not in ENUM_MODES:
            raise usage_error("%s must be auto, on or off (got %r)" % (env_var, env_value))
        mode, source = value, "env"
    flag = mode_word(flag)
    if flag is not None:
        if flag not in ENUM_MODES:
            raise usage_error("%s must be auto, on or off (got %r)" % (option, flag))
        mode, source = flag, "flag"
    return mode, source


def _int_in(low, high):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return "must be a whole number from %d to %d" % (low, high)
        return None
    return check


def _positive_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        return "must be a number above 0"     # 1e9 also keeps out inf and nan
    return None


def _non_negative_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return "must be a number of 0 or more"
    return None


def _one_of(*choices):
    def check(value):
        return None if value in choices else "must be one of %s" % ", ".join(choices)
    return check


def parse_size(text):
    """(width, height) from "WxH", each 64..4096."""
    try:
        width, height = (int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise usage_error("size must be WxH, like 1024x1024 (got %r)" % text) from None
    if not (SIZE_MIN <= width <= SIZE_MAX and SIZE_MIN <= height <= SIZE_MAX):
        raise usage_error("size %dx%d is out of range: each side must be %d..%d"
                          % (width, height, SIZE_MIN, SIZE_MAX))
    return width, height


def _is_size(value):
    try:
        parse_size(value)
    except ImagenError as exc:
        return exc.message
    return None


OUTPUT_KEYS = {"dir": _is_str, "naming": _is_str, "sidecar": _is_bool,
               "embed_metadata": _is_bool, "preview": _is_mode,
               "preview_command": _is_str, "cloud_sync": _is_mode}
CLOUD_KEYS = {"bucket": _is_str, "images_table": _is_str, "usage_table": _is_str,
              "timeout": _positive_number}
STYLE_KEYS = {"prompt": _is_str, "negative": _is_str, "size": _is_size,
              "steps": _int_in(0, MAX_STEPS), "backend": _is_str}
BACKEND_KEYS = {"adapter": _is_str, "model": _is_str, "timeout": _positive_number,
                "steps": _int_in(0, MAX_STEPS), "size": _is_size,
                "max_concurrency": _int_in(1, 1024), "max_queue": _int_in(0, 100000)}
TOP_KEYS = {"default_backend": _is_str, "owner_user_id": _is_str, "output": _is_mapping,
            "cloud": _is_mapping, "styles": _is_mapping, "backends": _is_mapping,
            "serve": _is_mapping, "default_edit_backend": _is_str}

DEFAULT_OUTPUT = {"dir": "~/Pictures/imagen", "naming": "{date}/{slug}-{seed}.{ext}",
                  "sidecar": True, "embed_metadata": True, "preview": "auto",
                  "preview_command": "tmux-img --hold {path}", "cloud_sync": "auto"}
DEFAULT_CLOUD = {"bucket": "imagen-generated", "images_table": "imagen.images",
                 "usage_table": "mai.imagen_usage", "timeout": 30}
SECRET_KEY_WORDS = ("token", "key", "secret", "password")


BUILTIN_BACKENDS = {"mock": {"adapter": "mock"}}


class Config:
    """The active configuration: merged data, where it came from, and its warnings."""

    def __init__(self, data, path, exists, warnings=()):
        self.data, self.path, self.exists = data, path, exists
        self.warnings = list(warnings)

    @property
    def output(self):
        return self.data["output"]

    @property
    def backends(self):
        return self.data["backends"]

    @property
    def styles(self):
        return self.data["styles"]


def config_path(explicit=None, env=None):
    """(path, explicit?) by precedence --config > $IMAGEN_CONFIG > XDG default."""
    env = os.environ if env is None else env
    if explicit:
        return explicit, True
    if env.get("IMAGEN_CONFIG"):
        return env["IMAGEN_CONFIG"], True
    base = env.get("XDG_CONFIG_HOME") or os.path.join(_home(env), ".config")
    return os.path.join(base, "imagen.yaml"), False


def read_config(explicit, env, strict, adapters):
    """Read, merge and validate the config, `adapters` being the known ones by name.
    Errors raise (exit 2) unless strict=False, which returns them in `config.problems`
    for `config validate`."""
    path, is_explicit = config_path(explicit, env)
    if not os.path.exists(path):
        if is_explicit:
            raise usage_error("config: %s: no such file" % path)
        config = Config(merge_defaults({}), path, exists=False)
        config.problems = []
        return config
    raw, lines = read_yaml(path)
    problems = validate_config(raw, lines, validating=not strict, adapters=adapters)
    errors = [p for p in problems if p[0] == "error"]
    if strict and errors:
        more = " (and %d more: imagen config validate)" % (len(errors) - 1) if len(errors) > 1 else ""
        raise usage_error("config: %s%s" % (format_problem(path, errors[0]), more))
    data = merge_defaults(raw if isinstance(raw, dict) else {})
    config = Config(data, path, exists=True,
                    warnings=["config: warning: " + format_problem(path, p)
                              for p in problems if p[0] == "warning"])
    config.problems = problems
    return config


def read_yaml(path):
    """(data, {yaml path: line}) from a YAML file; errors name file, line and column."""
    try:
        import yaml
    except ImportError:
        raise usage_error("config: reading %s needs PyYAML: pip install pyyaml" % path) from None
    try:
        text = read_capped(path, MAX_CONFIG_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise usage_error("config: %s: %s" % (path, getattr(exc, "strerror", None) or exc)) from None
    try:
        # the reader refuses a NUL or other control bytes at once
        loader = _depth_capped_loader(yaml, path)(text)
        try:
            node = loader.get_single_node()
            _refuse_hostile_yaml(node, path)
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = "%s:%d:%d" % (path, mark.line + 1, mark.column + 1) if mark else path
        raise usage_error("config: %s: %s" % (where, exc.problem or exc.context)) from None
    except yaml.reader.ReaderError as exc:
        character = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise usage_error("config: %s:%d: character #x%04x is not allowed in YAML" % (
            path, text.count("\n", 0, exc.position) + 1, character)) from None
    except yaml.YAMLError as exc:
        raise usage_error("config: %s: %s" % (path, " ".join(str(exc).split()))) from None
    return (data if data is not None else {}), _collect_lines(node)


MAX_CONFIG_DEPTH = 32       # levels of nesting, counted through aliases
MAX_CONFIG_VALUES = 100000  # values, counted through aliases: no "billion laughs"


def _depth_capped_loader(yaml, path):
    """A SafeLoader class that refuses nesting deeper than MAX_CONFIG_DEPTH as it composes:
    PyYAML composes nested nodes recursively, and a file of 20,000 brackets would be
    scanned up to the interpreter's recursion limit first (most of a second)."""
    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.depth == MAX_CONFIG_DEPTH:
                raise usage_error("config: %s:%d: nested too deeply (at most %d levels)" % (
                    path, self.peek_event().start_mark.line + 1, MAX_CONFIG_DEPTH))
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1
    return Loader


def _yaml_children(node):
    if node.id == "mapping":
        return [child for pair in node.value for child in pair]
    return list(node.value) if node.id == "sequence" else []


def _refuse_hostile_yaml(root, path):
    """A composed YAML tree whose aliases make it recursive, deeper than MAX_CONFIG_DEPTH or
    larger than MAX_CONFIG_VALUES once expanded is refused: everything that reads the
    config (validation, json.dumps of a backend's `input`, ...) may walk it in full.
    Each node is visited once, so this costs what the file's bytes cost."""
    measured = {}       # id(node) -> (values, depth) of its expansion
    open_nodes = set()  # ids on the path being walked: meeting one again is a cycle
    stack = [(root, False)] if root is not None else []
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes = [measured[id(child)] for child in _yaml_children(node)]
            values = 1 + sum(size for size, _ in sizes)
            depth = 1 + max([depth for _, depth in sizes] or [0])
            line = node.start_mark.line + 1
            if values > MAX_CONFIG_VALUES:
                raise usage_error("config: %s:%d: its aliases expand to more than %d values"
                                  % (path, line, MAX_CONFIG_VALUES))
            if depth > MAX_CONFIG_DEPTH:
                raise usage_error("config: %s:%d: nested too deeply (at most %d levels, "
                                  "counted through aliases)" % (path, line, MAX_CONFIG_DEPTH))
            measured[key] = (values, depth)
        elif key in open_nodes:
            raise usage_error("config: %s:%d: a recursive alias (a value that contains itself)"
                              % (path, node.start_mark.line + 1))
        elif key not in measured:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _yaml_children(node))


def _collect_lines(root):
    """{yaml path: line} of every key, each node walked once (an alias's second path has
    no line of its own)."""
    lines, seen = {}, set()
    stack = [(root, "")] if root is not None else []
    while stack:
        node, prefix = stack.pop()
        lines.setdefault(prefix, node.start_mark.line + 1)
        if id(node) in seen or node.id != "mapping":
            continue
        seen.add(id(node))
        children = []
        for key_node, value_node in node.value:
            name = key_node.value if key_node.id == "scalar" else "?"
            key = "%s.%s" % (prefix, name) if prefix else str(name)
            lines[key] = key_node.start_mark.line + 1
            children.append((value_node, key))
        stack.extend(reversed(children))
    return lines


def format_problem(path, problem):
    level, where, message, line = problem
    location = "%s:%d" % (path, line) if line else path
    return "%s: %s: %s" % (location, where or "(top)", message)


def validate_config(raw, lines=None, validating=True, adapters=()):
    """[(level, yaml_path, message, line)] for every problem in a parsed config file whose
    backends may use `adapters` ({name: Adapter class}).
    Level "hint" is a warning and "validate-error" an error that only `config validate`
    (validating) reports: for a setting that the environment or a flag may still make
    right for the command at hand, which checks it itself."""
    lines = lines or {}
    problems = []

    def report(level, where, message):
        if level in ("hint", "validate-error"):
            if not validating:
                return
            level = "warning" if level == "hint" else "error"
        problems.append((level, where, message, lines.get(where)))

    if raw is None or raw == {}:
        return problems
    if not isinstance(raw, dict):
        report("error", "", "the config must be a mapping of keys")
        return problems
    _check_keys(raw, TOP_KEYS, "", report)
    for section, keys in (("output", OUTPUT_KEYS), ("cloud", CLOUD_KEYS)):
        if isinstance(raw.get(section), dict):
            _check_keys(raw[section], keys, section, report)
    for name, style in _named_blocks(raw, "styles", report):
        _check_keys(style, STYLE_KEYS, "styles.%s" % name, report)
    backends = dict(_named_blocks(raw, "backends", report))
    for name, block in backends.items():
        _check_backend(name, block, report, adapters)
    for key in ("default_backend", "default_edit_backend"):
        default = raw.get(key)
        if isinstance(default, str) and default not in backends and default not in BUILTIN_BACKENDS:
            report("error", key, "no backend named %r (known: %s)"
                   % (default, ", ".join(sorted(set(backends) | set(BUILTIN_BACKENDS)))))
    check_cloud_owner(raw, report)
    check_preview_command(raw, report)
    check_serve_keys(raw, report)
    return problems


def _named_blocks(raw, section, report):
    blocks = raw.get(section)
    if not isinstance(blocks, dict):
        return []
    found = []
    for name, block in blocks.items():
        if not isinstance(block, dict):
            report("error", "%s.%s" % (section, name), "must be a mapping")
        else:
            found.append((str(name), block))
    return found


def _check_backend(name, block, report, adapters):
    where = "backends.%s" % name
    adapter = block.get("adapter")
    if adapter is None:
        report("error", where + ".adapter", "missing (one of: %s)" % ", ".join(adapters))
        return
    cls = adapters.get(adapter)
    if cls is None:
        report("error", where + ".adapter", "unknown adapter %r (known: %s)"
               % (adapter, ", ".join(adapters)))
        return
    keys = dict(BACKEND_KEYS, **cls.OPTIONS)
    _check_keys(block, keys, where, report)
    for key in cls.REQUIRED:
        if key not in block:
            report("error", "%s.%s" % (where, key), "missing (the %s adapter needs it)" % adapter)
    cls.check_block(block, where, report)


def _check_keys(mapping, known, where, report):
    for key, value in mapping.items():
        path = "%s.%s" % (where, key) if where else str(key)
        if _looks_like_literal_secret(key, value):
            report("error", path, "a token must not be written in the config: put it in an "
                   "environment variable and name that variable with %s_env" % key)
            continue
        check = known.get(key)
        if check is None:
            report("warning", path, "unknown key" + did_you_mean(str(key), known))
            continue
        problem = check(value)
        if problem:
            report("error", path, problem)


def _looks_like_literal_secret(key, value):
    name = str(key).lower()
    return (any(word in name for word in SECRET_KEY_WORDS) and not name.endswith("_env")
            and isinstance(value, str) and value.strip() != "")


def did_you_mean(word, choices):
    import difflib
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return ' (did you mean "%s"?)' % close[0] if close else ""


def merge_defaults(raw):
    """Built-in defaults under the file's values; the in-tree mock backend always exists."""
    def section(name):   # a section that is no mapping was reported by validate_config
        value = raw.get(name)
        return {str(key): item for key, item in value.items()} if isinstance(value, dict) else {}

    data = {"default_backend": raw.get("default_backend") or "mock",
            "default_edit_backend": raw.get("default_edit_backend") or None,
            "owner_user_id": raw.get("owner_user_id") or "",
            "output": dict(DEFAULT_OUTPUT, **section("output")),
            "cloud": dict(DEFAULT_CLOUD, **section("cloud")),
            "serve": section("serve"),
            "styles": section("styles"),
            "backends": dict(BUILTIN_BACKENDS, **section("backends"))}
    for key in MODE_KEYS:
        data["output"][key] = mode_word(data["output"][key])
    return data


def check_cloud_owner(raw, report):
    """CONFIG_CHECK: rows need an owner; an id that is not a UUID would fail every insert."""
    output = raw.get("output") if isinstance(raw.get("output"), dict) else {}
    mode = mode_word(output.get("cloud_sync", DEFAULT_OUTPUT["cloud_sync"]))
    owner = raw.get("owner_user_id")
    if not isinstance(owner, str) or mode not in ENUM_MODES:
        return           # the type and enum checks already said so
    if owner.strip() and not is_uuid(owner.strip()):
        report("error", "owner_user_id", "must be a UUID (the Supabase auth.users.id), got %r"
               % owner)
    elif not owner.strip() and "output" in raw and "cloud_sync" in output and mode != "off":
        if mode == "on":
            # not fatal on loading: $IMAGEN_CLOUD_SYNC or --no-cloud may turn sync off,
            # and check_cloud_sync stops a generate that still syncs without an owner
            report("validate-error", "owner_user_id", "is empty but output.cloud_sync is "
                   "on: cloud rows need their owner's auth.users.id")
        else:
            report("hint", "owner_user_id", "is empty, so cloud sync (auto) stays off; set "
                   "it to your Supabase auth.users.id, or set output.cloud_sync: off")


def is_uuid(text):
    import re
    return re.match(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$", text) is not None


def check_preview_command(raw, report):
    output = raw.get("output")
    command = output.get("preview_command") if isinstance(output, dict) else None
    if isinstance(command, str):
        try:
            preview_program(command)
        except ImagenError as exc:
            report("error", "output.preview_command", exc.message)


def split_host(text):
    """(name, port or None) of a Host header value, the name lower-cased and an IPv6
    address without its brackets; None when it is not one."""
    import re
    match = re.match(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9._-]+))(?::([0-9]{1,5}))?\Z",
                     text.strip().lower())
    if not match:
        return None
    port = match.group(3)
    return match.group(1) or match.group(2), int(port) if port else None


def _is_host_names(value):
    """serve.allowed_hosts: the names besides its address and localhost that serve
    answers to (a Host header checked by Api.answers_to)."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return "must be a host name or a list of host names"
    for name in names:
        if split_host(name) is None or split_host(name)[1] is not None:
            return "%r is not a host name: give it without scheme, port or path, like " \
                   "imagen.lan" % name
    return None


SERVE_KEYS = {"allowed_hosts": _is_host_names}


def check_serve_keys(raw, report):
    if isinstance(raw.get("serve"), dict):
        _check_keys(raw["serve"], SERVE_KEYS, "serve", report)


def cloud_table(config, key):
    """(schema, table) of cloud.images_table or cloud.usage_table."""
    return split_table_name("cloud." + key, config.data["cloud"][key])


def cloud_timeout(config):
    return float(config.data["cloud"]["timeout"])


def missing_supabase_settings(env, config, owner=True):
    url, key = supabase_credentials(env)
    missing = []
    if not url:
        missing.append("SUPABASE_URL")
    if not key:
        missing.append("SUPABASE_SERVICE_KEY (or MAI_SUPABASE_KEY)")
    if owner and not config.data["owner_user_id"]:
        missing.append("owner_user_id in the config")
    return missing


def require_supabase(env, config, context, owner=True):
    """The Supabase client, or exit 2 naming every setting that is missing (the owner
    too, unless `owner` is False: rows are written only with one)."""
    missing = missing_supabase_settings(env, config, owner)
    if missing:
        raise usage_error("%s %s %s not set" % (context, " and ".join(missing),
                                               "is" if len(missing) == 1 else "are"))
    return Supabase.from_env(env, cloud_timeout(config))


# ===== Adapter interface =====
# One small interface: an adapter is built from its own config block and returns one
# generated image per request; cancel() stops whatever it has running, harmlessly. Adding
# a backend is one `Adapter: <name>` section and its entry in ADAPTERS.

class Request:
    """What an adapter is asked for (final prompt, after the style)."""

    __slots__ = ("prompt", "negative", "seed", "steps", "width", "height", "index", "count",
                 "images", "strength")

    def __init__(self, prompt, negative, seed, steps, width, height, index=0, count=1,
                 images=(), strength=None):
        self.prompt, self.negative, self.seed, self.steps = prompt, negative, seed, steps
        self.width, self.height, self.index, self.count = width, height, index, count
        # input images (InputImage: path, data, sha256, mime_type, width, height), and
        # --strength or None
        self.images, self.strength = list(images), strength


class Result:
    """What an adapter returns: the bytes and what it knows about them."""

    __slots__ = ("data", "mime_type", "model", "seed", "steps", "cost_usd", "meta")

    def __init__(self, data, mime_type, model, seed, steps=None, cost_usd=None, meta=None):
        self.data, self.mime_type, self.model, self.seed = data, mime_type, model, seed
        self.steps, self.cost_usd, self.meta = steps, cost_usd, meta or {}


def scrub_result(result, env, secrets):
    """The Result with every secret blanked out of its text: a server may echo a token
    into an id or a log line, and all of it goes to stdout, sidecar, PNG and ledger."""
    def scrub(value):
        if isinstance(value, str):
            value = scrub_secrets(value, env)
            for secret in secrets:
                value = value.replace(secret, "[redacted]")
            return value
        if isinstance(value, dict):
            return {scrub(key): scrub(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [scrub(item) for item in value]
        return value
    return Result(result.data, result.mime_type, scrub(result.model), scrub(result.seed),
                  steps=scrub(result.steps), cost_usd=result.cost_usd, meta=scrub(result.meta))


class Adapter:
    """Base of every adapter. Subclasses set NAME, OPTIONS, REQUIRED and implement generate."""

    NAME = ""
    OPTIONS = {}          # config keys beyond BACKEND_KEYS: key -> check(value)
    REQUIRED = ()
    PAID = False          # paid adapters get a usage row per generation
    PROBED = False        # its hosts are only "configured" until `backends --check` probes them
    MAX_CONCURRENCY = 1   # serve's default max_concurrency for its backends
    TAKES_IMAGES = False  # does it take input images (--image, imagen edit)?
    MAX_IMAGES = 0        # how many at most, when it does
    SIZE_MULTIPLE = 8     # an input's size, as the default size, is rounded to this
    TAKES_SEED = True     # False: the backend has no seed; the record's seed is null
    TIMEOUT = DEFAULT_TIMEOUT   # seconds, when neither --timeout nor the block sets one

    def __init__(self, name, block, env, console):
        self.name, self.block, self.env, self.console = name, block, env, console

    @classmethod
    def status(cls, block, env):
        """(usable, note) for `imagen backends`: are its credentials present?"""
        return True, ""

    @classmethod
    def check_block(cls, block, where, report):
        """Checks of its block beyond each key's own, for `config validate`: report(level,
        yaml path, message) as in validate_config."""

    def model_id(self):
        return self.block.get("model") or self.NAME

    def probe_hosts(self, seconds):
        """For `backends --check`: one {"url", "reachable", "detail"} per host it would
        use, each probed within `seconds`."""
        return []

    def check_ready(self):
        """Raise ImagenError (exit 2) before any request if the adapter cannot run."""

    def secrets(self):
        """The secret values it uses (tokens), whatever variable holds them."""
        return ()

    def price_note(self):
        """What a generation costs, as `imagen backends` shows it; None when not priced."""
        return None

    def estimate_cost(self, images):
        """Estimated USD for `images` images before anything is submitted; None if unknown."""
        return None

    def max_images(self):
        """How many input images this backend takes (0: none); may read its config."""
        return self.MAX_IMAGES if self.TAKES_IMAGES else 0

    def takes_strength(self):
        """Whether --strength changes what it does (else it is ignored, with a note)."""
        return False
    def estimate_for(self, images, width, height):
        """estimate_cost for images asked for at width x height: an adapter whose price
        depends on the size overrides this one."""
        return self.estimate_cost(images)

    def generate_all(self, requests, deadline):
        """Yield one Result per request, each as soon as it exists."""
        for request in requests:
            yield self.generate(request, deadline)

    def generate(self, request, deadline):
        raise NotImplementedError

    def cancel(self):
        """Stop the job in flight, if any; must be harmless and quick when there is none."""


# ===== Adapter: mock =====

class MockAdapter(Adapter):
    """No network: a deterministic gradient drawn from prompt, seed and size."""

    NAME = "mock"
    OPTIONS = {"delay": _non_negative_number, "fail": _is_str,  # for tests and demos
               "gate": _is_str}
    MAX_CONCURRENCY = 8
    MODEL = "mock-gradient-1"
    TAKES_IMAGES, MAX_IMAGES, SIZE_MULTIPLE = True, 8, 1

    def takes_strength(self):
        return True

    def model_id(self):
        return self.block.get("model") or self.MODEL

    def generate(self, request, deadline):
        delay = float(self.block.get("delay") or 0)
        if delay:
            self._pretend_to_work(delay, deadline)
        if self.block.get("gate"):
            self._wait_for_gate(self.block["gate"], deadline)
        if self.block.get("fail"):
            raise ImagenError("%s: %s" % (self.name, self.block["fail"]))
        data = mock_png(request.prompt, request.seed, request.width, request.height,
                        mock_input_key(request))
        return Result(data, "image/png", self.model_id(), request.seed,
                      steps=request.steps or 1, cost_usd=0.0)

    def _pretend_to_work(self, delay, deadline):
        start = clock.monotonic()
        finish = start + delay
        while clock.monotonic() < finish:
            self._check_canceled()
            percent = int((clock.monotonic() - start) * 100 / delay)
            self.console.progress("mock: working %d%%" % percent, percent, 100)
            if not wait_until(deadline, min(0.05, finish - clock.monotonic())) \
                    and clock.monotonic() >= deadline:
                raise ImagenError("%s: timed out" % self.name)
        self.console.clear()

    def _wait_for_gate(self, path, deadline):
        """Work until the file `gate` names exists: a test releases the job once it has
        seen it in flight, instead of guessing a delay that is long enough."""
        while not os.path.exists(path):
            self._check_canceled()
            self.console.progress("mock: working")
            if not wait_until(deadline, 0.005) and clock.monotonic() >= deadline:
                raise ImagenError("%s: timed out" % self.name)
        self.console.clear()

    _canceled = False

    def cancel(self):
        """Stop pretending (from any thread): the next tick gives up."""
        self._canceled = True

    def _check_canceled(self):
        if self._canceled:
            raise ImagenError("%s: canceled" % self.name)


def mock_input_key(request):
    """What of the input images the mock's pixels depend on: every input's bytes (through
    its sha256) and the strength; empty without inputs, so text-only output is unchanged."""
    if not request.images:
        return ""
    return "\x00".join([image.sha256 for image in request.images] + [repr(request.strength)])


def mock_png(prompt, seed, width, height, inputs=""):
    """Same inputs, same pixels: a smooth gradient through a 256-colour cyclic palette,
    its slopes, phases and colours drawn from a hash of prompt, seed, size and `inputs`
    (mock_input_key: the input images).

    Built for speed, not small files: one row of palette indexes goes through a per-row
    lookup table (C-speed `bytes.translate`), a row equal to the one above is stored with
    PNG's Up filter as zeros, and deflate runs at level 1 over one byte per pixel."""
    import zlib
    key = ("%s\x00%d\x00%dx%d" % (prompt, seed, width, height)).encode("utf-8")
    if inputs:
        key += b"\x00" + inputs.encode("utf-8")
    words = [zlib.crc32(key, salt) for salt in range(8)]
    # one period of a triangle wave (0..255..0) over 256 steps, so colours wrap seamlessly
    wave = [min(v, 255 - v) * 2 for v in range(256)]
    palette = bytes(wave[(i * (1 + words[c] % 2) + words[3 + c]) & 0xFF]
                    for i in range(256) for c in range(3))
    step_x, step_y, start_y = 1 + words[6] % 2, 1 + words[6] // 2 % 3, words[7] & 0xFF
    row = bytes(x * 256 * step_x // width & 0xFF for x in range(width))
    indexes = bytes(range(256)) * 2        # every shift of the palette is one slice
    same_as_above = b"\x02" + bytes(width)

    def scanlines():
        previous = None
        for y in range(height):
            # 64 bands per period, so most rows repeat the one above
            shift = (4 * (y * step_y * 64 // height) + start_y) & 0xFF
            if shift == previous:
                yield same_as_above
            else:
                previous = shift
                yield b"\x00" + row.translate(indexes[shift:shift + 256])

    return encode_png(width, height, scanlines(), level=1, palette=palette)


# ===== Adapter: comfyui =====
# A ComfyUI server, e.g. FLUX-schnell on the user's own GPU host (APIS.md §1). Open the
# WebSocket first, then submit the workflow with our client id (without it the socket
# gets no execution messages); follow progress on the socket, or poll /history when it
# cannot be opened; read the image through /history + /view. Whenever the queue changes
# (and on a quiet socket), check that our prompt is still queued: one someone else removed
# (the web UI's Cancel or Clear Queue) is in neither /queue nor /history, and waiting for it
# would last until the timeout. Cancel uses POST /api/jobs/{id}/cancel where the server
# has it (ComfyUI 0.33+); older ones get our prompt removed from the queue, and interrupted
# only if it is the one running.

COMFYUI_CHECKPOINT = "flux1-schnell-fp8.safetensors"
COMFYUI_PLACEHOLDERS = ("prompt", "negative", "seed", "steps", "width", "height",
                        "filename_prefix", "strength", "image") + tuple(
                            "image%d" % n for n in range(1, MAX_INPUT_IMAGES + 1))
COMFYUI_FILENAME_PREFIX = "imagen"
COMFYUI_DEFAULT_STEPS = 20         # KSampler's own default, for workflows of your own
COMFYUI_PROBE_SECONDS = 2.0        # per host, when choosing among several
COMFYUI_CANCEL_SECONDS = 1.0       # cancel is quick or it gives up: the user is waiting
COMFYUI_SILENCE_SECONDS = 5.0      # socket silent this long: ask /history if we missed the end
COMFYUI_HELLO_SECONDS = 2.0        # wait this long at most for the socket's first `status`
COMFYUI_POLL_FIRST, COMFYUI_POLL_GROWTH, COMFYUI_POLL_MAX = 0.05, 1.3, 0.5
COMFYUI_READ_RETRY = RetryPolicy(attempts=4, transport="all", base=0.2, cap=2.0)


def flux_schnell_workflow(checkpoint):
    """The official FLUX-schnell UI template in API format: 4 steps, cfg 1, euler/simple.
    The negative text stays empty as in the template: with cfg 1 it has no effect."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptySD3LatentImage",
              "inputs": {"width": "{{width}}", "height": "{{height}}", "batch_size": 1}},
        "3": {"class_type": "KSampler",
              "inputs": {"seed": "{{seed}}", "steps": "{{steps}}", "cfg": 1.0,
                         "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                         "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                         "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage",
              "inputs": {"filename_prefix": "{{filename_prefix}}", "images": ["8", 0]}},
    }


def flux_schnell_img2img_workflow(checkpoint):
    """FLUX-schnell from a start image: LoadImage, scaled to the size asked for, encoded
    by the VAE as the sampler's latent; {{strength}} is the sampler's denoise."""
    workflow = flux_schnell_workflow(checkpoint)
    del workflow["5"]
    workflow.update({
        "10": {"class_type": "LoadImage", "inputs": {"image": "{{image}}"}},
        "11": {"class_type": "ImageScale",
               "inputs": {"image": ["10", 0], "upscale_method": "lanczos", "width": "{{width}}",
                          "height": "{{height}}", "crop": "center"}},
        "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}},
    })
    workflow["3"]["inputs"].update(denoise="{{strength}}", latent_image=["12", 0])
    return workflow


# name -> (build(checkpoint), default steps)
COMFYUI_WORKFLOWS = {"flux-schnell": (flux_schnell_workflow, 4),
                     "flux-schnell-img2img": (flux_schnell_img2img_workflow, 4)}
COMFYUI_EDIT_WORKFLOWS = {"flux-schnell": "flux-schnell-img2img"}   # the built-in pairs
COMFYUI_DEFAULT_STRENGTH = 0.75    # denoise of an image-input workflow without --strength


def fill_placeholders(value, values):
    """The workflow with every string that is exactly `{{name}}` replaced by the typed
    value (numbers stay numbers); any other text is left as written."""
    if isinstance(value, str):
        if value.startswith("{{") and value.endswith("}}") and value[2:-2] in values:
            return values[value[2:-2]]
        return value
    if isinstance(value, dict):
        return {key: fill_placeholders(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(item, values) for item in value]
    return value


def placeholders_in(value):
    """The set of `{{name}}` strings a workflow uses."""
    if isinstance(value, str):
        return {value[2:-2]} if value.startswith("{{") and value.endswith("}}") else set()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    found = set()
    for item in items:
        found |= placeholders_in(item)
    return found


def comfyui_urls(block):
    urls = block.get("url") or []
    return [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]


def _is_http_urls(value):
    problem = _is_str_or_list(value)
    if problem:
        return problem
    for url in [value] if isinstance(value, str) else value:
        if not url.startswith(("http://", "https://")) or not url.split("://", 1)[1]:
            return "must be an http:// or https:// URL (got %r)" % url
        if bad_port(url):
            return bad_port(url)
    return None


def _is_node_id(value):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return "must be a node id of the workflow, like \"9\""
    return None


def one_line(text):
    return " ".join(text.split())


def format_comfyui_rejection(body):
    """A 400 from POST /prompt in the server's words, naming each node and input."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        parts = [str(error.get("message") or error.get("type") or "rejected")]
        if error.get("details"):
            parts[0] += " (%s)" % error["details"]
    else:
        parts = [str(error or "rejected")]
    node_errors = body.get("node_errors") if isinstance(body, dict) else None
    for node, info in sorted((node_errors or {}).items()) if isinstance(node_errors, dict) else ():
        info = info if isinstance(info, dict) else {}
        errors = info.get("errors") if isinstance(info.get("errors"), list) else None
        for item in errors or [{}]:
            item = item if isinstance(item, dict) else {"message": str(item)}
            extra = item.get("extra_info") if isinstance(item.get("extra_info"), dict) else {}
            where = "node %s (%s)" % (node, info.get("class_type") or "?")
            if extra.get("input_name"):
                where += " input %s" % extra["input_name"]
            text = str(item.get("message") or item.get("type") or "invalid")
            if item.get("details"):
                text += ": %s" % item["details"]
            parts.append("%s: %s" % (where, text))
    return one_line("; ".join(parts))


def image_slots(workflow):
    """How many input images a workflow takes: {{image}} is the first, {{imageN}} the Nth."""
    used = placeholders_in(workflow)
    slots = [n for n in range(1, MAX_INPUT_IMAGES + 1) if "image%d" % n in used]
    return max(slots + [1 if "image" in used else 0])


def missing_input_images(body, workflow):
    """(node ids, image names) of the LoadImage nodes a 400 says name no image the server
    has (`custom_validation_failed`, "Invalid image file"), or None."""
    node_errors = body.get("node_errors") if isinstance(body, dict) else None
    nodes, names = [], []
    for node, info in sorted(node_errors.items()) if isinstance(node_errors, dict) else ():
        errors = _dig(info, "errors")
        for item in errors if isinstance(errors, list) else ():
            if isinstance(item, dict) and item.get("type") == "custom_validation_failed" \
                    and "Invalid image file" in str(item.get("details") or item.get("message")):
                nodes.append(str(node))
                names.append(repr(_dig(workflow, str(node), "inputs", "image")))
    return (", ".join(nodes), names) if nodes else None


def socket_url(host, client_id):
    """ws:// (or wss://) URL of a server's progress socket for our client id."""
    return "ws" + host[4:] + "/ws?clientId=" + client_id


def _counts(done, total):
    """(done, total) when a server sent two numbers a progress bar can use, else ()."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (done, total))
    return (done, total) if numbers and total > 0 else ()


def queue_place(queue, prompt_id):
    """From a GET /queue answer: ("running", 0), ("pending", prompts ahead of it), or
    None when the prompt is in neither list (or the answer is not ComfyUI's)."""
    if not isinstance(queue, dict):
        return None
    lists = [[e for e in queue[key] if isinstance(e, list) and len(e) > 1]
             if isinstance(queue.get(key), list) else []
             for key in ("queue_running", "queue_pending")]
    if any(e[1] == prompt_id for e in lists[0]):
        return "running", 0
    ours = [e for e in lists[1] if e[1] == prompt_id]
    if not ours:
        return None
    ahead = len(lists[0]) + sum(1 for e in lists[1] if _number(e) < _number(ours[0]))
    return "pending", ahead


def _number(entry):
    return entry[0] if isinstance(entry[0], (int, float)) else 0


def _dig(value, *keys):
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


class _HostDown(ImagenError):
    """The host refused the connection (or has no address): try the next one."""


class ComfyUISession:
    """What the jobs a batch runs one after another on one ComfyUI host keep between
    them: the keep-alive HTTP connection, and the progress WebSocket with the client id
    ComfyUI routes our prompts' messages by (our prompt id tells ours apart). Opening both
    again was most of the time a host stood idle between two jobs. One job at a time."""

    def __init__(self, host):
        self.host = host
        self.http = HttpClient(timeout=30.0)
        self.client_id = new_uuid()
        self.socket = None          # open and idle between two jobs, else None

    def take_socket(self, host):
        socket, self.socket = self.socket, None
        if socket is not None and (host != self.host or socket.closed):
            socket.close()
            socket = None
        return socket

    def close(self):
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        self.http.close()


class ComfyUIAdapter(Adapter):
    """A ComfyUI server or several (the least-loaded healthy one runs each image)."""

    NAME = "comfyui"
    OPTIONS = {"url": _is_http_urls, "workflow": _is_str, "output_node": _is_node_id,
               "edit_workflow": _is_str}
    REQUIRED = ("url",)
    PROBED = True
    MAX_CONCURRENCY = 1     # a GPU runs one job at a time; ComfyUI queues the rest
    TAKES_IMAGES, MAX_IMAGES, SIZE_MULTIPLE = True, MAX_INPUT_IMAGES, 16

    def __init__(self, name, block, env, console):
        super().__init__(name, block, env, console)
        self.urls = comfyui_urls(block)
        self.http = HttpClient(timeout=30.0)
        self.workflow_name = block.get("workflow") or "flux-schnell"
        self.builtin = self.workflow_name in COMFYUI_WORKFLOWS
        self._default_steps = COMFYUI_WORKFLOWS[self.workflow_name][1] if self.builtin \
            else COMFYUI_DEFAULT_STEPS
        self._workflow = None          # the loaded template, placeholders still in it
        self._job = None               # (host, prompt_id) while ours may be queued or running
        self._running = False          # has ours started? (then the queue is not shown)
        self._queue_changed = False    # a `status` came: is ours still queued?
        self._jobs_route = {}          # host -> has it /api/jobs? (unknown until asked)
        self._negative_noted = False
        self._edit = None              # the image-input workflow, once loaded
        self._uploaded = {}            # (host, sha256) -> the name LoadImage knows it by
        self._session = None           # a batch's ComfyUISession of the host this job runs on

    def use_session(self, session):
        """Run on the session's connections (a batch job on the session's host)."""
        self._session = session
        self.http = session.http

    @classmethod
    def status(cls, block, env):
        return True, ", ".join(redact_url(url) for url in comfyui_urls(block))

    def probe_hosts(self, seconds):
        """GET /system_stats of each host: reachable when it answers as ComfyUI does."""
        hosts = []
        for url in self.urls:
            where = redact_url(url)
            try:
                response = self.http.request("GET", url + "/system_stats", retry=NO_RETRY,
                                             deadline=clock.monotonic() + seconds,
                                             timeout=seconds, context=where)
            except ImagenError as exc:
                hosts.append({"url": where, "reachable": False, "detail": exc.message})
                continue
            version = _dig(response.json() if response.status == 200 else None,
                           "system", "comfyui_version")
            if isinstance(version, str):
                detail = "%s (ComfyUI %s)" % (where, version)
            else:
                detail = "%s: not a ComfyUI server (GET /system_stats: HTTP %d)" % (
                    where, response.status)
            hosts.append({"url": where, "reachable": isinstance(version, str), "detail": detail})
        self.http.close()
        return hosts

    def model_id(self):
        if self.builtin:
            return self.block.get("model") or COMFYUI_CHECKPOINT
        return self.block.get("model") or "workflow:%s" % os.path.basename(self.workflow_name)

    # ----- the workflow -----

    def check_ready(self):
        if self._workflow is None:
            self._workflow = self._load_workflow()

    def _load_workflow(self, name=None):
        name = name or self.workflow_name
        if name in COMFYUI_WORKFLOWS:
            build = COMFYUI_WORKFLOWS[name][0]
            workflow = build(self.block.get("model") or COMFYUI_CHECKPOINT)
        else:
            workflow = self._read_workflow_file(name)
        node = self.block.get("output_node")
        if node is not None and str(node) not in workflow:
            raise usage_error("%s: output_node %s is not a node of the workflow (nodes: %s)"
                              % (self.name, node, ", ".join(workflow)))
        unknown = placeholders_in(workflow) - set(COMFYUI_PLACEHOLDERS)
        if unknown:
            self.console.warn("%s: workflow placeholders left as written (unknown): %s" % (
                self.name, ", ".join("{{%s}}" % u for u in sorted(unknown))))
        if "seed" not in placeholders_in(workflow):
            self.console.warn("%s: the workflow has no {{seed}}: the seed recorded is not "
                              "the one it uses" % self.name)
        return workflow

    def _read_workflow_file(self, name):
        import json
        path = expand_home(name, _home(self.env))
        try:
            workflow = json.loads(read_capped(path, MAX_WORKFLOW_BYTES))
        except OSError as exc:
            raise usage_error("%s: workflow %s: %s (built-in workflows: %s)" % (
                self.name, name, exc.strerror or exc, ", ".join(COMFYUI_WORKFLOWS))) from None
        except JSON_ERRORS as exc:
            raise usage_error("%s: workflow %s is not JSON: %s" % (self.name, name, exc)) from None
        if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
            raise usage_error("%s: workflow %s is in ComfyUI's UI format; export it in API "
                              "format (Workflow > Export (API))" % (self.name, name))
        if not isinstance(workflow, dict) or not workflow or not all(
                isinstance(node, dict) and "class_type" in node for node in workflow.values()):
            raise usage_error("%s: workflow %s is not in API format (an object of node id -> "
                              "{class_type, inputs})" % (self.name, name))
        return workflow

    def _fill(self, request):
        if request.images:
            return self._fill_edit(request)
        if image_slots(self._workflow):
            raise usage_error("%s: the workflow %s needs an input image (--image FILE)"
                              % (self.name, self.workflow_name))
        return self._fill_workflow(self._workflow, self.builtin, request)

    def _fill_workflow(self, template, builtin, request, extra=None):
        steps = request.steps or self._default_steps
        width, height = request.width, request.height
        if builtin:
            # FLUX works on 16-pixel patches; the size read back from the image is recorded
            width, height = max(16, (width + 8) // 16 * 16), max(16, (height + 8) // 16 * 16)
        values = {"prompt": request.prompt, "negative": request.negative, "seed": request.seed,
                  "steps": steps, "width": width, "height": height,
                  "filename_prefix": COMFYUI_FILENAME_PREFIX}
        values.update(extra or {})
        # steps the workflow does not take from us are not ours to record
        return fill_placeholders(template, values), \
            (steps if "steps" in placeholders_in(template) else None)

    def _note_negative(self, request):
        if request.negative and self.builtin and not self._negative_noted:
            self._negative_noted = True
            self.console.warn("%s: note: FLUX ignores the negative prompt (cfg 1); it is "
                              "recorded but has no effect" % self.name)

    # ----- one image -----

    def generate(self, request, deadline):
        self.check_ready()
        self._note_negative(request)
        workflow, steps = self._fill(request)
        client_id = self._session.client_id if self._session is not None else new_uuid()
        self._running = self._queue_changed = False
        host, prompt_id, socket = self._submit(workflow, client_id, deadline, request.images)
        if socket is not None:      # closed there, or kept for the session's next job
            entry = self._wait_on_socket(socket, host, prompt_id, client_id, workflow, deadline)
        else:
            entry = self._wait_polling(host, prompt_id, deadline)
        self._job = None                 # it ended: nothing left to cancel
        self._raise_if_failed(entry, workflow)
        node, image = self._pick_image(entry, workflow)
        data, mime_type = self._download(host, image, deadline)
        meta = {"host": redact_url(host), "prompt_id": prompt_id, "client_id": client_id,
                "output_node": node, "filename": image.get("filename"),
                "subfolder": image.get("subfolder") or "",
                "wait": "websocket" if socket is not None else "polling"}
        return Result(data, mime_type, self.model_id(), request.seed, steps=steps,
                      cost_usd=0.0, meta=meta)

    def cancel(self):
        """Cancel our prompt: POST /api/jobs/{id}/cancel drops it when pending and interrupts
        it when running, with no race. Older servers lack that route: remove it from the
        queue, and interrupt it only if it is the one running."""
        job, self._job = self._job, None
        if job is None:
            return
        host, prompt_id = job
        client = HttpClient(timeout=COMFYUI_CANCEL_SECONDS)
        deadline = clock.monotonic() + COMFYUI_CANCEL_SECONDS
        try:
            if self._jobs_route.get(host) is False or self._post(
                    client, host, "/api/jobs/%s/cancel" % prompt_id, {}, deadline,
                    absent=(404, 405)) != 200:
                self._post(client, host, "/queue", {"delete": [prompt_id]}, deadline)
                if self._is_running(client, host, prompt_id, deadline) is not False:
                    self._post(client, host, "/interrupt", {"prompt_id": prompt_id}, deadline)
        except ImagenError as exc:
            self.console.warn("%s: could not cancel prompt %s: %s" % (self.name, prompt_id, exc.message))
        finally:
            client.close()

    # ----- submit, on the least-loaded healthy host -----

    def _submit(self, workflow, client_id, deadline, images=()):
        """(host, prompt_id, WebSocket or None) of the submitted prompt; input images are
        uploaded to the host that runs it."""
        problems = []
        for host in self._hosts_by_load(deadline):
            try:
                socket = self._session and self._session.take_socket(host) or \
                    self._open_socket(host, client_id, deadline)
            except _HostDown as exc:
                problems.append(exc.message)
                continue
            try:
                if images:
                    workflow = self._with_uploads(workflow, host, images, deadline)
                prompt_id = self._post_prompt(host, workflow, client_id, deadline)
            except BaseException:
                if socket is not None:
                    socket.close()
                raise
            return host, prompt_id, socket
        if len(problems) == 1:
            raise ImagenError("%s: %s" % (self.name, problems[0]))
        raise ImagenError("%s: no ComfyUI host is reachable: %s" % (self.name, "; ".join(problems)))

    def _hosts_by_load(self, deadline):
        """Healthy hosts, shortest queue first (listed order breaks ties). One host is
        not probed: submitting to it says all there is to know."""
        if len(self.urls) == 1:
            return self.urls
        loads, problems = [], []
        for index, host in enumerate(self.urls):
            probe_deadline = min(deadline, clock.monotonic() + COMFYUI_PROBE_SECONDS)
            try:
                response = self.http.request("GET", host + "/prompt", deadline=probe_deadline,
                                             retry=NO_RETRY, context=redact_url(host))
            except ImagenError as exc:
                problems.append(exc.message)
                continue
            info = response.json() if response.status == 200 else None
            queue = _dig(info, "exec_info", "queue_remaining")
            if isinstance(queue, bool) or not isinstance(queue, int):
                problems.append("%s: not a ComfyUI server (GET /prompt: HTTP %d)"
                                % (redact_url(host), response.status))
                continue
            loads.append((queue, index, host))
        if not loads:
            raise ImagenError("%s: no healthy ComfyUI host: %s" % (self.name, "; ".join(problems)))
        return [host for _, _, host in sorted(loads)]

    def _open_socket(self, host, client_id, deadline):
        """The progress WebSocket, or None when it cannot be opened (then we poll).
        A host that refuses the connection is down: _HostDown. ComfyUI registers the
        socket under our client id just before it sends its first `status`: waiting for
        that message means no execution message of a fast prompt can go astray."""
        try:
            socket = WebSocket.connect(socket_url(host, client_id),
                                       timeout=max(0.1, min(10.0, deadline - clock.monotonic())))
        except WebSocketError as exc:
            if "connection refused" in exc.message or "cannot resolve host" in exc.message:
                raise _HostDown("%s: %s" % (redact_url(host), exc.message.rsplit(": ", 1)[-1]))
            return None
        try:
            socket.recv(timeout=max(0.0, min(COMFYUI_HELLO_SECONDS, deadline - clock.monotonic())))
        except WebSocketError:
            socket.close()
            return None
        return socket

    def _post_prompt(self, host, workflow, client_id, deadline):
        if clock.monotonic() >= deadline:
            raise ImagenError("%s: %s: timed out" % (self.name, redact_url(host)))
        prompt_id = new_uuid()
        body = to_json({"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id})
        self._job = (host, prompt_id)   # before sending: a Ctrl-C during the POST cancels it
        response = self.http.request(
            "POST", host + "/prompt", body=body.encode("utf-8"), deadline=deadline,
            headers={"Content-Type": "application/json"}, retry=NO_RETRY,
            context="%s: %s" % (self.name, redact_url(host)))
        data = response.json()
        if response.status == 400 and isinstance(data, dict):
            self._job = None
            missing = missing_input_images(data, workflow)
            if missing:
                raise ImagenError("%s: ComfyUI on %s has no input image %s: its LoadImage "
                                  "node %s says \"Invalid image file\" (upload it, or name an "
                                  "image the server has)" % (self.name, redact_url(host),
                                                              ", ".join(missing[1]), missing[0]))
            raise ImagenError("%s: ComfyUI rejected the workflow: %s" % (
                self.name, format_comfyui_rejection(data)))
        if response.status != 200 or not isinstance(data, dict):
            self._job = None
            raise ImagenError("%s: %s/prompt: HTTP %d: %s" % (
                self.name, redact_url(host), response.status, one_line(response.text()) or "no body"))
        answered = data.get("prompt_id")      # ComfyUI echoes ours; a stranger may not
        self._job = (host, answered if isinstance(answered, str) and answered else prompt_id)
        return self._job[1]

    # ----- wait -----

    def _wait_on_socket(self, socket, host, prompt_id, client_id, workflow, deadline):
        """Follow the prompt on the WebSocket until `executing` with node null and our
        prompt id; returns its /history entry. A dropped socket is reopened once with the
        same client id (then /history tells whether we missed the end), else we poll."""
        reconnected = False
        quiet_since = clock.monotonic()
        try:
            while True:
                remaining = deadline - clock.monotonic()
                if remaining <= 0:
                    raise self._timed_out(host, prompt_id)
                try:
                    message = socket.recv(timeout=min(remaining, 0.5))
                except WebSocketError:
                    socket.close()
                    if reconnected:
                        return self._wait_polling(host, prompt_id, deadline)
                    reconnected = True
                    try:
                        socket = WebSocket.connect(socket_url(host, client_id),
                                                   timeout=max(0.1, min(5.0, remaining)))
                    except WebSocketError:
                        return self._wait_polling(host, prompt_id, deadline)
                    message = None
                    quiet_since = 0.0      # ask /history now: the end may have been missed
                if message is None:
                    if clock.monotonic() - quiet_since >= COMFYUI_SILENCE_SECONDS:
                        quiet_since = clock.monotonic()
                        entry = self._history_entry(host, prompt_id, deadline)
                        if entry is not None:
                            socket = self._keep_socket(socket)
                            return entry
                        self._raise_if_removed(host, prompt_id, deadline)
                    continue
                quiet_since = clock.monotonic()
                if message[0] == WS_TEXT and self._on_event(message[1], host, prompt_id, workflow):
                    entry = self._final_entry(host, prompt_id, deadline)
                    socket = self._keep_socket(socket)
                    return entry
                # binary frames carry previews: skipped
                if self._queue_changed and not self._running:
                    self._queue_changed = False
                    self._raise_if_removed(host, prompt_id, deadline)
        finally:
            if socket is not None:
                socket.close()

    def _keep_socket(self, socket):
        """Our prompt has ended: a batch keeps the socket open for the host's next job
        (None), else it is closed (the socket, to close)."""
        if self._session is None:
            return socket
        self._session.socket = socket
        return None

    def _on_event(self, text, host, prompt_id, workflow):
        """Show progress; True when our prompt has ended. Messages without a prompt_id
        (`status` broadcasts, the `executing` replayed after a reconnect) never end it."""
        import json
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            return False
        kind = event.get("type") if isinstance(event, dict) else None
        data = event.get("data") if isinstance(event, dict) else None
        if not isinstance(data, dict):
            return False
        if kind == "status":
            self._queue_changed = True
            if self.console.watched and not self._running:
                self._show_queue(host, prompt_id)
            return False
        if data.get("prompt_id") != prompt_id:
            if kind == "executing" and data.get("node") is not None and "prompt_id" not in data:
                self._show_node(workflow, data["node"])
            return False
        self._running = True
        if kind == "executing":
            if data.get("node") is None:
                return True
            self._show_node(workflow, data["node"])
        elif kind == "progress":
            self._show_node(workflow, data.get("node"), " step %s/%s" % (
                data.get("value"), data.get("max")), data.get("value"), data.get("max"))
        elif kind == "execution_start":
            self.console.progress("%s: running" % self.name)
        elif kind == "execution_cached" and isinstance(data.get("nodes"), list) \
                and len(data["nodes"]) == len(workflow):
            self.console.progress("%s: cached on the server" % self.name)
        return False

    def _show_node(self, workflow, node, suffix="", done=None, total=None):
        info = workflow.get(str(node)) if node is not None else None
        kind = info.get("class_type") if isinstance(info, dict) else "node"
        self.console.progress("%s: %s (node %s)%s" % (self.name, kind, node, suffix),
                              *_counts(done, total))

    def _show_queue(self, host, prompt_id):
        """`queued, N ahead` or `running`, from GET /queue (only when someone is watching)."""
        try:
            response = self.http.request("GET", host + "/queue", retry=NO_RETRY, timeout=2.0)
        except ImagenError:
            return
        place = queue_place(response.json(), prompt_id) if response.status == 200 else None
        if place and place[0] == "running":
            self.console.progress("%s: running" % self.name)
        elif place:
            self.console.progress("%s: queued, %d ahead" % (self.name, place[1]))

    def _wait_polling(self, host, prompt_id, deadline):
        """GET /history/{id} at a short, growing interval until the prompt has ended.
        It answers {} while the prompt is queued or running: that is "not yet"."""
        interval = COMFYUI_POLL_FIRST
        while True:
            entry = self._history_entry(host, prompt_id, deadline)
            if entry is not None:
                return entry
            self._raise_if_removed(host, prompt_id, deadline)
            if self.console.live:
                self._show_queue(host, prompt_id)
            if not wait_until(deadline, interval):
                raise self._timed_out(host, prompt_id)
            interval = min(interval * COMFYUI_POLL_GROWTH, COMFYUI_POLL_MAX)

    def _final_entry(self, host, prompt_id, deadline):
        """The history entry right after the end message (ComfyUI writes it first; a
        proxy or another version may lag, so give it until the deadline)."""
        entry = self._history_entry(host, prompt_id, deadline)
        return entry if entry is not None else self._wait_polling(host, prompt_id, deadline)

    def _history_entry(self, host, prompt_id, deadline):
        """The /history entry of an ended prompt, or None while it is not there yet."""
        entry = self._history_record(host, prompt_id, deadline)
        if entry is None:
            return None
        status = entry.get("status")
        if isinstance(status, dict) and not status.get("completed") \
                and status.get("status_str") not in ("success", "error"):
            return None
        return entry

    def _history_record(self, host, prompt_id, deadline):
        """Whatever /history holds for the prompt (ended or not), or None."""
        response = self.http.request("GET", "%s/history/%s" % (host, prompt_id),
                                     deadline=deadline, retry=COMFYUI_READ_RETRY,
                                     context="%s: %s" % (self.name, redact_url(host)))
        if response.status != 200:
            raise ImagenError("%s: %s/history: HTTP %d: %s" % (
                self.name, redact_url(host), response.status, one_line(response.text())))
        data = response.json()
        entry = data.get(prompt_id) if isinstance(data, dict) else None
        return entry if isinstance(entry, dict) else None

    def _raise_if_removed(self, host, prompt_id, deadline):
        """Raise at once when our prompt is in neither the queue nor the history: someone
        else removed it (the web UI's Cancel or Clear Queue). /api/jobs/{id} answers in
        one request where the server has it; its 404 (also what a server older than 0.33
        answers) is checked with /queue, then /history, read in that order so a prompt
        ending meanwhile is never taken for a removed one."""
        status = self._job_status(host, prompt_id, deadline)
        if status not in (None, "unknown"):
            return                          # the server knows it: queued, running or ended
        place = self._queue_place(self.http, host, prompt_id, deadline)
        if place is None:
            return                          # cannot tell: keep waiting
        if place == "absent" and self._history_record(host, prompt_id, deadline) is None:
            raise self._removed(host, prompt_id)
        if status == "unknown":             # a 404 for a prompt it holds: an older server
            self._jobs_route.setdefault(host, False)

    def _job_status(self, host, prompt_id, deadline):
        """Our prompt's status from GET /api/jobs/{id}: pending, in_progress, completed,
        failed or cancelled; "unknown" on a 404 (a removed prompt, or a server older than
        0.33 without the route); None when the answer says nothing."""
        if self._jobs_route.get(host) is False:
            return None
        try:
            response = self.http.request("GET", "%s/api/jobs/%s" % (host, prompt_id),
                                         deadline=deadline, retry=NO_RETRY)
        except ImagenError:
            return None
        if response.status == 404:
            return "unknown"
        status = _dig(response.json(), "status") if response.status == 200 else None
        if not isinstance(status, str):
            return None
        self._jobs_route[host] = True
        return status

    def _removed(self, host, prompt_id):
        self._job = None                # nothing of ours is left to cancel
        return ImagenError("%s: prompt %s was removed from the ComfyUI queue on %s before it ran"
                           % (self.name, prompt_id, redact_url(host)))

    def _timed_out(self, host, prompt_id):
        return ImagenError("%s: timed out waiting for prompt %s on %s"
                           % (self.name, prompt_id, redact_url(host)))

    # ----- result -----

    def _raise_if_failed(self, entry, workflow):
        status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
        if status.get("status_str") != "error":
            return
        messages = status.get("messages") if isinstance(status.get("messages"), list) else []
        for kind, data in [m for m in messages if isinstance(m, list) and len(m) == 2]:
            data = data if isinstance(data, dict) else {}
            node = "node %s (%s)" % (data.get("node_id"), data.get("node_type")
                                     or _dig(workflow, str(data.get("node_id")), "class_type"))
            if kind == "execution_error":
                message = one_line(str(data.get("exception_message") or "failed"))
                if data.get("exception_type"):
                    message = "%s: %s" % (data["exception_type"], message)
                raise ImagenError("%s: ComfyUI failed at %s: %s" % (self.name, node, message))
            if kind == "execution_interrupted":
                raise ImagenError("%s: the prompt was interrupted on the server at %s"
                                  % (self.name, node))
        raise ImagenError("%s: ComfyUI reports an error without details" % self.name)

    def _pick_image(self, entry, workflow):
        """(node, image) from `output_node`, else the first SaveImage node, else the first
        node with images, in the workflow's order."""
        outputs = entry.get("outputs") if isinstance(entry.get("outputs"), dict) else {}
        wanted = self.block.get("output_node")
        if wanted is not None:
            candidates = [str(wanted)]
        else:
            candidates = [n for n, info in workflow.items() if info.get("class_type") == "SaveImage"]
            candidates = candidates or [n for n in workflow if n in outputs]
        for node in candidates:
            images = _dig(outputs, node, "images")
            if isinstance(images, list) and images and isinstance(images[0], dict) \
                    and isinstance(images[0].get("filename"), str) \
                    and all(isinstance(images[0].get(key), (str, type(None)))
                            for key in ("subfolder", "type")):
                return node, images[0]
        raise ImagenError("%s: no image in the outputs of node %s (nodes with outputs: %s)" % (
            self.name, " or ".join(candidates) or "?", ", ".join(outputs) or "none"))

    def _download(self, host, image, deadline):
        """The image bytes from /view. The server's filename only travels back to the
        server: it never becomes a local path."""
        from urllib.parse import urlencode
        query = urlencode({"filename": image["filename"], "subfolder": image.get("subfolder") or "",
                           "type": image.get("type") or "output"})
        response = self.http.request("GET", "%s/view?%s" % (host, query), deadline=deadline,
                                     retry=COMFYUI_READ_RETRY,
                                     context="%s: %s" % (self.name, redact_url(host)))
        if response.status == 404:
            raise ImagenError("%s: the server has no file %r (GET /view: 404)"
                              % (self.name, image["filename"]))
        if response.status != 200:
            raise ImagenError("%s: GET /view: HTTP %d: %s" % (
                self.name, response.status, one_line(response.text()) or "no body"))
        try:
            mime_type = image_info(response.body)[0]
        except ImagenError:
            raise ImagenError("%s: /view returned something that is not an image (%s, %d bytes)"
                              % (self.name, response.header("content-type", "no type"),
                                 len(response.body))) from None
        return response.body, mime_type

    # ----- image input -----

    def _edit_workflow_name(self):
        """The workflow that takes input images: edit_workflow, else the built-in partner
        of a built-in workflow, else the workflow itself."""
        return self.block.get("edit_workflow") or COMFYUI_EDIT_WORKFLOWS.get(
            self.workflow_name, self.workflow_name)

    def _edit_template(self):
        if self._edit is None:
            name = self._edit_workflow_name()
            self._edit = self._load_workflow(name)
        return self._edit

    def max_images(self):
        slots = image_slots(self._edit_template())
        if not slots:
            raise usage_error("%s: its workflow %s takes no input image (no {{image}} "
                              "placeholder); name one that does with edit_workflow"
                              % (self.name, self._edit_workflow_name()))
        return slots

    def takes_strength(self):
        return "strength" in placeholders_in(self._edit_template())

    def _fill_edit(self, request):
        name = self._edit_workflow_name()
        wanted = image_slots(self._edit_template())
        if wanted > len(request.images):
            raise usage_error("%s: its workflow %s takes %d input images ({{image%d}}); %d "
                              "given" % (self.name, name, wanted, wanted, len(request.images)))
        strength = COMFYUI_DEFAULT_STRENGTH if request.strength is None else request.strength
        return self._fill_workflow(self._edit_template(), name in COMFYUI_WORKFLOWS, request,
                                   {"strength": strength})

    def _with_uploads(self, workflow, host, images, deadline):
        """The workflow with {{image}}, {{image1}}... naming the inputs as uploaded to
        `host` (each once per host: a later image of the same run reuses it)."""
        names = [self._upload(host, image, deadline) for image in images]
        values = {"image%d" % (n + 1): name for n, name in enumerate(names)}
        values["image"] = names[0]
        return fill_placeholders(workflow, values)

    def _upload(self, host, image, deadline):
        """POST /upload/image (type input, no overwrite): the server keeps one file for
        the same bytes under the same name, and renames other bytes under a taken one.
        A failed upload is exit 1 naming the file and the host."""
        key = (host, image.sha256)
        if key in self._uploaded:
            return self._uploaded[key]
        what = "%s: uploading %s to %s" % (self.name, image.path or "the input image",
                                           redact_url(host))
        content_type, body = multipart_body([
            ("image", (image.upload_name, image.mime_type, image.data)),
            ("type", "input"), ("overwrite", "false")])
        self.console.progress(what)
        response = self.http.request("POST", host + "/upload/image", body=body,
                                     headers={"Content-Type": content_type}, deadline=deadline,
                                     retry=COMFYUI_READ_RETRY, context=what)
        answer = response.json() if response.status == 200 else None
        name = _dig(answer, "name")
        if not isinstance(name, str) or not name:
            raise ImagenError("%s: HTTP %d: %s" % (what, response.status,
                                                   one_line(response.text())[:200] or "no body"))
        subfolder, kind = _dig(answer, "subfolder"), _dig(answer, "type")
        if isinstance(subfolder, str) and subfolder:
            name = "%s/%s" % (subfolder, name)
        if isinstance(kind, str) and kind and kind != "input":
            name = "%s [%s]" % (name, kind)
        self._uploaded[key] = name
        return name

    # ----- cancel helpers -----

    def _post(self, client, host, path, payload, deadline, absent=()):
        """POST JSON; its status, which is 200 or one of `absent` (a route an older
        server lacks)."""
        response = client.request("POST", host + path, body=to_json(payload).encode("utf-8"),
                                  headers={"Content-Type": "application/json"},
                                  deadline=deadline, retry=NO_RETRY,
                                  context="%s%s" % (redact_url(host), path))
        if response.status != 200 and response.status not in absent:
            raise ImagenError("%s%s: HTTP %d" % (redact_url(host), path, response.status))
        return response.status

    def _is_running(self, client, host, prompt_id, deadline):
        """True/False from GET /queue; None when it cannot tell."""
        place = self._queue_place(client, host, prompt_id, deadline)
        return None if place is None else place == "running"

    def _queue_place(self, client, host, prompt_id, deadline):
        """"running", "pending" or "absent" from GET /queue; None when it cannot tell."""
        try:
            response = client.request("GET", host + "/queue", deadline=deadline, retry=NO_RETRY)
        except ImagenError:
            return None
        queue = response.json()
        if response.status != 200 or not all(isinstance(_dig(queue, key), list)
                                              for key in ("queue_running", "queue_pending")):
            return None
        return (queue_place(queue, prompt_id) or ("absent",))[0]


# ===== Adapter: replicate =====
# Models on Replicate's HTTP API (APIS.md §2). One create request with `Prefer: wait`, so
# a fast model finishes in one round trip; past the wait window, poll `urls.get` with a
# growing interval. Outputs are fetched at once (Replicate deletes them after an hour).

REPLICATE_API = "https://api.replicate.com/v1"
REPLICATE_TOKEN_ENV = "REPLICATE_API_TOKEN"
REPLICATE_WAIT = 60                  # seconds a create may be held open (1..60)
REPLICATE_READ_MARGIN = 10.0         # a read timeout must outlast the wait window
REPLICATE_POLL = (0.2, 0.1, 5.0)     # poll interval: at least, share of the age, at most
REPLICATE_MAX_DOWNLOAD = 64 * 1024 * 1024
REPLICATE_FINAL = ("succeeded", "failed", "canceled", "aborted")  # official clients forget aborted

# Prices in USD per output image, as of REPLICATE_PRICES_DATE: flux-schnell and flux-pro
# from Replicate's own pages, the others from third-party listings. Check before trusting.
REPLICATE_PRICES_DATE = "2026-05"
REPLICATE_IMAGE_PRICES = {
    "black-forest-labs/flux-schnell": 0.003,
    "black-forest-labs/flux-dev": 0.025,
    "black-forest-labs/flux-pro": 0.055,
    "black-forest-labs/flux-1.1-pro": 0.04,
    "black-forest-labs/flux-1.1-pro-ultra": 0.06,
    # seen 2026-04 (runflow.io model page dated 2026-04-06; lumenfall.ai lists Replicate's
    # flux-kontext-pro at $0.04): third-party listings, check before trusting
    "black-forest-labs/flux-kontext-pro": 0.04,
    "black-forest-labs/flux-kontext-max": 0.08,
}
# Megapixel-billed models: USD per megapixel, each side rounded up per image, the output
# and every reference image counted apart (at least 1 MP each). flux-2-pro: $0.015/MP,
# seen 2026-04 on lumenfall.ai's table of Replicate prices (a third-party listing).
REPLICATE_MEGAPIXEL_PRICES = {"black-forest-labs/flux-2-pro": 0.015}
REPLICATE_DATA_URI_MAX = 256 * 1024   # larger inputs go through POST /v1/files (APIS.md)
# Time-billed models: USD per second of `metrics.predict_time` on the backend's `hardware`.
REPLICATE_HARDWARE_PRICES = {"cpu": 0.000100, "t4": 0.000225, "a40": 0.000575,
                             "l40s": 0.000975, "a100-80gb": 0.001400, "h100": 0.001525}
# A deployment is billed by its hardware's time: an estimate before the run assumes this
# many seconds per image unless the block says `seconds_per_image`.
REPLICATE_DEPLOYMENT_SECONDS = 10.0
REPLICATE_DEPLOYMENT_LOOKUP = 5.0      # seconds for GET /deployments/{owner}/{name}

FLUX_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")

# What each model family takes. size: "aspect" (aspect_ratio, the real size comes back in
# the image), "custom" (aspect_ratio custom + width/height, multiples of 32 in 256..1440)
# or "exact" (width/height, multiples of 8). steps: (input name, min, max, default).
# batch: the most images one prediction makes (num_outputs). Unknown models are "generic".
# images: (input name, most images) for input images, a list when more than one;
# strength: the input --strength goes to; match_input: aspect_ratio "match_input_image".
REPLICATE_FAMILIES = {
    "flux-schnell": {"size": "aspect", "megapixels": True, "batch": 4,
                     "steps": ("num_inference_steps", 1, 4, 4), "output_format": True},
    "flux-dev": {"size": "aspect", "megapixels": True, "batch": 4,
                 "steps": ("num_inference_steps", 1, 50, 28), "output_format": True,
                 "images": ("image", 1), "strength": "prompt_strength"},
    "flux-kontext": {"size": "aspect", "output_format": True, "images": ("input_image", 1),
                     "match_input": True},
    "flux-2": {"size": "aspect", "output_format": True, "images": ("input_images", 8),
               "match_input": True},
    "flux-pro": {"size": "custom", "steps": ("steps", 1, 50, 25), "output_format": True},
    "flux-1.1-pro": {"size": "custom", "output_format": True, "images": ("image_prompt", 1)},
    "flux-1.1-pro-ultra": {"size": "aspect", "output_format": True},
    "generic": {"size": "exact", "steps": ("num_inference_steps", 1, MAX_STEPS, None),
                "negative": "negative_prompt"},
}


def parse_model_ref(ref):
    """(owner/name, version or None) from `owner/name` or `owner/name:version`."""
    import re
    match = re.match(r"^([\w.-]+/[\w.-]+)(?::([\w.-]+))?$", ref or "")
    if not match:
        raise usage_error("model must be owner/name or owner/name:version (got %r)" % ref)
    return match.group(1), match.group(2)


def model_family(ref, declared=None):
    """The family name of a model: the block's `family`, else from the model's name."""
    if declared:
        return declared
    name = parse_model_ref(ref)[0].split("/", 1)[1]
    # longest first, so flux-1.1-pro-ultra is not taken for flux-1.1-pro
    for family in sorted(REPLICATE_FAMILIES, key=len, reverse=True):
        if family != "generic" and (name == family or name.startswith(family + "-")):
            return family
    return "generic"


def nearest_aspect_ratio(width, height, ratios=FLUX_RATIOS):
    """The allowed ratio closest to W:H on a log scale, so 2:1 and 1:2 are equally far."""
    import math
    target = math.log(width / float(height))

    def distance(ratio):
        w, h = ratio.split(":")
        return abs(target - math.log(float(w) / float(h)))
    return min(ratios, key=distance)


def _fit(value, low, high, multiple):
    return min(high, max(low, int(round(value / float(multiple))) * multiple))


def size_inputs(family, width, height):
    """The model inputs that ask for a WxH image, as close as the family allows."""
    spec = REPLICATE_FAMILIES[family]
    if spec["size"] == "aspect":
        inputs = {"aspect_ratio": nearest_aspect_ratio(width, height)}
        if spec.get("megapixels"):
            # 0.25 MP or 1 MP, whichever is nearer on a log scale (the split is 0.5 MP)
            inputs["megapixels"] = "0.25" if width * height <= 512 * 1024 else "1"
        return inputs
    if spec["size"] == "custom":
        return {"aspect_ratio": "custom", "width": _fit(width, 256, 1440, 32),
                "height": _fit(height, 256, 1440, 32)}
    return {"width": _fit(width, 64, SIZE_MAX, 8), "height": _fit(height, 64, SIZE_MAX, 8)}


def log_percent(logs):
    """The last percentage a progress bar printed in a prediction's logs, or None."""
    import re
    if not isinstance(logs, str):
        return None
    found = re.findall(r"(\d{1,3})%\|", logs)
    return int(found[-1]) if found else None


def predict_time(prediction):
    """Seconds of compute a prediction reports (`metrics.predict_time`), or None."""
    seconds = _dig(prediction, "metrics", "predict_time")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return None
    return seconds


def replicate_retry_after(response):
    """Seconds to wait after a 429: the Retry-After header, else `retry_after` in the body."""
    seconds = retry_after_seconds(response)
    if seconds is None:
        body = response.json()
        value = body.get("retry_after") if isinstance(body, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            seconds = float(value)
    return seconds


# A create is retried only when no prediction can exist: a 429, or a connection that was
# never made. Never after a read timeout: that prediction may be running, and billed.
CREATE_RETRY = RetryPolicy(attempts=5, statuses=frozenset((429,)), transport="connect",
                           retry_after=replicate_retry_after)
READ_RETRY = RetryPolicy(attempts=6, retry_after=replicate_retry_after)
CANCEL_RETRY = RetryPolicy(attempts=3, base=0.2, cap=1.0, retry_after=replicate_retry_after)
LOOKUP_RETRY = RetryPolicy(attempts=2, base=0.2, cap=1.0, transport="none",
                           retry_after=replicate_retry_after)


def decode_data_uri(uri):
    """The bytes of a `data:[type][;base64],payload` URI."""
    import base64
    from urllib.parse import unquote_to_bytes
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImagenError("malformed data: URI")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            raise ImagenError("data: URI is not valid base64") from None
    return unquote_to_bytes(payload)


def url_problem(url):
    """What makes an http(s) URL unfetchable (a bad host or port), or None."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return "is not a valid URL (%s)" % exc
    try:
        parts.port
    except ValueError as exc:
        return "has a bad port (%s)" % exc
    return None if parts.hostname else "has no host"


def _is_url(value):
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return "must be an http:// or https:// URL"
    return bad_port(value)



def _is_deployment_ref(value):
    import re
    if not isinstance(value, str) or not re.match(r"^[\w.-]+/[\w.-]+$", value):
        return "must be owner/name of a Replicate deployment"
    return None


def deployment_hardware(name):
    """The price-table key of a deployment's hardware: "gpu-l40s" -> "l40s"."""
    name = str(name or "").lower()
    return name[4:] if name.startswith("gpu-") else name


def _is_model_ref(value):
    if not isinstance(value, str):
        return "must be a string"
    try:
        parse_model_ref(value)
    except ImagenError as exc:
        return exc.message
    return None


class ReplicateAdapter(Adapter):
    NAME = "replicate"
    MAX_CONCURRENCY = 4
    OPTIONS = {"model": _is_model_ref, "api_token_env": _is_str, "base_url": _is_url,
               "input": _is_mapping,
               "wait": _int_in(1, 60), "max_cost_usd": _non_negative_number,
               "hardware": _one_of(*REPLICATE_HARDWARE_PRICES),
               "family": _one_of(*REPLICATE_FAMILIES),
               "image_field": _is_str, "strength_field": _is_str,
               "max_images": _int_in(1, MAX_INPUT_IMAGES),
               "deployment": _is_deployment_ref, "seconds_per_image": _positive_number}
    REQUIRED = ("model",)
    PAID = True
    TAKES_IMAGES, MAX_IMAGES = True, MAX_INPUT_IMAGES

    def __init__(self, name, block, env, console):
        super().__init__(name, block, env, console)
        self.base_url = (block.get("base_url") or REPLICATE_API).rstrip("/")
        self.ref, self.version = parse_model_ref(block.get("model"))
        self.family = model_family(self.ref, block.get("family"))
        self.http = HttpClient(timeout=30.0, max_body=REPLICATE_MAX_DOWNLOAD)
        self._token = None
        self._warned = set()
        self._running = None     # the prediction in flight, once its id is known
        self._submitting = None  # the input of a create still waiting for its answer
        self._image_values = []  # the inputs as the model takes them: data: URIs or URLs
        self._uploads = []       # ids of files uploaded for them, deleted when done
        self._input_shas = []    # how the record names the inputs
        self._megapixels = None  # (output MP, [input MP]) of a megapixel-billed request
        self._deployment = None  # GET /deployments/{owner}/{name}, once asked

    # ----- readiness, price -----

    @classmethod
    def token_env(cls, block):
        return block.get("api_token_env") or REPLICATE_TOKEN_ENV

    @classmethod
    def status(cls, block, env):
        variable = cls.token_env(block)
        if not (env.get(variable) or "").strip():
            return False, "$%s is not set" % variable
        return True, ""

    def check_ready(self):
        variable = self.token_env(self.block)
        token = (self.env.get(variable) or "").strip()
        if not token:
            raise usage_error("%s: $%s is not set: it must hold your Replicate API token"
                              % (self.name, variable))
        if any(ord(c) <= 32 or ord(c) >= 127 for c in token):
            raise usage_error("%s: $%s holds spaces or control characters; it must hold "
                              "only the token" % (self.name, variable))
        self._token = token

    def secrets(self):
        return (self._token,) if self._token else ()

    def image_price(self):
        if self.block.get("deployment"):
            return None          # billed by its hardware's time, not per image
        per_mp = REPLICATE_MEGAPIXEL_PRICES.get(self.ref)
        if per_mp is not None:
            output, inputs = self._megapixels or (1, [])
            return round(per_mp * (output + sum(inputs)), 6)
        return REPLICATE_IMAGE_PRICES.get(self.ref)

    def price_note(self):
        if self.block.get("deployment"):
            return self.deployment_note()
        per_image = self.image_price()
        if per_image is not None:
            return "$%s per image (prices of %s)" % (per_image, REPLICATE_PRICES_DATE)
        hardware = self.block.get("hardware")
        if hardware:
            return "$%s per second on %s (prices of %s)" % (
                REPLICATE_HARDWARE_PRICES[hardware], hardware, REPLICATE_PRICES_DATE)
        return "price unknown"

    def estimate_cost(self, images):
        if self.block.get("deployment"):
            price = REPLICATE_HARDWARE_PRICES.get(self.hardware())
            seconds = self.block.get("seconds_per_image") or REPLICATE_DEPLOYMENT_SECONDS
            return None if price is None else round(price * seconds * images, 6)
        per_image = self.image_price()
        return None if per_image is None else round(per_image * images, 6)

    # ----- a deployment: dedicated hardware, autoscaled between min and max instances -----

    def deployment_config(self):
        """The current release's configuration {hardware, min_instances, max_instances}
        of the block's deployment, asked once; an ImagenError when it cannot be read."""
        if self._deployment is None:
            if self._token is None:
                self.check_ready()
            url = "%s/deployments/%s" % (self.base_url, self.block["deployment"])
            response = self.http.request("GET", url, headers=self._headers(),
                                         retry=LOOKUP_RETRY, context=self._context(),
                                         deadline=clock.monotonic() + REPLICATE_DEPLOYMENT_LOOKUP,
                                         timeout=REPLICATE_DEPLOYMENT_LOOKUP)
            if response.status != 200:
                raise self._api_error(response, "deployment %s" % self.block["deployment"])
            found = _dig(response.json(), "current_release", "configuration")
            self._deployment = found if isinstance(found, dict) else {}
        return self._deployment

    def hardware(self):
        """The price-table name of the hardware that bills: the block's, else the
        deployment's (asked once), else None."""
        if self.block.get("hardware") or not self.block.get("deployment"):
            return self.block.get("hardware")
        try:
            return deployment_hardware(self.deployment_config().get("hardware"))
        except ImagenError:
            return None

    def batch_concurrency(self):
        """For a deployment: its max_instances (a batch runs that many at once)."""
        if not self.block.get("deployment"):
            return None
        try:
            most = self.deployment_config().get("max_instances")
        except ImagenError as exc:
            self.console.warn("%s: %s" % (self.name, exc.message))
            return None
        return most if isinstance(most, int) and not isinstance(most, bool) and most > 0 else None

    def deployment_note(self):
        name = self.block["deployment"]
        if not (self.env.get(self.token_env(self.block)) or "").strip():
            return "deployment %s" % name
        try:
            info = self.deployment_config()
        except ImagenError as exc:
            return "deployment %s: %s" % (name, exc.message)
        hardware = info.get("hardware")
        price = REPLICATE_HARDWARE_PRICES.get(deployment_hardware(hardware))
        return "deployment %s on %s, %s..%s instances%s" % (
            name, hardware, info.get("min_instances"), info.get("max_instances"),
            ", $%s per second (prices of %s)" % (price, REPLICATE_PRICES_DATE) if price else "")

    def cost_of(self, prediction, images):
        """USD per image of a finished prediction: the price table, else compute time."""
        per_image = self.image_price()
        if per_image is not None:
            return per_image
        seconds = predict_time(prediction)
        hardware = self.hardware()
        if hardware in REPLICATE_HARDWARE_PRICES and seconds is not None and images:
            return round(seconds * REPLICATE_HARDWARE_PRICES[hardware] / images, 8)
        return None

    # ----- generate -----

    def generate(self, request, deadline):
        return next(self.generate_all([request], deadline))

    def generate_all(self, requests, deadline):
        """One prediction per batch: up to `num_outputs` images where the model has it
        (all from the batch's first seed), else one prediction per image. Input images
        are sent once for all of them; files uploaded for them are deleted when the last
        prediction has ended (or by cancel(), after the one in flight is cancelled)."""
        size = REPLICATE_FAMILIES[self.family].get("batch", 1)
        self._image_values, self._input_shas = [], []
        try:
            if requests and requests[0].images:
                self._megapixels = request_megapixels(requests[0])
                self._image_values = self._input_values(requests[0].images, deadline)
            for start in range(0, len(requests), size):
                last = start + size >= len(requests)
                for result in self._run_batch(requests[start:start + size], deadline, last):
                    yield result
        finally:
            if self._running is None and self._submitting is None:
                self._delete_uploads()

    def _run_batch(self, batch, deadline, last=True):
        model_input = self.build_input(batch[0], len(batch))
        try:
            prediction = self._predict(model_input, len(batch), deadline)
        finally:
            if last and self._running is None and self._submitting is None:
                self._delete_uploads()    # it ended: its input files are no longer needed
        outputs = self._outputs(prediction)
        if not outputs:
            removed = " (removed after an hour)" if prediction.get("data_removed") else ""
            raise self._error("prediction %s finished without output%s" % (prediction.get("id"), removed))
        cost = self.cost_of(prediction, len(outputs))
        meta = {"prediction_id": prediction.get("id"), "status": prediction.get("status"),
                "predict_time": predict_time(prediction),
                "input": {k: self._meta_value(k, v) for k, v in model_input.items()
                          if k != "prompt" and not _looks_like_literal_secret(k, "x")}}
        seed, steps = self._seed_and_steps(model_input, batch[0])
        for index, url in enumerate(outputs[:len(batch)]):
            data = self._fetch(url, deadline)
            try:
                mime_type = image_info(data)[0]
            except ImagenError as exc:
                raise self._error("bad image from %s: %s" % (self._where(url), exc.message)) from None
            extra = {"output_index": index} if len(batch) > 1 else {}
            yield Result(data, mime_type, self.model_id(), seed, steps=steps, cost_usd=cost,
                         meta=dict(meta, **extra))
        if len(outputs) < len(batch):
            raise self._error("prediction %s made %d of %d images (Replicate drops images "
                              "its safety filter flags)" % (prediction.get("id"), len(outputs), len(batch)))

    def _seed_and_steps(self, model_input, request):
        """What the model was really given (the block's `input` may override both)."""
        seed = model_input.get("seed")
        spec = REPLICATE_FAMILIES[self.family].get("steps")
        steps = model_input.get(spec[0]) if spec else 0
        return (seed if isinstance(seed, int) else request.seed,
                steps if isinstance(steps, int) else 0)

    def build_input(self, request, images=1):
        """The model's input for a request: mapped per family, the block's `input` last."""
        spec = REPLICATE_FAMILIES[self.family]
        model_input = {"prompt": request.prompt}
        model_input.update(size_inputs(self.family, request.width, request.height))
        if spec.get("steps"):
            key, low, high, default = spec["steps"]
            steps = request.steps or default
            if steps is not None:
                if not low <= steps <= high:
                    steps = min(high, max(low, steps))
                    self._warn_once("steps", "%s takes %d..%d steps; using %d" % (self.ref, low, high, steps))
                model_input[key] = steps
        elif request.steps:
            self._warn_once("steps", "%s has no steps input; --steps is ignored" % self.ref)
        model_input["seed"] = request.seed
        if request.negative:
            if spec.get("negative"):
                model_input[spec["negative"]] = request.negative
            else:
                self._warn_once("negative", "%s has no negative prompt; it is ignored" % self.ref)
        if images > 1:
            model_input["num_outputs"] = images
        if spec.get("output_format"):
            model_input["output_format"] = "png"
        if request.images:
            model_input.update(self._image_inputs(request))
        model_input.update(self.block.get("input") or {})
        return model_input

    # ----- input images -----

    def _image_spec(self):
        """(input name, most images): the block's image_field (and max_images), else the
        family's; (None, 0) for a model that takes no images."""
        if self.block.get("image_field"):
            return self.block["image_field"], int(self.block.get("max_images") or 1)
        return REPLICATE_FAMILIES[self.family].get("images") or (None, 0)

    def _strength_field(self):
        return self.block.get("strength_field") or REPLICATE_FAMILIES[self.family].get("strength")

    def max_images(self):
        return self._image_spec()[1]

    def takes_strength(self):
        return bool(self._strength_field())

    def _image_inputs(self, request):
        field, most = self._image_spec()
        if not self._image_values:      # build_input without generate_all: no uploads
            self._input_shas = [image.sha256 for image in request.images]
            self._image_values = [image_data_uri(image) for image in request.images]
        values = self._image_values
        inputs = {field: values if most > 1 else values[0]}
        if request.strength is not None and self._strength_field():
            inputs[self._strength_field()] = request.strength
        first = request.images[0]
        if REPLICATE_FAMILIES[self.family].get("match_input") and \
                abs(request.width - first.width) < 8 and abs(request.height - first.height) < 8:
            inputs["aspect_ratio"] = "match_input_image"    # its own size, not the nearest ratio
        return inputs

    def _meta_value(self, key, value):
        """An input as the record keeps it: an image by its sha256, never its bytes or a
        signed URL."""
        if key != self._image_spec()[0] or not self._input_shas:
            return value
        names = ["sha256:" + sha[:16] for sha in self._input_shas]
        return names if isinstance(value, list) else names[0]

    def _input_values(self, images, deadline):
        """Each input as the model takes it: a data: URI up to 256 KiB, else the URL of
        a file uploaded with POST /v1/files."""
        self._input_shas = [image.sha256 for image in images]
        return [image_data_uri(image) if len(image.data) <= REPLICATE_DATA_URI_MAX
                else self._upload(image, deadline) for image in images]

    def _upload(self, image, deadline):
        """POST /v1/files (multipart, part `content`) -> its urls.get. A failure is exit 1
        naming the file and the host."""
        what = "uploading %s to %s" % (image.path or "the input image", redact_url(self.base_url))
        content_type, body = multipart_body([
            ("content", (image.upload_name, image.mime_type, image.data))])
        self.console.progress("%s: %s" % (self.name, what))
        response = self.http.request("POST", self.base_url + "/files", body,
                                     self._headers({"Content-Type": content_type}),
                                     deadline=deadline, retry=CREATE_RETRY,
                                     context="%s: %s" % (self.name, what))
        answer = response.json() if response.status in (200, 201) else None
        ident, url = _dig(answer, "id"), _dig(answer, "urls", "get")
        if not isinstance(ident, str) or not ident or not isinstance(url, str) or not url:
            if response.status in (200, 201):
                raise self._error("%s: the answer has no file id and urls.get" % what)
            raise self._api_error(response, what)
        self._uploads.append(ident)
        return url

    def _delete_uploads(self, client=None):
        """DELETE /v1/files/{id} of each uploaded input (best effort: they expire anyway),
        on `client` when cancel() calls it from another thread."""
        uploads, self._uploads = self._uploads, []
        for ident in uploads:
            try:
                response = (client or self.http).request(
                    "DELETE", "%s/files/%s" % (self.base_url, ident), headers=self._headers(),
                    retry=CANCEL_RETRY, deadline=clock.monotonic() + 5.0, timeout=5.0,
                    context=self._context())
                problem = None if response.status in (200, 204, 404) else "HTTP %d" % response.status
            except ImagenError as exc:
                problem = exc.message
            if problem:
                self.console.warn(self._scrub("%s: could not delete the uploaded input file %s "
                                              "(Replicate deletes it within a day): %s"
                                              % (self.name, ident, problem)))

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            self.console.warn("%s: %s" % (self.name, message))

    # ----- the API -----

    def _headers(self, extra=None):
        headers = {"Authorization": "Bearer " + self._token, "Content-Type": "application/json",
                   "User-Agent": "imagen/" + __version__}
        headers.update(extra or {})
        return headers

    def _predict(self, model_input, images, deadline):
        submitted = clock.monotonic()
        self._running = self._create(model_input, deadline)
        prediction = self._wait(self._running, images, deadline, submitted)
        self._running = None    # done: nothing left to cancel
        return prediction

    def _create(self, model_input, deadline):
        import json
        import math
        if self.block.get("deployment"):
            url = "%s/deployments/%s/predictions" % (self.base_url, self.block["deployment"])
            body = {"input": model_input}
        elif self.version:
            url, body = self.base_url + "/predictions", {"version": self.version, "input": model_input}
        else:
            url, body = "%s/models/%s/predictions" % (self.base_url, self.ref), {"input": model_input}
        remaining = deadline - clock.monotonic()
        # answer before the deadline, so the prediction's id is known and it can be cancelled
        wait = max(1, min(int(self.block.get("wait") or REPLICATE_WAIT), int(remaining - 1.5)))
        headers = self._headers({"Prefer": "wait=%d" % wait,
                                 # Replicate itself stops it if we die before the deadline
                                 "Cancel-After": "%ds" % max(5, math.ceil(remaining))})
        self.console.progress("%s: running %s (the answer may take up to %d s)"
                              % (self.name, self.ref, wait))
        # a fresh connection: on a reused one, HttpClient re-sends a request the server
        # dropped, and a create the server dropped may still have started (billed twice)
        self.http.close()
        self._submitting = model_input
        response = self.http.request("POST", url, json.dumps(body).encode("utf-8"), headers,
                                     deadline=deadline, retry=CREATE_RETRY,
                                     timeout=wait + REPLICATE_READ_MARGIN, context=self._context())
        self._submitting = None
        if response.status not in (200, 201, 202):
            raise self._api_error(response, "model %s" % self.block["model"])
        prediction = response.json()
        ident = prediction.get("id") if isinstance(prediction, dict) else None
        if not isinstance(ident, str) or not ident:
            raise self._error("create answered HTTP %d without a prediction id" % response.status)
        return prediction

    def _wait(self, prediction, images, deadline, submitted):
        """Until the prediction is done, polling at an interval that grows with its age,
        so a poll never comes later than a tenth of the time already spent."""
        least, share, most = REPLICATE_POLL
        while True:
            self._show(prediction)
            status = prediction.get("status")
            if not isinstance(status, str):
                raise self._error("prediction %s has status %s, which Replicate never gives"
                                  % (prediction["id"], to_json(status)[:40]))
            if status == "succeeded":
                return prediction
            if status in REPLICATE_FINAL:
                self._running = None
                raise self._error(self._failure(prediction))
            if len(self._outputs(prediction)) >= images:
                return prediction   # file outputs arrive before the status says so
            interval = min(most, max(least, share * (clock.monotonic() - submitted)))
            timed_out = self._error("timed out waiting for prediction %s (%s)"
                                    % (prediction.get("id"), status))
            if not wait_until(deadline, interval):
                raise timed_out
            try:
                prediction = self._running = self._get(prediction, deadline)
            except ImagenError:
                if clock.monotonic() >= deadline:
                    raise timed_out from None   # the poll in flight was cut by the deadline
                raise

    def _get(self, prediction, deadline):
        url = self._api_url(prediction, "get", "/predictions/%s" % prediction["id"])
        response = self.http.request("GET", url, headers=self._headers(),
                                     deadline=deadline, retry=READ_RETRY, context=self._context())
        if response.status != 200:
            raise self._api_error(response, "prediction %s" % prediction["id"])
        fresh = response.json()
        if not isinstance(fresh, dict):
            raise self._error("prediction %s: the answer is not JSON" % prediction["id"])
        return dict(fresh, id=prediction["id"])   # the one asked for, whatever it says

    def _api_url(self, prediction, kind, path):
        """urls.get / urls.cancel, but only on the API's own origin: the token goes there."""
        url = _dig(prediction, "urls", kind)
        if isinstance(url, str) and _origin(url) == _origin(self.base_url):
            return url
        return self.base_url + path

    def _show(self, prediction):
        percent = log_percent(prediction.get("logs"))
        self.console.progress(self._scrub("%s: %s %s%s" % (
            self.name, prediction.get("id"), prediction.get("status"),
            " %d%%" % percent if percent is not None else "")),
            *((percent, 100) if percent is not None else ()))

    @staticmethod
    def _outputs(prediction):
        output = prediction.get("output")
        if isinstance(output, str):
            return [output] if output else []
        if isinstance(output, list):
            return [item for item in output if isinstance(item, str) and item]
        return []

    @staticmethod
    def _failure(prediction):
        ident, status, error = prediction.get("id"), prediction.get("status"), prediction.get("error")
        if status == "failed":
            if error and not isinstance(error, str):
                error = to_json(error)[:300]
            return "prediction %s failed: %s" % (ident, error or "Replicate gave no reason")
        if status == "aborted":
            return "prediction %s was aborted: it did not start before its deadline (not billed)" % ident
        return "prediction %s was canceled" % ident

    def _fetch(self, url, deadline):
        """An output's bytes: http(s) fetched now, data: decoded, anything else refused."""
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            if len(url) > REPLICATE_MAX_DOWNLOAD * 4 // 3 + 1024:
                raise self._error("data: output larger than %d bytes" % REPLICATE_MAX_DOWNLOAD)
            try:
                return decode_data_uri(url)
            except ImagenError as exc:
                raise self._error(exc.message) from None
        if scheme not in ("http", "https"):
            raise self._error("refusing output %s: only https, http and data URLs are fetched"
                              % self._where(url))
        problem = url_problem(url)
        if problem:
            raise self._error("output %s %s" % (self._where(url), problem))
        self.console.progress(self._scrub("%s: downloading %s" % (self.name, self._where(url))))
        # no Authorization header: output files are public URLs on another host
        try:
            response = self.http.request("GET", url, deadline=deadline, retry=READ_RETRY,
                                         timeout=60.0, context="%s: %s" % (self.name, self._where(url)))
        except ImagenError as exc:
            if exc.code != EXIT_USAGE:
                raise
            # a URL the server made is the server's fault, not a usage error
            raise self._error("output %s: %s" % (self._where(url), exc.message)) from None
        if response.status != 200:
            raise self._error("downloading %s: HTTP %d" % (self._where(url), response.status))
        return response.body

    @staticmethod
    def _where(url):
        return redact_url(url)[:120] if "://" in url else url[:40]

    # ----- errors and cancel -----

    def _context(self):
        return "%s: %s" % (self.name, redact_url(self.base_url))

    def _error(self, message):
        """An ImagenError with the token scrubbed out, whatever the message quotes."""
        return ImagenError("%s: %s" % (self.name, self._scrub(message)))

    def _scrub(self, text):
        return text.replace(self._token, "***") if self._token else text

    def _api_error(self, response, subject):
        """Replicate's own words from a problem+json body (`title`, `detail`)."""
        body = response.json()
        body = body if isinstance(body, dict) else {}
        detail = body.get("detail") or response.text() or "(no detail)"
        detail = "; ".join(line.strip(" -") for line in str(detail).splitlines() if line.strip(" -"))
        title = body.get("title")
        words = "HTTP %d%s: %s" % (response.status, " " + title if title else "", detail)
        status = response.status
        if status == 401:
            return self._error("%s (check $%s)" % (words, self.token_env(self.block)))
        if status == 404:
            return self._error("%s not found: %s" % (subject, words))
        if status == 422:
            return self._error("invalid input for %s: %s" % (subject, words))
        return self._error("%s: %s" % (subject, words))

    def cancel(self):
        """POST urls.cancel for the prediction in flight. Interrupted while the create was
        still held open, its id is unknown: find it in the newest predictions. On its own
        connection: an interrupted request leaves self.http's unusable, and a cancel from
        another thread (MCP, batch) must not touch the one the generating thread waits on
        (once the prediction is canceled, that wait ends by itself)."""
        running, submitting = self._running, self._submitting
        self._running = self._submitting = None
        if not self._token:
            return
        client = HttpClient(timeout=5.0)
        try:
            if running is None and submitting is not None:
                running = self._find_submitted(submitting, client)
            if running is not None and running.get("id"):
                url = self._api_url(running, "cancel", "/predictions/%s/cancel" % running["id"])
                client.request("POST", url, b"", self._headers(), retry=CANCEL_RETRY,
                               deadline=clock.monotonic() + 5.0, timeout=5.0,
                               context=self._context())
        except ImagenError:
            pass    # best effort: the prediction's own Cancel-After deadline still holds
        try:
            self._delete_uploads(client)    # after the cancel: the prediction no longer reads them
        finally:
            client.close()

    def _find_submitted(self, model_input, client):
        response = client.request("GET", self.base_url + "/predictions", headers=self._headers(),
                                  retry=LOOKUP_RETRY, deadline=clock.monotonic() + 5.0,
                                  timeout=5.0, context=self._context())
        page = response.json() if response.status == 200 else None
        found = _dig(page, "results")
        for prediction in found if isinstance(found, list) else []:
            theirs = _dig(prediction, "input")
            if not isinstance(theirs, dict) or not isinstance(prediction.get("id"), str):
                continue
            if (prediction.get("status") not in REPLICATE_FINAL
                    and theirs.get("prompt") == model_input.get("prompt")
                    and theirs.get("seed") == model_input.get("seed")
                    and prediction.get("model") in (None, self.ref)):
                return prediction
        return None


def image_data_uri(image):
    import base64
    return "data:%s;base64,%s" % (image.mime_type, base64.b64encode(image.data).decode("ascii"))


def request_megapixels(request):
    """(output MP, [MP of each input]), each rounded up and at least 1, as megapixel
    billing counts them."""
    def megapixels(width, height):
        return max(1, -(-width * height // (1024 * 1024)))
    return megapixels(request.width, request.height), \
        [megapixels(image.width, image.height) for image in request.images]


def _origin(url):
    scheme, _, rest = url.partition("://")
    return scheme.lower(), rest.split("/", 1)[0].lower()


# ===== Adapter: openai =====
# OpenAI's Images API and the servers that speak it (APIS.md §5). One POST per batch of
# up to the model's `n` images, answered once they exist (gpt-image can take a minute or
# more): there is no job id, nothing to poll and nothing on the server to cancel. Images
# come as `b64_json`, or as a `url` (dall-e) that is downloaded without the key. There is
# no seed. With input images (--image, imagen edit) the request goes to /images/edits as
# multipart, one `image[]` part per input (`edit_all`); --strength has no equivalent there.

OPENAI_API = "https://api.openai.com/v1"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
OPENAI_TIMEOUT = 180.0                  # the default --timeout: gpt-image can take 60 s or more
OPENAI_MAX_ANSWER = 256 * 1024 * 1024   # ten large images, as base64
OPENAI_MAX_DOWNLOAD = 64 * 1024 * 1024
# What imagen sets itself: a backend's `input` cannot override these
OPENAI_RESERVED = ("model", "prompt", "n", "image", "image[]", "mask", "stream")
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536")
DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
DALLE2_SIZES = ("256x256", "512x512", "1024x1024")

# What each family takes: the sizes it offers (a requested WxH maps to the nearest; None:
# sent as asked), the most images one request makes (`n`), the most input images its
# /images/edits takes (0: it has none; API reference, image_edit_params.py: gpt-image up
# to 16, dall-e-2 one), the quality it is priced at when none is asked for, and the
# `input` options it knows with their values (None: any value).
OPENAI_FAMILIES = {
    "gpt-image": {"sizes": GPT_IMAGE_SIZES, "n": 10, "images": 16, "quality": "high",
                  "options": {"quality": ("low", "medium", "high", "auto"),
                              "background": ("transparent", "opaque", "auto"),
                              "output_format": ("png", "jpeg", "webp"),
                              "output_compression": None, "moderation": ("low", "auto"),
                              "input_fidelity": ("low", "high"),
                              "size": GPT_IMAGE_SIZES + ("auto",), "user": None,
                              "safety_identifier": None}},
    "dall-e-3": {"sizes": DALLE3_SIZES, "n": 1, "images": 0, "quality": "standard",
                 "options": {"quality": ("standard", "hd"), "style": ("vivid", "natural"),
                             "response_format": ("url", "b64_json"), "size": DALLE3_SIZES,
                             "user": None}},
    "dall-e-2": {"sizes": DALLE2_SIZES, "n": 10, "images": 1, "quality": "standard",
                 "options": {"response_format": ("url", "b64_json"), "size": DALLE2_SIZES,
                             "user": None}},
    # a server that only speaks the API: one of everything (`family:` in the block says more)
    "other": {"sizes": None, "n": 1, "images": 1, "quality": None, "options": None},
}
OPENAI_MODELS = {"gpt-image-1": "gpt-image", "gpt-image-1-mini": "gpt-image",
                 "gpt-image-1.5": "gpt-image", "chatgpt-image-latest": "gpt-image",
                 "dall-e-3": "dall-e-3", "dall-e-2": "dall-e-2"}

# Prices as of OPENAI_PRICES_DATE; check https://platform.openai.com/docs/pricing before
# trusting them. gpt-image models are billed per token: USD per 1M text input, image input
# and image output tokens (text output tokens, where an answer counts them apart, at
# text_out). gpt-image-1 and gpt-image-1-mini from OpenAI's model pages (gpt-image-1 was
# shut down on 2026-10-23); gpt-image-1.5 from third-party listings of OpenAI's prices.
OPENAI_PRICES_DATE = "2026-12-02"
OPENAI_TOKEN_PRICES = {
    "gpt-image-1": {"text_in": 5.00, "image_in": 10.00, "image_out": 40.00},
    "gpt-image-1-mini": {"text_in": 2.00, "image_in": 2.50, "image_out": 8.00},
    "gpt-image-1.5": {"text_in": 5.00, "image_in": 8.00, "image_out": 32.00, "text_out": 10.00},
}
# USD per image by quality and size: what dall-e bills, and for gpt-image models OpenAI's
# own per-image figures, used only to estimate (--max-cost) before the answer's `usage`
# gives the real cost.
OPENAI_IMAGE_PRICES = {
    "gpt-image-1": {"low": (0.011, 0.016), "medium": (0.042, 0.063), "high": (0.167, 0.25)},
    "gpt-image-1-mini": {"low": (0.005, 0.006), "medium": (0.011, 0.015),
                         "high": (0.036, 0.052)},
    "gpt-image-1.5": {"low": (0.009, 0.013), "medium": (0.034, 0.05), "high": (0.133, 0.2)},
    "dall-e-3": {"standard": (0.04, 0.08), "hd": (0.08, 0.12)},
    "dall-e-2": {"standard": {"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.02}},
}


def openai_family(model, declared=None):
    if declared:
        return declared
    if model in OPENAI_MODELS:
        return OPENAI_MODELS[model]
    # later gpt-image models still take the three standard sizes
    return "gpt-image" if model.startswith(("gpt-image", "chatgpt-image")) else "other"


def nearest_size(width, height, sizes):
    """The offered "WxH" closest to width x height in aspect ratio (on a log scale, so 2:1
    and 1:2 are equally far), then in area."""
    import math

    def distance(size):
        w, h = (int(side) for side in size.split("x"))
        return (round(abs(math.log(width / float(height)) - math.log(w / float(h))), 9),
                abs(math.log(width * height / float(w * h))))
    return min(sizes, key=distance)


def openai_image_price(model, quality, size):
    """USD for one image of `model` at `quality` and `size` ("WxH"; "auto" is priced as the
    dearest), from OPENAI_IMAGE_PRICES; None when unknown."""
    table = OPENAI_IMAGE_PRICES.get(model, {}).get(quality)
    if table is None:
        return None
    if isinstance(table, dict):
        return table.get(size, max(table.values()) if size == "auto" else None)
    square, oblong = table
    if size == "auto":
        return oblong
    w, _, h = str(size).partition("x")
    return square if w == h else oblong


def openai_usage_cost(usage, prices):
    """USD of one answer from its `usage` token counts; None when they are not there."""
    def count(*keys):
        value = _dig(usage, *keys)
        counted = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return value if counted else None
    output = count("output_tokens")
    text_in, image_in = (count("input_tokens_details", "text_tokens"),
                         count("input_tokens_details", "image_tokens"))
    if text_in is None and image_in is None:
        text_in = count("input_tokens")       # no details: all of it as text, the cheaper rate
    if output is None or (text_in is None and image_in is None):
        return None
    text_out = min(output, count("output_tokens_details", "text_tokens") or 0) \
        if "text_out" in prices else 0
    return ((text_in or 0) * prices["text_in"] + (image_in or 0) * prices["image_in"]
            + (output - text_out) * prices["image_out"]
            + text_out * prices.get("text_out", 0)) / 1e6


def openai_error(response):
    """(message, code, param) of an OpenAI error answer {"error": {message, type, param,
    code}}; the start of the body when it is something else (a proxy's HTML page)."""
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return response.text() or "(no detail)", None, None
    message = error.get("message")
    code, param = error.get("code"), error.get("param")
    return (str(message) if message else "(no message)",
            code if isinstance(code, str) else None, param if isinstance(param, str) else None)


def openai_retry_after(response):
    """Seconds to wait, as OpenAI says: `retry-after-ms`, else `retry-after`."""
    value = response.header("retry-after-ms")
    if value:
        try:
            seconds = float(value) / 1000.0
        except ValueError:
            seconds = None
        if seconds is not None and 0 <= seconds < 1e6:
            return seconds
    return retry_after_seconds(response)


class OpenAIRetry(RetryPolicy):
    """A 429 or 5xx *answer* means nothing was made: ask again, except when the quota is
    used up (`insufficient_quota`), which no wait clears."""

    def should_retry(self, response):
        if response.status not in self.statuses:
            return False
        return response.status != 429 or openai_error(response)[1] != "insufficient_quota"


# A create is sent again only when no image can have been made: an error answer, or a
# connection that was never made. Never after the body went out without an answer (a
# dropped connection, a read timeout): that request may be running, and billed.
OPENAI_CREATE_RETRY = OpenAIRetry(attempts=5, transport="connect", retry_after=openai_retry_after)
OPENAI_DOWNLOAD_RETRY = RetryPolicy(attempts=4, retry_after=openai_retry_after)


def _mask_keys(text):
    """OpenAI quotes a refused key half-masked (sk-abc***wxyz): none of it is shown."""
    import re
    return re.sub(r"\b(sk|sess|key)-[A-Za-z0-9_*.\-]{3,}", r"\1-***", text)


class OpenAIAdapter(Adapter):
    NAME = "openai"
    OPTIONS = {"model": _is_str, "api_key_env": _is_str, "base_url": _is_url,
               "organization_env": _is_str, "project_env": _is_str, "input": _is_mapping,
               "max_cost_usd": _non_negative_number, "family": _one_of(*OPENAI_FAMILIES)}
    REQUIRED = ("model",)
    PAID = True
    TAKES_SEED = False
    TIMEOUT = OPENAI_TIMEOUT
    MAX_CONCURRENCY = 4
    TAKES_IMAGES, MAX_IMAGES = True, MAX_INPUT_IMAGES     # max_images(): per model

    def __init__(self, name, block, env, console):
        super().__init__(name, block, env, console)
        self.base_url = (block.get("base_url") or OPENAI_API).rstrip("/")
        self.model = block.get("model") or ""
        self.family = openai_family(self.model, block.get("family"))
        self.spec = OPENAI_FAMILIES[self.family]
        self.http = HttpClient(timeout=OPENAI_TIMEOUT, max_body=OPENAI_MAX_ANSWER)
        self._key = None
        self._ids = {}          # OpenAI-Organization / OpenAI-Project, when the block names them
        self._warned = set()

    # ----- config, readiness, price -----

    @classmethod
    def key_env(cls, block):
        return block.get("api_key_env") or OPENAI_KEY_ENV

    @classmethod
    def check_block(cls, block, where, report):
        """`config validate` knows the models: an unknown one, an option or value the model
        does not take, or a size it does not offer is a warning."""
        model = block.get("model")
        if not isinstance(model, str):
            return
        family = block.get("family")
        family = family if isinstance(family, str) and family in OPENAI_FAMILIES else None
        if model not in OPENAI_MODELS and not family:
            report("hint", where + ".model", "unknown model %r (known: %s): its sizes and "
                   "options are not checked and its price is unknown"
                   % (model, ", ".join(OPENAI_MODELS)))
        spec = OPENAI_FAMILIES[openai_family(model, family)]
        size = block.get("size")
        if spec["sizes"] and isinstance(size, str) and size.lower() not in spec["sizes"] \
                and not _is_size(size):
            width, height = parse_size(size)
            report("hint", where + ".size", "%s offers %s; %s becomes %s" % (
                model, ", ".join(spec["sizes"]), size, nearest_size(width, height, spec["sizes"])))
        options = block.get("input")
        for key, value in (options.items() if isinstance(options, dict) else ()):
            cls._check_input(model, spec, key, value, "%s.input.%s" % (where, key), report)

    @staticmethod
    def _check_input(model, spec, key, value, where, report):
        if key in OPENAI_RESERVED:
            report("hint", where, "set by imagen from the command; this one is ignored")
        elif spec["options"] is None:
            return
        elif key not in spec["options"]:
            report("hint", where, "%s has no option %r%s" % (
                model, key, did_you_mean(str(key), spec["options"])))
        elif spec["options"][key] is not None and value not in spec["options"][key]:
            report("hint", where, "%s takes %s" % (model, ", ".join(spec["options"][key])))
        elif key == "output_compression" and (isinstance(value, bool) or value not in range(101)):
            report("hint", where, "must be a whole number from 0 to 100")

    @classmethod
    def status(cls, block, env):
        variable = cls.key_env(block)
        if not (env.get(variable) or "").strip():
            return False, "$%s is not set" % variable
        return True, "$%s is set" % variable

    def check_ready(self):
        self._key = self._variable(self.key_env(self.block), "your OpenAI API key")
        for key, header in (("organization_env", "OpenAI-Organization"),
                            ("project_env", "OpenAI-Project")):
            if self.block.get(key):
                what = "the %s id" % header[7:].lower()
                self._ids[header] = self._variable(self.block[key], what)

    def _variable(self, variable, what):
        value = (self.env.get(variable) or "").strip()
        if not value:
            raise usage_error("%s: $%s is not set: it must hold %s" % (self.name, variable, what))
        if any(ord(c) <= 32 or ord(c) >= 127 for c in value):
            raise usage_error("%s: $%s holds spaces or control characters; it must hold only %s"
                              % (self.name, variable, what))
        return value

    def secrets(self):
        return (self._key,) if self._key else ()

    def _quality(self, quality=None):
        """The quality a price is looked up at: the answer's, else the configured one; for
        `auto` (or none) the family's default, gpt-image's priced as high."""
        if quality is None:
            quality = (self.block.get("input") or {}).get("quality")
        return quality if isinstance(quality, str) and quality != "auto" else self.spec["quality"]

    def price_note(self):
        tokens = OPENAI_TOKEN_PRICES.get(self.model)
        if tokens:
            return "$%s/$%s/$%s per 1M text-in/image-in/image-out tokens (prices of %s)" % (
                dollars(tokens["text_in"]), dollars(tokens["image_in"]),
                dollars(tokens["image_out"]), OPENAI_PRICES_DATE)
        prices = OPENAI_IMAGE_PRICES.get(self.model)
        if prices:
            values = [v for table in prices.values()
                      for v in (table.values() if isinstance(table, dict) else table)]
            return "$%s-%s per image by size and quality (prices of %s)" % (
                min(values), max(values), OPENAI_PRICES_DATE)
        return "price unknown"

    def estimate_cost(self, images):
        """Without a size: priced as the dearest size, unless `input` names one."""
        return self.estimate_for(images, None, None)

    def estimate_for(self, images, width, height):
        """The per-image price of the size that will be asked for, at the configured
        quality (gpt-image's `auto` priced as high), times the images."""
        asked = (self.block.get("input") or {}).get("size")
        if asked is None and width and height:
            asked = self._size_for(width, height)
        per_image = openai_image_price(self.model, self._quality(), asked or "auto")
        return None if per_image is None else round(per_image * images, 6)

    def _cost(self, answer, body, images):
        """(USD per image of one answer, how it was found): its `usage` tokens at the
        model's token prices, else the per-image price of its quality and size."""
        prices = OPENAI_TOKEN_PRICES.get(self.model)
        usage = answer.get("usage")
        if prices and isinstance(usage, dict):
            total = openai_usage_cost(usage, prices)
            if total is not None:
                return round(total / images, 8), "usage"
        quality = answer.get("quality") if isinstance(answer.get("quality"), str) else None
        size = answer.get("size") if isinstance(answer.get("size"), str) else body.get("size")
        per_image = openai_image_price(self.model, self._quality(quality), size or "auto")
        return per_image, ("per-image price" if per_image is not None else None)

    # ----- generate and edit -----

    def max_images(self):
        return min(self.spec["images"], MAX_INPUT_IMAGES)

    def generate(self, request, deadline):
        return next(self.generate_all([request], deadline))

    def generate_all(self, requests, deadline):
        """POST /images/generations, `n` images a request (the model's most per request);
        with input images, POST /images/edits (edit_all)."""
        if requests and requests[0].images:
            return self.edit_all(requests, requests[0].images, deadline)
        return self._run(requests, deadline, ())

    def edit_all(self, requests, images, deadline, mask=None):
        """POST /images/edits: the images made from `images` (InputImages, read and checked
        by prepare_inputs), each sent as one `image[]` part (plain `image` for dall-e-2),
        and the InputImage `mask` if given. A model without edits is exit 2."""
        if not self.max_images():
            raise usage_error("%s: %s takes no input images (it has no /images/edits)"
                              % (self.name, self.model))
        if len(images) > self.max_images():
            raise usage_error("%s: %s takes at most %d input image(s) (got %d)"
                              % (self.name, self.model, self.max_images(), len(images)))
        if not images:
            raise usage_error("%s: an edit needs at least one input image" % self.name)
        field = "image" if self.family == "dall-e-2" else "image[]"
        files = [(field, (image.upload_name, image.mime_type, image.data)) for image in images]
        if mask is not None:
            files.append(("mask", (mask.upload_name, mask.mime_type, mask.data)))
        return self._run(requests, deadline, files)

    def _run(self, requests, deadline, files):
        per_request = self.spec["n"]
        for start in range(0, len(requests), per_request):
            batch = requests[start:start + per_request]
            for result in self._run_batch(batch, deadline, files):
                yield result

    def _run_batch(self, batch, deadline, files):
        body = self.build_body(batch[0], len(batch))
        answer, response = self._create(body, files, deadline)
        items = answer.get("data")
        items = [item for item in items if isinstance(item, dict)] \
            if isinstance(items, list) else []
        if not items:
            raise self._error("the answer holds no images%s" % self._request_id(response))
        cost, basis = self._cost(answer, body, len(items))
        meta = self._meta(answer, body, response, basis, bool(files))
        for index, item in enumerate(items[:len(batch)]):
            data = self._image_bytes(item, index, deadline)
            try:
                mime_type = image_info(data)[0]
            except ImagenError as exc:
                raise self._error("image %d of the answer: %s" % (index + 1, exc.message)) from None
            extra = {"output_index": index} if len(batch) > 1 else {}
            if isinstance(item.get("revised_prompt"), str):
                extra["revised_prompt"] = item["revised_prompt"]
            yield Result(data, mime_type, self.model_id(), None, steps=0, cost_usd=cost,
                         meta=dict(meta, **extra))
        if len(items) < len(batch):
            raise self._error("the answer holds %d of %d images%s"
                              % (len(items), len(batch), self._request_id(response)))

    def _meta(self, answer, body, response, basis, edit):
        meta = {"request_id": response.header("x-request-id"),
                "endpoint": "/images/edits" if edit else "/images/generations",
                "input": {k: v for k, v in body.items() if k != "prompt"}}
        for key in ("created", "size", "quality", "output_format", "background"):
            if isinstance(answer.get(key), (str, int)) and not isinstance(answer.get(key), bool):
                meta[key] = answer[key]
        if isinstance(answer.get("usage"), dict):
            meta["usage"] = answer["usage"]
        if basis:
            meta["cost_from"] = basis
        return meta

    def build_body(self, request, images=1):
        """The request's JSON fields: model, prompt, n, the nearest size, then the block's
        `input` (all but the fields imagen sets itself). No seed: the API has none."""
        if request.negative:
            self._warn_once("negative", "%s has no negative prompt; it is ignored" % self.model)
        if request.steps:
            self._warn_once("steps", "%s has no steps; --steps is ignored" % self.model)
        body = {"model": self.model, "prompt": request.prompt, "n": images,
                "size": self._size_for(request.width, request.height)}
        for key, value in (self.block.get("input") or {}).items():
            if key not in OPENAI_RESERVED:
                body[key] = value
        return body

    def _size_for(self, width, height):
        sizes = self.spec["sizes"]
        return nearest_size(width, height, sizes) if sizes else "%dx%d" % (width, height)

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            self.console.warn("%s: %s" % (self.name, message))

    # ----- the API -----

    def _headers(self, content_type):
        headers = {"Authorization": "Bearer " + self._key, "Content-Type": content_type,
                   "User-Agent": "imagen/" + __version__}
        headers.update(self._ids)
        return headers

    def _create(self, body, files, deadline):
        import json
        if files:
            path = "/images/edits"
            fields = [(key, value if isinstance(value, str) else to_json(value))
                      for key, value in body.items()]
            content_type, payload = multipart_body(fields + files)
        else:
            path = "/images/generations"
            payload, content_type = json.dumps(body).encode("utf-8"), "application/json"
        if clock.monotonic() >= deadline:
            raise self._error("timed out before asking for %d more image(s)" % body["n"])
        self.console.progress("%s: %s is making %d image(s)" % (self.name, self.model, body["n"]))
        # a fresh connection: then a request that got no answer surely reached no one
        # else's half-closed socket, and its outcome is what the error says
        self.http.close()
        try:
            response = self.http.request("POST", self.base_url + path, payload,
                                         self._headers(content_type), deadline=deadline,
                                         retry=OPENAI_CREATE_RETRY,
                                         timeout=deadline - clock.monotonic(),
                                         context=self._context())
        except ImagenError as exc:
            raise self._unknown_outcome(exc) from None
        if response.status != 200:
            raise self._api_error(response)
        answer = response.json()
        if not isinstance(answer, dict):
            raise self._error("HTTP %d: the answer is not a JSON object%s"
                              % (response.status, self._request_id(response)))
        return answer, response

    def _unknown_outcome(self, exc):
        """A create without an answer: say that it may have made (and billed) images, so
        that nobody sends it again blindly; imagen never does."""
        if exc.code == EXIT_USAGE or any(
                word in exc.message for word in ("connection refused", "cannot resolve host")):
            return self._error(exc.message)
        return self._error("%s: without an answer it is unknown whether images were made "
                           "(and billed); the request is not sent again" % exc.message)

    def _image_bytes(self, item, index, deadline):
        import base64
        encoded = item.get("b64_json")
        if isinstance(encoded, str) and encoded:
            try:
                return base64.b64decode(encoded, validate=True)
            except ValueError:
                raise self._error("image %d of the answer: b64_json is not valid base64"
                                  % (index + 1)) from None
        url = item.get("url")
        if isinstance(url, str) and url:
            return self._download(url, deadline)
        raise self._error("image %d of the answer has neither b64_json nor url" % (index + 1))

    def _download(self, url, deadline):
        """A `url` output (a signed blob URL on another host): fetched at once, without the
        key or any other header of ours."""
        where = redact_url(url)[:120]
        if url.split(":", 1)[0].lower() not in ("http", "https") or url_problem(url):
            raise self._error("refusing image URL %s: %s" % (
                where, url_problem(url) or "only https and http URLs are fetched"))
        self.console.progress("%s: downloading %s" % (self.name, where))
        try:
            response = self.http.request("GET", url, deadline=deadline,
                                         retry=OPENAI_DOWNLOAD_RETRY,
                                         timeout=deadline - clock.monotonic(),
                                         context="%s: %s" % (self.name, where))
        except ImagenError as exc:
            raise self._error(exc.message) from None
        if response.status != 200:
            raise self._error("downloading %s: HTTP %d" % (where, response.status))
        if len(response.body) > OPENAI_MAX_DOWNLOAD:
            raise self._error("%s: larger than %d bytes" % (where, OPENAI_MAX_DOWNLOAD))
        return response.body

    # ----- errors and cancel -----

    def _context(self):
        return "%s: %s" % (self.name, redact_url(self.base_url))

    def _error(self, message):
        """An ImagenError with the key scrubbed out, whatever the message quotes."""
        if self._key:
            message = message.replace(self._key, "***")
        return ImagenError("%s: %s" % (self.name, message))

    @staticmethod
    def _request_id(response):
        ident = response.header("x-request-id")
        return " (request %s)" % ident[:80] if ident else ""

    def _api_error(self, response):
        """OpenAI's own words: `error.message` and `code`, with the parameter it names."""
        message, code, param = openai_error(response)
        message = _mask_keys(message)
        status, where = response.status, self._request_id(response)
        if code in ("moderation_blocked", "content_policy_violation"):
            return self._error("refused by OpenAI's moderation (%s): %s%s" % (code, message, where))
        words = "HTTP %d%s%s: %s%s" % (status, " " + code if code else "",
                                      " for parameter '%s'" % param if param else "",
                                      message, where)
        if status == 401:
            return self._error("%s (check $%s)" % (words, self.key_env(self.block)))
        if code == "insufficient_quota":
            return self._error(words + " (waiting does not help: add credit or raise the limit)")
        return self._error(words)

    def cancel(self):
        """Nothing runs on OpenAI's side that a request could stop; close the connection
        so an interrupted request is not left half-read."""
        self.http.close()


# ===== Adapters: the registry =====

# Every adapter by the name a backend block gives in `adapter:`; `imagen backends` lists
# them in this order.
ADAPTERS = {"mock": MockAdapter, "comfyui": ComfyUIAdapter, "replicate": ReplicateAdapter,
            "openai": OpenAIAdapter}


def load_config(explicit=None, env=None, strict=True):
    """The config (see read_config) for the adapters above."""
    return read_config(explicit, env, strict, ADAPTERS)


def load_config_and_warn(config, env, console):
    """The Config given, or the one loaded from a path (None: the default place), its
    warnings shown."""
    if not isinstance(config, Config):
        config = load_config(None if config is None else os.fspath(config), env)
    for warning in config.warnings:
        console.warn(warning)
    return config


def make_adapter(name, config, env, console):
    block = config.backends[name]
    return ADAPTERS[block["adapter"]](name, block, env, console)


def backend_rows(config, env, console, check=False):
    """One dict per configured backend, for `imagen backends` and GET /v1/backends.
    `status` says no more than is known: a host that was not probed is "configured";
    with check, each host is probed (BACKEND_CHECK_SECONDS at most) and listed."""
    rows = []
    for name in sorted(config.backends):
        block = config.backends[name]
        cls = ADAPTERS[block["adapter"]]
        usable, note = cls.status(block, env)
        adapter = make_adapter(name, config, env, console)
        row = {"name": name, "adapter": block["adapter"], "model": adapter.model_id(),
               "default": name == config.data["default_backend"], "usable": usable,
               "note": note, "price": adapter.price_note(),
               "status": "usable" if usable else "not usable",
               "images": input_capacity(adapter)}
        if usable and cls.PROBED:
            row["status"] = "configured"
            if check:
                row["hosts"] = adapter.probe_hosts(BACKEND_CHECK_SECONDS)
                row["status"] = reachability(row["hosts"])
                row["note"] = "; ".join(host["detail"] for host in row["hosts"])
        rows.append(row)
    return rows


BACKEND_CHECK_SECONDS = 2.0     # per host, for `imagen backends --check`


def input_capacity(adapter):
    """How many input images a backend takes, for `imagen backends` (0: none, or its
    workflow cannot be read now)."""
    try:
        return adapter.max_images()
    except ImagenError:
        return 0


def reachability(hosts):
    up = sum(host["reachable"] for host in hosts)
    if up == len(hosts):
        return "reachable"
    return "partly reachable" if up else "unreachable"


# ===== Job =====
# Resolving one generate: flags > style > backend block > defaults, who asked, the
# auto/on/off modes and the spending limit; all decided before anything is submitted.

def check_range(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise usage_error("%s must be a whole number from %d to %d (got %r)"
                          % (name, low, high, value))
    return value


def clean_prompt(prompt):
    if not isinstance(prompt, str):
        raise usage_error("prompt must be text")
    prompt = prompt.strip()
    if not prompt:
        raise usage_error("prompt is empty")
    if not is_utf8(prompt):
        raise usage_error("prompt is not valid UTF-8 text")
    check_no_nul("prompt", prompt)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise usage_error("prompt is %d characters; at most %d are allowed"
                          % (len(prompt), MAX_PROMPT_CHARS))
    return prompt


def check_no_nul(name, text):
    """A NUL is never meant (binary piped into `generate -`), and the PNG spec forbids it in
    the `parameters` text chunk the prompt goes into."""
    if "\x00" in text:
        raise usage_error("%s contains a NUL character" % name)


def is_utf8(text):
    """False for text holding surrogates (undecodable bytes from argv, stdin or paths)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def apply_style(prompt, style):
    """The final prompt: the style's template with {prompt}, or the style appended."""
    template = (style or {}).get("prompt")
    if not template:
        return prompt
    if "{prompt}" in template:
        return template.replace("{prompt}", prompt)
    return "%s, %s" % (prompt, template)


def draw_seed():
    return 1 + int.from_bytes(os.urandom(4), "big") % RANDOM_SEED_MAX


class Job:
    """Every decision of one generate, made and checked before anything is submitted."""

    prompt: str
    final_prompt: str            # after the style
    negative: str
    style: "str | None"          # the style's name
    backend: str                 # the backend instance's name
    adapter: str                 # its adapter's name
    width: int
    height: int
    steps: int                   # 0: the backend's default
    seeds: "list[int]"           # one per image
    seed_given: bool             # a seed was asked for (a backend without seeds says so)
    timeout: float               # seconds for the whole generate
    output: "str | None"         # --output, absolute and checked
    output_given: "str | None"   # --output as given, for messages
    sidecar: bool
    embed: bool                  # carry the record inside PNGs
    home: str                    # the caller's home, for ~ in paths
    caller: str                  # who asked: set by prepare_job, which may ask tmux
    max_cost: "float | None"     # --max-cost as given (checked by check_spending_limit)
    cloud_flag: "str | bool | None"      # the cloud option as given (see decide_cloud_sync)
    preview_flag: "str | bool | None"    # the preview option as given (see decide_preview)
    interactive: bool            # stdout is a terminal: a person is watching
    cloud_sync: bool             # decided by decide_cloud_sync
    preview: bool                # decided by decide_preview
    images: list                 # input images: paths (or serve's InputImages) until
                                 # prepare_inputs reads them, then InputImages
    strength: "float | None"     # --strength, checked; None: the backend's default
    size_from_input: bool        # no --size or style size: the first input's size is asked for
    parent: "str | None"         # generate --from: the id of the generation it remixes
    job_key: "str | None"        # a batch job's key, kept in the ledger: a rerun skips it
    __slots__ = tuple(__annotations__)

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.pop(name))
        if fields:
            raise TypeError("Job has no field %s" % ", ".join(sorted(fields)))

    @property
    def count(self):
        return len(self.seeds)

    @property
    def requested_size(self):
        return "%dx%d" % (self.width, self.height)


def looks_like_id_prefix(text):
    return bool(text) and all(c in "0123456789abcdef-" for c in text.lower())


def check_parent(parent):
    """The `parent` of a record: a generation id, or None."""
    if parent is not None and (not isinstance(parent, str) or not looks_like_id_prefix(parent)
                               or len(parent) > 64):
        raise usage_error("parent must be a generation id (got %r)" % (parent,))
    return parent or None


def resolve_job(config, env, *, prompt, backend=None, size=None, seed=None, steps=None,
                style=None, negative=None, count=None, timeout=None, output=None,
                sidecar=None, preview=None, cloud=None, max_cost=None, interactive=False,
                images=None, strength=None, edit=False, parent=None, job_key=None):
    """The Job of a generate: flags > style > backend block > defaults, validated. No
    network and no subprocess: who asked is left to prepare_job, reading the input images
    to prepare_inputs. `edit` (imagen edit): default_edit_backend before default_backend."""
    prompt = clean_prompt(prompt)
    style_name = style
    style = {}
    if style_name:
        if style_name not in config.styles:
            raise usage_error("unknown style %r (known: %s)" % (
                style_name, ", ".join(sorted(config.styles)) or "none configured"))
        style = config.styles[style_name]
    backend = backend or style.get("backend") or default_backend(config, edit)
    if backend not in config.backends:
        raise usage_error("unknown backend %r (known: %s)"
                          % (backend, ", ".join(sorted(config.backends))))
    block = config.backends[backend]
    images, strength = check_image_options(images, strength)
    size_from_input = bool(images) and not size and not style.get("size")
    size = size or style.get("size") or block.get("size") or "1024x1024"
    width, height = parse_size(size)
    if not steps:
        steps = style.get("steps") or block.get("steps") or 0
    check_range("steps", steps, 0, MAX_STEPS)
    seed = check_range("seed", seed or 0, 0, MAX_SEED)
    count = check_range("count", _given(count, 1), 1, MAX_COUNT)
    default_timeout = ADAPTERS[block["adapter"]].TIMEOUT    # the adapter's: 180 s for openai
    timeout = _given(timeout, block.get("timeout") or default_timeout)
    if _positive_number(timeout):
        raise usage_error("timeout must be a number of seconds above 0 (got %r)" % timeout)
    output_given = output
    if output is not None:
        output = check_output_path(output, _home(env))
    if negative is None:
        negative = style.get("negative") or ""
    if isinstance(negative, str):
        check_no_nul("negative prompt", negative)
    sidecar = config.output["sidecar"] if sidecar is None else sidecar
    first_seed = seed or draw_seed()
    seeds = [first_seed + i if seed else (draw_seed() if i else first_seed) for i in range(count)]
    if seeds[-1] > MAX_SEED:
        raise usage_error("seed %d + count %d goes past %d" % (seed, count, MAX_SEED))
    return Job(prompt=prompt, final_prompt=apply_style(prompt, style), negative=negative,
               style=style_name or None, backend=backend, adapter=block["adapter"],
               width=width, height=height, steps=steps, seeds=seeds, seed_given=bool(seed),
               timeout=float(timeout), output=output, output_given=output_given,
               sidecar=bool(sidecar),
               embed=bool(config.output["embed_metadata"]), home=_home(env), caller="",
               max_cost=max_cost, cloud_flag=cloud, preview_flag=preview,
               interactive=bool(interactive), cloud_sync=False, preview=False,
               images=images, strength=strength, size_from_input=size_from_input,
               parent=check_parent(parent), job_key=job_key)


def default_backend(config, edit):
    """The backend when neither a flag nor the style names one."""
    return edit and config.data.get("default_edit_backend") or config.data["default_backend"]


def check_image_options(images, strength):
    """(the input images as a list, --strength as a float or None), checked without
    reading a file (prepare_inputs reads them)."""
    images = [] if images is None else [images] if isinstance(images, str) else list(images)
    if not images:
        if strength is not None:
            raise usage_error("--strength goes with --image: it says how far the result may "
                              "move from the input image")
        return [], None
    if len(images) > MAX_INPUT_IMAGES:
        raise usage_error("at most %d input images are allowed (got %d)"
                          % (MAX_INPUT_IMAGES, len(images)))
    if strength is None:
        return images, None
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
            or not 0 < strength <= 1:
        raise usage_error("--strength must be a number above 0 and at most 1 (got %r)"
                          % (strength,))
    return images, float(strength)


def prepare_job(config, env, **options):
    """resolve_job, then who asked: that may ask tmux, so only once the options are good."""
    job = resolve_job(config, env, **options)
    job.caller = resolve_caller(env)
    return job


def check_output_path(output, home):
    """--output as an absolute path to write, checked before anything is generated: UTF-8,
    and a regular file or nothing. A symlink is followed, so its target is replaced and
    the link stays, as `curl -o` does; a device, directory or FIFO is refused."""
    if not isinstance(output, str) or not output.strip() or not is_utf8(output):
        raise usage_error("--output must be a file path in UTF-8 (got %r)" % (output,))
    path = os.path.realpath(os.path.abspath(expand_home(output, home)))
    if os.path.exists(path) and not os.path.isfile(path):
        raise usage_error("--output %s exists and is not a regular file" % output)
    return path


def _given(value, default):
    return default if value is None else value


def resolve_caller(env):
    """Who asked: $MAI_FROM_ID, else the tmux pane's @mai-name, else the login name."""
    return _caller_from_env(env) or caller_from_tmux_pane(env) or _caller_login(env) or "unknown"


def _caller_from_env(env):
    return (env.get("MAI_FROM_ID") or "").strip()


def _caller_login(env):
    name = env.get("USER") or env.get("LOGNAME")
    if name:
        return name
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        return ""


# The spending guard: `--max-cost USD` (or `max_cost_usd` in the backend block) refuses
# a paid generation whose estimated cost is over the limit, before anything is submitted.

def check_spending_limit(job, adapter):
    limit, source = job.max_cost, "--max-cost"
    if limit is None:
        limit = adapter.block.get("max_cost_usd")
        source = "backends.%s.max_cost_usd" % job.backend
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0:
        raise usage_error("%s must be a number of US dollars, 0 or more (got %r)" % (source, limit))
    if not adapter.PAID:
        return
    estimate = adapter.estimate_for(job.count, job.width, job.height)
    if estimate is None:
        raise usage_error("%s: the cost of %s is unknown, so %s $%s cannot be enforced; "
                          "nothing was submitted" % (job.backend, adapter.model_id(), source,
                                                     dollars(limit)))
    if estimate > limit:
        raise usage_error("%s: estimated cost $%s for %d image(s) of %s is over %s $%s; "
                          "nothing was submitted" % (job.backend, dollars(estimate), job.count,
                                                     adapter.model_id(), source, dollars(limit)))


def warn_if_seed_unused(job, adapter, console):
    """A backend without seeds says once that a --seed given changes nothing."""
    if job.seed_given and not adapter.TAKES_SEED:
        console.warn("%s: %s takes no seed: --seed is ignored and the record's seed is null"
                     % (job.backend, adapter.model_id()))


def cloud_sync_mode(config, env, flag=None):
    """("auto" | "on" | "off", where that came from)."""
    mode, source = resolve_mode(config.output["cloud_sync"], env.get("IMAGEN_CLOUD_SYNC"),
                                flag, "IMAGEN_CLOUD_SYNC", "cloud")
    return mode, {"config": "output.cloud_sync", "env": "IMAGEN_CLOUD_SYNC",
                  "flag": "--no-cloud" if mode == "off" else "the cloud option"}[source]


def decide_cloud_sync(job, adapter, config, env):
    """Decide cloud sync once per generate (job.cloud_sync); `on` without what it needs
    is exit 2 before anything is generated. Returns the Supabase client the usage and
    cloud steps share (None when neither needs one), for the caller to close."""
    mode, source = cloud_sync_mode(config, env, job.cloud_flag)
    supabase = None
    if mode == "on":
        supabase = require_supabase(env, config, "cloud sync is on (%s) but" % source)
    job.cloud_sync = mode == "on" or (mode == "auto" and not missing_supabase_settings(env, config))
    if supabase is None and (job.cloud_sync or adapter.PAID):
        supabase = Supabase.from_env(env, cloud_timeout(config))
    if job.cloud_sync:
        cloud_table(config, "images_table")       # a bad name is exit 2 now, not a warning
    if supabase is not None and adapter.PAID:
        cloud_table(config, "usage_table")
    return supabase


def decide_preview(job, config, env):
    """Decided before generating (job.preview), so that `on` outside tmux fails with
    nothing written."""
    mode, _ = resolve_mode(config.output["preview"], env.get("IMAGEN_PREVIEW"),
                           job.preview_flag, "IMAGEN_PREVIEW", "preview")
    inside = inside_tmux(env)
    if mode == "on" and not inside:
        raise usage_error("preview is on, but this is not inside tmux ($TMUX is not set); "
                          "use --no-preview or IMAGEN_PREVIEW=auto")
    job.preview = mode == "on" or (mode == "auto" and inside and job.interactive)


# ===== Image input =====
# `--image FILE` (up to 8) and `imagen edit FILE PROMPT` (SPEC section 10). Each input is
# read once, checked by its bytes (PNG, JPEG or WebP, at most 20 MiB) and held against
# what the backend takes, all before anything is submitted; it then travels in the
# Request as an InputImage, and each adapter sends the bytes it holds as its server
# wants them (no second read of the file). The record lists every input, with the
# generation id of one imagen made, so a chain of edits can be followed back.

class InputImage:
    """One input image: its bytes and what they are. `path` is absolute, or None for
    bytes that came without a file (serve); `id` is the generation id recorded in it."""

    __slots__ = ("path", "data", "sha256", "mime_type", "width", "height", "id")

    def __init__(self, path, data, sha256, mime_type, width, height, ident=None):
        self.path, self.data, self.sha256, self.mime_type = path, data, sha256, mime_type
        self.width, self.height, self.id = width, height, ident

    @property
    def upload_name(self):
        """A name that is the same for the same bytes, so a server that keeps uploads
        recognises a second upload of them."""
        return "imagen-%s.%s" % (self.sha256[:16], MIME_EXTENSIONS[self.mime_type])

    def record(self):
        entry = {"path": self.path, "sha256": self.sha256, "bytes": len(self.data),
                 "mime_type": self.mime_type, "width": self.width, "height": self.height}
        if self.id:
            entry["id"] = self.id
        return entry


def read_input_image(given, home):
    """The InputImage of an --image path; exit 2 naming the file when it is missing,
    unreadable, not a regular file, over 20 MiB, empty or not PNG/JPEG/WebP."""
    where = "--image %s" % (given,)
    if not isinstance(given, str) or not given.strip() or not is_utf8(given):
        raise usage_error("--image must be a file path in UTF-8 (got %r)" % (given,))
    path = os.path.abspath(expand_home(given, home))
    try:
        data = read_capped(path, MAX_INPUT_BYTES)
    except OSError as exc:
        raise usage_error("%s: %s" % (where, exc.strerror or exc)) from None
    return input_image(data, where, path)


def input_image(data, where, path=None):
    """The InputImage of bytes said to be an image (`where` names them in errors)."""
    if not data:
        raise usage_error("%s: the file is empty" % where)
    if len(data) > MAX_INPUT_BYTES:
        raise usage_error("%s: over the %s limit" % (where, byte_size(MAX_INPUT_BYTES)))
    try:
        mime_type, width, height = image_info(data)
    except ImagenError as exc:
        raise usage_error("%s: not a PNG, JPEG or WebP image (%s)" % (where, exc.message)) from None
    import hashlib
    digest = hashlib.sha256(data).hexdigest()
    return InputImage(path, data, digest, mime_type, width, height,
                      recorded_generation_id(data, mime_type, path, digest))


def recorded_generation_id(data, mime_type, path, digest):
    """The `id` of the imagen record an input carries (embedded in a PNG, else in a
    sidecar that still matches the file), or None."""
    import json
    texts = []
    if mime_type == "image/png":
        texts.append(png_texts(data, ("imagen",)).get("imagen"))
    if path and os.path.isfile(path + ".json"):
        try:
            sidecar = read_capped(path + ".json", MAX_RECORD_BYTES)
        except OSError:
            sidecar = None
        texts.append(sidecar)
    for text in texts:
        try:
            record = json.loads(text) if text else None
        except JSON_ERRORS + (TypeError,):
            continue
        if not isinstance(record, dict) or record.get("sha256") not in (None, digest):
            continue
        ident = record.get("id")
        if isinstance(ident, str) and 0 < len(ident) <= 100:
            return ident
    return None


def prepare_inputs(job, adapter, console):
    """Hold the input images against what the backend takes, then read them into
    job.images (exit 2 naming the file or the backend, before any request). With
    job.size_from_input, the first input's size, rounded to the backend's multiple, is
    the size asked for."""
    if not job.images:
        return
    limit = adapter.max_images()
    if not limit:
        raise usage_error("backend %s takes no input images (imagen backends shows the ones "
                          "that do)" % adapter.name)
    if len(job.images) > limit:
        raise usage_error("backend %s takes at most %d input image%s; %d given"
                          % (adapter.name, limit, "" if limit == 1 else "s", len(job.images)))
    if job.strength is not None and not adapter.takes_strength():
        console.warn("%s: note: this backend ignores --strength" % adapter.name)
    job.images = [item if isinstance(item, InputImage) else read_input_image(item, job.home)
                  for item in job.images]
    if job.size_from_input:
        first = job.images[0]
        job.width, job.height = (input_side(first.width, adapter.SIZE_MULTIPLE),
                                 input_side(first.height, adapter.SIZE_MULTIPLE))


def input_side(pixels, multiple):
    """A side of an input as a size to ask for: rounded to `multiple`, within 64..4096."""
    rounded = (pixels + multiple // 2) // multiple * multiple     # halves up, as comfyui does
    return min(SIZE_MAX // multiple * multiple, max(-(-SIZE_MIN // multiple) * multiple, rounded))


# ===== Record and files =====
# The result record, the checks that its files can be created, and the writes themselves:
# atomic, and never over an existing file unless --output names it.

def check_output_creatable(job, config):
    """Exit 2 before anything is submitted (a paid backend bills at once) when an image or
    its sidecar could not be created where it is going. What only the write itself can
    tell (a full disk) comes later, as ImageNotWritten."""
    longest = max(MIME_EXTENSIONS, key=lambda mime: len(MIME_EXTENSIONS[mime]))
    now = clock.time()
    seeded = ADAPTERS[job.adapter].TAKES_SEED       # else every name says noseed
    paths = sorted({image_path(job, config, {"mime_type": longest,
                                             "seed": seed if seeded else None}, index, now)[0]
                    for index, seed in enumerate(job.seeds)})
    for path in paths:
        problem = output_problem(path, job.sidecar)
        if problem:
            where = "--output %s" % job.output_given if job.output else "output: %s" % path
            raise usage_error("%s: %s; nothing was submitted" % (where, problem))


def output_problem(path, sidecar):
    """Why the image at `path` (or its sidecar) could not be created, or None. os.access
    asks the kernel, so a read-only mount counts, and root (who may write anywhere) passes."""
    existing = os.path.dirname(path)
    while not os.path.isdir(existing):
        # isdir again: another process (or batch job) may have just made it
        if os.path.lexists(existing) and not os.path.isdir(existing):
            return "%s is not a directory" % existing
        existing = os.path.dirname(existing)
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > name_max:
            return _too_long("the name", part, name_max)
    sidecar_path = path + ".json"
    if sidecar and len(os.fsencode(os.path.basename(sidecar_path))) > name_max:
        return _too_long("the sidecar name", os.path.basename(sidecar_path), name_max) + \
            " (or use --no-sidecar)"
    if sidecar and os.path.lexists(sidecar_path) and not os.path.isfile(sidecar_path):
        return "%s exists and is not a regular file (or use --no-sidecar)" % sidecar_path
    longest = sidecar_path if sidecar else path
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    if len(os.fsencode(longest)) >= path_max:
        return "the path %s... is %d bytes; this system takes fewer than %d" % (
            longest[:40], len(os.fsencode(longest)), path_max)
    if not os.access(existing, os.W_OK | os.X_OK):
        return "cannot create files in %s" % existing
    return None


def _too_long(what, name, name_max):
    return "%s %s... is %d bytes; this filesystem takes at most %d" % (
        what, name[:40], len(os.fsencode(name)), name_max)


def _pathconf(directory, name, default):
    try:
        value = os.pathconf(directory, name)
    except (OSError, ValueError, AttributeError):   # no such limit, or no pathconf (Windows)
        return default
    return value if value and value > 0 else default


class ImageNotWritten(ImagenError):
    """A generated (maybe billed) image that could not be written, with its record."""

    def __init__(self, message, record):
        super().__init__(message)
        self.record = record


def save_result(result, job, config, index, latency_ms):
    """Check the bytes, embed the record, write the image; return the full record."""
    try:
        mime_type, width, height = image_info(result.data)
    except ImagenError as exc:
        raise ImagenError("%s: bad image: %s" % (job.backend, exc.message)) from None
    now = clock.time()
    record = build_record(result, job, mime_type, width, height, latency_ms, now)
    data = result.data
    if mime_type == "image/png" and job.embed:
        data = embed_record(data, record)
    try:
        path = write_image(data, job, config, record, index, now)
    except ImagenError as exc:
        path, _ = image_path(job, config, record, index, now)
        raise ImageNotWritten(exc.message, final_record(record, path, data)) from None
    return final_record(record, path, data)


def final_record(record, path, data):
    record = dict(record, file=os.path.basename(path), bytes=len(data), sha256=sha256_hex(data))
    return dict({key: record[key] for key in RECORD_FIELDS}, path=path)


def write_sidecar(record, console):
    """The sidecar copies what the PNG and the ledger keep too: failing to write it is one
    warning, and the image stays. A sidecar left at this path by an earlier image is
    removed, so that it cannot describe the new one."""
    path = record["path"] + ".json"
    data = (to_json(sidecar_record(record), indent=2) + "\n").encode("utf-8")
    try:
        write_atomic(path, data, overwrite=True)
    except ImagenError as exc:
        console.warn("sidecar: %s" % exc.message)
        try:
            os.unlink(path)
        except OSError:
            pass


def lost_image_message(message, exc, failed):
    """For an image generated but not written: its cost happened anyway, and after_write
    (with `unwritten`) wrote its ledger and usage rows; `failed` names the steps that
    failed."""
    cost = exc.record["cost_usd"]
    return "%s, its cost (%s) %s" % (
        message, "unknown" if cost is None else "$" + dollars(cost),
        "could not be recorded" if "ledger" in failed else "is in the ledger")


# What an image is when its name says so: `--output fox.jpg` of a PNG gets a warning.
NAMED_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
               "webp": "image/webp", "gif": "image/gif", "bmp": "image/bmp",
               "tif": "image/tiff", "tiff": "image/tiff", "avif": "image/avif",
               "heic": "image/heic", "jxl": "image/jxl"}


def warn_misnamed_output(record, job, console):
    """The bytes are written as asked, like `curl -o`; but a viewer or uploader that goes
    by the name may refuse them, so say so once."""
    if not job.output:
        return
    given = job.output_given
    ext = os.path.splitext(given)[1][1:].lower()
    named = NAMED_TYPES.get(ext)
    if named and named != record["mime_type"]:
        console.warn("--output %s: the image is %s, but the name says .%s; written as asked"
                     % (given, record["mime_type"].split("/")[1].upper(), ext))


RECORD_FIELDS = ("schema", "id", "file", "prompt", "final_prompt", "negative", "style",
                 "backend", "adapter", "model", "seed", "steps", "width", "height",
                 "requested_size", "mime_type", "bytes", "sha256", "latency_ms", "cost_usd",
                 "created_at", "caller", "imagen_version", "backend_meta", "inputs", "strength",
                 "parent")
EMBEDDED_LEAVES_OUT = ("file", "bytes", "sha256")


def build_record(result, job, mime_type, width, height, latency_ms, now):
    # the generation id is made here, once per image: the ledger, usage and cloud rows
    # take it from the record
    return {"schema": RECORD_SCHEMA, "id": new_uuid(), "file": None, "prompt": job.prompt,
            "final_prompt": job.final_prompt, "negative": job.negative,
            "style": job.style, "backend": job.backend, "adapter": job.adapter,
            "model": result.model, "seed": result.seed,
            "steps": result.steps if result.steps is not None else job.steps,
            "width": width, "height": height, "requested_size": job.requested_size,
            "mime_type": mime_type, "bytes": None, "sha256": None, "latency_ms": latency_ms,
            "cost_usd": result.cost_usd, "created_at": iso_time(now), "caller": job.caller,
            "imagen_version": version_string(), "backend_meta": result.meta,
            "inputs": [image.record() for image in job.images], "strength": job.strength,
            "parent": job.parent}


def sha256_hex(data):
    """hashlib's OpenSSL backend costs more to import than it saves on one image: the
    private module saves about 3 ms on every generate (`make bench` prints it)."""
    try:
        from _sha2 import sha256          # CPython 3.12+
    except ImportError:
        try:
            from _sha256 import sha256    # CPython 3.8-3.11
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()


def iso_time(now):
    """Local time in ISO 8601 with its UTC offset, e.g. 2026-05-11T01:51:09+02:00."""
    tm = time.localtime(now)
    offset = tm.tm_gmtoff
    sign = "+" if offset >= 0 else "-"
    offset = abs(offset) // 60
    return time.strftime("%Y-%m-%dT%H:%M:%S", tm) + "%s%02d:%02d" % (sign, offset // 60, offset % 60)


def embed_record(data, record):
    embedded = {k: v for k, v in record.items() if k not in EMBEDDED_LEAVES_OUT}
    return png_insert_chunks(data, png_itxt_chunk("imagen", to_json(embedded))
                             + png_text_chunk("parameters", parameters_text(record)))


def parameters_text(record):
    """The common "prompt / Negative prompt: / Steps: ..." text other image tools read."""
    lines = [record["final_prompt"]]
    if record["negative"]:
        lines.append("Negative prompt: %s" % record["negative"])
    seed = "" if record["seed"] is None else "Seed: %s, " % record["seed"]   # a seedless backend
    lines.append("Steps: %s, %sSize: %sx%s, Model: %s, Backend: %s" % (
        record["steps"], seed, record["width"], record["height"],
        record["model"], record["backend"]))
    # prompts with a NUL are refused; a model or style from a config or server may still
    # carry one, and tEXt text must not
    return "\n".join(lines).replace("\x00", "")


# ----- naming and atomic writes -----

def safe_value(value):
    """A placeholder value that cannot add a path separator or a `..`."""
    text = str(value).replace("/", "-").replace("\\", "-").replace(os.sep, "-")
    while ".." in text:
        text = text.replace("..", ".")
    return text.strip() or "_"


def render_name(template, values):
    import re

    def fill(match):
        key = match.group(1)
        return safe_value(values[key]) if key in values else match.group(0)

    return re.sub(r"\{(\w+)\}", fill, template)


def image_path(job, config, record, index, now):
    """(path, overwrite?) for one image: --output as given, else the naming template."""
    ext = MIME_EXTENSIONS[record["mime_type"]]
    if job.output:
        path = job.output             # absolute, checked by resolve_job
        if index:
            stem, dot_ext = os.path.splitext(path)
            path = "%s-%d%s" % (stem, index + 1, dot_ext)
        return path, True
    tm = time.localtime(now)
    values = {"date": time.strftime("%Y-%m-%d", tm), "time": time.strftime("%H%M%S", tm),
              "slug": slugify(job.prompt),
              "seed": "noseed" if record["seed"] is None else record["seed"],
              "backend": job.backend, "ext": ext}
    name = render_name(config.output["naming"], values)
    base = expand_home(config.output["dir"], job.home)
    return os.path.abspath(os.path.join(base, expand_home(name, job.home))), False


def write_image(data, job, config, record, index, now):
    path, overwrite = image_path(job, config, record, index, now)
    return write_atomic(path, data, overwrite=overwrite)


def write_atomic(path, data, overwrite):
    """Write via a temp file in the same directory; without overwrite, never replace an
    existing file but take the first free `-2`, `-3`, ... name. Returns the path used."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ImagenError("cannot create %s: %s" % (directory, exc.strerror or exc)) from None
    # at most 80 bytes of the name: a name that fits must not get a temp name that does not
    stem = os.fsencode(os.path.basename(path))[:80].decode("utf-8", "ignore")
    temp = os.path.join(directory, ".%s.%d.%s.tmp" % (stem, os.getpid(), os.urandom(4).hex()))
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(temp, path)
            return path
        return _link_first_free(temp, path)
    except OSError as exc:
        raise ImagenError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _write_all(fd, data):
    """Every byte to the file, then to the disk (a seam: tests make it fail as on a full
    disk, which no test machine can be made to be)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _link_first_free(temp, path):
    stem, ext = os.path.splitext(path)
    candidate, number = path, 1
    while True:
        try:
            os.link(temp, candidate)   # atomic, and fails if the name is taken
            return candidate
        except FileExistsError:
            number += 1
            candidate = "%s-%d%s" % (stem, number, ext)
        except OSError:
            # no hard links on this filesystem: reserve the name, then replace it
            try:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                number += 1
                candidate = "%s-%d%s" % (stem, number, ext)
                continue
            os.replace(temp, candidate)
            return candidate


def sidecar_record(record):
    """The record as the sidecar holds it: everything but the local path."""
    return {key: value for key, value in record.items() if key != "path"}


# ===== After the write =====
# Best-effort work after an image is safely on disk, called in order by after_write. Each
# failure is one warning line; none changes the exit code or touches the written files.

def after_write(record, job, index, adapter, supabase, config, env, console, unwritten=None):
    """The steps after an image is on disk, in this order: its ledger row, its usage row,
    its cloud sync, its preview. Each is best-effort: a failure is one warning, and none
    changes the exit code or touches the written files. With `unwritten` (the message of
    an image generated but not written), only the rows that record its cost are written.
    Returns the names of the steps that failed."""
    failed = []

    def step(name, function, *args):
        return best_effort(failed, name, console, env, function, *args)

    generation = record["id"]   # made once per image: its ledger, usage and image rows share it
    cloud_sync = job.cloud_sync and unwritten is None
    # the ledger stays open for the cloud step to record its outcome: one open per image
    ledger = step("ledger", record_in_ledger, env, record, generation, cloud_sync, unwritten,
                  job.job_key)
    try:
        if not cloud_sync and ledger is not None:
            ledger.close()
            ledger = None
        step("usage", record_usage, record, generation, adapter, supabase, config)
        if cloud_sync:
            step("cloud sync", sync_to_cloud, record, generation, supabase, config, env, ledger)
    finally:
        if ledger is not None:
            ledger.close()
    if unwritten is None and job.preview and index == job.count - 1:
        # with --count N, one window: the last image's (the others' paths are on stdout)
        step("preview", open_preview_window, record["path"], record["prompt"],
             config.output["preview_command"], env)
    return failed


def best_effort(failed, name, console, env, function, *args):
    """function(*args), or None with a warning and `name` added to `failed`."""
    try:
        return function(*args)
    except KeyboardInterrupt:
        raise
    except ImagenError as exc:
        console.warn("%s: %s" % (name, exc.message))
    except Exception as exc:  # a step's bug must not lose the image's exit code
        _debug_traceback(env)
        console.warn("%s: %s: %s" % (name, type(exc).__name__, scrub_secrets(str(exc), env)))
    failed.append(name)
    return None


def prompt_sha256(record):
    return sha256_hex(record["prompt"].encode("utf-8"))


def ledger_row(record, generation, cloud):
    return {"id": generation, "path": record["path"], "sha256": record["sha256"],
            "backend": record["backend"], "adapter": record["adapter"],
            "model": record["model"], "cost_usd": record["cost_usd"],
            "latency_ms": record["latency_ms"], "prompt_sha256": prompt_sha256(record),
            "caller": record["caller"], "created_at": record["created_at"],
            "seed": record["seed"], "width": record["width"], "height": record["height"],
            "cloud": cloud, "record": to_json(sidecar_record(record)),
            "parent": record.get("parent")}


def record_in_ledger(env, record, generation, cloud_sync, unwritten=None, job_key=None):
    """The image's ledger row; returns the ledger, open, for the caller to close."""
    ledger = open_ledger(env)
    row = ledger_row(record, generation, "pending" if cloud_sync else "off")
    if unwritten:
        row["error"] = unwritten       # no file: the row keeps the cost and says why
    if job_key:
        row["job_key"] = job_key       # a batch job: its rerun skips this image
    try:
        ledger.add(row)
    except BaseException:
        ledger.close()
        raise
    return ledger


# ----- usage rows and cloud sync -----
# A sync uploads the file (upsert), then inserts its row (ignore-duplicates); the ledger
# keeps the state, so `imagen sync` finishes whatever a generate could not.

def usage_row(record, generation):
    """The cost of one paid generation: never the prompt, only its hash."""
    return {"id": generation, "created_at": record["created_at"], "backend": record["backend"],
            "model": record["model"], "latency_ms": record["latency_ms"],
            "cost_usd": record["cost_usd"], "prompt_sha256": prompt_sha256(record),
            "caller": record["caller"]}


def record_usage(record, generation, adapter, supabase, config):
    if not adapter.PAID or supabase is None:
        return     # the ledger has the cost either way
    supabase.insert(cloud_table(config, "usage_table"), [usage_row(record, generation)],
                    clock.monotonic() + cloud_timeout(config))


def image_row(generation, owner, key, record):
    """The imagen.images row: every column of SPEC section 8."""
    return {"id": generation, "owner_user_id": owner, "storage_path": key,
            "prompt": record["prompt"], "prompt_sha256": prompt_sha256(record),
            "backend": record["backend"], "model": record["model"], "seed": record["seed"],
            "steps": record["steps"], "width": record["width"], "height": record["height"],
            "latency_ms": record["latency_ms"], "cost_usd": record["cost_usd"],
            "sidecar": record, "tags": [], "created_at": record["created_at"]}


UNREADABLE_RECORD = "its ledger record is not JSON"


class CloudPush:
    """Upload one generation and insert its row; the outcome is a ledger state."""

    def __init__(self, supabase, config):
        self.supabase, self.config = supabase, config
        self.cloud = config.data["cloud"]

    def push(self, generation, path, record, storage_path=None):
        """(state, storage_path, error message or None). A `storage_path` already known
        (the partial case) skips the upload: the object is there. State "rejected": the
        key can never be stored, a retry would fail the same way."""
        if record is None:    # a ledger row whose record is not JSON: nothing to upload from
            return "off", None, UNREADABLE_RECORD + "; left out of cloud sync"
        deadline = clock.monotonic() + cloud_timeout(self.config)
        try:
            if storage_path is None:
                key = storage_key(record)
                data = read_generated_file(path, record)
                self.supabase.upload(self.cloud["bucket"], key, data, record["mime_type"],
                                     deadline)
                storage_path = key
        except KeyRefused as exc:
            return "rejected", None, exc.message
        except ImagenError as exc:
            return "failed", None, exc.message
        try:
            row = image_row(generation, self.config.data["owner_user_id"], storage_path, record)
            self.supabase.insert(cloud_table(self.config, "images_table"), [row], deadline)
        except ImagenError as exc:
            return "partial", storage_path, "uploaded %s, but %s" % (storage_path, exc.message)
        return "synced", storage_path, None


def read_generated_file(path, record):
    """The image as generated: a file edited or replaced since then is not uploaded."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ImagenError("%s: %s" % (path, exc.strerror or exc)) from None
    if record.get("sha256") and sha256_hex(data) != record["sha256"]:
        raise ImagenError("%s changed since it was generated (sha256 differs)" % path)
    return data


def sync_to_cloud(record, generation, supabase, config, env, ledger=None):
    """Upload the image and insert its row, then record the outcome in the ledger (the
    open `ledger`, or one opened here when the ledger step could not give one)."""
    push = CloudPush(supabase, config)
    state, storage_path, error = push.push(generation, record["path"], sidecar_record(record))
    try:
        if ledger is not None:
            ledger.set_cloud(generation, state, storage_path, error)
        else:
            with open_ledger(env) as own:
                own.set_cloud(generation, state, storage_path, error)
    except ImagenError as exc:
        if not error:
            raise
        error = "%s (and the ledger: %s)" % (error, exc.message)
    if state == "rejected":
        error += "; refused for good: imagen sync skips it"
    if error:
        raise ImagenError(error)


# ===== Generate pipeline and library API =====
# Resolve a Job, call the adapter, check the bytes, embed the record, write image and
# sidecar atomically, then run the after-write steps. generate() is the library's door.

def generate(prompt, *, backend=None, size=None, seed=None, steps=None, style=None,
             negative=None, count=1, timeout=None, output=None, sidecar=None, preview=None,
             cloud=None, max_cost=None, images=None, strength=None, config=None, env=None,
             console=None, quiet=False, interactive=False, post_steps=True):
    """Generate images and return their result records (each with "path"); see the
    module docstring."""
    options = {"backend": backend, "size": size, "seed": seed, "steps": steps,
               "style": style, "negative": negative, "count": count, "timeout": timeout,
               "output": output, "sidecar": sidecar, "preview": preview, "cloud": cloud,
               "max_cost": max_cost, "images": images, "strength": strength,
               "interactive": interactive}
    return list(generate_records(prompt, options, config, env, console, quiet,
                                 post_steps=post_steps))


def generate_records(prompt, options, config=None, env=None, console=None, quiet=False,
                     post_steps=True, on_written=None):
    """Yield each result record as soon as its image and sidecar are on disk. `config` is
    a Config, a path, or None for the default place; `options` are resolve_job's."""
    env = dict(os.environ) if env is None else env
    console = console or Console(quiet=quiet)
    config = load_config_and_warn(config, env, console)
    try:
        job = prepare_job(config, env, prompt=prompt, **options)
    except ImagenError as exc:
        raise ImagenError("generate: " + exc.message, exc.code) from None
    return generate_images(job, config, env, console, on_written, post_steps)


def generate_images(job, config, env, console, on_written=None, post_steps=True,
                    on_adapter=None):
    """Run a Job: the checks that need the adapter, then one image after another, each
    written and followed by the after-write steps, and yielded. `on_adapter(adapter)` is
    called once the adapter is made (batch: to cancel its job on Ctrl-C, to free its host)."""
    check_output_creatable(job, config)
    adapter = make_adapter(job.backend, config, env, console)
    if on_adapter:
        on_adapter(adapter)
    try:
        prepare_inputs(job, adapter, console)
    except ImagenError as exc:
        raise ImagenError("generate: " + exc.message, exc.code) from None
    adapter.check_ready()
    warn_if_seed_unused(job, adapter, console)
    # in this order, which decides whose exit 2 a user sees first
    check_spending_limit(job, adapter)
    supabase = decide_cloud_sync(job, adapter, config, env)
    decide_preview(job, config, env)
    try:
        yield from run_adapter(job, adapter, supabase, config, env, console, on_written,
                               post_steps)
    finally:
        if supabase is not None:
            supabase.http.close()


def run_adapter(job, adapter, supabase, config, env, console, on_written, post_steps):
    deadline = clock.monotonic() + job.timeout
    requests = [Request(job.final_prompt, job.negative, seed, job.steps, job.width,
                        job.height, index, job.count, images=job.images, strength=job.strength)
                for index, seed in enumerate(job.seeds)]
    started = clock.monotonic()
    results = adapter.generate_all(requests, deadline)
    for index in range(job.count):
        try:
            result = scrub_result(next(results), env, adapter.secrets())
        except StopIteration:
            raise ImagenError("%s: returned %d of %d images" % (job.backend, index, job.count))
        except BaseException:
            adapter.cancel()
            raise
        finally:
            console.clear()
        latency_ms = int((clock.monotonic() - started) * 1000)
        try:
            record = save_result(result, job, config, index, latency_ms)
        except ImageNotWritten as exc:
            message = "%s; the image is lost" % exc.message
            if post_steps:
                message = lost_image_message(message, exc, after_write(
                    exc.record, job, index, adapter, supabase, config, env, console,
                    unwritten=exc.message))
            raise ImagenError(message) from None
        if job.sidecar:
            write_sidecar(record, console)
        if index == 0:
            warn_misnamed_output(record, job, console)
        try:
            if on_written:
                on_written(record)
        finally:   # a closed stdout must not cost the image its ledger row or upload
            if post_steps:
                after_write(record, job, index, adapter, supabase, config, env, console)
        started = clock.monotonic()
        yield record


# ===== Reports =====
# inspect, schema, usage, sync and url read the config through report_config; history
# reads only the ledger.

def report_config(args, env):
    """(config, console) for a report command, the config's warnings shown."""
    console = Console()
    return load_config_and_warn(getattr(args, "config", None), env, console), console


# ===== Reports: inspect =====

def read_metadata(path):
    """{"file", "mime_type", "width", "height", "embedded", "sidecar", "sidecar_matches"} for
    an image file written by imagen. sidecar_matches: does the file still have the sha256
    its sidecar recorded (None without one)."""
    import hashlib
    import json
    try:
        data = read_capped(path, MAX_INSPECT_BYTES)
    except OSError as exc:
        raise usage_error("inspect: %s: %s" % (path, exc.strerror or exc)) from None
    try:
        mime_type, width, height = image_info(data)
    except ImagenError as exc:
        raise usage_error("inspect: %s: %s" % (path, exc.message)) from None
    embedded = None
    if mime_type == "image/png":
        text = png_texts(data, ("imagen",)).get("imagen")
        if text:
            try:
                embedded = json.loads(text)
            except JSON_ERRORS:
                raise ImagenError("inspect: %s: the embedded record is not JSON" % path) from None
    sidecar = None
    if os.path.exists(path + ".json"):
        try:
            sidecar = json.loads(read_capped(path + ".json", MAX_RECORD_BYTES))
        except OSError as exc:
            raise usage_error("inspect: %s.json: %s" % (path, exc.strerror or exc)) from None
        except JSON_ERRORS as exc:
            raise ImagenError("inspect: %s.json: %s" % (path, exc)) from None
    if embedded is None and sidecar is None:
        raise usage_error("inspect: %s: no imagen metadata (no embedded record, no sidecar)" % path)
    recorded = sidecar.get("sha256") if isinstance(sidecar, dict) else None
    matches = None if not recorded else recorded == hashlib.sha256(data).hexdigest()
    return {"file": os.path.abspath(path), "mime_type": mime_type, "width": width,
            "height": height, "embedded": embedded, "sidecar": sidecar,
            "sidecar_matches": matches}


INSPECT_CHAIN_MAX = 64     # steps back through the inputs; a longer chain is cut there


def input_chain(record, env):
    """The images this one was made from, back as far as the files or the ledger know:
    [{id, path, sha256, prompt, backend, created_at, found}], following each record's
    first input (the start image). `found` says where its record was read: "file" (the
    input is still there, unchanged), "ledger", or null (only the path and hash are known)."""
    chain, seen, ledger = [], set(), None
    try:
        while isinstance(record, dict) and len(chain) < INSPECT_CHAIN_MAX:
            inputs = record.get("inputs")
            first = inputs[0] if isinstance(inputs, list) and inputs else None
            if not isinstance(first, dict):
                break
            ident = first.get("id")
            record, found = record_of_input(first), "file"
            if record is None and isinstance(ident, str):
                ledger = ledger or ledger_if_present(env)
                rows = ledger_rows_with_id(ledger, ident) if ledger else []
                record, found = rows[0]["record"] if rows else None, "ledger"
            step = {key: first.get(key) for key in ("id", "path", "sha256")}
            known = record if isinstance(record, dict) else {}
            step.update({key: known.get(key) for key in ("prompt", "backend", "created_at")})
            step["found"] = found if known else None
            chain.append(step)
            if ident in seen:
                break        # a record that names itself (edited by hand): stop going round
            seen.add(ident)
    finally:
        if ledger is not None:
            ledger.close()
    return chain


def record_texts(path, data):
    """Where the imagen record of the file at `path` (its bytes `data`) may be, in order:
    the PNG's `imagen` chunk, or the file itself when it is a sidecar; then its sidecar."""
    if data[:8] == PNG_SIGNATURE:
        texts = [png_texts(data, ("imagen",)).get("imagen")]
    else:
        texts = [data] if data.lstrip()[:1] == b"{" else []
    if os.path.isfile(path + ".json"):
        try:
            texts.append(read_capped(path + ".json", MAX_RECORD_BYTES))
        except OSError:
            pass
    return [text for text in texts if text]


def record_of_input(entry):
    """The imagen record of an input file that is still at its path with its recorded
    sha256 (embedded in a PNG, else its sidecar), or None."""
    import json
    path = entry.get("path")
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    try:
        data = read_capped(path, MAX_INPUT_BYTES)
    except OSError:
        return None
    import hashlib
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return None
    for text in record_texts(path, data):
        try:
            record = json.loads(text)
        except (JSON_ERRORS + (TypeError, ImagenError)):
            continue
        if isinstance(record, dict):
            return record
    return None


def ledger_rows_with_id(ledger, ident):
    try:
        return ledger._select("WHERE id = ?", (ident,), order="")
    except ledger.error:
        return []       # a damaged ledger: the chain ends here


def ledger_if_present(env):
    """The ledger when one exists (inspect never creates one), else None."""
    path = ledger_path(env)
    if not os.path.isfile(path):
        return None
    try:
        return Ledger(path)
    except ImagenError:
        return None


# ===== Reports: schema =====
# `imagen schema` prints the SQL for the Supabase side, for a newcomer to run once on a
# new project. Every statement is idempotent, so running it again (after an upgrade, or
# by mistake) changes nothing; it runs in one transaction, so a failure leaves nothing
# half-made.

SCHEMA_HEADER = """\
-- imagen schema: everything imagen needs on a Supabase project (tables %(images)s and
-- %(usage)s, the private Storage bucket %(bucket)s, row-level security and grants).
--
-- Run it once on a new project: paste it into the SQL editor and press Run, or
--   imagen schema | psql "$DATABASE_URL" -v ON_ERROR_STOP=1
-- Running it again is safe: it only creates what is missing and re-creates its policies.
--
-- Then expose the schemas to the REST API, or every request fails with PGRST106:
-- Dashboard > Project Settings > Data API > Exposed schemas: add %(schemas)s
-- (self-hosted PostgREST: add them to db-schemas / PGRST_DB_SCHEMAS).
--
-- On plain PostgreSQL, create first what Supabase provides: the roles anon, authenticated
-- and service_role (bypassrls), auth.users and auth.uid(), storage.buckets/objects.

begin;
"""

SCHEMA_PER_SCHEMA = """
create schema if not exists %(schema)s;
grant usage on schema %(schema)s to anon, authenticated, service_role;
"""

SCHEMA_TABLES = """
-- One row per image synced to Storage. imagen sends every column, the id included
-- (a client UUID, so a retried insert is ignored, never doubled) and owner_user_id (the
-- service key has no user, so auth.uid() cannot fill it in).
create table if not exists %(images)s (
  id            uuid primary key,
  owner_user_id uuid not null references auth.users (id) on delete cascade,
  storage_path  text not null,    -- key inside the bucket: 2026-05-11/a-red-fox-42.png
  prompt        text not null,
  prompt_sha256 text not null check (prompt_sha256 ~ '^[0-9a-f]{64}$'),
  backend       text not null,    -- the config's instance name
  model         text not null,
  seed          bigint check (seed >= 0),   -- up to 2^63-1; null: a backend without seeds
  steps         integer not null check (steps >= 0),
  width         integer not null check (width > 0),
  height        integer not null check (height > 0),
  latency_ms    integer not null check (latency_ms >= 0),
  cost_usd      numeric check (cost_usd >= 0),           -- null when the price is unknown
  sidecar       jsonb not null check (jsonb_typeof(sidecar) = 'object'),
  tags          text[] not null default '{}',
  created_at    timestamptz not null default now()
);
-- Projects made by an imagen before the openai backend have seed not null.
alter table %(images)s alter column seed drop not null;
-- storage_path is not unique on purpose: `--output` may write the same file name again
-- on the same day; the upload then replaces the object and each generation keeps its row.
create index if not exists %(images_index)s on %(images)s (owner_user_id, created_at);

-- One row per generation through a paid backend: the cost report. Never the prompt.
create table if not exists %(usage)s (
  id            uuid primary key,
  created_at    timestamptz not null default now(),
  backend       text not null,
  model         text not null,
  latency_ms    integer not null check (latency_ms >= 0),
  cost_usd      numeric check (cost_usd >= 0),
  prompt_sha256 text not null check (prompt_sha256 ~ '^[0-9a-f]{64}$'),
  caller        text not null default ''
);
create index if not exists %(usage_index)s on %(usage)s (created_at, id);

-- Row-level security: a signed-in user reads only their own images; usage rows have no
-- owner and no policy, so only the service role (which bypasses RLS) reads or writes.
alter table %(images)s enable row level security;
alter table %(usage)s enable row level security;
drop policy if exists "owner reads own images" on %(images)s;
create policy "owner reads own images" on %(images)s
  for select to authenticated using (owner_user_id = (select auth.uid()));

-- Grants: new projects no longer grant new tables to the API roles automatically, and
-- older ones granted too much; state exactly what each role may do.
revoke all on %(images)s, %(usage)s from anon, authenticated, service_role;
grant select on %(images)s to authenticated;
grant select, insert, update, delete on %(images)s, %(usage)s to service_role;

-- Storage: a private bucket. imagen uploads with the service key, which bypasses the
-- policies below; they let a signed-in user read the images whose rows are theirs and
-- upload or upsert objects they own (an upsert needs INSERT, SELECT and UPDATE).
insert into storage.buckets (id, name, public)
  values (%(bucket_literal)s, %(bucket_literal)s, false)
  on conflict (id) do nothing;
-- Where the role running this does not own storage.objects (newer projects), creating
-- policies on it fails with "must be owner of table objects": then this block only
-- warns, so the tables above are still created; add the policies under Storage > Policies.
do $policies$
begin
  drop policy if exists %(read_policy)s on storage.objects;
  create policy %(read_policy)s on storage.objects
    for select to authenticated using (
      bucket_id = %(bucket_literal)s and (
        owner_id = (select auth.uid())::text
        or exists (select 1 from %(images)s as image
                   where image.storage_path = objects.name
                     and image.owner_user_id = (select auth.uid()))));
  drop policy if exists %(insert_policy)s on storage.objects;
  create policy %(insert_policy)s on storage.objects
    for insert to authenticated with check (
      bucket_id = %(bucket_literal)s and owner_id = (select auth.uid())::text);
  drop policy if exists %(update_policy)s on storage.objects;
  create policy %(update_policy)s on storage.objects
    for update to authenticated
    using (bucket_id = %(bucket_literal)s and owner_id = (select auth.uid())::text)
    with check (bucket_id = %(bucket_literal)s and owner_id = (select auth.uid())::text);
exception when insufficient_privilege then
  raise warning 'imagen: storage policies not created (%%): add them under Storage > Policies '
    '(imagen itself needs none: it uploads with the service key)', sqlerrm;
end
$policies$;

commit;

-- Tell PostgREST to reload its schema cache, so the new tables answer at once.
notify pgrst, 'reload schema';
"""


def schema_sql(cloud):
    """The SQL of `imagen schema` for the config's `cloud` block (tables and bucket)."""
    import re
    images = split_table_name("cloud.images_table", cloud["images_table"])
    usage = split_table_name("cloud.usage_table", cloud["usage_table"])
    bucket = str(cloud["bucket"])
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", bucket):
        raise usage_error("cloud.bucket must be letters, digits, '.', '_' and '-' (got %r)"
                          % bucket)
    schemas = []
    for schema, _ in (images, usage):
        if schema not in schemas:
            schemas.append(schema)
    values = {
        "images": sql_name(*images), "usage": sql_name(*usage),
        "images_index": sql_ident(images[1] + "_owner_created_at_idx"),
        "usage_index": sql_ident(usage[1] + "_created_at_idx"),
        "bucket": bucket, "bucket_literal": sql_literal(bucket),
        "schemas": " and ".join(schemas),
        "read_policy": sql_ident("%s: owner reads" % bucket),
        "insert_policy": sql_ident("%s: owner uploads" % bucket),
        "update_policy": sql_ident("%s: owner updates" % bucket)}
    header = SCHEMA_HEADER % dict(values, images=".".join(images), usage=".".join(usage))
    return (header + "".join(SCHEMA_PER_SCHEMA % {"schema": sql_ident(s)} for s in schemas)
            + SCHEMA_TABLES % values)


def sql_ident(name):
    """A quoted SQL identifier: safe whatever the name, even a reserved word."""
    return '"%s"' % name.replace('"', '""')


def sql_name(schema, table):
    return "%s.%s" % (sql_ident(schema), sql_ident(table))


def sql_literal(text):
    return "'%s'" % text.replace("'", "''")


def cmd_schema(args, env):
    config, _ = report_config(args, env)
    sys.stdout.write(schema_sql(config.data["cloud"]))
    return EXIT_OK


# ===== Reports: usage =====
# Cost per ISO week (UTC), backend, model and caller: from PostgREST when Supabase
# credentials are set (paged, summed here: aggregates are off on Supabase), else from
# the ledger.

USAGE_COLUMNS = ("created_at", "backend", "model", "caller", "cost_usd", "latency_ms")


def parse_since(text):
    import datetime
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%d").date().isoformat()
    except ValueError:
        raise usage_error("usage: --since must be a date YYYY-MM-DD (got %r)" % text) from None


def usage_query(raw, since):
    """The PostgREST query of the report: the columns it shows, in a stable order."""
    columns = (("id",) if raw else ()) + USAGE_COLUMNS
    query = "select=%s&order=created_at.asc,id.asc" % ",".join(columns)
    return query + ("&created_at=gte.%s" % since if since else "")


def remote_usage(supabase, table, raw, since, timeout):
    """The rows of the usage table, page after page."""
    import itertools
    pages = supabase.select_pages(table, usage_query(raw, since), timeout)
    return itertools.chain.from_iterable(pages)


def local_usage(env, since):
    """The ledger's rows (every backend), on or after the UTC date `since`."""
    if not os.path.exists(ledger_path(env)):
        return
    with open_ledger(env) as ledger:
        rows = ledger.rows()
    for row in rows:
        if since is None or utc_day(row["created_at"]) >= since:
            yield {key: row[key] for key in ("id",) + USAGE_COLUMNS}


UTC_SUFFIXES = ("+00:00", "Z")


def utc_day(stamp):
    """YYYY-MM-DD in UTC of an ISO 8601 time (PostgREST sends UTC, the ledger local time)."""
    if stamp.endswith(UTC_SUFFIXES) or len(stamp) == 10:
        return stamp[:10]
    import datetime
    import re
    match = re.match(r"(\d{4}-\d\d-\d\d)[T ](\d\d):(\d\d)(?::\d\d(?:\.\d+)?)?"
                     r"(?:([+-])(\d\d):?(\d\d)?)?$", stamp)
    if not match:
        raise ImagenError("unreadable created_at %r" % stamp)
    date, hour, minute, sign, off_h, off_m = match.groups()
    moment = datetime.datetime.strptime("%s %s:%s" % (date, hour, minute), "%Y-%m-%d %H:%M")
    if sign:
        offset = datetime.timedelta(hours=int(off_h), minutes=int(off_m or 0))
        moment = moment - offset if sign == "+" else moment + offset
    return moment.date().isoformat()


def iso_week(day):
    """"2026-W19" for "2026-05-11"."""
    import datetime
    year, number, _ = datetime.date(int(day[:4]), int(day[5:7]), int(day[8:10])).isocalendar()
    return "%d-W%02d" % (year, number)


def group_usage(rows):
    """[{week, backend, model, caller, count, cost_usd, mean_latency_ms}], sorted. Written
    for 50,000 rows: C-level unpacking, rows grouped by UTC day first (one slice and one
    dict lookup a row), and days turned into ISO weeks once each at the end."""
    from operator import itemgetter
    fields = itemgetter("created_at", "backend", "model", "caller", "cost_usd", "latency_ms")
    by_day = {}
    for stamp, backend, model, caller, cost, latency in map(fields, rows):
        key = (stamp[:10] if stamp.endswith(UTC_SUFFIXES) else stamp, backend, model, caller)
        group = by_day.get(key)
        if group is None:
            group = by_day[key] = [0, 0.0, 0, 0]    # count, cost, latency sum and count
        group[0] += 1
        if cost is not None:
            group[1] += cost
        if latency is not None:
            group[2] += latency
            group[3] += 1
    groups, weeks = {}, {}
    for (day, backend, model, caller), (count, cost, latency, timed) in by_day.items():
        week = weeks.get(day)
        if week is None:
            week = weeks[day] = iso_week(utc_day(day))
        group = groups.setdefault((week, backend, model or "", caller or ""), [0, 0.0, 0, 0])
        group[0] += count
        group[1] += cost
        group[2] += latency
        group[3] += timed
    return [{"week": key[0], "backend": key[1], "model": key[2], "caller": key[3],
             "count": count, "cost_usd": round(cost, 6),
             "mean_latency_ms": int(round(latency / timed)) if timed else None}
            for key, (count, cost, latency, timed) in sorted(groups.items())]


def format_cost(value):
    return "-" if value is None else "%.4f" % value


def usage_table(groups, source):
    widths = [max([len(h)] + [len(str(g[k])) for g in groups])
              for h, k in (("WEEK", "week"), ("BACKEND", "backend"), ("MODEL", "model"),
                           ("CALLER", "caller"))]
    line = "%%-%ds  %%-%ds  %%-%ds  %%-%ds  %%6s  %%10s  %%9s" % tuple(widths)
    lines = [line % ("WEEK", "BACKEND", "MODEL", "CALLER", "COUNT", "COST_USD", "MEAN_MS")]
    for g in groups:
        lines.append(line % (g["week"], g["backend"], g["model"], g["caller"], g["count"],
                             format_cost(g["cost_usd"]), "-" if g["mean_latency_ms"] is None
                             else g["mean_latency_ms"]))
    lines.append(line % ("total", "", "", "", sum(g["count"] for g in groups),
                         format_cost(sum(g["cost_usd"] for g in groups)), ""))
    lines.append("(from %s)" % source)
    return "\n".join(line.rstrip() for line in lines)


def raw_usage_table(rows, source):
    line = "%-25s  %-20s  %-32s  %-16s  %10s  %10s"
    lines = [line % ("CREATED_AT", "BACKEND", "MODEL", "CALLER", "COST_USD", "LATENCY_MS")]
    for row in rows:
        lines.append(line % (row["created_at"], row["backend"], row["model"] or "",
                             row["caller"] or "", format_cost(row["cost_usd"]),
                             "-" if row["latency_ms"] is None else row["latency_ms"]))
    lines.append("(%d generations from %s)" % (len(rows), source))
    return "\n".join(lines)


def usage_rows(config, env, since=None, local=False, raw=False):
    """(rows, source) of the usage report: Supabase's usage table when credentials are
    set (unless `local`), else the ledger. The rows are read as they are consumed."""
    supabase = None if local else Supabase.from_env(env, cloud_timeout(config))
    if supabase is not None:
        table = cloud_table(config, "usage_table")
        rows = remote_usage(supabase, table, raw, since, cloud_timeout(config))
        return rows, "Supabase %s.%s" % table
    return local_usage(env, since), "the ledger %s" % ledger_path(env)


def cmd_usage(args, env):
    config, console = report_config(args, env)
    since = parse_since(args.since) if args.since else None
    rows, source = usage_rows(config, env, since, args.local, args.raw)
    try:
        rows = list(rows) if args.raw else group_usage(rows)    # the reading happens here
    except ImagenError as exc:
        raise ImagenError("usage: %s" % exc.message, exc.code) from None
    if args.raw:
        emit(to_json({"source": source, "rows": rows}) if args.json
             else raw_usage_table(rows, source))
    else:
        emit(to_json({"source": source, "groups": rows}) if args.json
             else usage_table(rows, source))
    return EXIT_OK


# ===== Reports: sync and url =====

SIGN_BATCH = 100      # keys per signing request of `sync --recheck`
REFUSED_NOTE = "%d refused for good, skipped (imagen sync --dry-run says why)"


def cmd_sync(args, env):
    """Finish every pending, failed or partial cloud sync recorded in the ledger; with
    --recheck, first find synced images whose object is gone from the bucket."""
    config, console = report_config(args, env)
    supabase = require_supabase(env, config, "sync:")
    with open_ledger(env) as ledger:
        gone = recheck_synced(ledger, supabase, config, args.dry_run) if args.recheck else []
        rows = ledger.unsynced()
        refused = [row for row in rows if row["cloud"] == "rejected"]
        rows = [row for row in rows if row["cloud"] != "rejected"]
        note = "; " + REFUSED_NOTE % len(refused) if refused else ""
        if args.dry_run:
            list_sync_plan(rows + gone, refused)     # a dry run left `gone` synced
            return EXIT_OK
        if not rows:
            emit("sync: nothing to do" + note)
            return EXIT_OK
        push = CloudPush(supabase, config)
        failed = 0
        for row in rows:
            known = row["storage_path"] if row["cloud"] == "partial" else None
            state, storage_path, error = push.push(row["id"], row["path"], row["record"], known)
            ledger.set_cloud(row["id"], state, storage_path, error)
            if error:
                failed += 1
                console.warn("sync: %s: %s%s" % (row["path"], error, "; refused for good: "
                                                 "sync skips it from now on"
                                                 if state == "rejected" else ""))
            else:
                emit("synced %s -> %s" % (row["path"], storage_path))
    emit("sync: %d synced, %d failed%s" % (len(rows) - failed, failed, note))
    return EXIT_FAILED if failed else EXIT_OK


def list_sync_plan(rows, refused):
    for row in rows:
        if row["record"] is None:
            emit("would skip %s (%s)" % (row["path"], UNREADABLE_RECORD))
            continue
        emit("would %s %s (%s)" % (
            "insert the row of" if row["cloud"] == "partial" else "upload", row["path"],
            "gone from the bucket" if row["cloud"] == "synced" else row["cloud"]))
    for row in refused:
        emit("skip %s (refused for good: %s)" % (row["path"], row["error"]))
    emit("sync: dry run: %d to sync%s" % (len(rows), ", %d skipped" % len(refused)
                                          if refused else ""))


def recheck_synced(ledger, supabase, config, dry_run):
    """Synced rows whose object is gone from the bucket (deleted on the server), found by
    signing their keys (Storage signs only objects that exist), SIGN_BATCH per request.
    They become pending again, so this sync uploads them; a dry run only lists them."""
    rows = ledger.synced()
    bucket = config.data["cloud"]["bucket"]
    gone = []
    for start in range(0, len(rows), SIGN_BATCH):
        batch = rows[start:start + SIGN_BATCH]
        try:
            signed = supabase.sign(bucket, [row["storage_path"] for row in batch], 60,
                                   clock.monotonic() + cloud_timeout(config))
        except ImagenError as exc:
            raise ImagenError("sync: recheck: %s" % exc.message) from None
        gone.extend(row for row in batch if signed[row["storage_path"]][0] is None)
    emit("sync: recheck: %d in the bucket, %d gone" % (len(rows) - len(gone), len(gone)))
    if not dry_run:
        for row in gone:
            ledger.set_cloud(row["id"], "pending", None, "gone from bucket %s" % bucket)
    return gone


def cmd_url(args, env):
    """A signed Storage URL for a generated image (its token is the output, nowhere else)."""
    config, _ = report_config(args, env)
    if args.expires < 1:
        raise usage_error("url: --expires must be at least 1 second (got %d)" % args.expires)
    supabase = require_supabase(env, config, "url:", owner=False)
    path = os.path.abspath(args.file)
    if not os.path.isfile(path):
        raise usage_error("url: %s: no such file" % args.file)
    key, synced = stored_key(path, env, args.file)
    bucket = config.data["cloud"]["bucket"]
    deadline = clock.monotonic() + cloud_timeout(config)
    try:
        url, _ = supabase.sign(bucket, [key], args.expires, deadline)[key]
    except ImagenError as exc:
        raise ImagenError("url: %s" % exc.message) from None
    if url is None:
        raise ImagenError("url: %s: no object %s in bucket %s%s" % (
            args.file, key, bucket, ": it was synced, then deleted on the server (imagen "
            "sync --recheck uploads it again)" if synced else ", and the ledger here has no "
            "record of it: it was never synced from this machine"))
    emit(url)
    return EXIT_OK


def stored_key(path, env, shown):
    """(object key, whether the ledger knows it as uploaded) of an image: from the
    ledger, else from its own record."""
    with open_ledger(env) as ledger:
        row = ledger.latest_for(path)
    if row is not None:
        if row["storage_path"]:
            return row["storage_path"], True
        why = {"off": "", "rejected": ": %s" % row["error"]}.get(row["cloud"],
                                                                  "; run imagen sync")
        raise ImagenError("url: %s is not in the bucket (cloud sync: %s)%s" % (
            shown, row["cloud"], why))
    info = read_metadata(path)
    record = info["sidecar"] or info["embedded"]
    return storage_key(dict(record, file=os.path.basename(path))), False


# ===== Reports: history =====
# `imagen history`: past generations from the ledger, newest first, found by the words of
# their prompts. The gallery and MCP's search_images ask the same query (search_history).
# The search index is SQLite FTS5 (case and accents folded), built on first use and kept
# in step with the ledger by triggers, so an older ledger needs no step from the user; a
# Python whose SQLite lacks FTS5 or JSON gets LIKE over the prompt folded in Python.

HISTORY_LIMIT = 20
SEARCH_TABLE = "generations_fts"
SEARCH_TOKENIZER = "unicode61 remove_diacritics 2"
# the prompt inside the record column; NULL (nothing indexed) for a record that is not JSON
SEARCH_PROMPT_SQL = "CASE WHEN json_valid(%s.record) THEN json_extract(%s.record, '$.prompt') END"
# Contentless (the prompt stays in the record only), keyed by the ledger row's rowid,
# which VACUUM keeps. A contentless row is deleted by giving back what was indexed.
_SEARCH_DELETE = ("INSERT INTO generations_fts (generations_fts, rowid, prompt) "
                  "VALUES ('delete', old.rowid, %s);" % (SEARCH_PROMPT_SQL % ("old", "old")))
_SEARCH_INSERT = ("INSERT INTO generations_fts (rowid, prompt) VALUES (new.rowid, %s);"
                  % (SEARCH_PROMPT_SQL % ("new", "new")))
SEARCH_INDEX_SQL = ["CREATE VIRTUAL TABLE generations_fts USING fts5(prompt, content = '', "
                    "tokenize = '%s')" % SEARCH_TOKENIZER,
                    "CREATE TRIGGER generations_fts_insert AFTER INSERT ON generations BEGIN "
                    + _SEARCH_INSERT + " END",
                    "CREATE TRIGGER generations_fts_delete AFTER DELETE ON generations BEGIN "
                    + _SEARCH_DELETE + " END",
                    "CREATE TRIGGER generations_fts_update AFTER UPDATE OF record ON generations "
                    "BEGIN " + _SEARCH_DELETE + " " + _SEARCH_INSERT + " END",
                    "INSERT INTO generations_fts (rowid, prompt) SELECT g.rowid, %s FROM "
                    "generations g" % (SEARCH_PROMPT_SQL % ("g", "g"))]
HISTORY_COLUMNS = ("id", "created_at", "backend", "path", "cloud", "rejected", "cost_usd",
                   "width", "height", "seed", "parent", "record")
# The prompt of a record, read by SQLite where it reads it as json.loads does: a text under
# one top-level "prompt" key, no escaped surrogate (SQLite cannot give it back) or NUL (it
# would cut the text there); NULL otherwise, and Python reads that record.
HISTORY_PROMPT_SQL = ("CASE WHEN json_valid(g.record) THEN CASE WHEN "
                      "json_type(g.record, '$.prompt') = 'text' "
                      "AND (SELECT count(*) FROM json_each(g.record) WHERE key = 'prompt') = 1 "
                      "AND instr(lower(g.record), '\\ud') = 0 "
                      "AND instr(g.record, '\\u0000') = 0 "
                      "THEN json_extract(g.record, '$.prompt') END END")


def search_history(env, words=(), since=None, backend=None, limit=HISTORY_LIMIT, before=None,
                   ledger=None, records=True):
    """Past generations from the ledger, newest first, as a list of dicts: id, created_at,
    backend, path, cloud (off, pending, synced, failed, partial, rejected), exists (is the
    file still there), record (the sidecar record, or None when the ledger holds no JSON),
    cost_usd, width, height, seed, parent, and `cursor`.

    words: every one must occur in the prompt (case and accents folded; a word matches
    the start of a word of the prompt with FTS5, any part of it with the LIKE fallback);
    a string is split on whitespace. since: YYYY-MM-DD (local), or Nh, Nd, Nw back from
    now. backend: an instance name. limit: at most that many rows (0: all).
    before: the `cursor` of the last row of the previous page, to get the next page. It is
    the text "<created_at>/<rowid>" (created_at as the ledger stores it, ISO 8601 with the
    UTC offset; rowid the ledger row's SQLite rowid): rows strictly older in the order
    (created_at, rowid) come back. Treat it as opaque. ledger: an open Ledger to read
    (else the ledger of env is opened, if there is one).
    records=False: `record` holds only the prompt ({"prompt": ...}) where SQLite can read
    it: the lines of `imagen history`, which then import no JSON parser (with the `re` it
    imports, a third of that command's time)."""
    words = words.split() if isinstance(words, str) else [w for w in words if w.strip()]
    since = history_since(since)
    check_range("limit", limit, 0, 10 ** 9)
    where, params = ["1"], []
    if since:
        where.append("g.created_at >= ?")
        params.append(since)
    if backend:
        where.append("g.backend = ?")
        params.append(backend)
    if before:
        stamp, rowid = parse_history_cursor(before)
        where.append("(g.created_at < ? OR (g.created_at = ? AND g.rowid < ?))")
        params += [stamp, stamp, rowid]
    if ledger is not None:
        return search_ledger(ledger, words, where, params, limit, records)
    if not os.path.exists(ledger_path(env)):
        return []
    with open_ledger(env) as ledger:
        return search_ledger(ledger, words, where, params, limit, records)


def search_ledger(ledger, words, where, params, limit, records=True):
    clause, more = words_clause(ledger, words) if words else ("1", [])
    columns = ", ".join("g." + c for c in HISTORY_COLUMNS)
    if not records and sqlite_has_json(ledger):
        columns += ", %s AS prompt_text" % HISTORY_PROMPT_SQL
    sql = ("SELECT %s, g.rowid AS row_number FROM generations g WHERE %s "
           "ORDER BY g.created_at DESC, g.rowid DESC%s"
           % (columns, " AND ".join(where + ["%s"]), " LIMIT %d" % limit if limit else ""))
    try:
        found = None
        if clause == SEARCH_MATCH_CLAUSE and limit:
            found = newest_matches(ledger, sql, params, more[0], limit)
        if found is None:
            found = ledger.db.execute(sql % clause, params + more).fetchall()
    except ledger.error as exc:
        raise ImagenError("history: %s: %s" % (ledger.path, exc)) from None
    return [history_row(dict(zip(row.keys(), row))) for row in found]


def history_row(row):
    prompt = row.pop("prompt_text", None)
    row["record"] = ledger_record(row["record"]) if prompt is None else {"prompt": prompt}
    if row.pop("rejected", 0):
        row["cloud"] = "rejected"
    row["cursor"] = "%s/%d" % (row["created_at"], row.pop("row_number"))
    row["exists"] = os.path.isfile(row["path"])
    return row


def parse_history_cursor(text):
    stamp, slash, rowid = str(text).rpartition("/")
    if not slash or not stamp or not rowid.isdigit():
        raise usage_error("history: bad page cursor %r (give the cursor of a row as it "
                          "came)" % (text,))
    return stamp, int(rowid)


def history_since(text):
    """The earliest created_at wanted, comparable with the ledger's local ISO times."""
    if not text:
        return None
    import re
    text = str(text).strip()
    match = re.match(r"^(\d+)([hdw])$", text)
    if match:
        seconds = int(match.group(1)) * {"h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return iso_time(clock.time() - seconds)[:19]
    if re.match(r"^\d{4}-\d{2}-\d{2}$", text):
        return parse_since(text)
    raise usage_error("history: --since must be a date YYYY-MM-DD or an age like 12h, 7d, "
                      "2w (got %r)" % text)


def words_clause(ledger, words):
    """(SQL condition, params) that every word is in the prompt: FTS5 when it can be had,
    else LIKE over the folded prompt."""
    if ensure_search_index(ledger):
        # each word a quoted prefix phrase: FTS5 operators typed by the user stay text
        query = " AND ".join(word_query(ledger, w) for w in words
                             if any(c.isalnum() for c in w))
        if not query:
            return "1", []
        return SEARCH_MATCH_CLAUSE, [query]
    ledger.db.create_function("imagen_folded_prompt", 1, folded_prompt)
    clause = " AND ".join(["imagen_folded_prompt(g.record) LIKE ? ESCAPE '\\'"] * len(words))
    return clause, ["%" + like_escape(fold_text(w)) + "%" for w in words]


def word_query(ledger, word):
    """The FTS5 query for the prompts with a word that starts with `word`: the prefix
    phrase "word"*, or for a plain ASCII word that starts only a few indexed words, those
    words spelled out ("fox" OR "foxes"). FTS5 answers a prefix phrase by merging the
    lists of all its words before it gives the first match (for a word in a tenth of
    100,000 rows, most of a search's time); spelled out, the lists are read newest first
    and no further than needed."""
    prefix = '"%s"*' % word.replace('"', '""')
    if not (word.isascii() and word.isalnum()):     # else the tokenizer may split or fold it
        return prefix
    token = word.lower()            # as the tokenizer has it
    try:
        terms = indexed_words(ledger, token, SEARCH_MAX_TERMS + 1)
    except ledger.error:
        return prefix
    if len(terms) > SEARCH_MAX_TERMS:
        return prefix
    return "(%s)" % " OR ".join('"%s"' % term.replace('"', '""') for term in terms or [token])


SEARCH_MAX_TERMS = 8


def indexed_words(ledger, token, most):
    """Up to `most` words of the search index that start with `token`, in order: one
    lookup each, of the first word at or after the last one found followed by chr(1),
    which no word holds (the tokenizer splits at control characters), so that the next
    word found is the next longer one, like "foxes" after "fox"."""
    ledger.db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.imagen_words USING "
                      "fts5vocab(main, %s, 'instance')" % SEARCH_TABLE)
    terms, start = [], token
    while len(terms) < most:
        row = ledger.db.execute("SELECT term FROM temp.imagen_words WHERE term >= ? LIMIT 1",
                                (start,)).fetchone()
        if row is None or not row[0].startswith(token):
            break
        terms.append(row[0])
        start = row[0] + "\x01"
    return terms


# `+`: walk the rows newest first and stop at the limit, rather than look up every match
# (a third of a big ledger for a common word) and sort them all
SEARCH_MATCH_CLAUSE = ("+g.rowid IN (SELECT rowid FROM generations_fts WHERE generations_fts "
                       "MATCH ?)")
# newest_matches looks at the last limit x 2 matches (rows mostly come in time order, and
# without a filter or a cursor the newest are among them), then x 8, then x 32, then gives up
SEARCH_WALK = (2, 8, 32)


def newest_matches(ledger, sql, params, query, limit):
    """The rows of `sql` (its condition on the words left as %s) among the matches of the
    FTS query, or None when the quick way cannot vouch for its answer.

    SEARCH_MATCH_CLAUSE makes SQLite list every match before it walks the ledger (a tenth
    of 100,000 rows for "fox": most of the time of a search). Rows are mostly added as
    they are made, so the newest matches are mostly those of highest rowid, which the
    index gives first: take the last N matches and keep the newest `limit` that meet the
    other conditions. A row below the lowest rowid taken can only come before the last
    row kept if it is newer: the few such rows (a ledger merged, a clock set back) are
    looked up and added when they match. Too many of them: the next N, then None."""
    # the order first, by created_at and rowid only: then the whole rows of the chosen
    keys = "SELECT g.created_at, g.rowid" + sql[sql.index(" FROM generations g "):]
    for factor in SEARCH_WALK:
        size = limit * factor
        taken = search_rowids(ledger, query, "ORDER BY rowid DESC LIMIT %d" % size)
        kept = rows_by_rowid(ledger, keys, params, taken)
        if len(taken) == size:
            if len(kept) < limit:
                continue
            newer = [row[0] for row in ledger.db.execute(
                "SELECT rowid FROM generations WHERE created_at > ? AND rowid < ? LIMIT ?",
                (kept[-1][0], taken[-1], size + 1))]
            if len(newer) > size:
                continue
            if newer:
                newer = set(newer).intersection(search_rowids(
                    ledger, query, "AND rowid BETWEEN %d AND %d" % (min(newer), max(newer))))
                kept = rows_by_rowid(ledger, keys, params, taken + sorted(newer))
        return rows_by_rowid(ledger, sql, params, [row[1] for row in kept])
    return None


def search_rowids(ledger, query, tail):
    return [row[0] for row in ledger.db.execute(
        "SELECT rowid FROM generations_fts WHERE generations_fts MATCH ? " + tail, (query,))]


def rows_by_rowid(ledger, sql, params, rowids):
    """The rows of `sql` among these rowids. They are written into the SQL: as a
    subquery, a prefix query would cost FTS5 its merge of every matching word again, and
    the list may be longer than SQLite's limit on parameters; they come from SQLite."""
    if not rowids:
        return []
    return ledger.db.execute(sql % ("g.rowid IN (%s)" % ",".join(str(int(r)) for r in rowids)),
                             params).fetchall()


def ensure_search_index(ledger):
    """Build the FTS5 index and its triggers unless they exist; False when this SQLite
    cannot (no FTS5, no JSON functions). Of processes doing it at once, the first builds
    it under the write lock and the others find it done."""
    if search_index_state(ledger) is not None:
        return True
    if not SEARCH_USES_FTS5 or not sqlite_can_search(ledger):
        return False
    try:
        ledger.db.execute("BEGIN IMMEDIATE")
        try:
            if search_index_state(ledger) is None:
                for statement in SEARCH_INDEX_SQL:
                    ledger.db.execute(statement)
        except BaseException:
            ledger.db.execute("ROLLBACK")
            raise
        ledger.db.execute("COMMIT")
    except ledger.error as exc:
        raise ImagenError("history: %s: building the search index: %s" % (ledger.path, exc)) \
            from None
    return True


SEARCH_USES_FTS5 = True     # a seam: tests turn it off to take the LIKE path


def sqlite_has_json(ledger):
    try:
        ledger.db.execute("SELECT json_valid('{}')")
    except ledger.error:
        return False
    return True


def search_index_state(ledger):
    row = ledger.db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (SEARCH_TABLE,)).fetchone()
    return row[0] if row else None


def sqlite_can_search(ledger):
    try:
        ledger.db.execute("SELECT json_extract('{}', '$.a')")
        ledger.db.execute("CREATE VIRTUAL TABLE temp.imagen_probe USING fts5(a, tokenize = '%s')"
                          % SEARCH_TOKENIZER)
        ledger.db.execute("DROP TABLE temp.imagen_probe")
    except ledger.error:
        return False
    return True


def fold_text(text):
    """Lowercase without accents, as FTS5's unicode61 tokenizer with remove_diacritics 2
    sees it: "Éclair" -> "eclair"."""
    import unicodedata
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def folded_prompt(record_text):
    record = ledger_record(record_text)
    prompt = record.get("prompt") if record else None
    return fold_text(prompt) if isinstance(prompt, str) else ""


def like_escape(text):
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# ----- one generation by file, id, id prefix or `last` -----

def find_generation(env, ref, command):
    """The ledger row of `last` or of a generation id or unique id prefix; exit 2 with one
    line when there is none or the prefix names several."""
    rows = []
    if os.path.exists(ledger_path(env)) and (ref == "last" or looks_like_id_prefix(ref)):
        if ref == "last":
            rows = search_history(env, limit=1)
        else:
            with open_ledger(env) as ledger:
                found = ledger.db.execute("SELECT id FROM generations WHERE id GLOB ? LIMIT 6",
                                          (ref.lower() + "*",)).fetchall()
            ids = [row[0] for row in found]
            if len(ids) > 1:
                raise usage_error("%s: id prefix %r is ambiguous: it matches %s%s; give more "
                                  "characters" % (command, ref, ", ".join(i[:13] for i in ids[:5]),
                                                  " and more" if len(ids) > 5 else ""))
            rows = [row_by_id(env, ids[0])] if ids else []
    if not rows:
        if ref == "last":
            raise usage_error("%s: last: the ledger %s holds no generation yet"
                              % (command, ledger_path(env)))
        raise usage_error("%s: %s: no such file, and no generation with that id in the "
                          "ledger" % (command, ref))
    return rows[0]


def row_by_id(env, ident):
    with open_ledger(env) as ledger:
        found = ledger.db.execute("SELECT %s, rowid AS row_number FROM generations WHERE id = ?"
                                  % ", ".join(HISTORY_COLUMNS), (ident,)).fetchone()
    return history_row(dict(zip(found.keys(), found)))


def inspect_target(ref, env):
    """The image path `inspect` reads: the file named, else the generation's file."""
    if os.path.lexists(ref):
        return ref
    row = find_generation(env, ref, "inspect")
    if not row["exists"]:
        raise usage_error("inspect: %s: generation %s was written to %s, which no longer "
                          "exists" % (ref, row["id"], row["path"]))
    return row["path"]


# ----- remix: generate --from SOURCE -----

REMIX_FLAGS = ("negative", "style", "backend", "size", "steps", "seed")


def remix_options(source, prompt, options, env):
    """(prompt, options) of `generate --from SOURCE [PROMPT] [flags]`: the source's
    settings, each flag given (not None) overriding; `--seed 0` draws a new seed, as it
    always does. The new record's parent is the source's id when it has one."""
    fields = remix_fields(source, env)
    merged = dict(options)
    for key in REMIX_FLAGS:
        if merged.get(key) is None and fields.get(key) is not None:
            merged[key] = fields[key]
    merged["parent"] = fields.get("parent")
    return (fields.get("prompt") if prompt is None else prompt), merged


def remix_fields(source, env):
    """{prompt, negative, style, backend, size, steps, seed, parent} of an imagen image,
    its sidecar, a generation id or prefix, `last`, or another tool's PNG that carries
    the common `parameters` text."""
    where = "generate: --from %s" % source
    if not os.path.lexists(source):
        row = find_generation(env, source, "generate: --from")
        if row["record"] is None:
            raise usage_error("%s: the ledger holds no readable record for it" % where)
        return fields_of_record(row["record"], row["id"])
    try:
        data = read_capped(source, MAX_INSPECT_BYTES)
    except OSError as exc:
        raise usage_error("%s: %s" % (where, exc.strerror or exc)) from None
    record = record_in_file(source, data, where)
    if record is not None:
        image = source[:-len(".json")] if source.endswith(".json") else source
        return fields_of_record(record, record.get("id") or id_of_path(env, image))
    text = png_texts(data, ("parameters",)).get("parameters") if data[:8] == PNG_SIGNATURE \
        else None
    if not text:
        raise usage_error("%s: no imagen record and no `parameters` text in it" % where)
    return parse_parameters(text)


def record_in_file(path, data, where):
    """The imagen record of a sidecar, of an image's iTXt chunk, or of its sidecar; None
    when there is none."""
    import json
    for text in record_texts(path, data):
        try:
            record = json.loads(text)
        except JSON_ERRORS + (UnicodeDecodeError,):
            raise usage_error("%s: its record is not JSON" % where) from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            return record
    return None


def id_of_path(env, path):
    """The id of the newest ledger row for this file: a record from before ids has none."""
    if not os.path.exists(ledger_path(env)):
        return None
    with open_ledger(env) as ledger:
        row = ledger.latest_for(os.path.abspath(path))
    return row["id"] if row else None


def fields_of_record(record, ident):
    size = record.get("requested_size")
    if not isinstance(size, str) and record.get("width") and record.get("height"):
        size = "%sx%s" % (record["width"], record["height"])
    seed, steps = record.get("seed"), record.get("steps")
    return {"prompt": record.get("prompt"), "negative": record.get("negative"),
            "style": record.get("style"), "backend": record.get("backend"), "size": size,
            "steps": steps if isinstance(steps, int) and not isinstance(steps, bool) else None,
            "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            "parent": ident if isinstance(ident, str) else None}


def parse_parameters(text):
    """Prompt, negative, steps, seed and size from the `parameters` text other tools
    write: the prompt, then `Negative prompt: ...`, then a line `Steps: 20, Sampler: ...,
    Seed: 42, Size: 512x768, ...` (a value may be a quoted string holding commas)."""
    import re
    lines = text.replace("\r\n", "\n").split("\n")
    settings = {}
    for index in range(len(lines) - 1, -1, -1):
        if re.match(r"^\s*Steps:\s*\d", lines[index]):
            settings = dict(re.findall(r'\s*([^:,]+?):\s*("(?:[^"\\]|\\.)*"|[^,]*)\s*(?:,|$)',
                                       lines[index]))
            lines = lines[:index]
            break
    prompt, negative = [], []
    target = prompt
    for line in lines:
        if line.startswith("Negative prompt:"):
            target, line = negative, line[len("Negative prompt:"):].lstrip()
        target.append(line)
    fields = {"prompt": "\n".join(prompt).strip(), "negative": "\n".join(negative).strip(),
              "steps": _int_or_none(settings.get("Steps")),
              "seed": _int_or_none(settings.get("Seed")), "parent": None}
    if re.match(r"^\d+x\d+$", settings.get("Size", "").strip()):
        fields["size"] = settings["Size"].strip()
    return fields


def _int_or_none(text):
    try:
        return int(str(text).strip())
    except ValueError:
        return None


# ----- the command -----

def cmd_history(args, env):
    rows = search_history(env, args.words, since=args.since, backend=args.backend,
                          limit=args.limit, records=args.json)
    if args.json:
        for row in rows:
            emit(to_json(history_json(row)))
        return EXIT_OK
    width = terminal_columns()
    local_offset = iso_time(clock.time())[19:]
    home = _home(env)
    for row in rows:
        emit(history_line(row, width, local_offset, home))
    if not rows:
        Console().warn("history: no generation%s" % (" matches" if args.words or args.since
                                                     or args.backend else " yet"))
    return EXIT_OK


def history_json(row):
    """The record plus path, cloud state and exists; the ledger's columns where the row
    holds no record."""
    record = row["record"] or {key: row[key] for key in ("id", "created_at", "backend",
                                                          "cost_usd", "width", "height",
                                                          "seed", "parent")}
    return dict(record, id=row["id"], path=row["path"], cloud=row["cloud"],
                exists=row["exists"])


def history_line(row, width, local_offset, home):
    """`id8  2026-05-11 14:02  backend  WxH  $cost  path  prompt`, cut to the width."""
    record = row["record"] or {}
    cost = row["cost_usd"]
    path = row["path"]
    if path.startswith(home + os.sep):
        path = "~" + path[len(home):]
    prompt = one_line(str(record.get("prompt") or ""))
    for shown in (path, "…/" + os.path.basename(path)):   # a long path leaves the prompt room
        line = "%s  %s  %s  %sx%s  %s  %s%s  %s" % (
            row["id"][:8], local_time(row["created_at"], local_offset), row["backend"],
            row["width"], row["height"], "-" if cost is None else "$" + dollars(cost), shown,
            "" if row["exists"] else " (missing)", prompt)
        if width is None or len(line) <= width:
            return line
        if len(line) - len(prompt) + min(len(prompt), 20) <= width:
            break
    return line[:max(width - 1, 0)] + "…"


def local_time(stamp, local_offset):
    """`YYYY-MM-DD HH:MM` in this machine's time zone of an ISO 8601 time."""
    if stamp[19:] == local_offset:
        return stamp[:16].replace("T", " ")
    import datetime
    try:
        moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp[:16].replace("T", " ")
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M")


def terminal_columns():
    """The width of stdout's terminal (or $COLUMNS); None for a pipe or a file, whose
    reader (grep, a script) wants whole lines."""
    if not os.environ.get("COLUMNS") and not _isatty(sys.stdout):
        return None
    import shutil
    return shutil.get_terminal_size((100, 24)).columns


# ===== Serve =====
# `imagen serve`: the generate pipeline behind a small JSON API, on the standard library's
# ThreadingHTTPServer (one thread per connection). Per backend, a gate lets at most
# max_concurrency jobs run and max_queue more wait; past that a request gets 429. Every
# read of a request shares one deadline, so a client that stalls or trickles its bytes
# holds a thread for at most the client timeout. The gallery (its page and the JSON routes
# it reads) is the second part of this section: the API's routes table names it.

SERVE_ADDR = "127.0.0.1:8080"
SERVE_MAX_BODY = 64 * 1024
SERVE_CLIENT_TIMEOUT = 30.0                 # seconds to send a request; also per write
SERVE_QUEUE_FACTOR = 4                      # default max_queue = 4 x max_concurrency
SERVE_LINGER = 2.0                          # seconds to drain an unread body before closing
# The JSON fields of POST /v1/generate and their types (ranges are checked as for the CLI).
SERVE_FIELDS = {"prompt": str, "backend": str, "size": str, "seed": int, "steps": int,
                "style": str, "negative": str, "count": int, "images": list, "strength": float}
# POST /v1/generate may carry up to 8 input images of 20 MiB as base64: its body may be
# that much larger than SERVE_MAX_BODY, which still bounds everything besides the images.
SERVE_MAX_GENERATE_BODY = SERVE_MAX_BODY + MAX_INPUT_IMAGES * (4 * -(-MAX_INPUT_BYTES // 3) + 256)
# The body types POST /v1/generate takes. The image-input issue may add multipart/form-data
# here: a form can send it from another site without a preflight, so it stays behind
# check_site like every request.
SERVE_BODY_TYPES = ("application/json",)
SERVED_TYPES = dict({"." + ext: mime for mime, ext in MIME_EXTENSIONS.items()},
                    **{".jpeg": "image/jpeg", ".json": "application/json"})

class ApiError(Exception):
    """An HTTP error answer: status, the message for {"error": ...}, extra headers, and
    extra fields of the body."""

    def __init__(self, status, message, headers=(), extra=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, list(headers)
        self.extra = extra or {}

    @classmethod
    def from_imagen_error(cls, exc, extra=None):
        """The CLI's exit 2 is the client's mistake (400); anything else failed here (500)."""
        return cls(400 if exc.code == EXIT_USAGE else 500, exc.message, extra=extra)


def parse_addr(text):
    """(host, port, family) from HOST:PORT, :PORT (every interface) or [IPv6]:PORT."""
    import socket
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise usage_error("serve: --addr must be HOST:PORT, like 127.0.0.1:8080 (got %r)" % text)
    family = socket.AF_INET
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], socket.AF_INET6
    elif ":" in host:
        raise usage_error("serve: --addr: put an IPv6 address in brackets, like [::1]:8080")
    return host or "0.0.0.0", int(port), family


def same_origin(origin, host):
    """Whether an Origin header names the site the request was sent to: exactly its Host,
    over http (or https: a TLS proxy in front)."""
    scheme, sep, authority = origin.strip().partition("://")
    return bool(sep and host and scheme.lower() in ("http", "https")
                and authority.lower() == host.strip().lower())


def check_body_type(content_type):
    """A page on another site can POST text/plain, a form or multipart to loopback without
    the browser asking first (no CORS preflight); a JSON body needs the preflight, which
    this server never grants."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media not in SERVE_BODY_TYPES:
        raise ApiError(415, "send the body as JSON, with Content-Type: application/json%s"
                       % (" (got %s)" % media[:100] if media else ""))


def serve_limits(block):
    """(max_concurrency, max_queue) of a backend block, with the adapter's defaults."""
    limit = block.get("max_concurrency") or ADAPTERS[block["adapter"]].MAX_CONCURRENCY
    queue = block.get("max_queue")
    return limit, SERVE_QUEUE_FACTOR * limit if queue is None else queue


class JobGate:
    """At most `limit` jobs at once; up to `queue` more wait and get their turn in arrival
    order; past that enter() refuses (429)."""

    def __init__(self, limit, queue):
        import collections
        import threading
        self.limit, self.queue = limit, queue
        self.running = 0
        self._waiting = collections.deque()     # one Event per waiter, set on its turn
        self._lock = threading.Lock()

    @property
    def waiting(self):
        return len(self._waiting)

    def enter(self, name):
        import threading
        with self._lock:
            if self.running < self.limit and not self._waiting:
                self.running += 1
                return
            if len(self._waiting) >= self.queue:
                raise ApiError(429, "backend %s is busy: %d running, %d waiting; try again "
                               "later" % (name, self.running, len(self._waiting)),
                               [("Retry-After", "1")])
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()

    def leave(self):
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()      # the slot passes straight to the next
            else:
                self.running -= 1


class DeadlineReader(io.RawIOBase):
    """A socket as a raw file whose reads all end by one deadline: a client that trickles
    its request a byte at a time (slowloris) holds a thread no longer than a silent one."""

    def __init__(self, sock):
        super().__init__()
        self.sock, self.deadline, self.received = sock, None, 0

    def readable(self):
        return True

    def start(self, seconds):
        self.deadline, self.received = clock.monotonic() + seconds, 0

    def readinto(self, buffer):
        if self.deadline is not None:
            remaining = self.deadline - clock.monotonic()
            if remaining <= 0:
                import socket
                raise socket.timeout("timed out")
            self.sock.settimeout(remaining)
        count = self.sock.recv_into(buffer)
        self.received += count
        return count


class Api:
    """What the server knows and does, apart from HTTP plumbing: auth, routes, jobs."""

    ROUTES = (("/healthz", "GET", "health"), ("/v1/backends", "GET", "backends"),
              ("/v1/generate", "POST", "generate"), ("/v1/images/", "GET", "image"))

    def __init__(self, config, env, token, client_timeout, console):
        import threading
        self.config, self.env, self.token, self.console = config, env, token, console
        self.client_timeout = client_timeout
        self.output_dir = os.path.abspath(expand_home(config.output["dir"], _home(env)))
        self.gates = {name: JobGate(*serve_limits(block))
                      for name, block in config.backends.items()}
        names = config.data.get("serve", {}).get("allowed_hosts") or []
        self.allowed_hosts = {split_host(name)[0]
                              for name in ([names] if isinstance(names, str) else names)}
        self.jobs, self.thumbs = GalleryJobs(), ThumbCache(env)      # the gallery's
        self.readers = LedgerReaders(env)
        self.draining = False
        self._busy = 0                       # requests between their headers and answer
        self._idle = threading.Condition()
        self._log_lock = threading.Lock()

    # ----- requests in flight, and draining them -----

    def begin(self):
        """Count a request whose headers have arrived; whether it is accepted. One accepted
        before the signal is finished, even if its body is still on the way."""
        with self._idle:
            self._busy += 1
            return not self.draining

    def end(self):
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def stop_accepting(self):
        with self._idle:
            self.draining = True

    def drain(self):
        """Refuse new requests (503); return once every one accepted before, queued or
        running, has its answer. The queue is bounded, so this is too."""
        self.stop_accepting()
        with self._idle:
            while self._busy:
                self._idle.wait(1.0)

    # ----- the parts of a request -----

    def check_auth(self, header):
        """Compare bytes: http.server decodes header values as Latin-1, so encoding them
        back gives what the client sent, while the token from the environment is UTF-8
        (its undecodable bytes kept as surrogates)."""
        if not self.token:
            return
        import hmac
        blanks = " \t"         # str.strip() would also take \xa0 and \x85, UTF-8 tail bytes
        scheme, _, given = (header or "").strip(blanks).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip(blanks).encode("latin-1", "replace"),
                self.token.encode("utf-8", "surrogateescape")):
            raise ApiError(401, "missing or wrong token: send Authorization: Bearer <token>",
                           [("WWW-Authenticate", 'Bearer realm="imagen"')])

    def check_site(self, headers, address):
        """Refuse (403) what a web page the user visits may make the browser send: a request
        from another site (Origin, Sec-Fetch-Site), or to a name that is not this server's
        (DNS rebinding: the page's own name made to resolve to 127.0.0.1, so that the
        browser sees no other site). Scripts send no Origin, and only browsers must send
        a Host."""
        hosts = headers.get_all("Host") or []
        if len(hosts) > 1:
            raise ApiError(400, "more than one Host header")
        if hosts and not self.answers_to(hosts[0], address):
            raise ApiError(403, "Host %r is not an address of this server; to reach it by "
                           "that name, list it under serve.allowed_hosts in the config"
                           % hosts[0][:100])
        origin = headers.get("Origin")
        if origin is not None and not same_origin(origin, hosts[0] if hosts else None):
            raise ApiError(403, "requests from another site are refused (Origin: %s)"
                           % origin[:100])
        site = (headers.get("Sec-Fetch-Site") or "").strip().lower()
        if site in ("cross-site", "same-site"):
            raise ApiError(403, "requests from another site are refused (Sec-Fetch-Site: %s)"
                           % site)

    def answers_to(self, host, address):
        """Whether a Host header names this server: with the port it listens on, its
        address (any IP address when it listens on every interface) or localhost; on any
        port (a reverse proxy may stand in front), a name from serve.allowed_hosts."""
        import ipaddress
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        if name in self.allowed_hosts:
            return True
        if (80 if port is None else port) != address[1]:
            return False
        if name == "localhost":
            return True
        try:
            given, bound = ipaddress.ip_address(name), ipaddress.ip_address(address[0])
        except ValueError:
            return False
        return given == bound or bound.is_unspecified

    def route(self, method, path):
        """The name of the method answering `method path`, or ApiError 404/405."""
        for prefix, allowed, name in self.ROUTES + GALLERY_ROUTES:
            if path == prefix or (prefix.endswith("/") and prefix != "/"
                                  and path.startswith(prefix)):
                if method != allowed:
                    raise ApiError(405, "%s is not allowed on %s (use %s)"
                                   % (method, prefix, allowed), [("Allow", allowed)])
                return name
        raise ApiError(404, "not found: %s" % path)

    def health(self):
        return {"status": "ok", "version": __version__}

    def backends(self):
        rows = backend_rows(self.config, self.env, self.console)
        for row in rows:
            gate = self.gates[row["name"]]
            row.update(max_concurrency=gate.limit, max_queue=gate.queue,
                       running=gate.running, waiting=gate.waiting)
        return {"adapters": list(ADAPTERS), "backends": rows}

    def generate(self, body):
        """{"images": [record, ...]} for a JSON request body, through the CLI's pipeline.
        When image N of a count fails, the error answer still lists the images before it."""
        options = request_options(body)
        # bad input: 400 before queueing; who asked is looked up once per request
        job = prepare_job(self.config, self.env, preview="off", **options)
        gate = self.gates[job.backend]
        gate.enter(job.backend)
        images = []
        try:
            for record in generate_images(job, self.config, self.env, self.console):
                images.append(dict(record, url=self.image_url(record["path"])))
        except ImagenError as exc:
            raise ApiError.from_imagen_error(exc, {"images": images} if images else None)
        finally:
            gate.leave()
        return {"images": images}

    def image_url(self, path):
        from urllib.parse import quote
        relative = os.path.relpath(path, self.output_dir)
        if relative.startswith(os.pardir + os.sep):
            return None     # written outside output.dir (an absolute naming template)
        return "/v1/images/" + quote(relative.replace(os.sep, "/"))

    def image_file(self, url_path):
        """(open file, content type) for /v1/images/<relative path>: only a regular file
        inside output.dir, by a path with no `..`, `.`, empty or hidden segment (after
        percent-decoding) and no symlink leading outside; else 404."""
        from urllib.parse import unquote
        missing = ApiError(404, "no such image")
        try:
            relative = unquote(url_path[len("/v1/images/"):], errors="strict")
        except UnicodeDecodeError:
            raise missing from None
        parts = relative.split("/")
        if any(not part or part.startswith(".") or "\x00" in part or "\\" in part
               for part in parts):
            raise missing
        root = os.path.realpath(self.output_dir)
        path = os.path.realpath(os.path.join(root, *parts))
        if os.path.commonpath([root, path]) != root:
            raise missing
        import stat
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise missing from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise missing
        handle = os.fdopen(fd, "rb")
        ext = os.path.splitext(path)[1].lower()
        return handle, SERVED_TYPES.get(ext, "application/octet-stream")

    # ----- logs -----

    def log(self, line):
        with self._log_lock:
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def internal_error(self, exc):
        if self.env.get("IMAGEN_DEBUG") == "1":
            import traceback
            traceback.print_exc()
        self.console.warn("serve: internal error: %s: %s" % (type(exc).__name__, exc))


def request_options(body):
    """The generate options in a POST /v1/generate body; anything else is a 400."""
    import json
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "bad JSON: %s" % exc) from None
    except RecursionError:      # [[[[... fits in the body limit many thousand levels deep
        raise ApiError(400, "bad JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object, like {\"prompt\": \"a fox\"}")
    unknown = sorted(set(data) - set(SERVE_FIELDS))
    if unknown:
        raise ApiError(400, "unknown field %r (known: %s)" % (unknown[0], ", ".join(SERVE_FIELDS)))
    if data.get("prompt") is None:
        raise ApiError(400, "prompt is missing")
    for key, kind in SERVE_FIELDS.items():
        if kind is str and data.get(key) is not None and not isinstance(data[key], str):
            raise ApiError(400, "%s must be a string" % key)
    images = data.get("images")
    image_data = sum(len(item["data"]) for item in images if isinstance(item, dict)
                     and isinstance(item.get("data"), str)) if isinstance(images, list) else 0
    if len(body) - image_data > SERVE_MAX_BODY:
        raise ApiError(413, "the body is %d bytes besides its images; at most %d are accepted"
                       % (len(body) - image_data, SERVE_MAX_BODY))
    options = {key: value for key, value in data.items() if value is not None}
    if "images" in options:
        options["images"] = request_images(options["images"])
    return options


def request_images(images):
    """The InputImages of a request's `images: [{"data": base64}, ...]`; a 400 for a bad
    one, a 413 for one over MAX_INPUT_BYTES."""
    import base64
    if not isinstance(images, list) or not all(
            isinstance(item, dict) and isinstance(item.get("data"), str) and set(item) == {"data"}
            for item in images):
        raise ApiError(400, "images must be a list of {\"data\": \"<base64 of a PNG, JPEG or "
                       "WebP file>\"}")
    if len(images) > MAX_INPUT_IMAGES:
        raise ApiError(400, "at most %d input images are allowed (got %d)"
                       % (MAX_INPUT_IMAGES, len(images)))
    found = []
    for number, item in enumerate(images, 1):
        if len(item["data"]) > 4 * -(-MAX_INPUT_BYTES // 3) + 4:
            raise ApiError(413, "images[%d] is over the %s limit" % (number, byte_size(MAX_INPUT_BYTES)))
        try:
            data = base64.b64decode(item["data"], validate=True)
        except ValueError:
            raise ApiError(400, "images[%d].data is not base64" % number) from None
        if len(data) > MAX_INPUT_BYTES:
            raise ApiError(413, "images[%d] is over the %s limit" % (number, byte_size(MAX_INPUT_BYTES)))
        try:
            found.append(input_image(data, "images[%d]" % number))
        except ImagenError as exc:
            raise ApiError(400, exc.message) from None
    return found


def make_handler(api):
    """The request handler class: HTTP/1.1 keep-alive, JSON errors, one log line each."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = api.client_timeout
        disable_nagle_algorithm = True      # TCP_NODELAY: small answers leave at once

        def version_string(self):
            return "imagen/" + __version__

        def setup(self):
            super().setup()
            self.rfile.close()
            self.reader = DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self.reader)

        def handle_one_request(self):
            # request line, headers and body all arrive within one client timeout
            self.reader.start(self.timeout)
            self.started, self.sent, self.unread = clock.monotonic(), 0, False
            self.command, self.path = "-", "-"
            self.expect_continue = False
            super().handle_one_request()

        def do_request(self):
            self.accepted = api.begin()
            status = 499
            try:
                status = self.answer_or_error()
            except OSError as exc:      # reading the request or writing the answer failed
                status = self.client_failed(exc)
            finally:
                api.end()
                self.log_access(status)
                if self.unread:
                    self.linger()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_request

        def answer_or_error(self):
            import socket
            try:
                return self.answer()
            except (ConnectionError, socket.timeout):
                raise                   # the client's side of the socket: no answer to give
            except ApiError as exc:
                error = exc
            except ImagenError as exc:
                error = ApiError.from_imagen_error(exc)
            except Exception as exc:
                api.internal_error(exc)
                error = ApiError(500, "internal error")
            return self.send_json(error.status, dict({"error": error.message}, **error.extra),
                                  error.headers)

        def answer(self):
            length = self.headers.get("Content-Length")
            self.unread = bool(length and length.strip() != "0") \
                or "Transfer-Encoding" in self.headers
            if not self.accepted:
                raise ApiError(503, "shutting down")
            api.check_site(self.headers, self.server.server_address)
            path, _, query = self.path.partition("?")
            if path not in GALLERY_PUBLIC:      # the gallery page asks for the token itself
                api.check_auth(self.headers.get("Authorization"))
            name = api.route(self.command, path)
            if name.startswith("gallery_"):
                return answer_gallery(self, api, name, path, query)
            if name == "image":
                return self.send_file(*api.image_file(path))
            if name == "generate" and prefers_async(self.headers.get("Prefer")):
                check_body_type(self.headers.get("Content-Type"))
                job = api.jobs.start(api, self.read_body())
                return self.send_json(202, job, [("Location", job["url"])])
            if name == "generate":
                check_body_type(self.headers.get("Content-Type"))
                result = api.generate(self.read_body())
            else:
                result = getattr(api, name)()
            return self.send_json(200, result)

        def read_body(self):
            """The request body, refused before reading it when it is over the limit."""
            if "Transfer-Encoding" in self.headers:
                raise ApiError(411, "send the body with a Content-Length, not chunked")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise ApiError(411, "a Content-Length header is required") from None
            if length < 0:
                raise ApiError(400, "bad Content-Length")
            if length > SERVE_MAX_GENERATE_BODY:
                raise ApiError(413, "the body is %d bytes; at most %d are accepted (%d "
                               "besides its images)" % (length, SERVE_MAX_GENERATE_BODY,
                                                        SERVE_MAX_BODY))
            if self.expect_continue:
                self.send_response_only(100)
                self.end_headers()
            body = self.rfile.read(length)
            if len(body) < length:
                raise ConnectionError("the client closed the connection mid-body")
            self.unread = False
            return body

        def client_failed(self, exc):
            """408 to a client too slow to send its request; 499 (logged only) when it
            went away."""
            import socket
            self.close_connection = True
            if isinstance(exc, socket.timeout) and not self.sent:
                try:
                    return self.send_json(408, {"error": "the request did not arrive within "
                                                "%g seconds" % self.timeout})
                except OSError:
                    pass
            return 499

        def handle_expect_100(self):
            self.expect_continue = True     # answered in read_body, after the checks
            return True

        # ----- answers -----

        def answer_head(self, status, content_type, length, headers=()):
            """The status line and headers, as bytes the caller sends in one write with the
            body (or its first chunk): written apart, the body waited for the client's
            delayed ACK (Nagle), 40 ms on every keep-alive request."""
            self.reader.deadline = None     # the request is read: back to a timeout per write
            self.connection.settimeout(self.timeout)
            if self.unread or api.draining:
                self.close_connection = True
            lines = ["%s %d %s" % (self.protocol_version, status,
                                   self.responses.get(status, ("",))[0]),
                     "Server: " + self.version_string(), "Date: " + self.date_time_string(),
                     "Content-Type: " + content_type, "Content-Length: %d" % length]
            lines += ["%s: %s" % (key, value) for key, value in headers]
            given = {key.lower() for key, _ in headers}
            if "x-content-type-options" not in given:
                lines.append("X-Content-Type-Options: nosniff")
            if content_type == "application/json" and "content-security-policy" not in given:
                lines.append("Content-Security-Policy: " + SERVE_JSON_CSP)
            if self.close_connection:
                lines.append("Connection: close")
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        def send_json(self, status, value, headers=()):
            body = (to_json(value) + "\n").encode("utf-8")
            return send_bytes(self, status, "application/json", body, headers)

        def send_file(self, handle, content_type):
            with handle:
                size = os.fstat(handle.fileno()).st_size
                pending = self.answer_head(200, content_type, size,
                                           [("X-Content-Type-Options", "nosniff")])
                for chunk in iter(lambda: handle.read(64 * 1024), b""):
                    self.wfile.write(pending + chunk)
                    self.sent += len(chunk)
                    pending = b""
                if pending:
                    self.wfile.write(pending)       # an empty file
                return 200

        def send_error(self, code, message=None, explain=None):
            """http.server's own errors (bad request line, unknown method...) as JSON."""
            self.close_connection = True
            self.request_version = self.protocol_version   # 0.9 would leave out the status line
            try:
                self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})
            except OSError:
                pass
            self.log_access(code)
            self.linger()       # the rest of a request too long to read may still be coming

        def linger(self):
            """Stop sending, then read and drop the unread body for a moment, so the client
            gets our answer instead of a reset from closing with its data unread."""
            import socket
            try:
                self.connection.shutdown(socket.SHUT_WR)
                self.reader.start(SERVE_LINGER)
                while self.rfile.read1(64 * 1024) and self.reader.received < 16 * SERVE_MAX_BODY:
                    pass
            except OSError:
                pass
            self.close_connection = True

        # ----- logs: one access line per request, never a header -----

        def log_access(self, status):
            path = self.path.partition("?")[0][:300]
            path = "".join(c if " " < c < "\x7f" and c != '"' else "%%%02X" % (ord(c) & 0xFF)
                           for c in path)     # one line, one quoted field, whatever was sent
            api.log('%s - [%s] "%s %s" %d %d %dms' % (
                self.client_address[0], iso_time(clock.time()), self.command or "-", path, status,
                self.sent, (clock.monotonic() - self.started) * 1000))

        def log_request(self, code="-", size="-"):
            pass            # log_access writes the line, once the answer is complete

        def log_message(self, format, *args):
            if self.reader.received:    # a request cut off; an idle keep-alive is no news
                api.log("imagen: serve: %s: %s" % (self.client_address[0], format % args))

    return Handler


def make_server(api, host, port, family):
    from http.server import ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        request_queue_size = 128

        def server_bind(self):
            # HTTPServer.server_bind would look up the host's FQDN, which can hang on DNS
            import socketserver
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = host, self.server_address[1]

        def handle_error(self, request, client_address):
            exc = sys.exc_info()[1]
            if not isinstance(exc, OSError):
                api.internal_error(exc)

    try:
        return Server((host, port), make_handler(api))
    except OSError as exc:
        raise usage_error("serve: cannot listen on %s:%d: %s"
                          % (host, port, exc.strerror or exc)) from None


def serve_until_signalled(api, server):
    """Serve until SIGTERM or SIGINT, then stop accepting and finish every accepted job,
    running or queued. A second signal stops at once (exit 130)."""
    import signal
    import threading
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        while not stop.wait(1.0):
            pass
        api.console.warn("serve: stopping: finishing the jobs in flight")
        api.stop_accepting()
        server.shutdown()
        server.server_close()       # new connections are refused from here on
        api.drain()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    api.console.warn("serve: stopped")


def cmd_serve(args, env):
    host, port, family = parse_addr(args.addr)
    token = env.get("IMAGEN_SERVE_TOKEN") or ""
    if not token and not is_loopback(host):
        raise usage_error("serve: %s is not a loopback address: set $IMAGEN_SERVE_TOKEN "
                          "(clients then send Authorization: Bearer <token>)" % args.addr)
    if not args.client_timeout > 0:
        raise usage_error("serve: --client-timeout must be a number of seconds above 0")
    console = Console(quiet=True)
    config = load_config_and_warn(getattr(args, "config", None), env, console)
    config = Config(config.data, config.path, config.exists)   # warned once, not per job
    api = Api(config, env, token, args.client_timeout, console)
    server = make_server(api, host, port, family)
    bound = server.server_address
    shown = "[%s]" % bound[0] if ":" in bound[0] else bound[0]
    console.warn("serve: listening on http://%s:%d (%s)" % (
        shown, bound[1], "a bearer token is required" if token else "no token"))
    serve_until_signalled(api, server)
    return EXIT_OK


# ----- the gallery: one page over a few JSON routes -----
# SPEC §15: `GET /` is one HTML page (its script and style allowed by their hashes in the
# CSP, nothing from elsewhere) over a few JSON routes: /v1/history pages of the ledger,
# /v1/thumbs/ downscaled PNGs cached on disk, /v1/usage, and /v1/jobs/<id>, the progress
# of a generate started with `Prefer: respond-async`. The page and its icon carry no data,
# so they need no token: the page asks for it and sends it with every request it makes.

GALLERY_ROUTES = (("/", "GET", "gallery_page"), ("/favicon.ico", "GET", "gallery_favicon"),
                  ("/v1/history", "GET", "gallery_history"),
                  ("/v1/usage", "GET", "gallery_usage"),
                  ("/v1/thumbs/", "GET", "gallery_thumb"), ("/v1/jobs/", "GET", "gallery_job"))
GALLERY_PUBLIC = ("/", "/favicon.ico")
GALLERY_PAGE_ROWS = 50              # a page of the grid; /v1/history takes up to 200
GALLERY_MAX_ROWS = 200
THUMB_MAX_WIDTH = 1024
THUMB_DEFAULT_WIDTH = 256
THUMB_MAX_SOURCE = 64 * 1024 * 1024  # bytes of an image read to make its thumbnail
GALLERY_JOBS_KEPT = 200             # finished async jobs remembered for their pollers
SERVE_JSON_CSP = "default-src 'none'; frame-ancestors 'none'"


def answer_gallery(handler, api, name, path, query):
    """Answer one of GALLERY_ROUTES; returns the status."""
    from urllib.parse import parse_qs
    params = {key: values[-1] for key, values in
              parse_qs(query, keep_blank_values=True, errors="replace").items()}
    if name == "gallery_page":
        body, headers = gallery_page(bool(api.token))
        return send_bytes(handler, 200, "text/html; charset=utf-8", body, headers)
    if name == "gallery_favicon":
        return send_bytes(handler, 200, "image/png", gallery_favicon(),
                          [("Cache-Control", "public, max-age=86400")])
    if name == "gallery_thumb":
        return answer_thumb(handler, api, path, params)
    if name == "gallery_history":
        result = gallery_history(api, params)
    elif name == "gallery_usage":
        result = gallery_usage(api, params)
    else:
        result = api.jobs.get(path[len("/v1/jobs/"):])
    return handler.send_json(200, result, [("Cache-Control", "no-store")])


def send_bytes(handler, status, content_type, body, headers=()):
    head = handler.answer_head(status, content_type, len(body), headers)
    if status == 304:       # no body, and no length of one that would mislead a cache
        handler.wfile.write(head.replace(b"\r\nContent-Length: 0\r\n", b"\r\n"))
    elif handler.command == "HEAD":
        handler.wfile.write(head)
    else:
        handler.wfile.write(head + body)
        handler.sent = len(body)
    return status


def prefers_async(header):
    """Whether a Prefer header (RFC 7240) asks for respond-async."""
    return any(part.split(";")[0].strip().lower() == "respond-async"
               for part in (header or "").split(","))


# ----- /v1/history -----

def gallery_history(api, params):
    """{"rows": [...], "next": cursor or null} for q (words), backend, since (YYYY-MM-DD),
    limit and before (the `next` of the previous page); or the row of one generation id."""
    if params.get("id"):
        return {"rows": [gallery_row(api, row) for row in ledger_rows_by_id(api.env, params["id"])],
                "next": None}
    limit = gallery_number("limit", params.get("limit"), GALLERY_PAGE_ROWS, GALLERY_MAX_ROWS)
    since = params.get("since") or None
    if since is not None:
        import re
        if not re.match(r"\d{4}-\d\d-\d\d$", since):
            raise ApiError(400, "since must be a date YYYY-MM-DD (got %r)" % since[:40])
    ledger = api.readers.get()
    rows = search_history(api.env, words=params.get("q", ""), since=since,
                          backend=params.get("backend") or None, limit=limit,
                          before=params.get("before") or None, ledger=ledger) if ledger else []
    return {"rows": [gallery_row(api, row) for row in rows],
            "next": rows[-1]["cursor"] if len(rows) == limit else None}


class LedgerReaders:
    """An open ledger per serving thread (one keep-alive connection is one thread) for
    the gallery's searches: opening the ledger costs more than a search of it (SQLite reads
    the schema again, and closing its last connection checkpoints and deletes the WAL).
    A thread's ledger is closed with the thread, or when the file changes (is replaced,
    or written by a checkpoint)."""

    def __init__(self, env):
        import threading
        self.env, self._local = env, threading.local()

    def get(self):
        """The thread's open Ledger, or None when there is no ledger yet."""
        try:
            info = os.stat(ledger_path(self.env))
        except FileNotFoundError:
            return None
        # ctime too: a file made anew may get the inode number of the one deleted
        key = (info.st_dev, info.st_ino, info.st_ctime_ns)
        held = getattr(self._local, "held", None)
        if held and held[0] == key:
            return held[1]
        if held:
            held[1].close()
        self._local.held = (key, open_ledger(self.env))
        return self._local.held[1]


def gallery_number(name, text, default, highest):
    if text is None or text == "":
        return default
    if not text.isdigit() or not 1 <= int(text) <= highest:
        raise ApiError(400, "%s must be a whole number from 1 to %d (got %r)"
                       % (name, highest, text[:40]))
    return int(text)


def ledger_rows_by_id(env, generation):
    if not os.path.exists(ledger_path(env)):
        return []
    with open_ledger(env) as ledger:
        rows = ledger._select("WHERE id = ?", (generation,), order="")
    for row in rows:
        row["exists"] = os.path.isfile(row["path"])
    return rows


def gallery_row(api, row):
    """What the page shows of a ledger row. Seeds go as text too: JavaScript numbers
    lose digits past 2**53."""
    record = row.get("record") or {}
    url = api.image_url(row["path"]) if row.get("exists") else None
    inputs = [{"path": item.get("path"), "id": item.get("id"), "sha256": item.get("sha256"),
               "url": api.image_url(item["path"]) if isinstance(item.get("path"), str)
               and os.path.isfile(item["path"]) else None}
              for item in record.get("inputs") or () if isinstance(item, dict)]
    seed = row.get("seed", record.get("seed"))
    return {"id": row["id"], "created_at": row["created_at"], "backend": row["backend"],
            "path": row["path"], "cloud": row.get("cloud"), "exists": bool(row.get("exists")),
            "prompt": record.get("prompt"), "seed": None if seed is None else str(seed),
            "width": row.get("width") or record.get("width"),
            "height": row.get("height") or record.get("height"),
            "cost_usd": row.get("cost_usd"), "url": url,
            "thumb": url and "/v1/thumbs/" + url[len("/v1/images/"):],
            "parent": record.get("parent") or row.get("parent"), "inputs": inputs,
            "record": record, "cursor": row.get("cursor")}


# ----- /v1/usage -----

def gallery_usage(api, params):
    """`imagen usage --json` (the same groups, from the same source) plus the cost of each
    ISO week by backend, for the chart."""
    since = params.get("since") or None
    if since is not None:
        since = parse_since(since)
    rows, source = usage_rows(api.config, api.env, since,
                              local=params.get("local") in ("1", "true"))
    try:
        groups = group_usage(rows)
    except ImagenError as exc:
        raise ImagenError("usage: %s" % exc.message, exc.code) from None
    weeks = {}
    for group in groups:
        week = weeks.setdefault(group["week"], {"week": group["week"], "backends": {},
                                                "count": 0, "cost_usd": 0.0})
        week["backends"][group["backend"]] = round(
            week["backends"].get(group["backend"], 0.0) + group["cost_usd"], 6)
        week["count"] += group["count"]
        week["cost_usd"] = round(week["cost_usd"] + group["cost_usd"], 6)
    return {"source": source, "groups": groups, "weeks": [weeks[k] for k in sorted(weeks)],
            "total": {"count": sum(g["count"] for g in groups),
                      "cost_usd": round(sum(g["cost_usd"] for g in groups), 6)}}


# ----- /v1/thumbs/ -----

def answer_thumb(handler, api, path, params):
    """A PNG at most w pixels wide (JPEG and WebP as they are: the browser scales them),
    by the path rules of /v1/images/, with an ETag from the file's sha256 and w."""
    width = gallery_number("w", params.get("w"), THUMB_DEFAULT_WIDTH, THUMB_MAX_WIDTH)
    handle, content_type = api.image_file("/v1/images/" + path[len("/v1/thumbs/"):])
    with handle:
        digest, data = api.thumbs.digest(handle)
        etag = '"%s-%d"' % (digest[:40], width)
        headers = [("ETag", etag), ("Cache-Control", "private, no-cache")]
        if etag_matches(handler.headers.get("If-None-Match"), etag):
            return send_bytes(handler, 304, content_type, b"", headers)
        body = api.thumbs.thumbnail(handle, data, digest, width, content_type)
    return send_bytes(handler, 200, content_type, body, headers)


def etag_matches(header, etag):
    tags = [tag.strip() for tag in (header or "").split(",")]
    return "*" in tags or etag in tags or "W/" + etag in tags


def thumbs_dir(env):
    base = env.get("XDG_CACHE_HOME") or os.path.join(_home(env), ".cache")
    return os.path.join(base, "imagen", "thumbs")


def gallery_thumb_side(width, height, max_width):
    """The longest side to give downscale_png (which bounds the longest side) so that the
    thumbnail is at most max_width wide."""
    return max_width if width >= height else max(1, max_width * height // width)


class ThumbCache:
    """Thumbnails on disk under $XDG_CACHE_HOME/imagen/thumbs as <sha256>-<w>.png, and in
    memory the sha256 of each file seen (by device, inode, size and mtime), so a warm
    thumbnail costs a stat and one small read."""

    MEMO_SIZE = 20000

    def __init__(self, env):
        import threading
        self.dir = thumbs_dir(env)
        self._digests = {}
        self._lock = threading.Lock()

    def digest(self, handle):
        """(sha256 of the open file, its bytes when they had to be read, else None)."""
        info = os.fstat(handle.fileno())
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            known = self._digests.get(key)
        if known:
            return known, None
        data = read_thumb_source(handle)
        digest = sha256_hex(data)
        with self._lock:
            if len(self._digests) >= self.MEMO_SIZE:
                self._digests.clear()
            self._digests[key] = digest
        return digest, data

    def thumbnail(self, handle, data, digest, width, content_type):
        if content_type != "image/png":
            return data if data is not None else read_thumb_source(handle)
        path = os.path.join(self.dir, "%s-%d.png" % (digest, width))
        try:
            with open(path, "rb") as cached:
                return cached.read(THUMB_MAX_SOURCE)
        except FileNotFoundError:
            pass
        if data is None:
            handle.seek(0)
            data = read_thumb_source(handle)
        try:
            size = _png_size(png_chunks(data))
            if size[0] <= width:
                return data         # already narrow enough: the file itself
            small = downscale_png(data, gallery_thumb_side(size[0], size[1], width))
        except ImagenError as exc:
            raise ImagenError("thumbnail: %s" % exc.message) from None
        self._store(path, small)
        return small

    def _store(self, path, data):
        """Write atomically (a reader never sees half a file); a cache that cannot be
        written costs speed, never the answer."""
        import tempfile
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".thumb-", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(temp, path)
            except BaseException:
                os.unlink(temp)
                raise
        except OSError:
            pass


def read_thumb_source(handle):
    data = handle.read(THUMB_MAX_SOURCE + 1)
    if len(data) > THUMB_MAX_SOURCE:
        raise ApiError(413, "the image is over %d MiB: no thumbnail" % (THUMB_MAX_SOURCE >> 20))
    return data


# ----- async jobs: POST /v1/generate with Prefer: respond-async, GET /v1/jobs/<id> -----

class JobConsole(Console):
    """The console of a job run for the page: its progress lines become the job's."""

    def __init__(self, state, lock):
        super().__init__(quiet=True)
        self.state, self.lock = state, lock

    def progress(self, message, done=None, total=None):
        with self.lock:
            self.state["progress"] = message[:200]


class GalleryJobs:
    """Generations run in the background for the page, each polled at its URL: state
    queued, running, done or failed; images so far; the adapter's last progress line."""

    def __init__(self):
        import collections
        import threading
        self._jobs = collections.OrderedDict()
        self._started = {}          # id -> clock.monotonic() when it was accepted
        self._lock = threading.Lock()

    def start(self, api, body):
        """Check the request (a 400 comes now, as from /v1/generate), then run it in a
        thread counted as a request in flight, so SIGTERM waits for it."""
        import threading
        import uuid
        options = request_options(body)
        job = prepare_job(api.config, api.env, preview="off", **options)
        ident = uuid.uuid4().hex
        state = {"id": ident, "url": "/v1/jobs/" + ident, "state": "queued",
                 "backend": job.backend, "count": job.count, "done": 0, "images": [],
                 "progress": "", "error": None, "status": None, "elapsed_ms": 0}
        if not api.begin():
            api.end()
            raise ApiError(503, "shutting down")
        started = clock.monotonic()
        with self._lock:
            self._jobs[ident], self._started[ident] = state, started
            self._forget_old()
        threading.Thread(target=self._run, args=(api, job, state, started), daemon=True).start()
        return self.get(ident)

    def _run(self, api, job, state, started):
        gate = api.gates[job.backend]
        entered = False
        try:
            gate.enter(job.backend)
            entered = True
            self._set(state, state="running", elapsed_ms=self._ms(started))
            console = JobConsole(state, self._lock)
            for record in generate_images(job, api.config, api.env, console):
                image = dict(record, url=api.image_url(record["path"]))
                with self._lock:
                    state["images"].append(image)
                    state["done"] += 1
            self._set(state, state="done", status=200, progress="")
        except ApiError as exc:
            self._set(state, state="failed", error=exc.message, status=exc.status)
        except ImagenError as exc:
            error = ApiError.from_imagen_error(exc)
            self._set(state, state="failed", error=error.message, status=error.status)
        except Exception as exc:
            api.internal_error(exc)
            self._set(state, state="failed", error="internal error", status=500)
        finally:
            if entered:
                gate.leave()
            state["elapsed_ms"] = self._ms(started)
            api.end()

    @staticmethod
    def _ms(started):
        return int((clock.monotonic() - started) * 1000)

    def _set(self, job_state, **values):
        with self._lock:
            job_state.update(values)

    def _forget_old(self):
        finished = [key for key, job in self._jobs.items() if job["state"] in ("done", "failed")]
        for key in finished[:max(0, len(self._jobs) - GALLERY_JOBS_KEPT)]:
            del self._jobs[key], self._started[key]

    def get(self, ident):
        with self._lock:
            state = self._jobs.get(ident)
            if state is None:
                raise ApiError(404, "no such job: %s" % ident[:40])
            if state["state"] in ("queued", "running"):
                state["elapsed_ms"] = self._ms(self._started[ident])
            return dict(state, images=list(state["images"]))


# ----- the page and its icon -----

_GALLERY_PAGES = {}


def gallery_page(token_required):
    """(HTML bytes, headers) of the page: its one script and one style allowed by their
    sha256 in the CSP, everything else from this server only."""
    page = _GALLERY_PAGES.get(token_required)
    if page is None:
        import base64
        import hashlib

        def source_hash(text):
            return "'sha256-%s'" % base64.b64encode(
                hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
        csp = ("default-src 'self'; script-src %s; style-src %s; img-src 'self' blob:; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'" % (source_hash(GALLERY_JS), source_hash(GALLERY_CSS)))
        html = (GALLERY_HTML.replace("{{token}}", "required" if token_required else "none")
                .replace("{{version}}", __version__)
                .replace("{{style}}", GALLERY_CSS).replace("{{script}}", GALLERY_JS))
        page = _GALLERY_PAGES[token_required] = (html.encode("utf-8"), [
            ("Content-Security-Policy", csp), ("Cache-Control", "no-cache"),
            ("Referrer-Policy", "no-referrer")])
    return page


_FAVICON = []


def gallery_favicon():
    """A 32x32 PNG drawn here: a diagonal gradient with a light disc, imagen's mark."""
    if not _FAVICON:
        size, lines = 32, []
        for y in range(size):
            row = bytearray(b"\x00")
            for x in range(size):
                t = (x + y) / 62.0
                if (x - 20.5) ** 2 + (y - 11.5) ** 2 < 30:
                    row += b"\xff\xf4\xc8"
                else:
                    row += bytes((int(40 + 150 * t), int(170 - 90 * t), int(200 + 40 * t)))
            lines.append(bytes(row))
        _FAVICON.append(encode_png(size, size, lines))
    return _FAVICON[0]


# The page: no build step, no external resource. Each text of a ledger row goes in with
# textContent (never as HTML); the token stays in sessionStorage and travels only in an
# Authorization header (images through fetch and blob: URLs when a token is needed).
GALLERY_HTML = r'''<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>imagen gallery</title>
<link rel="icon" href="/favicon.ico" type="image/png">
<style>{{style}}</style></head>
<body data-token="{{token}}">
<header>
<h1><img src="/favicon.ico" width="20" height="20" alt=""> imagen</h1>
<nav>
<button type="button" id="to-gallery" aria-pressed="true">Gallery</button>
<button type="button" id="to-spend" aria-pressed="false">Spend</button>
<button type="button" id="to-generate" class="primary">Generate</button>
</nav>
<form id="filters" role="search">
<input type="search" name="q" id="search" placeholder="Search prompts ( / )" aria-label="Search prompts" autocomplete="off">
<select name="backend" id="f-backend" aria-label="Backend"><option value="">all backends</option></select>
<input type="date" name="since" id="f-since" aria-label="Made on or after">
</form>
</header>
<main>
<section id="gallery" aria-label="Images">
<p id="status" role="status"></p>
<ul id="grid"></ul>
<div id="more"></div>
</section>
<section id="spend" hidden aria-label="Spend">
<h2>Spend per ISO week</h2>
<p id="spend-source" class="muted"></p>
<div id="chart"></div>
<div class="scroll"><table id="spend-table"></table></div>
</section>
</main>
<dialog id="detail" aria-label="Image">
<div class="bar">
<button type="button" id="d-prev" aria-label="Previous image">&#8249;</button>
<button type="button" id="d-next" aria-label="Next image">&#8250;</button>
<span class="grow"></span>
<button type="button" id="d-close" aria-label="Close">&#215;</button>
</div>
<div class="detail">
<figure id="d-figure"></figure>
<div class="info">
<p class="prompt"><span id="d-prompt"></span> <button type="button" id="d-copy" class="small">copy</button></p>
<dl id="d-fields"></dl>
<p id="d-links" class="links"></p>
<p class="actions">
<button type="button" id="d-remix" class="primary">remix</button>
<button type="button" id="d-edit">edit this</button>
<a id="d-download" class="button" download>download</a>
<button type="button" id="d-copy-path">copy path</button>
<span id="d-note" class="muted" role="status"></span>
</p>
<details><summary>record</summary><pre id="d-record"></pre></details>
</div></div>
</dialog>
<dialog id="gen" aria-label="Generate">
<form id="gen-form">
<h2>Generate</h2>
<label>Prompt <textarea name="prompt" rows="3" required></textarea></label>
<div class="fields">
<label>Backend <select name="backend" id="g-backend"><option value="">default</option></select></label>
<label>Size <input name="size" placeholder="1024x1024" autocomplete="off"></label>
<label>Seed <input name="seed" inputmode="numeric" placeholder="random" autocomplete="off"></label>
<label>Style <input name="style" placeholder="none" autocomplete="off"></label>
<label>Count <input name="count" type="number" min="1" value="1"></label>
</div>
<div class="fields">
<label>Images <input type="file" name="images" accept="image/png,image/jpeg,image/webp" multiple></label>
<label>Strength <input name="strength" inputmode="decimal" placeholder="0 to 1" autocomplete="off"></label>
</div>
<p id="g-inputs" class="muted"></p>
<progress id="g-progress" hidden></progress>
<p id="g-status" role="status" class="muted"></p>
<p id="g-error" role="alert" class="error"></p>
<div id="g-result" class="result"></div>
<p class="actions"><button type="button" id="g-close">Close</button>
<button type="submit" class="primary">Generate</button></p>
</form>
</dialog>
<dialog id="token-dialog" aria-label="Token">
<form id="token-form">
<h2>Token</h2>
<p class="muted">This server needs its token ($IMAGEN_SERVE_TOKEN). It is kept for this tab only.</p>
<label>Token <input type="password" name="token" id="token" autocomplete="off" required></label>
<p class="actions"><button type="submit" class="primary">Use token</button></p>
</form>
</dialog>
<footer class="muted">imagen {{version}}</footer>
<script>{{script}}</script>
</body></html>'''

GALLERY_CSS = r'''
:root { --bg: #f7f7f5; --fg: #1b1d21; --muted: #6a6f78; --card: #ffffff; --line: #dcdde0;
  --accent: #2b6cb0; --accent-fg: #ffffff; --error: #b42318; --tile: #e8e9ec;
  color-scheme: light dark; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #121417; --fg: #e6e7ea; --muted: #9aa0aa; --card: #1c1f24; --line: #30343b;
    --accent: #6ea8ff; --accent-fg: #0b1220; --error: #ff8a80; --tile: #23272e; } }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
header { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; gap: 8px 16px;
  align-items: center; padding: 10px 16px; background: var(--bg);
  border-bottom: 1px solid var(--line); }
h1 { font-size: 18px; margin: 0; display: flex; align-items: center; gap: 6px; }
h1 img { border-radius: 5px; }
h2 { font-size: 17px; margin: 0 0 10px; }
nav { display: flex; gap: 6px; }
#filters { display: flex; flex: 1 1 320px; gap: 6px; flex-wrap: wrap; }
#search { flex: 1 1 180px; }
input, select, textarea, button, .button { font: inherit; color: inherit; background: var(--card);
  border: 1px solid var(--line); border-radius: 8px; padding: 6px 10px; min-width: 0; }
textarea { width: 100%; resize: vertical; }
button, .button { cursor: pointer; text-decoration: none; display: inline-block; }
button:hover, .button:hover { border-color: var(--accent); }
button[aria-pressed="true"] { border-color: var(--accent); color: var(--accent); }
.primary { background: var(--accent); color: var(--accent-fg); border-color: var(--accent); }
.small { padding: 2px 8px; font-size: 13px; }
:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
main { padding: 12px 16px 40px; }
.muted { color: var(--muted); }
.error { color: var(--error); white-space: pre-wrap; }
.error:empty, #g-status:empty, #g-inputs:empty { display: none; }
#status { margin: 0 0 10px; color: var(--muted); min-height: 1.45em; }
#grid { list-style: none; margin: 0; padding: 0; display: grid; gap: 10px;
  grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); }
.tile { display: block; width: 100%; padding: 0; border-radius: 10px; overflow: hidden;
  background: var(--tile); position: relative; aspect-ratio: 1 / 1; }
.tile img { display: block; width: 100%; height: 100%; object-fit: cover; }
.tile .cap { position: absolute; left: 0; right: 0; bottom: 0; padding: 16px 8px 6px;
  font-size: 12px; text-align: left; color: #fff; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; background: linear-gradient(transparent, rgba(0,0,0,.65)); }
.tile .missing { display: flex; height: 100%; align-items: center; justify-content: center;
  color: var(--muted); font-size: 13px; }
#more { height: 1px; }
dialog { border: 1px solid var(--line); border-radius: 12px; background: var(--card);
  color: var(--fg); padding: 14px; width: min(1100px, calc(100vw - 16px));
  max-height: calc(100vh - 16px); }
dialog::backdrop { background: rgba(0,0,0,.6); }
#gen, #token-dialog { width: min(560px, calc(100vw - 16px)); }
.bar { display: flex; gap: 6px; margin-bottom: 10px; }
.grow { flex: 1; }
.detail { display: grid; grid-template-columns: minmax(0, 3fr) minmax(260px, 2fr); gap: 16px; }
figure { margin: 0; display: flex; align-items: flex-start; justify-content: center; }
figure img { width: 100%; height: auto; max-height: calc(100vh - 120px);
  object-fit: contain; border-radius: 8px; background: var(--tile); }
.prompt { font-size: 16px; margin: 0 0 10px; white-space: pre-wrap; overflow-wrap: anywhere; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 12px; margin: 0 0 10px;
  font-size: 13px; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.links a, a { color: var(--accent); margin-right: 10px; }
.actions { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
pre { font-size: 12px; overflow: auto; max-height: 40vh; background: var(--bg);
  padding: 8px; border-radius: 8px; }
label { display: block; font-size: 13px; color: var(--muted); margin-bottom: 8px; }
label > input, label > select, label > textarea { display: block; width: 100%; color: var(--fg);
  margin-top: 2px; }
.fields { display: grid; grid-template-columns: repeat(auto-fit, minmax(130px, 1fr)); gap: 0 10px; }
progress { width: 100%; }
.result { display: flex; flex-wrap: wrap; gap: 8px; }
.result img { width: 128px; height: 128px; object-fit: cover; border-radius: 8px; }
#chart svg { width: 100%; height: auto; max-width: 900px; display: block; }
#chart text { fill: var(--fg); font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; margin-top: 12px; }
th, td { text-align: left; padding: 3px 10px; border-bottom: 1px solid var(--line); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tfoot td { font-weight: 600; }
.scroll { overflow-x: auto; }
footer { padding: 0 16px 16px; font-size: 12px; }
@media (max-width: 640px) {
  header { padding: 8px 10px; } main { padding: 10px; }
  #grid { grid-template-columns: repeat(auto-fill, minmax(104px, 1fr)); gap: 6px; }
  .detail { grid-template-columns: 1fr; }
  dialog { padding: 10px; } }
'''

GALLERY_JS = r'''
"use strict";
// imagen gallery: every text goes in with textContent, never as HTML.
const PAGE = 50, POLL_MS = 2000, TOKEN_KEY = "imagen.token";
const THUMB_W = window.devicePixelRatio > 1.5 ? 512 : 256;
const $ = (id) => document.getElementById(id);
const grid = $("grid"), search = $("search"), detail = $("detail"), gen = $("gen");
const needsToken = document.body.dataset.token === "required";
let token = needsToken ? sessionStorage.getItem(TOKEN_KEY) || "" : "";
const S = { byId: new Map(), next: null, done: false, loading: false, era: 0, current: null,
  blobs: [], attached: [] };

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "text") e.textContent = v; else e.setAttribute(k, String(v));
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
}
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

// ----- the token: asked once, kept for the tab, sent as a header only -----
let asking = null;
function askToken() {
  if (!asking) {
    asking = new Promise((done) => {
      const dialog = $("token-dialog"), form = $("token-form");
      form.onsubmit = (event) => {
        event.preventDefault();
        token = $("token").value.trim();
        sessionStorage.setItem(TOKEN_KEY, token);
        dialog.close();
        asking = null;
        done();
      };
      dialog.oncancel = (event) => event.preventDefault();
      dialog.showModal();
      $("token").focus();
    });
  }
  return asking;
}

class ApiError extends Error {}
async function request(path, options) {
  options = options || {};
  if (needsToken && !token) await askToken();
  const headers = Object.assign({}, options.headers);
  if (token) headers.Authorization = "Bearer " + token;
  const answer = await fetch(path, Object.assign({}, options, { headers }));
  if (answer.status === 401 && needsToken) {
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    await askToken();
    return request(path, options);
  }
  return answer;
}
async function getJSON(path, options) {
  const answer = await request(path, options);
  let body = null;
  try { body = await answer.json(); } catch (e) { body = null; }
  if (!answer.ok) {
    throw new ApiError(body && body.error ? body.error : "HTTP " + answer.status);
  }
  return body;
}
// an image: its own URL without a token; with one, fetched with the header, as a blob URL
function showImage(img, url, keep) {
  if (!needsToken) { img.src = url; return Promise.resolve(url); }
  return request(url).then((answer) => answer.ok ? answer.blob() : null).then((blob) => {
    if (!blob) return null;
    const local = URL.createObjectURL(blob);
    if (keep) S.blobs.push(local);
    else img.addEventListener("load", () => URL.revokeObjectURL(local), { once: true });
    img.src = local;
    return local;
  });
}
function params(extra) {
  const form = new FormData($("filters")), query = new URLSearchParams();
  for (const [key, value] of form) if (String(value).trim()) query.set(key, String(value).trim());
  for (const [key, value] of Object.entries(extra || {})) query.set(key, value);
  return query;
}

// ----- the grid: pages of 50, newest first, more as the end comes into view -----
function tile(row) {
  const button = el("button", { type: "button", class: "tile", "data-id": row.id,
    title: row.prompt || "" });
  if (row.thumb) {
    const img = el("img", { alt: row.prompt || "", width: row.width || THUMB_W,
      height: row.height || THUMB_W, decoding: "async" });
    if (!needsToken) img.loading = "lazy";
    showImage(img, row.thumb + "?w=" + THUMB_W);
    button.append(img);
  } else {
    button.append(el("span", { class: "missing",
      text: row.exists ? "not under output.dir" : "file missing" }));
  }
  button.append(el("span", { class: "cap", text: row.prompt || "" }));
  button.addEventListener("click", () => openDetail(row.id));
  return el("li", null, button);
}
function addRows(rows, atTop) {
  const items = [];
  for (const row of rows) {
    if (S.byId.has(row.id)) continue;
    S.byId.set(row.id, row);
    items.push(tile(row));
  }
  if (atTop) grid.prepend(...items); else grid.append(...items);
  setStatus();
}
function setStatus(text) {
  const count = grid.children.length;
  $("status").textContent = text || (count ? count + (count === 1 ? " image" : " images")
    + (S.done ? "" : ", more below") : S.done ? "No images yet: press Generate." : "Loading...");
}
async function loadMore() {
  if (S.loading || S.done) return;
  S.loading = true;
  const era = S.era;
  try {
    const page = await getJSON("/v1/history?" + params(Object.assign({ limit: PAGE },
      S.next ? { before: S.next } : {})));
    if (era !== S.era) return;
    S.next = page.next;
    S.done = !page.next;
    addRows(page.rows, false);
  } catch (error) {
    if (era === S.era) { S.done = true; setStatus("imagen: " + error.message); }
    return;
  } finally {
    if (era === S.era) S.loading = false;
  }
  if (endInView()) loadMore();
}
function endInView() {
  return !$("gallery").hidden && $("more").getBoundingClientRect().top < innerHeight + 800;
}
function restart() {
  S.era += 1;
  S.byId.clear();
  S.next = null; S.done = false; S.loading = false;
  grid.replaceChildren();
  setStatus();
  loadMore();
}
new IntersectionObserver((entries) => {
  if (entries.some((entry) => entry.isIntersecting)) loadMore();
}, { rootMargin: "800px" }).observe($("more"));

// new images from any process: the first page again, what is above the newest we show
async function poll() {
  try {
    if (!document.hidden && !S.loading && (S.byId.size || S.done)) {
      const era = S.era;
      const page = await getJSON("/v1/history?" + params({ limit: PAGE }));
      const fresh = [];
      for (const row of page.rows) { if (S.byId.has(row.id)) break; fresh.push(row); }
      if (era === S.era && fresh.length) addRows(fresh, true);
    }
  } catch (error) {
    setStatus("imagen: " + error.message);
  }
  setTimeout(poll, POLL_MS);
}

let typing = null;
search.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(restart, 200); });
$("filters").addEventListener("submit", (event) => { event.preventDefault(); restart(); });
$("f-backend").addEventListener("change", restart);
$("f-since").addEventListener("change", restart);

// ----- the detail view -----
function field(list, name, value) {
  if (value === null || value === undefined || value === "") return;
  list.append(el("dt", { text: name }), el("dd", { text: String(value) }));
}
function fileName(path) { return String(path || "").split("/").pop(); }
function link(text, url) {
  const a = el("a", { href: url, text: text, target: "_blank", rel: "noopener" });
  if (needsToken) {
    a.addEventListener("click", (event) => {
      event.preventDefault();
      request(url).then((answer) => answer.blob()).then((blob) => {
        const local = URL.createObjectURL(blob);
        S.blobs.push(local);
        window.open(local, "_blank", "noopener");
      });
    });
  }
  return a;
}
function generationLink(text, id) {
  const a = el("a", { href: "#" + id, text: text });
  a.addEventListener("click", async (event) => {
    event.preventDefault();
    try {
      const page = await getJSON("/v1/history?" + new URLSearchParams({ id: id }));
      if (!page.rows.length) { note("not in the ledger: " + id); return; }
      if (!S.byId.has(id)) S.byId.set(id, page.rows[0]);
      openDetail(id);
    } catch (error) { note("imagen: " + error.message); }
  });
  return a;
}
function note(text) { $("d-note").textContent = text; }
function forgetBlobs() { for (const url of S.blobs) URL.revokeObjectURL(url); S.blobs = []; }
function openDetail(id) {
  const row = S.byId.get(id), record = row.record || {};
  S.current = id;
  forgetBlobs();
  note("");
  const figure = $("d-figure");
  figure.replaceChildren();
  const download = $("d-download");
  download.removeAttribute("href");
  download.setAttribute("download", fileName(row.path));
  if (row.url) {
    const img = el("img", { alt: row.prompt || "", width: row.width || 512,
      height: row.height || 512 });
    figure.append(img);
    showImage(img, row.url, true).then((url) => { if (url && S.current === id) download.href = url; });
  } else {
    figure.append(el("p", { class: "muted", text: row.exists ? "not under output.dir"
      : "the file is missing: " + row.path }));
  }
  $("d-prompt").textContent = row.prompt || "";
  const list = $("d-fields");
  list.replaceChildren();
  field(list, "seed", row.seed);
  field(list, "size", row.width && row.height ? row.width + "x" + row.height : null);
  field(list, "backend", row.backend);
  field(list, "model", record.model);
  field(list, "cost", row.cost_usd === null || row.cost_usd === undefined ? null
    : "$" + Number(row.cost_usd).toFixed(4));
  field(list, "time", new Date(row.created_at).toLocaleString() + " (" + row.created_at + ")");
  field(list, "caller", record.caller);
  field(list, "style", record.style);
  field(list, "negative", record.negative);
  field(list, "steps", record.steps);
  field(list, "latency", record.latency_ms === undefined ? null : record.latency_ms + " ms");
  field(list, "cloud", row.cloud);
  field(list, "id", row.id);
  field(list, "path", row.path);
  const links = $("d-links");
  links.replaceChildren();
  if (row.url) links.append(link("file", row.url));
  if (row.parent) links.append(generationLink("parent", row.parent));
  (row.inputs || []).forEach((input, index) => {
    const name = "input " + (index + 1);
    if (input.id) links.append(generationLink(name, input.id));
    else if (input.url) links.append(link(name, input.url));
    else links.append(el("span", { class: "muted", text: name + ": " + (input.path
      || (input.sha256 ? "sha256 " + input.sha256.slice(0, 12) : "?")) + " " }));
  });
  $("d-record").textContent = JSON.stringify(record, null, 2);
  if (!detail.open) detail.showModal();
  $("d-close").focus();
}
function step(delta) {
  const tiles = Array.from(grid.querySelectorAll(".tile"));
  const at = tiles.findIndex((t) => t.dataset.id === S.current);
  const next = tiles[at + delta];
  if (next) { openDetail(next.dataset.id); next.scrollIntoView({ block: "nearest" }); }
  if (at + delta >= tiles.length - 5) loadMore();
}
function copy(text, done) {
  navigator.clipboard.writeText(text).then(() => note(done), () => note("could not copy"));
}
$("d-prev").addEventListener("click", () => step(-1));
$("d-next").addEventListener("click", () => step(1));
$("d-close").addEventListener("click", () => detail.close());
$("d-copy").addEventListener("click", () => copy($("d-prompt").textContent, "prompt copied"));
$("d-copy-path").addEventListener("click", () => copy(S.byId.get(S.current).path, "path copied"));
$("d-remix").addEventListener("click", () => {
  const row = S.byId.get(S.current), record = row.record || {};
  detail.close();
  openGenerate({ prompt: record.prompt || "", backend: row.backend, seed: row.seed || "",
    size: row.width && row.height ? row.width + "x" + row.height : "", style: record.style || "",
    count: 1, strength: "" }, []);
});
// edit this: the image shown, fetched from /v1/images/ (with the token), as the input
$("d-edit").addEventListener("click", async () => {
  const row = S.byId.get(S.current);
  if (!row.url) { note("not served: " + row.path); return; }
  try {
    const answer = await request(row.url);
    if (!answer.ok) throw new ApiError("HTTP " + answer.status);
    const blob = await answer.blob();
    detail.close();
    openGenerate({ prompt: "", backend: "", seed: "", size: "", style: "", count: 1,
      strength: "" }, [new File([blob], fileName(row.path), { type: blob.type })]);
  } catch (error) { note("imagen: " + error.message); }
});
detail.addEventListener("close", () => { forgetBlobs(); const t = grid.querySelector(
  '.tile[data-id="' + CSS.escape(S.current || "") + '"]'); if (t) t.focus(); });

// ----- keyboard: arrows move, Esc closes (the dialog's own), / searches -----
document.addEventListener("keydown", (event) => {
  const target = event.target, tag = target.tagName;
  const editing = tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT";
  const forward = event.key === "ArrowRight" || event.key === "ArrowDown";
  const back = event.key === "ArrowLeft" || event.key === "ArrowUp";
  if (detail.open) {
    if (forward || back) { event.preventDefault(); step(forward ? 1 : -1); }
    return;
  }
  if (gen.open || $("token-dialog").open || editing) return;
  if (event.key === "/") { event.preventDefault(); search.focus(); search.select(); return; }
  if ((forward || back) && target.classList.contains("tile")) {
    const tiles = Array.from(grid.querySelectorAll(".tile")), at = tiles.indexOf(target);
    const across = Math.max(1, Math.round(grid.clientWidth / target.offsetWidth));
    const delta = event.key === "ArrowRight" ? 1 : event.key === "ArrowLeft" ? -1
      : event.key === "ArrowDown" ? across : -across;
    const next = tiles[at + delta];
    event.preventDefault();
    if (next) next.focus();
    if (at + delta >= tiles.length - across) loadMore();
  }
});

// ----- generate: POST /v1/generate (async), then follow the job -----
// input images: the files chosen, after those attached by "edit this"
function openGenerate(values, attached) {
  const form = $("gen-form");
  for (const [key, value] of Object.entries(values || {})) {
    if (form.elements[key]) form.elements[key].value = value;
  }
  if (attached) { S.attached = attached; form.elements.images.value = ""; }
  showAttached();
  $("g-error").textContent = "";
  if (!gen.open) gen.showModal();
  form.elements.prompt.focus();
}
function showAttached() {
  const box = $("g-inputs");
  box.replaceChildren();
  if (!S.attached.length) return;
  const drop = el("button", { type: "button", class: "small", text: "remove" });
  drop.addEventListener("click", () => { S.attached = []; showAttached(); });
  box.append("input: " + S.attached.map((f) => f.name).join(", ") + " ", drop);
}
function base64(buffer) {
  const bytes = new Uint8Array(buffer), parts = [];
  for (let i = 0; i < bytes.length; i += 0x8000) {
    parts.push(String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000)));
  }
  return btoa(parts.join(""));
}
async function inputImages(form) {
  const files = S.attached.concat(Array.from(form.elements.images.files));
  return Promise.all(files.map(async (file) => ({ data: base64(await file.arrayBuffer()) })));
}
function progressText(job) {
  const seconds = (job.elapsed_ms / 1000).toFixed(1) + " s";
  if (job.state === "queued") return "queued for " + job.backend + " (" + seconds + ")";
  if (job.state === "running") return "running on " + job.backend + ": " + job.done + " of "
    + job.count + " done, " + seconds + (job.progress ? " - " + job.progress : "");
  return job.state + " in " + seconds;
}
function showJob(job) {
  const bar = $("g-progress");
  bar.hidden = job.state === "done" || job.state === "failed";
  if (job.count > 1 && job.done) { bar.max = job.count; bar.value = job.done; }
  else bar.removeAttribute("value");
  $("g-status").textContent = progressText(job);
  const result = $("g-result");
  for (const image of job.images.slice(result.children.length)) {
    const img = el("img", { alt: image.prompt, width: image.width, height: image.height });
    showImage(img, image.url);
    result.append(img);
  }
}
$("gen-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target, submit = form.querySelector('button[type="submit"]');
  const body = {}, raw = {};
  for (const [key, value] of new FormData(form)) {
    if (key === "images") continue;         // files: read below
    const text = String(value).trim();
    if (!text) continue;
    // whole numbers go into the JSON as typed: a JavaScript number would round a big seed
    if ((key === "seed" || key === "count") && /^[0-9]+$/.test(text)) raw[key] = text;
    else if (key === "strength" && text !== "" && isFinite(Number(text))) body[key] = Number(text);
    else body[key] = text;
  }
  $("g-error").textContent = "";
  $("g-result").replaceChildren();
  submit.disabled = true;
  try {
    const images = await inputImages(form);
    if (images.length) body.images = images;
    let json = JSON.stringify(body);
    for (const [key, text] of Object.entries(raw)) {
      json = json.slice(0, -1) + (json.length > 2 ? "," : "") + JSON.stringify(key) + ":" + text + "}";
    }
    let job = await getJSON("/v1/generate", { method: "POST", body: json,
      headers: { "Content-Type": "application/json", "Prefer": "respond-async" } });
    for (;;) {
      showJob(job);
      if (job.state === "done" || job.state === "failed") break;
      await sleep(250);
      job = await getJSON(job.url);
    }
    if (job.state === "failed") throw new ApiError(job.error);
    poll.now();
  } catch (error) {
    $("g-progress").hidden = true;
    $("g-error").textContent = "imagen: " + error.message;
  } finally {
    submit.disabled = false;
  }
});
poll.now = async () => {
  try {
    const page = await getJSON("/v1/history?" + params({ limit: PAGE }));
    const fresh = [];
    for (const row of page.rows) { if (S.byId.has(row.id)) break; fresh.push(row); }
    if (fresh.length) addRows(fresh, true);
  } catch (error) { setStatus("imagen: " + error.message); }
};
$("to-generate").addEventListener("click", () => openGenerate(null, []));
$("g-close").addEventListener("click", () => gen.close());

// ----- spend: cost per ISO week by backend, the numbers of `imagen usage` -----
const COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
  "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const money = (value) => Number(value).toFixed(4);
function svg(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}
function chart(usage) {
  const weeks = usage.weeks, backends = [];
  for (const week of weeks) for (const name of Object.keys(week.backends)) {
    if (!backends.includes(name)) backends.push(name);
  }
  backends.sort();
  const width = 720, height = 260, left = 60, bottom = 40, top = 24;
  const most = Math.max(0.0001, ...weeks.map((w) => w.cost_usd));
  const slot = (width - left - 10) / Math.max(1, weeks.length);
  const bar = Math.min(48, slot * 0.7);
  const root = svg("svg", { viewBox: "0 0 " + width + " " + (height + 20 * Math.ceil(backends.length / 4)),
    role: "img", "aria-label": "cost per ISO week by backend" });
  root.append(svg("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom,
    stroke: "currentColor", "stroke-opacity": 0.3 }));
  root.append(svg("text", { x: left - 6, y: top, "text-anchor": "end" }, "$" + money(most)));
  root.append(svg("text", { x: left - 6, y: height - bottom, "text-anchor": "end" }, "$0"));
  weeks.forEach((week, i) => {
    const x = left + i * slot + (slot - bar) / 2;
    let y = height - bottom;
    for (const name of backends) {
      const cost = week.backends[name] || 0;
      if (!cost) continue;
      const h = (height - bottom - top) * cost / most;
      y -= h;
      const rect = svg("rect", { x: x, y: y, width: bar, height: Math.max(h, 0.5),
        fill: COLOURS[backends.indexOf(name) % COLOURS.length] });
      rect.append(svg("title", {}, week.week + " " + name + ": $" + money(cost)));
      root.append(rect);
    }
    root.append(svg("text", { x: x + bar / 2, y: y - 4, "text-anchor": "middle",
      class: "total" }, "$" + money(week.cost_usd)));
    root.append(svg("text", { x: x + bar / 2, y: height - bottom + 16, "text-anchor": "middle" },
      week.week));
  });
  backends.forEach((name, i) => {
    const x = left + (i % 4) * 165, y = height + 4 + 20 * Math.floor(i / 4);
    root.append(svg("rect", { x: x, y: y - 10, width: 12, height: 12,
      fill: COLOURS[i % COLOURS.length] }));
    root.append(svg("text", { x: x + 18, y: y }, name));
  });
  return root;
}
function spendTable(usage) {
  const table = $("spend-table");
  const head = ["WEEK", "BACKEND", "MODEL", "CALLER", "COUNT", "COST_USD", "MEAN_MS"];
  table.replaceChildren(el("thead", null, el("tr", null,
    ...head.map((h, i) => el("th", { class: i > 3 ? "num" : null, text: h })))));
  const body = el("tbody");
  for (const g of usage.groups) {
    body.append(el("tr", null, ...[g.week, g.backend, g.model, g.caller].map((t) =>
      el("td", { text: t })), el("td", { class: "num", text: g.count }),
      el("td", { class: "num", text: money(g.cost_usd) }),
      el("td", { class: "num", text: g.mean_latency_ms === null ? "-" : g.mean_latency_ms })));
  }
  table.append(body, el("tfoot", null, el("tr", null, el("td", { text: "total" }),
    el("td"), el("td"), el("td"), el("td", { class: "num", id: "spend-count",
      text: usage.total.count }), el("td", { class: "num", id: "spend-total",
      text: money(usage.total.cost_usd) }), el("td"))));
}
async function showSpend() {
  try {
    const usage = await getJSON("/v1/usage");
    $("spend-source").textContent = "from " + usage.source;
    $("chart").replaceChildren(usage.weeks.length ? chart(usage)
      : el("p", { class: "muted", text: "Nothing spent yet." }));
    spendTable(usage);
  } catch (error) {
    $("spend-source").textContent = "imagen: " + error.message;
  }
}
function view(name) {
  $("gallery").hidden = name !== "gallery";
  $("spend").hidden = name !== "spend";
  $("filters").hidden = name !== "gallery";
  $("to-gallery").setAttribute("aria-pressed", String(name === "gallery"));
  $("to-spend").setAttribute("aria-pressed", String(name === "spend"));
  if (name === "spend") showSpend(); else loadMore();
}
$("to-gallery").addEventListener("click", () => view("gallery"));
$("to-spend").addEventListener("click", () => view("spend"));

async function start() {
  try {
    const answer = await getJSON("/v1/backends");
    for (const row of answer.backends) {
      $("f-backend").append(el("option", { value: row.name, text: row.name }));
      $("g-backend").append(el("option", { value: row.name, text: row.name }));
    }
  } catch (error) { setStatus("imagen: " + error.message); }
  setStatus();
  loadMore();
  setTimeout(poll, POLL_MS);
}
start();
'''


# ===== MCP server =====
# `imagen mcp`: the Model Context Protocol on stdio (APIS.md §6), so that agents call
# imagen as a tool. JSON-RPC 2.0, one message a line. Only protocol goes to stdout: while
# serving, file descriptor 1 itself points at stderr and the protocol writes to a copy of
# the old one, so a stray print or a child process cannot break the stream. Both
# generations of clients work: the initialize handshake (2025-03-26 .. 2025-11-25), and
# the stateless 2026-07-28 revision, whose every request carries its version in _meta and
# which the official SDK probes first with server/discover. Each tools/call runs in a
# thread under serve's per-backend JobGate; answers leave when ready, one line each.

MCP_HANDSHAKE_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")     # oldest first
MCP_MODERN_VERSIONS = ("2026-07-28",)
MCP_META = "io.modelcontextprotocol/"        # prefix of the per-request _meta keys
MCP_MAX_LINE = 4 * 1024 * 1024               # bytes in one message; a longer line is refused
MCP_PREVIEW_SIDE = 512                       # longest side of the preview in a tool result
MCP_MAX_PREVIEW_FILE = 64 * 1024 * 1024      # bigger outputs get a link but no preview
MCP_PROGRESS_INTERVAL = 0.1                  # seconds: at most 10 progress notifications a second
MCP_LIST_TTL_MS = 3600 * 1000                # the tool list holds while the process lives
MCP_CANCEL_WAIT = 10.0                       # seconds for canceled jobs to wind down at a signal
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND = -32700, -32600, -32601
INVALID_PARAMS, INTERNAL_ERROR, UNSUPPORTED_VERSION = -32602, -32603, -32022


class McpError(Exception):
    """A JSON-RPC error answer."""

    def __init__(self, code, message, data=None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class CallCanceled(Exception):
    """A tools/call the client canceled: it gets no answer."""


class McpCall:
    """One tools/call in flight: its cancel switch, the adapter to cancel, its progress."""

    def __init__(self, server, ident, token, version):
        import _thread
        self.server, self.id, self.token, self.version = server, ident, token, version
        self.canceled = False
        self.adapter = None
        self.count, self.index, self.fraction = 1, 0, 0.0
        self.sent_at, self.sent_value, self.sent_message = 0.0, -1.0, None
        self._lock = _thread.allocate_lock()

    def cancel(self):
        with self._lock:
            self.canceled = True
            adapter = self.adapter
        if adapter is not None:
            adapter.cancel()

    def attach(self, adapter):
        """generate_images' on_adapter: from now on a cancel reaches the backend's job."""
        with self._lock:
            self.adapter = adapter
            if self.canceled:
                raise CallCanceled()

    def written(self, record):
        with self._lock:
            self.index, self.fraction = self.index + 1, 0.0
        self.progress("wrote %s" % record["path"])

    def progress(self, message, done=None, total=None):
        """A Console's on_progress: notifications/progress in percent of the whole call,
        increasing with every notification, and at most one per MCP_PROGRESS_INTERVAL."""
        if self.token is None or self.canceled:
            return
        with self._lock:
            if done is not None and total:
                self.fraction = min(max(float(done) / total, 0.0), 1.0)
            value = round(100.0 * (self.index + self.fraction) / self.count, 2)
            now = clock.monotonic()
            if now - self.sent_at < MCP_PROGRESS_INTERVAL:
                return
            if value <= self.sent_value:
                if message == self.sent_message:
                    return
                value = round(self.sent_value + 0.01, 2)   # news without a number
            self.sent_at, self.sent_value, self.sent_message = now, value, message
        self.server.notify("notifications/progress", {
            "progressToken": self.token, "progress": value, "total": 100,
            "message": scrub_secrets(message, self.server.env)[:300]}, call=self)


class McpServer:
    """The protocol: read messages, answer requests, run tool calls in threads. What only
    tool calls need (threading, the gates, a SIGTERM handler from `on_first_call`) is set
    up at the first one: an agent starts the server for every session, and start-up
    until the initialize answer should cost little more than starting Python."""

    def __init__(self, config, env, out, log=None, on_first_call=None):
        import _thread
        self.config, self.env, self.out = config, env, out
        self.log = log if log is not None else sys.stderr
        self.on_first_call = on_first_call
        self.gates = None                            # backend -> JobGate, at the first call
        self.version = MCP_HANDSHAKE_VERSIONS[-1]    # until initialize says otherwise
        self.calls = {}                              # request key -> McpCall
        self._work = self._pool = None               # worker threads, from the first call
        self._calls_lock = _thread.allocate_lock()
        self._write_lock = _thread.allocate_lock()
        self._tools = None

    # ----- the stream -----

    def serve(self, stdin):
        """Answer every line of stdin; at its end, let the calls in flight finish."""
        while True:
            try:
                line = stdin.readline(MCP_MAX_LINE + 1)
            except (OSError, ValueError):    # stdin gone in some other way: as its end
                line = b""
            if not line:
                break
            if len(line) > MCP_MAX_LINE and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):      # skip the rest of it
                    line = stdin.readline(MCP_MAX_LINE)
                self.send_error(None, PARSE_ERROR, "message longer than %d bytes" % MCP_MAX_LINE)
                continue
            self.handle_line(line)
        self.wait_for_work()
        return EXIT_OK

    def handle_line(self, line):
        text = line.strip()
        if not text:
            return
        try:
            message = mcp_loads(text.decode("utf-8"))
        except UnicodeDecodeError:
            return self.send_error(None, PARSE_ERROR, "parse error: the line is not UTF-8")
        except JSON_ERRORS as exc:
            return self.send_error(None, PARSE_ERROR, "parse error: %s" % str(exc)[:200])
        self.handle(message)

    def send(self, message, call=None):
        """One message, one line; none about a call once it is canceled. Never raises:
        a client that has gone away (a closed pipe) is noticed when stdin ends."""
        try:
            data = mcp_dumps(message).encode("ascii") + b"\n"
        except (TypeError, ValueError) as exc:      # a bug: the client still gets an answer
            if "id" not in message:
                return self.warn("cannot send %s: %s" % (message.get("method"), exc))
            data = mcp_dumps({"jsonrpc": "2.0", "id": message["id"], "error": {
                "code": INTERNAL_ERROR, "message": "internal error: %s" % exc}}).encode("ascii") + b"\n"
        with self._write_lock:
            if call is not None and call.canceled:
                return
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError):
                pass

    def send_error(self, ident, code, message, data=None):
        error = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        self.send({"jsonrpc": "2.0", "id": ident, "error": error})

    def notify(self, method, params, call=None):
        self.send({"jsonrpc": "2.0", "method": method, "params": params}, call)

    def warn(self, message):
        try:
            self.log.write("imagen: mcp: %s\n" % message)
            self.log.flush()
        except (OSError, ValueError):
            pass

    # ----- one message -----

    def handle(self, message):
        if isinstance(message, list):
            return self.send_error(None, INVALID_REQUEST,
                                   "batches are not supported: send one message a line")
        if not isinstance(message, dict):
            return self.send_error(None, INVALID_REQUEST, "a message must be a JSON object")
        method, ident = message.get("method"), message.get("id")
        if method is None and "id" in message and ("result" in message or "error" in message):
            return     # an answer, though this server never asks anything
        valid_id = _is_request_id(ident)
        if message.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return self.send_error(ident if valid_id else None, INVALID_REQUEST,
                                   'invalid request: it needs "jsonrpc": "2.0" and a method')
        params = message.get("params")
        params = {} if params is None else params
        if "id" not in message:
            if isinstance(params, dict):
                self.on_notification(method, params)
            return
        if not valid_id:
            return self.send_error(None, INVALID_REQUEST, "a request id must be a string "
                                   "or an integer")
        try:
            if not isinstance(params, dict):
                raise McpError(INVALID_PARAMS, "params must be an object")
            modern = self.modern_version(method, params)
            if method == "server/discover":     # a method of that revision, whoever asks
                modern = modern or MCP_MODERN_VERSIONS[-1]
            result = self.on_request(ident, method, params, modern)
        except McpError as exc:
            return self.send_error(ident, exc.code, exc.message, exc.data)
        except Exception as exc:    # a bug: one answer, one stderr line, and serving goes on
            _debug_traceback(self.env)
            return self.send_error(ident, INTERNAL_ERROR, "internal error: %s: %s" % (
                type(exc).__name__, scrub_secrets(str(exc), self.env)))
        if result is not None:
            self.answer(ident, result, modern)

    def answer(self, ident, result, modern, call=None):
        if modern:
            result = dict(result, resultType="complete")
            result["_meta"] = {MCP_META + "serverInfo": self.server_info()}
        self.send({"jsonrpc": "2.0", "id": ident, "result": result}, call)

    def modern_version(self, method, params):
        """The 2026-07-28 revision a request asks for in its _meta, or None for a request
        of the handshake era (whose version initialize settled)."""
        meta = params.get("_meta")
        if method == "initialize" or not isinstance(meta, dict) \
                or MCP_META + "protocolVersion" not in meta:
            return None
        version = meta[MCP_META + "protocolVersion"]
        if version not in MCP_MODERN_VERSIONS:
            raise McpError(UNSUPPORTED_VERSION, "Unsupported protocol version", {
                "supported": self.supported_versions(), "requested": version})
        if not isinstance(meta.get(MCP_META + "clientCapabilities"), dict):
            raise McpError(INVALID_PARAMS, "_meta needs %sclientCapabilities (an object)"
                           % MCP_META)
        return version

    def on_request(self, ident, method, params, modern):
        if method == "initialize":
            return self.initialize(params)
        if method == "server/discover":
            return dict(self.discover(), ttlMs=MCP_LIST_TTL_MS, cacheScope="private")
        if method == "ping":
            return {}
        if method == "tools/list":
            result = {"tools": [mcp_tool_for(tool, modern or self.version)
                                for tool, _ in self.tools().values()]}
            return dict(result, ttlMs=MCP_LIST_TTL_MS, cacheScope="private") if modern else result
        if method == "tools/call":
            return self.start_call(ident, params, modern)
        raise McpError(METHOD_NOT_FOUND, "method not found: %s" % method[:100])

    def on_notification(self, method, params):
        if method == "notifications/cancelled":
            ident = params.get("requestId")
            with self._calls_lock:
                call = self.calls.get(_request_key(ident)) if _is_request_id(ident) else None
            if call is not None:
                with self._write_lock:       # from here on, nothing more about it goes out
                    call.canceled = True
                reason = params.get("reason")
                self.warn("call %s canceled%s" % (ident, ": %s" % str(reason)[:200]
                                                   if reason else ""))
                self.spawn(call.cancel)       # a backend's cancel may take a few seconds
        # notifications/initialized and anything else: nothing to do

    # ----- the handshake and discovery -----

    def server_info(self):
        return {"name": "imagen", "version": version_string()}

    def supported_versions(self):
        return list(MCP_MODERN_VERSIONS[::-1] + MCP_HANDSHAKE_VERSIONS[::-1])

    def initialize(self, params):
        asked = params.get("protocolVersion")
        self.version = asked if asked in MCP_HANDSHAKE_VERSIONS else MCP_HANDSHAKE_VERSIONS[-1]
        return {"protocolVersion": self.version, "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": self.server_info(), "instructions": MCP_INSTRUCTIONS}

    def discover(self):
        return {"supportedVersions": self.supported_versions(),
                "capabilities": {"tools": {"listChanged": False}},
                "instructions": MCP_INSTRUCTIONS}

    # ----- tool calls -----

    def tools(self):
        if self._tools is None:
            self._tools = mcp_tools(self.config, self.env)
        return self._tools

    def input_schema(self, name):
        return self.tools()[name][0]["inputSchema"]

    def start_call(self, ident, params, modern):
        name, arguments = params.get("name"), params.get("arguments")
        tools = self.tools()
        if not isinstance(name, str) or name not in tools:
            raise McpError(INVALID_PARAMS, "unknown tool %r (known: %s)" % (
                name, ", ".join(tools)))
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        token = meta.get("progressToken")
        if self.gates is None:
            self.gates = {backend: JobGate(*serve_limits(block))
                          for backend, block in self.config.backends.items()}
            if self.on_first_call is not None:
                self.on_first_call()
        call = McpCall(self, ident, token if _is_request_id(token) else None,
                       modern or self.version)
        with self._calls_lock:
            if _request_key(ident) in self.calls:
                raise McpError(INVALID_REQUEST, "request id %r is taken by a call in progress"
                               % (ident,))
            self.calls[_request_key(ident)] = call
        self.spawn(self.run_call, call, tools[name][1], arguments, modern)
        return None     # the thread answers

    def spawn(self, target, *args):
        """Run target(*args) on a worker thread: an idle one if there is one (handing work
        to a waiting thread costs less than starting one), else a new one."""
        import threading
        if self._pool is None:
            import queue
            self._work, self._pool = queue.SimpleQueue(), threading.Condition()
            self._busy = self._idle = 0
        with self._pool:
            self._busy += 1
            start = self._idle == 0
            if not start:
                self._idle -= 1         # that one takes it from the queue
        self._work.put((target, args))
        if start:
            threading.Thread(target=self._worker, daemon=True).start()

    def _worker(self):
        while True:
            target, args = self._work.get()
            try:
                target(*args)
            finally:
                with self._pool:
                    self._busy -= 1
                    self._idle += 1
                    self._pool.notify_all()

    def wait_for_work(self, seconds=None):
        """Until every call (and cancel) handed to the workers has ended, or `seconds`."""
        if self._pool is None:
            return
        deadline = None if seconds is None else clock.monotonic() + seconds
        with self._pool:
            while self._busy:
                left = None if deadline is None else deadline - clock.monotonic()
                if left is not None and left <= 0:
                    return
                self._pool.wait(left)

    def run_call(self, call, handler, arguments, modern):
        try:
            if arguments is not None and not isinstance(arguments, dict):
                raise usage_error("arguments must be an object")
            result = handler(self, call, arguments or {})
        except CallCanceled:
            result = None
        except ImagenError as exc:
            result = mcp_tool_error(scrub_secrets(exc.message, self.env))
        except Exception as exc:
            _debug_traceback(self.env)
            result = mcp_tool_error("internal error: %s: %s" % (
                type(exc).__name__, scrub_secrets(str(exc), self.env)))
        finally:
            with self._calls_lock:
                self.calls.pop(_request_key(call.id), None)
        if result is not None:
            self.answer(call.id, result, modern, call)

    def cancel_all(self):
        with self._calls_lock:
            calls = list(self.calls.values())
        for call in calls:
            call.cancel()
        return len(calls)


# The wire format without `import json`: its regular expressions cost a third of starting
# Python, and only a malformed line needs them. The json module's own C scanner reads a
# message; whatever it does not read to the end goes to json.loads, for its error.

class _ScanRules:
    strict, object_hook, object_pairs_hook, parse_float, parse_int = True, None, None, float, int

    @staticmethod
    def parse_constant(name):
        raise ValueError(name)      # NaN and Infinity: json.loads decides


_scan_json = []


def mcp_loads(text):
    if not _scan_json:
        try:
            from _json import make_scanner
            _scan_json.append(make_scanner(_ScanRules))
        except ImportError:
            _scan_json.append(None)
    if _scan_json[0] is not None:
        try:
            value, end = _scan_json[0](text, 0)
            if end == len(text):
                return value
        except (StopIteration, ValueError, SystemError):
            pass
    import json
    return json.loads(text)


def mcp_dumps(value):
    """One line of ASCII JSON."""
    try:
        from _json import encode_basestring_ascii as quote
    except ImportError:
        import json
        return json.dumps(value, separators=(",", ":"))

    def encode(item):
        if isinstance(item, str):
            return quote(item)
        if item is None or isinstance(item, bool):
            return {None: "null", True: "true", False: "false"}[item]
        if isinstance(item, int):
            return int.__repr__(item)
        if isinstance(item, float) and item - item == 0:        # finite
            return float.__repr__(item)
        if isinstance(item, dict):
            return "{%s}" % ",".join(quote(key) + ":" + encode(v) for key, v in item.items())
        if isinstance(item, (list, tuple)):
            return "[%s]" % ",".join(map(encode, item))
        raise TypeError("%r cannot be sent as JSON" % (item,))
    return encode(value)


def _is_request_id(value):
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _request_key(ident):
    return (isinstance(ident, str), ident)     # 1 and "1" are two requests


MCP_INSTRUCTIONS = ("imagen makes images from text prompts with the backends the user "
                    "configured, and saves each one as a file. Call list_backends to see "
                    "what is available and what it costs; generate_image returns each "
                    "file's path, a small preview and its record (seed, size, cost).")


def mcp_tool_error(message):
    return {"content": [{"type": "text", "text": "imagen: %s" % message}], "isError": True}


def mcp_tool_for(tool, version):
    """A tool definition as `version` knows it: title and outputSchema came in 2025-06-18."""
    if version == MCP_HANDSHAKE_VERSIONS[0]:
        return {key: value for key, value in tool.items() if key not in ("title", "outputSchema")}
    return tool


# ----- the tools -----

def mcp_tools(config, env=None):
    """name -> (definition, handler) of every tool. With `env`, the descriptions say which
    backends lack their credentials."""
    return {"generate_image": (mcp_generate_tool(config, env), mcp_generate_image),
            "edit_image": (mcp_edit_tool(config, env), mcp_edit_image),
            "search_images": (mcp_search_tool(config), mcp_search_images),
            "list_backends": (MCP_LIST_BACKENDS_TOOL, mcp_list_backends)}


# Each side 64..4096, as a pattern: 64-69, 70-99, 100-999, 1000-3999, 4000-4089, 4090-4096.
MCP_SIDE = "(6[4-9]|[7-9][0-9]|[1-9][0-9]{2}|[1-3][0-9]{3}|40[0-8][0-9]|409[0-6])"
MCP_ADAPTER_NOTES = {"mock": "draws a test gradient at once, for trying things out",
                     "comfyui": "the user's own ComfyUI server",
                     "replicate": "Replicate's cloud, billed per image"}


def mcp_backend_lines(config, env):
    """One line per backend for a description: what it is, what it costs, and whether
    it can run (its credentials are set)."""
    lines = []
    for name in sorted(config.backends):
        block = config.backends[name]
        adapter = make_adapter(name, config, {}, Console(quiet=True))
        usable, note = ADAPTERS[block["adapter"]].status(block, env) if env is not None \
            else (True, "")
        notes = [MCP_ADAPTER_NOTES.get(block["adapter"], ""), adapter.price_note() or "",
                 "" if usable else "not usable: " + note]
        lines.append("- %s%s: %s, model %s%s" % (
            name, " (the default)" if name == config.data["default_backend"] else "",
            block["adapter"], adapter.model_id(),
            "".join("; " + note for note in notes if note)))
    return lines


def mcp_style_lines(config):
    lines = []
    for name in sorted(config.styles):
        style = config.styles[name]
        facts = ["%s %s" % (key, style[key]) for key in ("size", "backend", "steps")
                 if style.get(key)]
        lines.append("- %s%s" % (name, ": " + ", ".join(facts) if facts else ""))
    return lines


def mcp_generate_properties(config):
    """The JSON Schema properties generate_image and edit_image share."""
    backends = sorted(config.backends)
    properties = {
        "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS,
                   "description": "What the image shows, in plain words."},
        "backend": {"type": "string", "enum": backends,
                    "description": "Which configured backend makes it (default: the style's "
                    "backend, else %s)." % config.data["default_backend"]},
        "size": {"type": "string", "pattern": "^%sx%s$" % (MCP_SIDE, MCP_SIDE),
                 "description": "WIDTHxHEIGHT in pixels, each %d..%d, like 1024x1024 or "
                 "1344x768 (default: the style's, else the backend's, else 1024x1024). "
                 "Backends may round it; the result says the actual size." % (SIZE_MIN, SIZE_MAX)},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED,
                 "description": "0 or absent draws a random one. The seed used is in the "
                 "result: the same prompt, seed and backend make the same image again."},
        "steps": {"type": "integer", "minimum": 0, "maximum": MAX_STEPS,
                  "description": "Sampling steps; 0 or absent is the backend's default."},
        "negative": {"type": "string", "maxLength": MAX_PROMPT_CHARS,
                     "description": "What the image should not show (backends that take a "
                     "negative prompt)."},
    }
    if config.styles:
        properties["style"] = {"type": "string", "enum": sorted(config.styles),
                               "description": "A style from the config: a prompt template and "
                               "defaults for size, backend, steps."}
    return properties


def mcp_generate_tool(config, env=None):
    properties = mcp_generate_properties(config)
    properties["count"] = {"type": "integer", "minimum": 1, "maximum": MAX_COUNT, "default": 1,
                           "description": "How many images; with a seed, they use seed, seed+1, ..."}
    properties["images"] = {"type": "array", "maxItems": MAX_INPUT_IMAGES,
                            "items": {"type": "string", "minLength": 1},
                            "description": "Paths of PNG, JPEG or WebP files (at most %s "
                            "each) the backend uses as references or as the start image; "
                            "list_backends says which backends take how many."
                            % byte_size(MAX_INPUT_BYTES)}
    properties["strength"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                              "description": "With images: how far the result may move from "
                              "the start image, above 0 and at most 1 (default: the backend's)."}
    lines = ["Generate images from a text prompt; each is saved as a file (PNG, JPEG or WebP "
             "as the backend makes it). The result has, per image, a preview (a PNG at most "
             "%d px, for PNG outputs), a file:// link and the absolute path; "
             "structuredContent.images holds each image's record: path, seed, width, height, "
             "backend, model, cost_usd. Errors (bad arguments, a backend failure) come back "
             "as a result with isError and an `imagen: ...` message." % MCP_PREVIEW_SIDE,
             "Backends:"] + mcp_backend_lines(config, env)
    if config.styles:
        lines += ["Styles:"] + mcp_style_lines(config)
    return {"name": "generate_image", "title": "Generate images", "description": "\n".join(lines),
            "inputSchema": {"type": "object", "properties": properties, "required": ["prompt"],
                            "additionalProperties": False},
            "outputSchema": MCP_IMAGES_SCHEMA,
            "annotations": {"title": "Generate images", "readOnlyHint": False,
                            "destructiveHint": False, "idempotentHint": False,
                            "openWorldHint": True}}


def mcp_edit_tool(config, env=None):
    properties = {key: value for key, value in mcp_generate_properties(config).items()
                  if key in ("prompt", "backend", "size", "seed")}
    properties["prompt"] = dict(properties["prompt"], description="What to change, or what "
                                "the new image shows, in plain words.")
    properties["backend"] = dict(properties["backend"], description="Which configured backend "
                                 "makes it (default: %s). It must take input images."
                                 % default_backend(config, True))
    properties["image"] = {"type": "string", "minLength": 1,
                           "description": "Path of the PNG, JPEG or WebP file (at most %s) to "
                           "start from; it is left as it is." % byte_size(MAX_INPUT_BYTES)}
    properties["strength"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                              "description": "How far the result may move from the image, "
                              "above 0 and at most 1 (default: the backend's)."}
    properties["size"] = dict(properties["size"], description="WIDTHxHEIGHT in pixels, each "
                              "%d..%d (default: the input image's size, rounded as the backend "
                              "needs)." % (SIZE_MIN, SIZE_MAX))
    return {"name": "edit_image", "title": "Edit an image",
            "description": "Make a new image from an existing image file and a prompt that "
            "says what to change; saved as a new file (the input stays as it is), with the "
            "same result as generate_image: preview, link, path, and the record, whose "
            "inputs list the input file (with the generation id of one imagen made).",
            "inputSchema": {"type": "object", "properties": properties,
                            "required": ["image", "prompt"], "additionalProperties": False},
            "outputSchema": MCP_IMAGES_SCHEMA,
            "annotations": {"title": "Edit an image", "readOnlyHint": False,
                            "destructiveHint": False, "idempotentHint": False,
                            "openWorldHint": True}}


def mcp_search_tool(config):
    return {"name": "search_images", "title": "Search past images",
            "description": "Find images generated before, newest first, by words of their "
            "prompt, age and backend (from the local ledger; nothing is contacted). Each "
            "result is the image's generation record (as generate_image returns it) with "
            "its path, whether the file still exists, and its cloud state (off, pending, "
            "synced, failed, partial, rejected); pass a path to edit_image or to "
            "generate_image's images to build on it.",
            "inputSchema": {"type": "object", "additionalProperties": False, "properties": {
                "query": {"type": "string", "maxLength": MAX_PROMPT_CHARS,
                          "description": "Words that must all occur in the prompt (case and "
                          "accents do not matter; a word matches the start of a word)."},
                "since": {"type": "string", "pattern": MCP_SINCE,
                          "description": "Only from this local day on (YYYY-MM-DD), or this "
                          "far back from now: 12h, 7d, 2w."},
                "backend": {"type": "string", "enum": sorted(config.backends)},
                "limit": {"type": "integer", "minimum": 1, "maximum": MCP_SEARCH_MAX,
                          "default": HISTORY_LIMIT, "description": "At most this many results."}}},
            "outputSchema": {"type": "object", "required": ["results"], "properties": {
                "results": {"type": "array", "items": MCP_HISTORY_SCHEMA}}},
            "annotations": {"title": "Search past images", "readOnlyHint": True,
                            "openWorldHint": False}}


MCP_SINCE = "^([0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]+[hdw])$"    # what history_since takes
MCP_SEARCH_MAX = 200


MCP_RECORD_SCHEMA = {
    "type": "object",
    "required": ["path", "file", "prompt", "backend", "width", "height", "mime_type", "bytes",
                 "sha256", "created_at"],
    "properties": {
        "path": {"type": "string", "description": "absolute path of the image file"},
        "file": {"type": "string"}, "schema": {"type": "string"},
        "prompt": {"type": "string"}, "final_prompt": {"type": "string"},
        "negative": {"type": ["string", "null"]}, "style": {"type": ["string", "null"]},
        "backend": {"type": "string"}, "adapter": {"type": "string"},
        "model": {"type": ["string", "null"]}, "seed": {"type": ["integer", "null"]},
        "steps": {"type": ["integer", "null"]},
        "width": {"type": "integer"}, "height": {"type": "integer"},
        "requested_size": {"type": "string"},
        "mime_type": {"type": "string", "enum": sorted(MIME_EXTENSIONS)},
        "bytes": {"type": "integer"}, "sha256": {"type": "string"},
        "latency_ms": {"type": "integer"}, "cost_usd": {"type": ["number", "null"]},
        "created_at": {"type": "string"}, "caller": {"type": "string"},
        "imagen_version": {"type": "string"}, "backend_meta": {"type": "object"},
        "id": {"type": "string", "description": "the generation id"},
        "inputs": {"type": "array", "description": "the input images", "items": {
            "type": "object", "required": ["sha256", "bytes", "mime_type", "width", "height"],
            "properties": {"path": {"type": ["string", "null"]}, "sha256": {"type": "string"},
                           "bytes": {"type": "integer"}, "mime_type": {"type": "string"},
                           "width": {"type": "integer"}, "height": {"type": "integer"},
                           "id": {"type": "string", "description": "the generation id of "
                                  "an input imagen made"}}}},
        "strength": {"type": ["number", "null"]}, "parent": {"type": ["string", "null"]}}}
# A past image as `imagen history --json` gives it (history_json): its record plus path,
# cloud and exists; only the ledger's columns when it holds no record, and then the size
# and seed may be unknown.
MCP_HISTORY_SCHEMA = {
    "type": "object",
    "required": ["id", "created_at", "backend", "path", "cloud", "exists"],
    "properties": dict(
        MCP_RECORD_SCHEMA["properties"],
        cloud={"type": "string", "enum": ["off", "pending", "synced", "failed", "partial",
                                          "rejected"], "description": "its cloud sync state"},
        exists={"type": "boolean", "description": "whether the file is still there"},
        width={"type": ["integer", "null"]}, height={"type": ["integer", "null"]})}
MCP_IMAGES_SCHEMA = {"type": "object", "required": ["images"], "properties": {
    "images": {"type": "array", "items": MCP_RECORD_SCHEMA}}}
MCP_LIST_BACKENDS_TOOL = {
    "name": "list_backends", "title": "List backends",
    "description": "List the configured image backends: name, adapter, model, whether it is "
    "the default and usable (credentials present), its price, and how many generate_image "
    "calls it runs at once and has waiting. Nothing is contacted.",
    "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
    "outputSchema": {"type": "object", "required": ["backends"], "properties": {
        "backends": {"type": "array", "items": {"type": "object", "required": [
            "name", "adapter", "model", "default", "usable", "status"], "properties": {
                "name": {"type": "string"}, "adapter": {"type": "string"},
                "model": {"type": ["string", "null"]}, "default": {"type": "boolean"},
                "usable": {"type": "boolean"}, "status": {"type": "string"},
                "note": {"type": "string"}, "price": {"type": ["string", "null"]},
                "max_concurrency": {"type": "integer"}, "max_queue": {"type": "integer"},
                "running": {"type": "integer"}, "waiting": {"type": "integer"}}}}}},
    "annotations": {"title": "List backends", "readOnlyHint": True, "openWorldHint": False}}


def mcp_arguments(arguments, schema):
    """The arguments with their JSON types checked against a tool's input schema (null is
    as good as absent); ranges and names are the pipeline's to check, with its messages."""
    properties = schema["properties"]
    kinds = {"string": str, "integer": int, "number": (int, float), "array": list}
    options = {}
    for key, value in arguments.items():
        if key not in properties:
            raise usage_error("unknown argument %r (known: %s)" % (
                key, ", ".join(properties) or "none"))
        if value is None:
            continue
        kind = properties[key]["type"]
        items = properties[key].get("items", {}).get("type")
        if isinstance(value, bool) or not isinstance(value, kinds[kind]) or (items and any(
                isinstance(item, bool) or not isinstance(item, kinds[items]) for item in value)):
            raise usage_error("%s must be %s (got %s)" % (
                key, "an integer" if kind == "integer" else "an array of %ss" % items
                if items else "a " + kind, to_json(value)[:100]))
        options[key] = value
    for key in schema.get("required", ()):
        if key not in options:
            raise usage_error("%s is missing" % key)
    return options


def mcp_generate_image(server, call, arguments):
    return mcp_run_generate(server, call, mcp_arguments(arguments,
                                                         server.input_schema("generate_image")))


def mcp_edit_image(server, call, arguments):
    """As `imagen edit`: the image is the first input, and the size and backend default to
    the input's and to default_edit_backend."""
    options = mcp_arguments(arguments, server.input_schema("edit_image"))
    options["images"] = [options.pop("image")]
    return mcp_run_generate(server, call, dict(options, edit=True))


def mcp_search_images(server, call, arguments):
    options = mcp_arguments(arguments, server.input_schema("search_images"))
    limit = check_range("limit", options.get("limit", HISTORY_LIMIT), 1, MCP_SEARCH_MAX)
    backend = options.get("backend")
    if backend is not None and backend not in server.config.backends:     # as the enum says
        raise usage_error("unknown backend %r (known: %s)"
                          % (backend, ", ".join(sorted(server.config.backends))))
    rows = search_history(server.env, words=options.get("query", ""),
                             since=options.get("since"), backend=backend, limit=limit)
    results = [history_json(row) for row in rows]
    return {"content": [{"type": "text", "text": to_json(record)} for record in results],
            "structuredContent": {"results": results}}


def mcp_list_backends(server, call, arguments):
    mcp_arguments(arguments, MCP_LIST_BACKENDS_TOOL["inputSchema"])
    rows = backend_rows(server.config, server.env, Console(quiet=True))
    for row in rows:
        gate = server.gates[row["name"]]
        row.update(max_concurrency=gate.limit, max_queue=gate.queue, running=gate.running,
                   waiting=gate.waiting)
    result = {"backends": rows}
    return {"content": [{"type": "text", "text": to_json(result)}], "structuredContent": result}


def mcp_run_generate(server, call, options):
    """The generate pipeline under the backend's gate, as serve runs it; never a tmux
    preview. A failure after some images of a count still shows those images."""
    # bad input: before queueing; who asked is looked up once per call
    job = prepare_job(server.config, server.env, preview="off", **options)
    call.count = job.count
    gate = server.gates[job.backend]
    try:
        gate.enter(job.backend)
    except ApiError as exc:
        raise ImagenError(exc.message) from None
    records = []
    console = Console(quiet=True, stream=server.log, on_progress=call.progress)
    try:
        if call.canceled:
            raise CallCanceled()
        for record in generate_images(job, server.config, server.env, console,
                                      on_written=call.written, on_adapter=call.attach):
            records.append(record)
    except ImagenError as exc:
        if call.canceled:
            raise CallCanceled() from None
        if not records:
            raise
        result = mcp_images_result(server, records, call.version)
        result["content"].insert(0, mcp_tool_error(exc.message)["content"][0])
        return dict(result, isError=True)
    finally:
        gate.leave()
    return mcp_images_result(server, records, call.version)


def mcp_images_result(server, records, version):
    content = []
    for record in records:
        content += mcp_image_content(server, record, version)
    result = {"content": content}
    if version != MCP_HANDSHAKE_VERSIONS[0]:      # structured content came in 2025-06-18
        result["structuredContent"] = {"images": records}
    return result


def mcp_image_content(server, record, version):
    """Per image: a PNG preview (PNG outputs only), a resource_link, the path as text."""
    blocks = []
    if record["mime_type"] == "image/png":
        preview = mcp_preview(server, record)
        if preview is not None:
            blocks.append({"type": "image", "data": preview, "mimeType": "image/png"})
    if version != MCP_HANDSHAKE_VERSIONS[0]:      # resource_link came in 2025-06-18
        blocks.append({"type": "resource_link", "uri": file_uri(record["path"]),
                       "name": record["file"], "mimeType": record["mime_type"],
                       "size": record["bytes"],
                       "description": "%dx%d, seed %s, %s" % (
                           record["width"], record["height"], record["seed"], record["backend"])})
    blocks.append({"type": "text", "text": record["path"]})
    return blocks


def mcp_preview(server, record):
    """The image at most MCP_PREVIEW_SIDE px, base64; None (and a warning) when it cannot
    be made: the file and its link stay the result."""
    import base64
    if record["bytes"] > MCP_MAX_PREVIEW_FILE:
        server.warn("no preview of %s: %d bytes is over %d" % (
            record["path"], record["bytes"], MCP_MAX_PREVIEW_FILE))
        return None
    try:
        with open(record["path"], "rb") as handle:
            data = handle.read(MCP_MAX_PREVIEW_FILE + 1)
        return base64.b64encode(downscale_png(data, MCP_PREVIEW_SIDE)).decode("ascii")
    except (OSError, ImagenError) as exc:
        server.warn("no preview of %s: %s" % (record["path"], getattr(exc, "message", None)
                                              or getattr(exc, "strerror", None) or exc))
        return None


def file_uri(path):
    """file:///abs/path with everything but / and unreserved characters percent-encoded
    (UTF-8), so spaces, #, ?, % and non-ASCII names survive."""
    from urllib.parse import quote
    return "file://" + quote(path, safe="/")


# ----- the command -----

def cmd_mcp(args, env):
    config = load_config_and_warn(getattr(args, "config", None), env, Console())
    if sys.stdin is None:
        raise usage_error("mcp: stdin is closed")
    out = protocol_stdout()
    previous = []
    server = McpServer(config, env, out, on_first_call=lambda: previous.append(_raise_on_sigterm()))
    try:
        return server.serve(sys.stdin.buffer)
    except KeyboardInterrupt:
        canceled = server.cancel_all()
        server.wait_for_work(MCP_CANCEL_WAIT)
        return EXIT_INTERRUPTED if canceled else EXIT_OK
    finally:
        if previous:
            _restore_sigterm(previous[0])


def protocol_stdout():
    """A private copy of stdout for the protocol; file descriptor 1 then points at stderr,
    so that whatever else is printed (by this process or a child) cannot reach the client."""
    if sys.stdout is None:
        raise ImagenError("mcp: stdout is closed")
    try:
        sys.stdout.flush()
        fd = os.dup(sys.stdout.fileno())
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError) as exc:
        raise ImagenError("mcp: cannot take over stdout: %s" % (
            getattr(exc, "strerror", None) or exc)) from None
    return io.open(fd, "wb")


# ===== Batch =====
# `imagen batch FILE`: many generations from a file of prompts (text, or JSON Lines of
# generate's fields), every line checked before anything runs. Jobs run in threads under
# a global limit and each backend's max_concurrency; a ComfyUI URL list runs one job per
# host, the least-loaded healthy host taking the next, a failing host rested and its job
# retried once elsewhere. Each image is recorded (file, sidecar, ledger row with the job's
# key) before it is reported, so a rerun after a crash skips what is done.

BATCH_FIELDS = {"prompt": (str,), "backend": (str,), "size": (str,), "seed": (int,),
                "steps": (int,), "style": (str,), "negative": (str,), "count": (int,),
                "images": (list,), "strength": (int, float), "output": (str,)}
MAX_BATCH_BYTES = 64 * 1024 * 1024
BATCH_HOST_REST = 30.0        # seconds a ComfyUI host that failed gets no new job
BATCH_CANCEL_WAIT = 3.0       # after Ctrl-C: time the running jobs get to stop and write
BATCH_PROBE_SECONDS = 2.0     # the first look at each ComfyUI host's queue


class BatchJob:
    """One image of a batch line: what to generate (its Job, resolved and checked when
    the batch is planned), where it runs, how it went."""

    __slots__ = ("line", "image", "prompt", "options", "key", "backend", "estimate",
                 "host", "tried", "adapter", "holding", "records", "error", "job")

    def __init__(self, line, image, job, options, key, estimate):
        self.line, self.image, self.prompt, self.options = line, image, job.prompt, options
        self.key, self.backend, self.estimate, self.job = key, job.backend, estimate, job
        self.host, self.tried, self.adapter, self.holding = None, [], None, False
        self.records, self.error = [], None


def read_batch(source):
    """[(line number, {fields})] of a batch file or `-` (stdin): text, one prompt a line,
    or JSON Lines; blank lines and # comments skipped. A bad line is exit 2 naming it."""
    import json
    name = "stdin" if source == "-" else source
    try:
        if source == "-":
            stream = getattr(sys.stdin, "buffer", sys.stdin)
            data = stream.read(MAX_BATCH_BYTES + 1)
        else:
            data = read_capped(source, MAX_BATCH_BYTES)
    except (OSError, ValueError, AttributeError) as exc:
        raise usage_error("batch: %s: %s" % (name, getattr(exc, "strerror", None) or exc)) \
            from None
    if len(data) > MAX_BATCH_BYTES:
        raise usage_error("batch: %s is over %d bytes" % (name, MAX_BATCH_BYTES))
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.strip().startswith("#")]
    json_lines = bool(lines) and lines[0][1].startswith("{")
    entries = []
    for number, line in lines:
        if not json_lines:
            entries.append((number, {"prompt": line}))
            continue
        try:
            fields = json.loads(line)
        except JSON_ERRORS:
            raise usage_error("batch: %s line %d: not a JSON object (a JSON Lines file has "
                              "one on every line)" % (name, number)) from None
        entries.append((number, check_batch_fields(fields, name, number)))
    if not entries:
        raise usage_error("batch: %s holds no prompt" % name)
    return entries


def check_batch_fields(fields, name, number):
    where = "batch: %s line %d" % (name, number)
    if not isinstance(fields, dict):
        raise usage_error("%s: not a JSON object" % where)
    for key, value in fields.items():
        if key not in BATCH_FIELDS:
            raise usage_error("%s: unknown field %r (known: %s)"
                              % (where, key, ", ".join(BATCH_FIELDS)))
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, BATCH_FIELDS[key])):
            raise usage_error("%s: %s must be %s" % (where, key, " or ".join(
                t.__name__ for t in BATCH_FIELDS[key])))
    return {key: value for key, value in fields.items() if value is not None}


def plan_batch(entries, defaults, config, env, name):
    """Every job of the batch, each checked as generate would check it (exit 2 naming
    the line of the first bad one); a line of count N is N jobs."""
    jobs = []
    for number, fields in entries:
        options = dict(defaults, **fields)
        prompt = options.pop("prompt", None)
        try:
            count = check_range("count", _given(options.pop("count", None), 1), 1, MAX_COUNT)
            for image in range(count):
                jobs.append(plan_job(number, image, prompt, options, config, env))
        except ImagenError as exc:
            raise usage_error("batch: %s line %d: %s" % (name, number, exc.message)) from None
    return jobs


def plan_job(number, image, prompt, options, config, env):
    options = dict(options)
    if image and options.get("seed"):
        options["seed"] += image
    if image and options.get("output"):
        stem, ext = os.path.splitext(options["output"])
        options["output"] = "%s-%d%s" % (stem, image + 1, ext)
    job = resolve_job(config, env, prompt=prompt, preview="off", **options)
    check_output_creatable(job, config)
    fields = {key: getattr(job, key) for key in ("prompt", "final_prompt", "negative", "style",
                                                  "backend", "width", "height", "steps",
                                                  "output")}
    fields.update(seed=options.get("seed") or 0, images=options.get("images"),
                  strength=options.get("strength"), line=number, image=image)
    job.job_key = sha256_hex(to_json(fields).encode("utf-8"))
    return BatchJob(number, image, job, options, job.job_key, None)


def finished_job_keys(env, jobs):
    """The keys of jobs the ledger holds with their file still there."""
    if not os.path.exists(ledger_path(env)):
        return set()
    keys, done = [job.key for job in jobs], set()
    with open_ledger(env) as ledger:
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            for key, path in ledger.db.execute(
                    "SELECT job_key, path FROM generations WHERE job_key IN (%s)"
                    % ", ".join("?" * len(chunk)), chunk):
                if os.path.isfile(path):
                    done.add(key)
    return done


def backend_limits(config, env, console, names):
    """{backend: (max jobs at once, [ComfyUI hosts] or None)} of the backends a batch uses."""
    limits = {}
    for name in names:
        block = config.backends[name]
        limit = block.get("max_concurrency")
        hosts = None
        if block["adapter"] == "comfyui":
            hosts = comfyui_urls(block)
            limit = min(limit or len(hosts), len(hosts))
        elif limit is None:
            adapter = make_adapter(name, config, env, console)
            limit = getattr(adapter, "batch_concurrency", lambda: None)() or \
                ADAPTERS[block["adapter"]].MAX_CONCURRENCY
        limits[name] = (limit, hosts)
    return limits


def estimate_jobs(jobs, config, env, console):
    """Each job's estimated USD (0 on free backends, None when unknown) and the total."""
    total, unknown = 0.0, False
    adapters = {}
    for job in jobs:
        if job.backend not in adapters:
            adapters[job.backend] = make_adapter(job.backend, config, env, console)
        adapter = adapters[job.backend]
        job.estimate = adapter.estimate_cost(1) if adapter.PAID else 0.0
        if job.estimate is None:
            unknown = True
        else:
            total += job.estimate
    return total, unknown


class BatchRunner:
    """Runs the jobs in threads; the main thread starts them, prints what finishes and
    shows the progress, so Ctrl-C and SIGTERM reach it."""

    def __init__(self, jobs, config, env, limits, parallel, max_cost, as_json, console):
        import collections
        import queue
        self.queue = collections.deque(jobs)
        self.total = len(jobs)
        self.config, self.env, self.limits = config, env, limits
        self.parallel, self.max_cost, self.as_json = parallel, max_cost, as_json
        self.console = console
        self.events = queue.Queue()
        self.running = []
        self.busy = {name: 0 for name in limits}
        self.hosts = {}        # url -> {"job", "rest_until", "load", "index"}
        for name, (_, urls) in limits.items():
            for index, url in enumerate(urls or ()):
                self.hosts.setdefault(url, {"job": None, "rest_until": 0.0, "load": 0,
                                            "index": index})
        # the connections each host's jobs share, one job after another
        self.sessions = {url: ComfyUISession(url) for url in self.hosts}
        self.done, self.failed, self.over_budget, self.spent = [], [], [], 0.0

    # ----- the loop -----

    def run(self):
        import queue
        self._probe_hosts()
        while self.queue or self.running:
            self._start_what_fits()
            if not self.running:
                self._fail_what_cannot_start()
                continue
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            self._handle(*event)
        self.console.clear()
        self._close_sessions()
        return self._summary()

    def _close_sessions(self):
        for session in self.sessions.values():
            session.close()

    def _start_what_fits(self):
        waiting = []
        while self.queue and len(self.holding()) < self.parallel:
            job = self.queue.popleft()
            if self.busy[job.backend] >= self.limits[job.backend][0]:
                waiting.append(job)
                continue
            if self._over_budget(job):
                self.over_budget.append(job)
                continue
            host = self._pick_host(job)
            if host is False:
                waiting.append(job)
                continue
            self._start(job, host)
        self.queue.extendleft(reversed(waiting))
        self._show()

    def holding(self):
        return [job for job in self.running if job.holding]

    def _over_budget(self, job):
        if self.max_cost is None or not job.estimate:
            return False
        running = sum(other.estimate or 0.0 for other in self.running)
        return self.spent + running + job.estimate > self.max_cost + 1e-9

    def _pick_host(self, job):
        """A free, rested host of a ComfyUI list (None for other backends; False when
        none is free now): the one with the shortest queue, then the least used."""
        urls = self.limits[job.backend][1]
        if not urls or len(urls) == 1 and not job.tried:
            return urls[0] if urls else None
        now = clock.monotonic()
        free = [url for url in urls if self.hosts[url]["job"] is None
                and self.hosts[url]["rest_until"] <= now and url not in job.tried]
        if not free:
            return False
        return min(free, key=lambda url: (self.hosts[url]["load"], self.hosts[url]["index"]))

    def _fail_what_cannot_start(self):
        """Nothing runs, yet jobs wait: their hosts are all resting (or were tried)."""
        job = self.queue.popleft()
        job.error = "%s: no healthy ComfyUI host left to run it (%s)" % (
            job.backend, "; ".join(job.tried) or "all resting after failures")
        self._finished_badly(job)

    def _start(self, job, host):
        import threading
        job.host, job.holding = host, True
        self.busy[job.backend] += 1
        if host is not None:
            self.hosts[host]["job"] = job
            job.tried.append(host)
        self.running.append(job)
        thread = threading.Thread(target=self._work, args=(job,), daemon=True)
        thread.start()

    def _work(self, job):
        config = self.config
        if job.host is not None:
            block = dict(config.backends[job.backend], url=job.host)
            config = Config(dict(config.data, backends=dict(config.backends,
                                                             **{job.backend: block})),
                            config.path, config.exists)
        events = self.events

        def watch(adapter):
            job.adapter = adapter
            if job.host is not None:
                adapter.use_session(self.sessions[job.host])
            inner = adapter.generate_all

            def generate_all(requests, deadline):
                for result in inner(requests, deadline):
                    events.put(("free", job))      # the host may take the next job now
                    yield result
            adapter.generate_all = generate_all

        try:
            for record in generate_images(job.job, config, self.env, Console(quiet=True),
                                          on_adapter=watch):
                job.records.append(record)
            events.put(("done", job))
        except BaseException as exc:      # reported by the main thread, one line
            job.error = exc.message if isinstance(exc, ImagenError) else \
                "%s: %s" % (type(exc).__name__, scrub_secrets(str(exc), self.env))
            events.put(("failed", job))

    def _handle(self, kind, job):
        if kind == "free":
            self._release(job)
            return
        self._release(job)
        self.running.remove(job)
        if kind == "done":
            for record in job.records:
                self.spent += record.get("cost_usd") or 0.0
                emit(to_json(dict(record, line=job.line)) if self.as_json else record["path"])
            self.done.append(job)
            self._report(job, "done")
            return
        if job.host is not None and len(self.limits[job.backend][1]) > 1 and not job.records:
            self.hosts[job.host]["rest_until"] = clock.monotonic() + BATCH_HOST_REST
            if len(job.tried) < 2 and len(job.tried) < len(self.limits[job.backend][1]):
                self.console.warn("batch: line %d: %s; %s rests, the job goes to another host"
                                  % (job.line, job.error, redact_url(job.host)))
                job.error, job.adapter = None, None
                self.queue.appendleft(job)
                return
        self._finished_badly(job)

    def _finished_badly(self, job):
        self.failed.append(job)
        self.console.warn("batch: line %d: %s" % (job.line, job.error))
        self._report(job, "failed")

    def _release(self, job):
        if not job.holding:
            return
        job.holding = False
        self.busy[job.backend] -= 1
        if job.host is not None:
            self.hosts[job.host]["job"] = None

    # ----- hosts -----

    def _probe_hosts(self):
        """One quick look at each host's queue (GET /prompt): a host that does not answer
        rests; the others are ranked by the jobs they already have."""
        import threading
        if len(self.hosts) < 2:
            return

        def probe(url):
            http = HttpClient(timeout=BATCH_PROBE_SECONDS)
            try:
                response = http.request("GET", url + "/prompt", retry=NO_RETRY,
                                        deadline=clock.monotonic() + BATCH_PROBE_SECONDS,
                                        context=redact_url(url))
                load = _dig(response.json() if response.status == 200 else None,
                            "exec_info", "queue_remaining")
                if isinstance(load, bool) or not isinstance(load, int):
                    raise ImagenError("not a ComfyUI server")
                self.hosts[url]["load"] = load
            except ImagenError as exc:
                self.hosts[url]["rest_until"] = clock.monotonic() + BATCH_HOST_REST
                self.console.warn("batch: %s: %s; it gets no job for now"
                                  % (redact_url(url), exc.message))
            finally:
                http.close()
        threads = [threading.Thread(target=probe, args=(url,), daemon=True) for url in self.hosts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # ----- Ctrl-C, SIGTERM -----

    def cancel(self):
        """Ask every backend to stop its running job, then give the jobs a moment to end
        (an image already downloaded is still written)."""
        import threading
        cancels = [threading.Thread(target=job.adapter.cancel, daemon=True)
                   for job in self.running if job.adapter is not None]
        for thread in cancels:
            thread.start()
        deadline = clock.monotonic() + BATCH_CANCEL_WAIT
        for thread in cancels:
            thread.join(max(0.0, deadline - clock.monotonic()))
        import queue
        while self.running and clock.monotonic() < deadline:
            try:
                kind, job = self.events.get(timeout=max(0.01, deadline - clock.monotonic()))
            except queue.Empty:
                break
            if kind == "done":
                self._handle(kind, job)
            elif kind == "failed":
                self._release(job)
                self.running.remove(job)
        if not self.running:
            self._close_sessions()
        self.console.clear()
        self.console.warn("batch: interrupted: %s" % self._counts())

    # ----- progress -----

    def _counts(self):
        return "%d done, %d failed, %d running, %d queued, $%s so far" % (
            len(self.done), len(self.failed), len(self.running), len(self.queue),
            dollars(self.spent))

    def _show(self):
        self.console.progress("batch: " + self._counts())

    def _report(self, job, outcome):
        if self.console.live:
            self._show()
        elif not self.console.quiet:
            self.console.warn("batch: [%d/%d] line %d %s; %s" % (
                len(self.done) + len(self.failed), self.total, job.line, outcome,
                self._counts()))

    def _summary(self):
        if not self.failed and not self.over_budget:
            return EXIT_OK
        parts = ["%d done" % len(self.done)]
        if self.failed:
            parts.append("%d failed (line %s)" % (len(self.failed), ", ".join(
                str(n) for n in sorted({job.line for job in self.failed}))))
        if self.over_budget:
            parts.append("%d not started: they would pass --max-cost $%s"
                         % (len(self.over_budget), dollars(self.max_cost)))
        self.console.warn("batch: %s; run the same batch again to do only what is missing"
                          % ", ".join(parts))
        return EXIT_FAILED


def batch_defaults(args):
    """The generate flags given on the command line: defaults a line's fields override."""
    defaults = {key: getattr(args, key) for key in ("backend", "size", "seed", "steps",
                                                     "style", "negative", "count", "output")
                if getattr(args, key) is not None}
    for key in ("sidecar", "cloud", "timeout"):
        if getattr(args, key) is not None:
            defaults[key] = getattr(args, key)
    return defaults


def cmd_batch(args, env):
    console = Console(quiet=args.quiet)
    config = load_config_and_warn(getattr(args, "config", None), env, console)
    name = "stdin" if args.file == "-" else args.file
    jobs = plan_batch(read_batch(args.file), batch_defaults(args), config, env, name)
    if args.jobs is not None:
        check_range("batch: -j", args.jobs, 1, 1024)
    if args.max_cost is not None and not args.max_cost >= 0:
        raise usage_error("batch: --max-cost must be a number of US dollars, 0 or more")
    done = set() if args.force else finished_job_keys(env, jobs)
    todo = [job for job in jobs if job.key not in done]
    total, unknown = estimate_jobs(todo, config, env, console)
    if unknown and args.max_cost is not None:
        raise usage_error("batch: the cost of some jobs is unknown, so --max-cost $%s "
                          "cannot be enforced; nothing was started" % dollars(args.max_cost))
    console.warn("batch: %d job(s) from %d line(s)%s; estimated cost $%s%s" % (
        len(todo), len({job.line for job in jobs}),
        ", %d already done (--force redoes them)" % (len(jobs) - len(todo)) if done else "",
        dollars(total), " plus jobs of unknown price" if unknown else ""))
    if args.dry_run:
        for job in jobs:
            show_planned_job(job, job.key in done, args.json)
        return EXIT_OK
    if not todo:
        return EXIT_OK
    caller = resolve_caller(env)      # who asked: once for the batch (it may ask tmux)
    for job in todo:
        job.job.caller = caller
    limits = backend_limits(config, env, console, sorted({job.backend for job in todo}))
    parallel = args.jobs or sum(limit for limit, _ in limits.values())
    runner = BatchRunner(todo, config, env, limits, parallel, args.max_cost, args.json, console)
    previous = _raise_on_sigterm()
    try:
        return runner.run()
    except KeyboardInterrupt:
        runner.cancel()
        raise
    finally:
        _restore_sigterm(previous)


def show_planned_job(job, done, as_json):
    fields = dict(job.options, prompt=job.prompt, backend=job.backend, line=job.line,
                  image=job.image, key=job.key, estimate_usd=job.estimate,
                  state="done" if done else "to do")
    if as_json:
        emit(to_json(fields))
        return
    emit("line %d%s: %s %s seed %s: %s%s" % (
        job.line, "" if not job.image else " #%d" % (job.image + 1), job.backend,
        job.options.get("size") or "-", job.options.get("seed") or "random",
        one_line(job.prompt), " (done)" if done else ""))


# ===== CLI and main =====

def make_parser():
    """The parser of `imagen [--config PATH] [--version] [COMMAND [ARGUMENTS...]]`. The
    command line from COMMAND on is left whole (a `--` in it included) for
    command_parser(COMMAND): building the parsers of every command would cost more than
    the rest of `imagen --help`."""
    import argparse
    parser = new_parser("imagen", epilog=EPILOG, description=DESCRIPTION + "\n\ncommands:\n"
                        + "".join("  %-10s %s\n" % (name, entry[1])
                                  for name, entry in COMMANDS.items()),
                        usage="%(prog)s [-h] [--config PATH] [--version] [COMMAND ...]")
    add_config_flag(parser)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="one of the commands above; imagen COMMAND --help for its flags")
    return parser


def command_parser(name):
    """The parser of one command's arguments (`imagen NAME --help` prints its help)."""
    import argparse
    _, help_text, add_arguments = COMMANDS[name]
    parser = new_parser("imagen " + name, description=help_text)
    add_config_flag(parser, argparse.SUPPRESS)   # keep a --config given before the command
    add_arguments(parser)
    return parser


def parse_command_line(argv):
    """(top-level parser, args): argparse sees the whole structure, so a --config value
    named like a command stays a file name, and the command's parser gets the rest."""
    parser = make_parser()
    args = parser.parse_args(argv)
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    args.command = words[0] if words else None
    if args.command is not None:
        if args.command not in COMMANDS:
            parser.error("argument COMMAND: invalid choice: %r (choose from %s)"
                         % (args.command, ", ".join(map(repr, COMMANDS))))
        command_parser(args.command).parse_args(words[1:], namespace=args)
    return parser, args


def plain_command_args(argv):
    """The args of `COMMAND [POSITIONALS...] [--option [VALUE]]...` (options spelled out,
    no value starting with -) read without argparse, from what the command declares, as
    argparse reads it; None for any other command line, which argparse reads (and words
    the errors of). Importing and building argparse was a third of a mock generate."""
    if not argv or argv[0] not in COMMANDS:
        return None
    table = ArgumentTable()
    add_config_flag(table)
    COMMANDS[argv[0]][2](table)
    if not table.plain:
        return None
    args = CommandArgs(version=False, command=argv[0], **table.defaults)
    rest = argv[1:]
    positionals = list(table.positionals)
    while rest and positionals and (rest[0] == "-" or not rest[0].startswith("-")):
        dest, nargs = positionals[0]
        if nargs == "*":        # the last positional: every word before the options
            getattr(args, dest).append(rest.pop(0))
        else:
            setattr(args, dest, rest.pop(0))
            positionals.pop(0)
    if any(nargs is None for _, nargs in positionals):
        return None
    while rest:
        option = table.options.get(rest.pop(0))
        if option is None:
            return None
        dest, takes_value, convert, const = option
        if not takes_value:
            setattr(args, dest, const)
            continue
        if not rest or rest[0].startswith("-"):
            return None
        try:
            value = convert(rest.pop(0))
        except (TypeError, ValueError):
            return None
        setattr(args, dest, (getattr(args, dest) or []) + [value] if takes_value == "append"
                else value)
    return args


class CommandArgs:
    """What argparse's Namespace is to a command: its arguments as attributes."""

    def __init__(self, **values):
        vars(self).update(values)


class ArgumentTable:
    """What an add_*_arguments function declares, in argparse's terms, for
    plain_command_args: each option's (dest, takes a value: "store"/"append"/None,
    type, const), the positionals' (dest, nargs: None, "?" or, last, "*"), the defaults.
    `plain` turns False when the declarations use more of argparse than
    plain_command_args reads."""

    UNSET = object()
    FLAGS = {"store_true": True, "store_false": False}     # action -> the value it stores

    def __init__(self):
        self.options, self.positionals, self.defaults = {}, [], {}
        self.plain = True

    def add_argument_group(self, title):
        return self

    def add_argument(self, *names, action="store", dest=None, type=str, const=None,
                     nargs=None, default=UNSET, choices=None, metavar=None, help=None):
        if default is self.UNSET:
            default = not self.FLAGS[action] if action in self.FLAGS else None
        self.plain &= choices is None and not (isinstance(default, str) and type is not str)
        if not names[0].startswith("-"):
            after_many = any(taken == "*" for _, taken in self.positionals)
            self.plain &= action == "store" and nargs in (None, "?", "*") and not after_many
            self.positionals.append((names[0], nargs))
            self.defaults.setdefault(names[0], [] if nargs == "*" and default is None
                                     else default)
            return
        self.plain &= nargs is None and action in ("store", "append", "store_const") + tuple(
            self.FLAGS)
        longs = [name for name in names if name.startswith("--")]
        dest = dest or (longs or names)[0].lstrip("-").replace("-", "_")
        takes_value = action if action in ("store", "append") else None
        for name in names:
            self.options[name] = (dest, takes_value, type, self.FLAGS.get(action, const))
        self.defaults.setdefault(dest, default)


def new_parser(prog, **kwargs):
    """An ArgumentParser whose errors are ImagenErrors: `imagen: <command>: <message>`."""
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def __init__(self, prog, **kwargs):
            # argparse would import shutil for the width: about 2 ms of every command
            # but version (`make bench` prints it)
            kwargs.setdefault("width", _terminal_width())
            super().__init__(prog, **kwargs)

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            command = self.prog[len("imagen"):].strip()
            raise usage_error("%s: %s" % (command, message) if command else message)

    return Parser(prog=prog, formatter_class=Formatter, **kwargs)


DESCRIPTION = "Turn a prompt into an image file through pluggable backends."


def _terminal_width():
    try:
        columns = int(os.environ.get("COLUMNS") or os.get_terminal_size(2).columns)
    except (OSError, ValueError):
        columns = 80
    return max(columns - 2, 40)


def add_config_flag(parser, default=None):
    parser.add_argument("--config", metavar="PATH", default=default,
                        help="config file (default $IMAGEN_CONFIG, then ~/.config/imagen.yaml)")


def add_generate_arguments(gen):
    gen.add_argument("prompt", metavar="PROMPT", nargs="?",
                     help="the prompt; - reads it from stdin")
    what = gen.add_argument_group("what to generate")
    what.add_argument("--from", dest="source", metavar="SOURCE",
                      help="run an image again: its file, sidecar, id (or prefix) or last; "
                      "PROMPT and flags given override its settings")
    what.add_argument("--backend", metavar="NAME", help="backend instance from the config")
    what.add_argument("--size", metavar="WxH", help="e.g. 1024x1024 (64..4096 each side)")
    what.add_argument("--seed", type=int, metavar="N",
                      help="0 (default) draws one; with --count: seed, seed+1, ...")
    what.add_argument("--steps", type=int, metavar="N", help="0 = backend default")
    what.add_argument("--style", metavar="NAME", help="style from the config")
    what.add_argument("--negative", metavar="TEXT", help="negative prompt")
    what.add_argument("--count", type=int, default=1, metavar="N", help="how many images (1..100)")
    add_image_arguments(what)
    where = gen.add_argument_group("where it goes")
    where.add_argument("--output", "-o", metavar="PATH", help="explicit file (overwritten)")
    where.add_argument("--no-sidecar", dest="sidecar", action="store_false", default=None,
                       help="do not write <image>.json")
    where.add_argument("--preview", dest="preview", action="store_const", const="on",
                       help="open a tmux preview window")
    where.add_argument("--no-preview", dest="preview", action="store_const", const="off",
                       help="no tmux preview window, whatever output.preview says")
    where.add_argument("--no-cloud", dest="cloud", action="store_const", const="off",
                       help="skip the cloud upload for this call")
    how = gen.add_argument_group("how it runs")
    how.add_argument("--json", action="store_true", help="print one JSON record per image")
    how.add_argument("--timeout", type=float, metavar="SECONDS", help="overall deadline")
    how.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    paid = gen.add_argument_group("paid backends")
    paid.add_argument("--max-cost", type=float, metavar="USD",
                      help="refuse a generation estimated to cost more than this")


def add_image_arguments(group):
    group.add_argument("--image", "-i", dest="images", action="append", metavar="FILE",
                       help="input image: PNG, JPEG or WebP, up to 20 MiB (repeat: up to %d)"
                       % MAX_INPUT_IMAGES)
    group.add_argument("--strength", type=float, metavar="F",
                       help="0 < F <= 1: how far the result may move from the input image")


def add_edit_arguments(parser):
    parser.add_argument("file", metavar="FILE", help="the image to edit (PNG, JPEG or WebP)")
    add_generate_arguments(parser)


def add_json_flag(parser):
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_backends_arguments(parser):
    add_json_flag(parser)
    parser.add_argument("--check", action="store_true", help="probe each ComfyUI host "
                        "(GET /system_stats, %g s at most each): reachable or not"
                        % BACKEND_CHECK_SECONDS)


def add_config_arguments(parser):
    parser.add_argument("action", choices=("init", "validate", "path"))
    parser.add_argument("--write", action="store_true", help="init: write the sample to the "
                        "config path (creating its directory) instead of stdout; never "
                        "overwrites a file")


def add_help_arguments(parser):
    parser.add_argument("topic", nargs="?", choices=list(COMMANDS), metavar="COMMAND",
                        help="the command whose flags to print")


def add_inspect_arguments(parser):
    parser.add_argument("file", metavar="FILE|ID|last", help="an image, a generation id or "
                        "a unique prefix of one, or last (the newest)")


def add_file_argument(parser):
    parser.add_argument("file", metavar="FILE")


def add_usage_arguments(parser):
    parser.add_argument("--since", metavar="YYYY-MM-DD", help="only generations on/after")
    parser.add_argument("--raw", action="store_true", help="one row per generation")
    add_json_flag(parser)
    parser.add_argument("--local", action="store_true", help="read the local ledger")


def add_sync_arguments(parser):
    parser.add_argument("--dry-run", action="store_true", help="say what would be done")
    parser.add_argument("--recheck", action="store_true",
                        help="first find synced images deleted from the bucket, to upload "
                        "them again")


def add_history_arguments(parser):
    parser.add_argument("words", nargs="*", metavar="WORDS",
                        help="words that must all occur in the prompt (case and accents "
                        "do not matter)")
    parser.add_argument("--since", metavar="DATE", help="only generations on/after "
                        "YYYY-MM-DD, or within an age like 12h, 7d, 2w")
    parser.add_argument("--backend", metavar="NAME", help="only this backend instance")
    parser.add_argument("--limit", type=int, default=HISTORY_LIMIT, metavar="N",
                        help="at most N, newest first (default %d; 0: all)" % HISTORY_LIMIT)
    parser.add_argument("--json", action="store_true", help="one JSON object a line: the "
                        "record plus path, cloud state and exists")


def add_batch_arguments(parser):
    parser.add_argument("file", metavar="FILE", help="one prompt a line, or JSON Lines of "
                        "generate's fields; - reads stdin")
    run = parser.add_argument_group("how the batch runs")
    run.add_argument("-j", "--jobs", type=int, metavar="N", help="at most N jobs at once "
                     "(default: the sum of the backends' max_concurrency)")
    run.add_argument("--max-cost", type=float, metavar="USD", help="start no paid job that "
                     "would take the batch's cost past this")
    run.add_argument("--dry-run", action="store_true", help="print the plan and the "
                     "estimated cost; run nothing")
    run.add_argument("--force", action="store_true", help="run every job, also those the "
                     "ledger has as done")
    run.add_argument("--json", action="store_true", help="print one JSON record per image "
                     "(with its line)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    what = parser.add_argument_group("defaults for every line (a line's fields win)")
    what.add_argument("--backend", metavar="NAME", help="backend instance from the config")
    what.add_argument("--size", metavar="WxH", help="e.g. 1024x1024")
    what.add_argument("--seed", type=int, metavar="N", help="0 draws one per image")
    what.add_argument("--steps", type=int, metavar="N", help="0 = backend default")
    what.add_argument("--style", metavar="NAME", help="style from the config")
    what.add_argument("--negative", metavar="TEXT", help="negative prompt")
    what.add_argument("--count", type=int, metavar="N", help="images per line (1..100)")
    what.add_argument("--output", "-o", metavar="PATH", help="explicit file (for a "
                      "one-line batch)")
    what.add_argument("--no-sidecar", dest="sidecar", action="store_false", default=None,
                      help="do not write <image>.json")
    what.add_argument("--no-cloud", dest="cloud", action="store_const", const="off",
                      help="skip the cloud upload")
    what.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline of each job")


def add_url_arguments(parser):
    add_file_argument(parser)
    parser.add_argument("--expires", type=int, default=3600, metavar="SECONDS",
                        help="how long the URL stays valid (default 3600)")


def add_serve_arguments(parser):
    parser.add_argument("--addr", default=SERVE_ADDR, metavar="HOST:PORT",
                        help="where to listen (default %s; :PORT is every interface and "
                        "needs $IMAGEN_SERVE_TOKEN)" % SERVE_ADDR)
    parser.add_argument("--client-timeout", type=float, default=SERVE_CLIENT_TIMEOUT,
                        metavar="SECONDS", help="time a client gets to send its request "
                        "(default %g)" % SERVE_CLIENT_TIMEOUT)


def add_no_arguments(parser):
    pass


EPILOG = """\
examples:
  imagen generate "a red fox in the snow" --backend mock
  echo "a lighthouse at dusk" | imagen generate - --json
  imagen generate "blog header about RAG" --style blog-header --count 4
  imagen config init --write && imagen config validate
  imagen help COMMAND

exit codes: 0 ok, 1 generation failed, 2 bad usage/config/input, 130 interrupted"""


def version_text():
    return "imagen " + version_string()


def cmd_version(args, env):
    emit(version_text())
    return EXIT_OK


def cmd_generate(args, env, edit=False):
    prompt = args.prompt
    if prompt == "-":
        prompt = read_prompt_from_stdin()
    console = Console(quiet=args.quiet)
    options = {"backend": args.backend, "size": args.size, "seed": args.seed,
               "steps": args.steps, "style": args.style, "negative": args.negative,
               "count": args.count, "timeout": args.timeout, "output": args.output,
               "sidecar": args.sidecar, "preview": args.preview, "cloud": args.cloud,
               "max_cost": args.max_cost, "images": args.images, "strength": args.strength,
               "edit": edit, "interactive": _isatty(sys.stdout)}
    if args.source:
        prompt, options = remix_options(args.source, prompt, options, env)
    elif prompt is None:
        raise usage_error("generate: a PROMPT (or --from SOURCE) is required")

    def show(record):
        emit(to_json(record) if args.json else record["path"])

    previous = _raise_on_sigterm()
    try:
        for _ in generate_records(prompt, options, getattr(args, "config", None), env,
                                  console, on_written=show):
            pass
    finally:
        _restore_sigterm(previous)
    return EXIT_OK


def cmd_edit(args, env):
    """`imagen edit FILE PROMPT`: generate with FILE as the first input image; the size
    and the backend default to the input's and to default_edit_backend."""
    args.images = [args.file] + (args.images or [])
    return cmd_generate(args, env, edit=True)


def read_prompt_from_stdin():
    """`generate -`: the prompt on stdin, read up to MAX_STDIN_PROMPT_BYTES (never more);
    stdin may be closed (`<&-`) or unreadable."""
    if sys.stdin is None:
        raise usage_error("generate -: cannot read the prompt: stdin is closed")
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    try:
        data = stream.read(MAX_STDIN_PROMPT_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise usage_error("generate -: cannot read the prompt: stdin: %s" % (
            getattr(exc, "strerror", None) or exc)) from None
    if len(data) > MAX_STDIN_PROMPT_BYTES:
        raise usage_error("generate -: the prompt on stdin is over %d bytes (at most %d "
                          "characters are allowed)" % (MAX_STDIN_PROMPT_BYTES, MAX_PROMPT_CHARS))
    return data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data


def cmd_backends(args, env):
    config, console = report_config(args, env)
    rows = backend_rows(config, env, console, check=args.check)
    # --check is a health check: exit 1 when a probed backend has no host answering
    code = EXIT_FAILED if any(row["status"] == "unreachable" for row in rows) else EXIT_OK
    if args.json:
        emit(to_json({"adapters": list(ADAPTERS), "backends": rows}))
        return code
    emit("adapters: %s" % ", ".join(ADAPTERS))
    emit("%-2s%-24s %-10s %-36s %s" % ("", "BACKEND", "ADAPTER", "MODEL", "STATUS"))
    for row in rows:
        status = row["status"]
        status += (": " + row["note"] if row["note"] else "")
        status += ("; " + row["price"] if row["price"] else "")
        emit("%-2s%-24s %-10s %-36s %s" % ("*" if row["default"] else "", row["name"],
                                           row["adapter"], row["model"], status))
    takers = ["%s (up to %d)" % (row["name"], row["images"]) for row in rows if row["images"]]
    emit("input images (--image, edit): %s" % (", ".join(takers) or "no backend takes them"))
    return code


def cmd_config(args, env):
    explicit = getattr(args, "config", None)
    if args.write and args.action != "init":
        raise usage_error("config: --write goes with init only")
    if args.action == "init":
        if args.write:
            emit(write_sample_config(config_path(explicit, env)[0]))
        else:
            sys.stdout.write(SAMPLE_CONFIG)
        return EXIT_OK
    if args.action == "path":
        path, _ = config_path(explicit, env)
        emit(path)
        Console().warn("config: %s %s" % (path, "exists" if os.path.exists(path)
                                            else "does not exist (built-in defaults apply)"))
        return EXIT_OK
    config = load_config(explicit, env, strict=False)
    console = Console()
    if not config.exists:
        emit("%s: not found; built-in defaults apply" % config.path)
        return EXIT_OK
    errors = 0
    for problem in config.problems:
        errors += problem[0] == "error"
        console.warn("config: %s: %s" % (problem[0], format_problem(config.path, problem)))
    if errors:
        console.warn("config: %s: %d error(s)" % (config.path, errors))
        return EXIT_USAGE
    emit("%s: valid (%d warning(s))" % (config.path, len(config.problems)))
    return EXIT_OK


def write_sample_config(path):
    """`config init --write`: the sample at `path`, its directory created; an existing file
    (or anything else there) is never replaced."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise usage_error("config: %s: %s" % (directory, exc.strerror or exc)) from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise usage_error("config: %s already exists; not overwritten" % path) from None
    except OSError as exc:
        raise usage_error("config: %s: %s" % (path, exc.strerror or exc)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(SAMPLE_CONFIG)
    except OSError as exc:
        os.unlink(path)         # no half-written sample left to be mistaken for a config
        raise usage_error("config: %s: %s" % (path, exc.strerror or exc)) from None
    return path


def cmd_help(args, env):
    parser = command_parser(args.topic) if args.topic else make_parser()
    parser.print_help(sys.stdout)
    return EXIT_OK


def cmd_inspect(args, env):
    path = inspect_target(args.file, env)
    info = read_metadata(path)
    info["chain"] = input_chain(info["sidecar"] or info["embedded"], env)
    if info["sidecar_matches"] is False:
        Console().warn("inspect: %s no longer matches its sidecar (sha256 differs): changed "
                       "since it was generated" % path)
    emit(to_json(info, indent=2))
    return EXIT_OK


# name -> (function, help, add_arguments), in the order `imagen --help` lists them
COMMANDS = {
    "generate": (cmd_generate, "generate image(s) from a prompt", add_generate_arguments),
    "edit": (cmd_edit, "generate from an input image (edit FILE PROMPT)", add_edit_arguments),
    "backends": (cmd_backends, "list adapters and configured backends", add_backends_arguments),
    "config": (cmd_config, "config init | validate | path", add_config_arguments),
    "usage": (cmd_usage, "cost report", add_usage_arguments),
    "sync": (cmd_sync, "upload generations whose cloud sync is pending", add_sync_arguments),
    "url": (cmd_url, "signed Storage URL for an image", add_url_arguments),
    "inspect": (cmd_inspect, "print the generation record of an image", add_inspect_arguments),
    "history": (cmd_history, "list and search past generations", add_history_arguments),
    "batch": (cmd_batch, "many generations from a file, concurrently, resumable",
              add_batch_arguments),
    "schema": (cmd_schema, "print the SQL for the Supabase side", add_no_arguments),
    "serve": (cmd_serve, "HTTP API for generate (see README: Serve)", add_serve_arguments),
    "mcp": (cmd_mcp, "Model Context Protocol server on stdio, for agents", add_no_arguments),
    "version": (cmd_version, "print the version", add_no_arguments),
    "help": (cmd_help, "print this help, or a command's (help COMMAND)", add_help_arguments),
}


def _freeze_start_up_objects():
    """The process is imagen (main() reads sys.argv): what importing it made lives until
    exit, so the cyclic garbage collector need not walk it again, at exit either. Those
    walks cost `imagen version` 1 to 2 ms, a mock generate more (`make bench` prints it)."""
    import gc
    gc.freeze()


def main(argv=None, env=None):
    """Run one command; returns the exit code. Only here do errors become output."""
    if argv is None:
        _freeze_start_up_objects()
    argv = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ) if env is None else env
    try:
        if argv in (["version"], ["--version"]):   # fast path: no argparse
            return cmd_version(None, env)
        if argv == ["mcp"]:     # agents start it for every session: no argparse either
            return cmd_mcp(None, env)
        args = plain_command_args(argv)
        if args is not None:
            return COMMANDS[args.command][0](args, env)
        parser, args = parse_command_line(argv)
        if args.version:
            return cmd_version(args, env)
        if not args.command:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return COMMANDS[args.command][0](args, env)
    except ImagenError as exc:
        _debug_traceback(env)
        sys.stderr.write("imagen: %s\n" % scrub_secrets(exc.message, env))
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write("\nimagen: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_FAILED
    except Exception as exc:      # a bug: still one line, and never a secret in it
        _debug_traceback(env)
        sys.stderr.write("imagen: internal error: %s: %s (IMAGEN_DEBUG=1 shows where)\n"
                         % (type(exc).__name__, scrub_secrets(str(exc), env)))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
