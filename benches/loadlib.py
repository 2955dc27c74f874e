"""Shared helpers of the load/robustness scripts in benches/ (hostile.py, slowloris.py,
health_latency.py, soak.py): start and stop a sluice server on OS-chosen ports, sample its
memory and file descriptors from /proc, small HTTP/1.1 and HTTP/2 (gRPC) clients that send
big bodies from one shared buffer without copying it, percentiles, tables and JSON output.

Not a script: the others import it (they run from the repository root with the project
venv, e.g. `.venv/bin/python benches/hostile.py`). Standard library only, plus
tritonclient's generated protobuf modules where a script needs them. Every socket has a
timeout and every client talks to 127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TENSOR_MODEL = "fashion-resnet20"
IMAGE_MODEL = "fashion-resnet20-image"
REQUEST_JSON = ROOT / "deploy" / "examples" / "request.json"
EXAMPLE_PNG = ROOT / "deploy" / "examples" / "ankle-boot.png"
DEFAULT_BINARY = ROOT / "target" / "release" / "sluice"
GIB = 1 << 30
MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# The server under test


def base_server_command(binary: str | Path, extra: list[str]) -> list[str]:
    """`sluice serve` on the shipped repository, every port chosen by the OS, bound to
    loopback, policy changes not persisted; `extra` (from --server-arg) is appended."""
    return [
        str(binary), "serve", "--model-repository", str(ROOT / "deploy" / "models"),
        "--address", HOST, "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--admin-port", "0", "--no-persist-policy", *extra,
    ]


class ServerDied(RuntimeError):
    pass


class Server:
    """One `sluice serve` child process. Its stdout is read by a thread (the ready line
    gives the ports); stderr goes to a temporary log file whose tail is printed if it dies."""

    _all: list["Server"] = []

    def __init__(self, command: list[str], ready_timeout: float = 120.0, log_dir: str | None = None):
        self.command = command
        self.log = tempfile.NamedTemporaryFile(
            prefix="sluice-server-", suffix=".log", dir=log_dir, delete=False)
        self.stdout_lines: list[str] = []
        self.ports: dict[str, int] = {}
        self.exit_code: int | None = None
        self.killed_by_harness = False
        self.sigterm_at: float | None = None
        self.exited_at: float | None = None
        self.started_at = time.monotonic()
        self.owner_pid = os.getpid()  # forked helper processes must never signal the server
        self.proc = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.log, text=True, bufsize=1)
        self.pid = self.proc.pid
        Server._all.append(self)
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        # If the machine runs out of memory, the kernel should pick the server, not the
        # harness or anything else running here.
        try:
            Path(f"/proc/{self.pid}/oom_score_adj").write_text("1000")
        except OSError:
            pass
        deadline = time.monotonic() + ready_timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                self.exit_code = self.proc.returncode
                raise ServerDied(f"the server exited with {self.exit_code} before it was ready\n"
                                 + self.log_tail())
            if time.monotonic() > deadline:
                self.kill()
                raise ServerDied(f"no 'sluice ready' line within {ready_timeout:.0f} s\n" + self.log_tail())
        self.line_s = time.monotonic() - self.started_at
        # The ready line comes when the listeners are bound, which may be before the models
        # have loaded: wait for /v2/health/ready too.
        while True:
            try:
                c = http.client.HTTPConnection(HOST, self.http, timeout=5)
                c.request("GET", "/v2/health/ready")
                status = c.getresponse().status
                c.close()
                if status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                self.exit_code = self.proc.returncode
                raise ServerDied(f"the server exited with {self.exit_code} before it was ready\n" + self.log_tail())
            if time.monotonic() > deadline:
                self.kill()
                raise ServerDied(f"/v2/health/ready not 200 within {ready_timeout:.0f} s\n" + self.log_tail())
            time.sleep(0.1)
        self.ready_s = time.monotonic() - self.started_at

    def _read_stdout(self):
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            m = re.match(r"sluice ready: (.*)", line.strip())
            if m and not self._ready.is_set():
                for key, value in re.findall(r"(\w+)=(\S+)", m.group(1)):
                    if value != "none":
                        self.ports[key] = int(value.rsplit(":", 1)[1])
                self._ready.set()

    @property
    def http(self) -> int:
        return self.ports["http"]

    @property
    def grpc(self) -> int:
        return self.ports["grpc"]

    @property
    def metrics(self) -> int:
        return self.ports["metrics"]

    @property
    def admin(self) -> int:
        return self.ports["admin"]

    def alive(self) -> bool:
        if self.proc.poll() is None:
            return True
        if self.exit_code is None:
            self.exit_code = self.proc.returncode
            self.exited_at = time.monotonic()
        return False

    def proc_status(self) -> dict[str, int]:
        """VmRSS, VmHWM (KiB), Threads from /proc/<pid>/status; {} once it is gone."""
        out = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmRSS", "VmHWM", "Threads"):
                        out[k] = int(v.split()[0])
        except OSError:
            pass
        return out

    def rss_kib(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
        except (OSError, IndexError, ValueError):
            return None

    def fd_count(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None

    def nofile_limit(self) -> str:
        try:
            for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    return " ".join(line.split()[3:5])
        except OSError:
            pass
        return "?"

    def log_tail(self, lines: int = 40) -> str:
        try:
            self.log.flush()
            text = Path(self.log.name).read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return f"--- last {min(lines, len(text))} lines of the server log {self.log.name} ---\n" + \
            "\n".join(text[-lines:])

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait up to `timeout` (SIGKILL after). Returns the exit code."""
        if os.getpid() != self.owner_pid:
            return None
        if self.alive():
            self.sigterm_at = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.alive()
        return self.exit_code

    def kill(self):
        if os.getpid() != self.owner_pid:
            return
        if self.proc.poll() is None:
            self.killed_by_harness = True
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.alive()

    @classmethod
    def kill_all(cls):
        for s in cls._all:
            try:
                s.kill()
            except Exception:
                pass

    @classmethod
    def tidy_logs(cls):
        """At exit: the logs of servers that exited 0 after our SIGTERM are deleted; the
        others are kept, and their paths printed."""
        for s in cls._all:
            if os.getpid() != s.owner_pid:
                continue
            if s.sigterm_at is not None and s.exit_code == 0 and not s.killed_by_harness:
                try:
                    os.unlink(s.log.name)
                except OSError:
                    pass
            else:
                print(f"server log kept: {s.log.name} (pid {s.pid}, exit code {s.exit_code})", file=sys.stderr)


