"""Starting the real server for tests: `dsmd serve` as its own process on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_search(tiny_search: Path, dest: Path) -> tuple[Path, Path]:
    """A private copy of the tiny bundle and index (tests that write must not share one)."""
    shutil.copytree(tiny_search / "bundle", dest / "bundle")
    shutil.copytree(tiny_search / "index", dest / "index")
    return dest / "bundle", dest / "index"


def open_for_writing(fifo: Path) -> int | None:
    """A descriptor writing into the named pipe `fifo` once the server has it open for reading (a
    non-blocking open for writing fails until then), else None. While it stays open the server's read
    blocks; closing it ends the file."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


async def pipe_opened(fifo: Path, timeout: float = 30.0) -> int:
    """Wait, on the event loop (the test's requests go on), until the server has the named pipe `fifo`
    open for reading; returns a descriptor writing into it (write, then close it to end the file)."""
    deadline = time.monotonic() + timeout
    while (fd := open_for_writing(fifo)) is None:
        assert time.monotonic() < deadline, f"the server did not open {fifo.name} within {timeout:g} s"
        await asyncio.sleep(0.02)
    return fd


class Server:
    """`with Server(bundle, index, env) as s:` a running server at s.url; s.pid for /proc."""

    def __init__(self, bundle: Path, index: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "dsmd.cli", "serve", "--bundle", str(bundle), "--index", str(index),
                    "--port", str(self.port), *args]
        self.env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"the server did not start: {self.proc.stdout.read()}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the server process, in bytes, read from /proc."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
        return out

    def reset_peak(self) -> int:
        """Set the server's VmHWM back to its resident size now (Linux clear_refs "5"), so a later
        memory()["VmHWM"] is the peak of what happened in between, not of start-up; returns that size."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self.memory()["VmHWM"]

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0
