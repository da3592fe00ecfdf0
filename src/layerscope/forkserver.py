"""A local fork server: CLI calls skip the 3.5-6 s import of torch + diffusers + transformers.

Every Snakemake job is a fresh ``layerscope`` process, and on a small machine the imports cost
more than the tiny default study's work (54 jobs x ~4 s).  With ``LAYERSCOPE_FORKSERVER`` set
(``auto``, or a socket path), ``layerscope <command>`` first tries to hand its arguments, working
directory, environment and its own stdin/stdout/stderr (passed as file descriptors, so the
job's log redirection holds) to a server that has imported the heavy libraries once; the server
forks, the child runs the command with the modules already in memory and the client exits with
the child's exit code.  SIGTERM/SIGINT to the client (Snakemake cancelling a job) is forwarded to
the child, which then cleans up its temporary shard like an ordinary job; a client killed
outright (SIGKILL) hangs up its connection and the server sends its child SIGTERM.

The first client starts the server (detached, one per user, interpreter and package
directory; serialised by a lock file); it exits after ``LAYERSCOPE_FORKSERVER_IDLE`` seconds
(default 120) without work.  ``LAYERSCOPE_FORKSERVER_PRELOAD=0`` skips the preloading (tests).  Whenever anything fails on the way, the client runs the command
in-process as usual: the server is only ever a shortcut.  The server never runs a torch
operation itself (no thread pools exist to break across ``fork``).  Local runs only: the SLURM
profile leaves the variable unset, and a cluster job is one process per shard anyway.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Sequence

# What the jobs of the study import (diffusers and transformers are lazy modules: name the classes).
PRELOAD = (
    "torch", "numpy", "h5py", "pandas", "safetensors.torch", "peft",
    "transformers:DINOv3ViTModel,CLIPModel,CLIPProcessor,CLIPTextModel,CLIPTextModelWithProjection,CLIPTokenizer,"
    "T5EncoderModel,UMT5EncoderModel,T5Tokenizer",
    "diffusers:StableDiffusionXLPipeline,StableDiffusion3Pipeline,SD3Transformer2DModel,UNet2DConditionModel,"
    "AutoencoderKL,WanTransformer3DModel,DiffusionPipeline,EulerDiscreteScheduler,FlowMatchEulerDiscreteScheduler",
    "diffusers.models.attention_processor", "skimage.metrics", "matplotlib.pyplot", "seaborn",
)
_LEN = struct.Struct("!I")


def socket_path() -> Path:
    """``LAYERSCOPE_FORKSERVER`` when it is a path; for ``auto`` one per user/interpreter/package."""
    val = os.environ.get("LAYERSCOPE_FORKSERVER", "")
    if val and val != "auto":
        return Path(val)
    key = hashlib.sha1(f"{sys.executable}\0{Path(__file__).resolve().parent}".encode()).hexdigest()[:12]
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"layerscope-fs-{os.getuid()}-{key}.sock"


def _send_msg(sock: socket.socket, obj: object, fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    payload = _LEN.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("fork server closed the connection")
        buf += chunk
    return buf


def _recv_msg(sock: socket.socket, with_fds: int = 0) -> tuple[object, list[int]]:
    fds: list[int] = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(sock, _LEN.size, with_fds)
        head += _recv_exact(sock, _LEN.size - len(head)) if len(head) < _LEN.size else b""
    else:
        head = _recv_exact(sock, _LEN.size)
    (n,) = _LEN.unpack(head)
    return json.loads(_recv_exact(sock, n)), fds


# ------------------------------------------------------------------ client


def _connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return s
    except OSError:
        s.close()
        return None


def _start_server(path: Path, wait_s: float = 60.0) -> socket.socket | None:
    import fcntl
    import subprocess

    lock = open(str(path) + ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        s = _connect(path)  # another client may have started it while we waited
        if s is not None:
            return s
        if path.exists():
            path.unlink()
        subprocess.Popen([sys.executable, "-m", "layerscope.forkserver", str(path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        t = time.monotonic()
        while time.monotonic() - t < wait_s:
            s = _connect(path)
            if s is not None:
                return s
            time.sleep(0.05)
        return None
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def try_forward(argv: Sequence[str]) -> int | None:
    """Run ``layerscope argv`` in a forked child of the server; its exit code, or None to run here."""
    try:
        path = socket_path()
        s = _connect(path) or _start_server(path)
        if s is None:
            return None
        with s:
            _send_msg(s, {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}, fds=[0, 1, 2])
            reply, _ = _recv_msg(s)
            pid = int(reply["pid"])  # type: ignore[index]

            def forward(signum, frame):  # noqa: ARG001
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, forward)
            reply, _ = _recv_msg(s)
            return int(reply["rc"])  # type: ignore[index]
    except (OSError, ConnectionError, ValueError, KeyError):
        return None


# ------------------------------------------------------------------ server


def _child(msg: dict, fds: list[int]) -> None:
    """In the forked child: become the client's process (fds, cwd, env) and run the CLI."""
    for i, fd in enumerate(fds[:3]):
        os.dup2(fd, i)
        os.close(fd)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    os.chdir(msg["cwd"])
    os.environ.clear()
    os.environ.update(msg["env"])
    os.environ.pop("LAYERSCOPE_FORKSERVER", None)  # never recurse
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    rc = 1
    try:
        from layerscope.cli import main

        rc = main(msg["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - print like the interpreter would, then exit non-zero
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) else 1)