def _at_exit():
    Server.kill_all()
    Server.tidy_logs()


atexit.register(_at_exit)


def _on_signal(signum, frame):
    Server.kill_all()
    sys.exit(128 + signum)


def install_signal_handlers():
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)


def child_process_init():
    """In a forked helper process: default signal handling, Ctrl-C left to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Sampler(threading.Thread):
    """Samples the server's VmRSS/VmHWM/Threads and open fds every `interval` seconds
    (t relative to `t0`). With `rss_cap_kib`, a second, faster check kills the server when
    its RSS passes the cap (a safety net for this machine, reported as such)."""

    def __init__(self, server: Server, interval: float = 0.1, t0: float | None = None,
                 rss_cap_kib: int | None = None, fds: bool = True, csv_path: Path | None = None):
        super().__init__(daemon=True)
        self.server, self.interval, self.fds = server, interval, fds
        self.t0 = time.monotonic() if t0 is None else t0
        self.rss_cap_kib = rss_cap_kib
        self.samples: list[dict] = []
        self.capped_at_kib: int | None = None
        self._stop_evt = threading.Event()
        self.csv = open(csv_path, "w") if csv_path else None
        if self.csv:
            self.csv.write("t_s,vm_rss_kib,vm_hwm_kib,fds,threads\n")

    def run(self):
        next_sample = time.monotonic()
        while not self._stop_evt.is_set():
            now = time.monotonic()
            if self.rss_cap_kib is not None:
                rss = self.server.rss_kib()
                if rss is not None and rss > self.rss_cap_kib and self.capped_at_kib is None:
                    self.capped_at_kib = rss
                    print(f"!! server RSS {rss / MIB:.2f} GiB passed the safety cap "
                          f"{self.rss_cap_kib / MIB:.2f} GiB: killing it", flush=True)
                    self.server.kill()
            if now >= next_sample:
                st = self.server.proc_status()
                if not st:
                    if not self.server.alive():
                        break
                else:
                    s = {"t": round(now - self.t0, 3), "rss": st.get("VmRSS"), "hwm": st.get("VmHWM"),
                         "threads": st.get("Threads"), "fds": self.server.fd_count() if self.fds else None}
                    self.samples.append(s)
                    if self.csv:
                        self.csv.write(f"{s['t']},{s['rss']},{s['hwm']},{s['fds']},{s['threads']}\n")
                        self.csv.flush()
                next_sample += self.interval
                if next_sample < now:
                    next_sample = now + self.interval
            self._stop_evt.wait(0.02 if self.rss_cap_kib is not None else max(0.0, next_sample - time.monotonic()))
        if self.csv:
            self.csv.close()

    def stop(self):
        self._stop_evt.set()
        self.join(5)

    def window(self, t_from: float, t_to: float) -> list[dict]:
        return [s for s in self.samples if t_from <= s["t"] <= t_to]


def rss_cap_default_kib(limit_gib: float) -> int:
    """min(limit, 60% of MemAvailable now), in KiB."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1])
    except OSError:
        pass
    cap = int(limit_gib * MIB)
    return min(cap, int(avail * 0.6)) if avail else cap


