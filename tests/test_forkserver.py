"""The local fork server (LAYERSCOPE_FORKSERVER): a command run through it behaves like the same
command run in its own process - same files, same exit code, output in the caller's redirections -
and anything wrong with the server falls back to running in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "import sys; from layerscope.cli import main; sys.exit(main())"]


def _run(args: list[str], env: dict, cwd: Path, tag: str) -> tuple[int, str, str]:
    out, err = cwd / f"{tag}.out", cwd / f"{tag}.err"
    with open(out, "w") as o, open(err, "w") as e:
        rc = subprocess.run(CLI + args, env=env, cwd=cwd, stdout=o, stderr=e, timeout=300).returncode
    return rc, out.read_text(), err.read_text()


@pytest.fixture
def fs_env(tmp_path):
    sock = tmp_path / "fs.sock"
    env = dict(os.environ, LAYERSCOPE_FORKSERVER=str(sock), LAYERSCOPE_FORKSERVER_IDLE="15",
               LAYERSCOPE_FORKSERVER_PRELOAD="0", OMP_NUM_THREADS="1")
    yield env, sock
    # the server exits on its own when idle; nothing to kill


REPO = Path(__file__).resolve().parents[1]


def test_forked_command_equals_in_process_command(tmp_path, fs_env):
    env, sock = fs_env
    plain = {k: v for k, v in env.items() if not k.startswith("LAYERSCOPE_FORKSERVER")}
    cfg = str(REPO / "config.yaml")
    rc_fs, out_fs, err = _run(["check-config", cfg], env, tmp_path, "a")
    assert rc_fs == 0, err
    assert sock.exists()  # it really went through a server (which listens until idle)
    rc_pl, out_pl, err = _run(["check-config", cfg], plain, tmp_path, "b")
    assert rc_pl == 0, err
    assert "sdxl_ablation" in out_fs and out_fs == out_pl
    # a user-facing error: same exit code and one line on the caller's stderr, through the server
    rc_fs, out_fs, err_fs = _run(["check-config", "missing.yaml"], env, tmp_path, "c")
    rc_pl, out_pl, err_pl = _run(["check-config", "missing.yaml"], plain, tmp_path, "d")
    assert rc_fs == rc_pl != 0
    assert err_fs.strip().splitlines()[-1] == err_pl.strip().splitlines()[-1]
    assert "missing.yaml" in err_fs and out_fs == out_pl


def test_unusable_server_falls_back_to_in_process(tmp_path, fs_env):
    env, _ = fs_env
    bad = tmp_path / "not-a-dir"
    bad.write_text("x")
    env = dict(env, LAYERSCOPE_FORKSERVER=str(bad / "fs.sock"))  # cannot exist: the lock file fails
    rc, out, err = _run(["check-config", str(REPO / "config.yaml")], env, tmp_path, "m")
    assert rc == 0, err
    assert "sdxl_ablation" in out


def test_killed_client_terminates_its_forked_child(tmp_path, fs_env):
    """SIGKILL to the client (Snakemake giving up on a job): the server terminates the child."""
    import signal
    import time

    env, sock = fs_env
    # start the server first (a client that cannot reach a server in time runs in-process instead,
    # which on a loaded machine would leave no forked child to look for)
    rc, _, err = _run(["check-config", str(REPO / "config.yaml")], env, tmp_path, "warm")
    assert rc == 0 and sock.exists(), err
    # a command that blocks: check-config reading a FIFO nobody writes to
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    p = subprocess.Popen(CLI + ["check-config", str(fifo)], env=env, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    child = None
    while time.monotonic() < deadline and child is None:  # the forked child: a process holding the FIFO open
        out = subprocess.run(["pgrep", "-f", f"layerscope.forkserver {sock}"], capture_output=True, text=True).stdout.split()
        kids = [c for srv in out for c in subprocess.run(["pgrep", "-P", srv], capture_output=True, text=True).stdout.split()]
        child = kids[0] if kids and sock.exists() else None
        time.sleep(0.2)
    assert child is not None
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}/stat").exists() else "X"
        if state == "Z":
            break
        time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
