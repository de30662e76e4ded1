"""Run untrusted generated code (a HumanEval solution and its tests) in a limited child process.

Limits: a wall-clock timeout (the whole process group is killed), an address-space and CPU-time limit
set in the child (`resource.setrlimit`), an isolated interpreter (`python -I`: no user site, no
PYTHON* variables) in an empty temporary directory with a minimal environment, and no network: a
prelude replaces the socket constructors before the program runs. This stops accidents of generated
code (loops, huge allocations, stray downloads), not a determined attacker: for that, run the eval
inside a container without a network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

NO_NETWORK_PRELUDE = """
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the adapt eval sandbox")
for _name in ("socket", "create_connection", "create_server", "getaddrinfo", "socketpair", "fromfd"):
    setattr(_socket, _name, _no_network)
del _socket, _name
import sys as _sys
_source = _sys.stdin.read()
del _sys
exec(compile(_source, "<program>", "exec"), {"__name__": "__main__"})
"""


@dataclass
class Outcome:
    status: str  # "passed", "failed" (non-zero exit) or "timeout"
    output: str  # the tail of stderr (or stdout), for diagnosis

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 2048) -> Outcome:
    """Run `source` as a Python program under the limits above; passed means exit code 0."""

    def limit_child():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))

    with tempfile.TemporaryDirectory(prefix="adapt-sandbox-") as workdir:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", NO_NETWORK_PRELUDE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=workdir, env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            preexec_fn=limit_child, start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(source, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the child leads its own session: no grandchild survives
            process.communicate()
            return Outcome("timeout", f"killed after {timeout} s")
    if process.returncode == 0:
        return Outcome("passed", "")
    return Outcome("failed", (stderr or stdout)[-2000:])