def raise_nofile(want: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, want), hard) if hard != resource.RLIM_INFINITY else max(soft, want)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --------------------------------------------------------------------------------------------
# Requests


def load_request_json() -> bytes:
    return REQUEST_JSON.read_bytes()


def example_png() -> bytes:
    return EXAMPLE_PNG.read_bytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_gray(width: int, height: int, rows) -> bytes:
    """An 8-bit grayscale PNG from an iterable of raw rows (bytes of `width`), filter 0."""
    comp = zlib.compressobj(6)
    parts = []
    for row in rows:
        parts.append(comp.compress(b"\x00" + row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + \
        _png_chunk(b"IEND", b"")


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height 8-bit grayscale pixels, every pixel 0,
    with the IDAT zlib-compressed at level 9 (about 1/1000 of the decoded size)."""
    comp = zlib.compressobj(9)
    rows_per_chunk = max(1, (4 << 20) // (width + 1))
    block = b"\x00" * ((width + 1) * rows_per_chunk)
    parts, left = [], height
    while left > 0:
        n = min(left, rows_per_chunk)
        parts.append(comp.compress(block if n == rows_per_chunk else block[: (width + 1) * n]))
        left -= n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + \
        _png_chunk(b"IEND", b"")


def noisy_png(size: int, seed: int = 1) -> bytes:
    """A size x size grayscale PNG of noise (barely compressible: decoding it costs)."""
    import random
    rnd = random.Random(seed)
    return png_gray(size, size, (rnd.randbytes(size) for _ in range(size)))


def warm_up(server: "Server", seconds: float, threads: int = 4) -> str:
    """Valid requests to both models from `threads` threads for `seconds`: the first
    requests after a start are much slower than the rest (libtorch sets up each new shape),
    so measurements start after this. Returns a one-line summary."""
    body, png = load_request_json(), example_png()
    lat: list[float] = []
    end = time.monotonic() + seconds

    def run(i):
        ka = KeepAlive(server.http, timeout=60)
        while time.monotonic() < end:
            if i % 4 == 3:
                r = ka.request("POST", f"/v2/models/{IMAGE_MODEL}/infer", png,
                               {"Inference-Header-Content-Length": "0"})
            else:
                r = ka.request("POST", f"/v2/models/{TENSOR_MODEL}/infer", body,
                               {"Content-Type": "application/json"})
            lat.append(r.elapsed)
        ka.close()

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 70)
    first = lat[: min(20, len(lat))]
    last = lat[-min(100, len(lat)):]
    return (f"warm-up: {len(lat)} requests in {seconds:g} s from {threads} threads; median of the first "
            f"{len(first)} {ms(median(first))} ms, of the last {len(last)} {ms(median(last))} ms")


class HttpResult:
    __slots__ = ("status", "body", "error", "elapsed", "sent_all", "t_sent", "early")

    def __init__(self):
        self.early = False  # answered before the whole request was sent
        self.status: int | None = None
        self.body = b""
        self.error: str | None = None
        self.elapsed = 0.0
        self.sent_all = False
        self.t_sent: float | None = None

    def outcome(self) -> str:
        if self.status is not None:
            return str(self.status)
        return self.error or "no answer"


def _classify_exc(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, BrokenPipeError):
        return "broken pipe"
    if isinstance(e, http.client.RemoteDisconnected):
        return "closed without answer"
    if isinstance(e, http.client.IncompleteRead):
        return "incomplete answer"
    if isinstance(e, OSError) and e.errno is not None:
        return f"oserror {os.strerror(e.errno)}"
    return type(e).__name__


def _read_http_response(sock: socket.socket, buf: bytearray, deadline: float, max_body: int = 1 << 20):
    """Reads one HTTP/1.1 response (status, body) from `sock` with `buf` holding what was
    already received. Bodies beyond max_body are read and dropped."""
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline:
            raise socket.timeout()
        chunk = sock.recv(65536)
        if not chunk:
            if buf:
                raise http.client.IncompleteRead(bytes(buf))
            raise http.client.RemoteDisconnected("closed without answer")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = bytearray(rest)
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(body) < n:
            if time.monotonic() > deadline:
                raise socket.timeout()
            chunk = sock.recv(min(1 << 20, n - len(body)))
            if not chunk:
                raise http.client.IncompleteRead(bytes(body))
            body += chunk
        return status, bytes(body[:max_body])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while not body.endswith(b"0\r\n\r\n"):
            if time.monotonic() > deadline:
                raise socket.timeout()
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, bytes(body[:max_body])
    return status, bytes(body[:max_body])


def http_raw(port: int, method: str, path: str, headers: dict[str, str] | None, body,
             timeout: float = 60.0, total_timeout: float = 180.0, chunk: int = 1 << 20) -> HttpResult:
    """One request on a fresh connection, the body sent from `body` (bytes or memoryview)
    in `chunk`-sized slices without copying it. An answer that arrives while the body is
    still being sent (413, 400) is read and reported; a reset after that is ignored."""
    r = HttpResult()
    t0 = time.monotonic()
    deadline = t0 + total_timeout
    view = memoryview(body) if body is not None else memoryview(b"")
    hdrs = {"Host": f"{HOST}:{port}", "Content-Length": str(len(view))}
    hdrs.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    buf = bytearray()
    sock = None
    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
        sock.settimeout(timeout)
        sock.sendall(head.encode("latin-1"))
        off, n = 0, len(view)
        early = False
        while off < n:
            if time.monotonic() > deadline:
                raise socket.timeout()
            rd, _, _ = select.select([sock], [], [], 0)
            if rd:
                early = True
                break
            sent = sock.send(view[off: off + chunk])
            off += sent
        r.sent_all = off >= n
        r.t_sent = time.monotonic()
        if early:
            # Answered before the whole body went out.
            pass
        r.status, r.body = _read_http_response(sock, buf, deadline)
    except BaseException as e:  # noqa: BLE001 - every failure is an outcome here
        if isinstance(e, KeyboardInterrupt):
            raise
        # The server may have answered and then reset the connection while we were still
        # sending: whatever arrived is in the socket buffer or already in buf.
        if sock is not None and r.status is None:
            try:
                sock.settimeout(1.0)
                r.status, r.body = _read_http_response(sock, buf, time.monotonic() + 2.0)
            except BaseException:  # noqa: BLE001
                r.error = _classify_exc(e)
        else:
            r.error = _classify_exc(e)
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
    r.elapsed = time.monotonic() - t0
    return r


class KeepAlive:
    """A keep-alive HTTP/1.1 connection (http.client) that reconnects after errors and
    counts the reconnects."""

    def __init__(self, port: int, timeout: float = 60.0):
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.connects = 0

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                on_sent=None) -> HttpResult:
        r = HttpResult()
        t0 = time.monotonic()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
                self.conn.connect()
                self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connects += 1
            self.conn.request(method, path, body=body, headers=headers or {})
            r.sent_all = True
            r.t_sent = time.monotonic()
            if on_sent:
                on_sent(r.t_sent)
            resp = self.conn.getresponse()
            r.body = resp.read()
            r.status = resp.status
            if resp.will_close:
                self.close()
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            r.error = _classify_exc(e)
            if not r.sent_all and self.conn is not None and self.conn.sock is not None \
                    and isinstance(e, (BrokenPipeError, ConnectionResetError)):
                # The server may have answered (and closed) before reading the whole
                # request: that answer is still in the socket buffer.
                try:
                    self.conn.sock.settimeout(2.0)
                    resp = http.client.HTTPResponse(self.conn.sock, method=method)
                    resp.begin()
                    r.body = resp.read()
                    r.status = resp.status
                    r.error = None
                    r.early = True
                except BaseException:  # noqa: BLE001
                    pass
            self.close()
        r.elapsed = time.monotonic() - t0
        return r

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn = None


# --------------------------------------------------------------------------------------------
# A minimal HTTP/2 client for one gRPC unary call whose message is sent from shared buffers
# (grpcio copies every message it sends, which 64 concurrent 250 MB calls cannot afford).

# RFC 7541 Appendix B: the code length in bits of symbols 0..256 (256 = EOS). The codes are
# canonical (assigned in order of length, then symbol), so the lengths define the table.
_HUFFMAN_LENGTHS = (
    "13,23,28,28,28,28,28,28,28,24,30,28,28,30,28,28,28,28,28,28,28,28,30,28,28,28,28,28,28,28,28,28,"
    "6,10,10,12,13,6,8,11,10,10,8,11,8,6,6,6,5,5,5,6,6,6,6,6,6,6,7,8,15,6,12,10,"
    "13,6,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,8,7,8,13,19,13,14,6,"
    "15,5,6,5,6,5,6,6,6,5,7,7,6,6,6,5,6,7,6,5,5,6,7,7,7,7,7,15,11,14,13,28,"
    "20,22,20,20,22,22,22,23,22,23,23,23,23,23,24,23,24,24,22,23,24,23,23,23,23,21,22,23,22,23,23,24,"
    "22,21,20,22,22,23,23,21,23,22,22,24,21,22,23,23,21,21,22,21,23,22,23,23,20,22,22,22,23,22,22,23,"
    "26,26,20,19,22,23,22,25,26,26,26,27,27,26,24,25,19,21,26,27,27,26,27,24,21,21,26,26,28,27,27,27,"
    "20,24,20,21,22,21,21,23,22,22,25,25,24,24,26,23,26,27,26,26,27,27,27,27,27,28,27,27,27,27,27,26,"
    "30"
)


def _huffman_decode_table() -> dict[tuple[int, int], int]:
    lengths = [int(x) for x in _HUFFMAN_LENGTHS.split(",")]
    assert len(lengths) == 257
    table, code, prev_len = {}, 0, 0
    for length, sym in sorted((length, sym) for sym, length in enumerate(lengths)):
        code <<= length - prev_len
        prev_len = length
        table[(length, code)] = sym
        code += 1
    # Self-check against two codes of the RFC: EOS is 30 ones, '0' is 00000, 'a' is 00011.
    assert table[(30, 0x3FFFFFFF)] == 256 and table[(5, 0)] == 48 and table[(5, 3)] == 97
    return table


_HUFF = None


def huffman_decode(data: bytes) -> bytes:
    global _HUFF
    if _HUFF is None:
        _HUFF = _huffman_decode_table()
    out = bytearray()
    code = length = 0
    for byte in data:
        for bit in range(7, -1, -1):
            code = (code << 1) | ((byte >> bit) & 1)
            length += 1
            sym = _HUFF.get((length, code))
            if sym is not None:
                if sym == 256:
                    raise ValueError("EOS in a Huffman string")
                out.append(sym)
                code = length = 0
            elif length > 30:
                raise ValueError("bad Huffman code")
    return bytes(out)  # what is left is padding (at most 7 ones)


_STATIC_TABLE = [None] + [tuple(x.split(" ", 1)) if " " in x else (x, "") for x in [
    ":authority", ":method GET", ":method POST", ":path /", ":path /index.html", ":scheme http",
    ":scheme https", ":status 200", ":status 204", ":status 206", ":status 304", ":status 400",
    ":status 404", ":status 500", "accept-charset", "accept-encoding gzip, deflate", "accept-language",
    "accept-ranges", "accept", "access-control-allow-origin", "age", "allow", "authorization",
    "cache-control", "content-disposition", "content-encoding", "content-language", "content-length",
    "content-location", "content-range", "content-type", "cookie", "date", "etag", "expect", "expires",
    "from", "host", "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
    "last-modified", "link", "location", "max-forwards", "proxy-authenticate", "proxy-authorization",
    "range", "referer", "refresh", "retry-after", "server", "set-cookie", "strict-transport-security",
    "transfer-encoding", "user-agent", "vary", "via", "www-authenticate"]]
assert len(_STATIC_TABLE) == 62


class HpackDecoder:
    def __init__(self):
        self.dynamic: list[tuple[str, str]] = []  # newest first

    def _entry(self, index: int) -> tuple[str, str]:
        if index < len(_STATIC_TABLE):
            return _STATIC_TABLE[index]
        return self.dynamic[index - len(_STATIC_TABLE)]

    @staticmethod
    def _int(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
        mask = (1 << prefix) - 1
        value = data[pos] & mask
        pos += 1
        if value < mask:
            return value, pos
        shift = 0
        while True:
            b = data[pos]
            pos += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, pos

    def _str(self, data: bytes, pos: int) -> tuple[str, int]:
        huff = data[pos] & 0x80
        n, pos = self._int(data, pos, 7)
        raw = data[pos: pos + n]
        return (huffman_decode(raw) if huff else raw).decode("latin-1"), pos + n

    def decode(self, data: bytes) -> list[tuple[str, str]]:
        out, pos = [], 0
        while pos < len(data):
            b = data[pos]
            if b & 0x80:  # indexed
                idx, pos = self._int(data, pos, 7)
                out.append(self._entry(idx))
            elif b & 0xE0 == 0x20:  # dynamic table size update
                _, pos = self._int(data, pos, 5)
            else:
                incremental = b & 0xC0 == 0x40
                idx, pos = self._int(data, pos, 6 if incremental else 4)
                if idx:
                    name = self._entry(idx)[0]
                else:
                    name, pos = self._str(data, pos)
                value, pos = self._str(data, pos)
                out.append((name, value))
                if incremental:
                    self.dynamic.insert(0, (name, value))
        return out


def _hpack_literal(name: str, value: str) -> bytes:
    def s(x: str) -> bytes:
        raw = x.encode("latin-1")
        assert len(raw) < 127
        return bytes([len(raw)]) + raw
    return b"\x00" + s(name) + s(value)  # literal without indexing, new name, no Huffman


_H2_DATA, _H2_HEADERS, _H2_RST, _H2_SETTINGS, _H2_PING, _H2_GOAWAY, _H2_WINDOW, _H2_CONT = 0, 1, 3, 4, 6, 7, 8, 9
_H2_ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
              4: "SETTINGS_TIMEOUT", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM",
              8: "CANCEL", 9: "COMPRESSION_ERROR", 10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM",
              12: "INADEQUATE_SECURITY", 13: "HTTP_1_1_REQUIRED"}
GRPC_CODES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
              5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
              9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
              13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


class GrpcRawResult:
    def __init__(self):
        self.code: str | None = None      # gRPC status name
        self.message = ""
        self.http_status: str | None = None
        self.error: str | None = None     # transport-level outcome when there is no status
        self.sent = 0
        self.elapsed = 0.0
        self.answered_s: float | None = None  # when the grpc-status arrived
        self.frames: list = []                # (t, type, flags, stream, length) received, the first 64

    def outcome(self) -> str:
        return self.code or self.error or "no answer"


def grpc_unary_raw(port: int, method_path: str, message_parts: list, timeout: float = 60.0,
                   total_timeout: float = 300.0) -> GrpcRawResult:
    """One gRPC unary call over a fresh HTTP/2 connection (prior knowledge, h2c). The
    message is the concatenation of `message_parts` (bytes/memoryviews, never copied); it is
    sent as DATA frames within the flow-control windows the server grants. Returns the
    grpc-status, or the transport outcome (RST_STREAM code, GOAWAY, reset, timeout)."""
    r = GrpcRawResult()
    t0 = time.monotonic()
    deadline = t0 + total_timeout
    views = [memoryview(p).cast("B") for p in message_parts]
    total = sum(len(v) for v in views)
    payload = [memoryview(b"\x00" + struct.pack(">I", total))] + views
    sock = None
    hpack = HpackDecoder()
    state = {"max_frame": 16384, "stream_window": 65535, "conn_window": 65535, "initial": 65535,
             "headers": [], "block": bytearray(), "ended": False}
    rbuf = bytearray()

    def frame(ftype: int, flags: int, stream: int, payload_bytes: bytes = b"") -> bytes:
        return struct.pack(">I", len(payload_bytes))[1:] + bytes([ftype, flags]) + \
            struct.pack(">I", stream) + payload_bytes

    def handle(ftype, flags, stream, body):
        if len(r.frames) < 64:
            r.frames.append((round(time.monotonic() - t0, 3), ftype, flags, stream, len(body)))
        if ftype == _H2_SETTINGS and not flags & 1:
            for i in range(0, len(body), 6):
                ident, value = struct.unpack(">HI", body[i: i + 6])
                if ident == 4:  # INITIAL_WINDOW_SIZE
                    state["stream_window"] += value - state["initial"]
                    state["initial"] = value
                elif ident == 5:
                    state["max_frame"] = value
            sock.sendall(frame(_H2_SETTINGS, 1, 0))
        elif ftype == _H2_WINDOW:
            inc = struct.unpack(">I", body[:4])[0] & 0x7FFFFFFF
            if stream == 0:
                state["conn_window"] += inc
            elif stream == 1:
                state["stream_window"] += inc
        elif ftype == _H2_PING and not flags & 1:
            sock.sendall(frame(_H2_PING, 1, 0, body))
        elif ftype in (_H2_HEADERS, _H2_CONT) and stream == 1:
            b = body
            if ftype == _H2_HEADERS:
                pad = 0
                if flags & 0x8:
                    pad = b[0]
                    b = b[1:]
                if flags & 0x20:
                    b = b[5:]
                if pad:
                    b = b[:-pad]
            state["block"] += b
            if flags & 0x4:  # END_HEADERS
                state["headers"] += hpack.decode(bytes(state["block"]))
                state["block"] = bytearray()
                if any(k == "grpc-status" for k, _ in state["headers"]) and r.answered_s is None:
                    r.answered_s = time.monotonic() - t0
            if flags & 0x1:
                state["ended"] = True
        elif ftype == _H2_DATA and stream == 1:
            if body:  # give the window back so a response of any size can come in
                sock.sendall(frame(_H2_WINDOW, 0, 0, struct.pack(">I", len(body))))
            if flags & 0x1:
                state["ended"] = True
        elif ftype == _H2_RST and stream == 1:
            code = struct.unpack(">I", body[:4])[0]
            r.error = f"RST_STREAM {_H2_ERRORS.get(code, code)}"
            state["ended"] = True
        elif ftype == _H2_GOAWAY:
            code = struct.unpack(">I", body[4:8])[0]
            last = struct.unpack(">I", body[:4])[0] & 0x7FFFFFFF
            if last < 1 or code != 0:
                r.error = f"GOAWAY {_H2_ERRORS.get(code, code)}"
            if last < 1:
                state["ended"] = True

    def pump(block: bool):
        """Reads and handles whatever frames are available (waits for one when block)."""
        while True:
            rd, _, _ = select.select([sock], [], [], min(timeout, max(0.0, deadline - time.monotonic())) if block else 0)
            if not rd:
                if block:
                    raise socket.timeout()
                return
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError("closed")
            rbuf.extend(chunk)
            while len(rbuf) >= 9:
                length = int.from_bytes(rbuf[:3], "big")
                if len(rbuf) < 9 + length:
                    break
                ftype, flags = rbuf[3], rbuf[4]
                stream = struct.unpack(">I", rbuf[5:9])[0] & 0x7FFFFFFF
                body = bytes(rbuf[9: 9 + length])
                del rbuf[: 9 + length]
                handle(ftype, flags, stream, body)
            return

    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Preface; our receive windows as large as allowed.
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                     + frame(_H2_SETTINGS, 0, 0, struct.pack(">HI", 4, (1 << 31) - 1) + struct.pack(">HI", 2, 0))
                     + frame(_H2_WINDOW, 0, 0, struct.pack(">I", (1 << 31) - 1 - 65535)))
        hdr = b"".join([
            _hpack_literal(":method", "POST"), _hpack_literal(":scheme", "http"),
            _hpack_literal(":path", method_path), _hpack_literal(":authority", f"{HOST}:{port}"),
            _hpack_literal("content-type", "application/grpc"), _hpack_literal("te", "trailers"),
            _hpack_literal("grpc-timeout", f"{int(total_timeout)}S")])
        sock.sendall(frame(_H2_HEADERS, 0x4, 1, hdr))
        pi, po = 0, 0  # part index, offset in the part
        remaining = total + 5
        while remaining > 0 and not state["ended"]:
            if time.monotonic() > deadline:
                raise socket.timeout()
            pump(block=False)
            if state["ended"]:
                break
            window = min(state["stream_window"], state["conn_window"])
            if window <= 0:
                pump(block=True)
                continue
            # Up to 1 MiB (or the window) per sendmsg, in frames of max_frame bytes.
            budget = min(window, 1 << 20, remaining)
            iov: list = []
            while budget > 0:
                n = min(budget, state["max_frame"])
                pieces, got = [], 0
                while got < n:
                    part = payload[pi]
                    take = min(n - got, len(part) - po)
                    pieces.append(part[po: po + take])
                    got += take
                    po += take
                    if po == len(part):
                        pi, po = pi + 1, 0
                remaining -= n
                budget -= n
                iov.append(struct.pack(">I", n)[1:] + bytes([_H2_DATA, 0x1 if remaining == 0 else 0])
                           + struct.pack(">I", 1))
                iov.extend(pieces)
                state["stream_window"] -= n
                state["conn_window"] -= n
                r.sent += n
            view_list = iov
            while view_list and not state["ended"]:
                # Never block in a send: an answer (or a reset) may come while the server
                # is not reading, and a client would stop sending then.
                rd, wr, _ = select.select([sock], [sock], [], min(timeout, max(0.0, deadline - time.monotonic())))
                if not rd and not wr:
                    raise socket.timeout()
                if rd:
                    pump(block=False)
                    continue
                try:
                    sent = sock.sendmsg(view_list[:1000], [], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                # Drop what went out.
                while sent > 0 and view_list:
                    first = view_list[0]
                    if sent >= len(first):
                        sent -= len(first)
                        view_list = view_list[1:]
                    else:
                        view_list = [memoryview(first)[sent:]] + view_list[1:]
                        sent = 0
        while not state["ended"]:
            if time.monotonic() > deadline:
                raise socket.timeout()
            pump(block=True)
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        if r.error is None:
            r.error = _classify_exc(e)
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
    headers = dict(state["headers"])
    r.http_status = headers.get(":status")
    if "grpc-status" in headers:
        code = int(headers["grpc-status"])
        r.code = GRPC_CODES.get(code, str(code))
        r.message = headers.get("grpc-message", "")
        r.error = None
    elif r.error is None and r.http_status and r.http_status != "200":
        r.error = f"HTTP {r.http_status}"
    r.elapsed = time.monotonic() - t0
    return r


# --------------------------------------------------------------------------------------------
# Figures and output


def percentile(values, p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of `values`; None when empty."""
    v = sorted(values)
    if not v:
        return None
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
    return v[k]


def median(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.2f}"


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    rows = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = []
    if title:
        out.append(title)
    out.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def write_json(path: str | None, data: dict):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"JSON summary written to {path}")


def check_binary(path: str) -> None:
    if not Path(path).exists():
        sys.exit(f"{path} does not exist: build it first (cargo build --release, or make build)")


def machine_load() -> str:
    """The 1-minute load average against the cores: other work on the machine skews every
    latency and throughput figure, so the scripts print this at the start and the end."""
    try:
        one = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return "load average unknown"
    cores = os.cpu_count() or 1
    warn = "  (!! the machine is busy with other work: latency figures are skewed)" if one > 0.5 * cores else ""
    return f"load average (1 min) {one:.2f} on {cores} cores{warn}"


def fmt_counts(counter: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "-"


def add_server_args(ap) -> None:
    """The arguments every benchmark takes: the binary, extra `sluice serve` flags, a JSON
    summary path."""
    ap.add_argument("--binary", default=str(DEFAULT_BINARY), help="sluice binary (default: %(default)s)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for `sluice serve` (repeatable; use --server-arg=--flag=value)")
    ap.add_argument("--json", help="write a JSON summary here")
