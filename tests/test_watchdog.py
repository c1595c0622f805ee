"""A stopped (SIGSTOP, not dead) peer ends the surviving rank within seconds, with a message naming
it, instead of a hang until the collective timeout."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = """
import os, signal, sys, torch, torch.distributed as dist
from ppd_engine.training.distributed import init_distributed
env = init_distributed("cpu", "gloo", timeout_s=600, heartbeat_s=3)
t = torch.ones(1)
dist.all_reduce(t)
print("joined", flush=True)
if env.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
dist.all_reduce(t)  # rank 0 waits here for the stopped rank 1
print("not reached", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stopped_peer_ends_the_survivor_quickly():
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    try:
        out, err = procs[0].communicate(timeout=45)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
    assert "joined" in out and "not reached" not in out
    assert procs[0].returncode == 4, err[-2000:]
    assert "rank 1" in err and "heartbeat" in err and "Traceback" not in err
    assert elapsed < 40