def serve(path: Path, idle_s: float | None = None) -> None:
    """Import the heavy libraries, listen on ``path``, fork one child per request."""
    import importlib
    import select
    import selectors
    import threading

    idle_s = float(os.environ.get("LAYERSCOPE_FORKSERVER_IDLE", "120")) if idle_s is None else idle_s
    import matplotlib

    matplotlib.use("Agg")
    preload = PRELOAD if os.environ.get("LAYERSCOPE_FORKSERVER_PRELOAD", "1") != "0" else ()
    for item in preload:
        mod, _, attrs = item.partition(":")
        try:
            m = importlib.import_module(mod)
            for a in filter(None, attrs.split(",")):
                getattr(m, a, None)
        except Exception:  # noqa: BLE001 - a missing optional library only costs its import later
            pass
    import layerscope.cli  # noqa: F401

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = Path(f"{path}.{os.getpid()}")
    srv.bind(str(tmp))
    os.chmod(tmp, 0o600)
    srv.listen(64)
    os.replace(tmp, path)  # clients connect only once the server listens
    running = [0]
    last = [time.monotonic()]
    lock = threading.Lock()

    def wait(conn: socket.socket, pid: int) -> None:  # waiter thread: reply pid, then the exit code
        with conn:
            try:
                _send_msg(conn, {"pid": pid})
                hung_up = False
                while True:  # a client killed outright (SIGKILL) hangs up: terminate its child
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    if not hung_up and select.select([conn], [], [], 0.2)[0] and not conn.recv(1, socket.MSG_PEEK):
                        hung_up = True
                        try:
                            os.kill(pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
                    elif hung_up:
                        time.sleep(0.2)
                rc = os.waitstatus_to_exitcode(status)
                _send_msg(conn, {"rc": rc if rc >= 0 else 128 - rc})
            except (OSError, ConnectionError):
                pass
            finally:
                with lock:
                    running[0] -= 1
                    last[0] = time.monotonic()

    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    try:
        while True:
            if sel.select(timeout=1.0):
                conn, _ = srv.accept()
                try:
                    conn.settimeout(10)
                    msg, fds = _recv_msg(conn, with_fds=3)
                    conn.settimeout(None)
                except (OSError, ConnectionError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()  # in the main thread: waiter threads hold no locks the child needs
                if pid == 0:
                    srv.close()
                    conn.close()
                    _child(msg, fds)  # never returns
                for fd in fds:
                    os.close(fd)
                with lock:
                    running[0] += 1
                threading.Thread(target=wait, args=(conn, pid), daemon=True).start()
            with lock:
                if running[0] == 0 and time.monotonic() - last[0] > idle_s:
                    break
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        srv.close()

if __name__ == "__main__":
    serve(Path(sys.argv[1]))
