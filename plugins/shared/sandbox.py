"""Run generated code against its tests in a separate, limited Python process.

``run_tests(code, tests)`` writes the code as ``solution.py`` and the tests as
``test_solution.py`` in a fresh temporary folder and runs them in ``python -I`` (isolated: no
user site, no ``PYTHON*`` variables, no current folder on the path) with an empty environment,
under ``resource`` limits set in the child before it starts: address space (``memory_mb``), CPU
seconds, open files, no core files; and a wall-clock ``timeout_s`` after which the whole
process group is killed. The tests are plain ``def test_*()`` functions with ``assert`` (pytest
style, without pytest) or ``unittest.TestCase`` classes; each counts as one test. The tests'
module is executed with ``from solution import *`` already done, so tests may use the
solution's names directly or import them.

An audit hook (``sys.addaudithook``, which Python code cannot remove) installed before the
solution is imported refuses network access (``socket.*``), new processes (``fork``, ``subprocess``,
``os.system``, ``exec*``, ``posix_spawn``: no fork bomb), ``ctypes`` and signals, and any write,
removal or rename outside the sandbox folder; the refusal is a ``PermissionError`` the test run
reports as a failure.

This is a guard against mistakes and against sampled code that misbehaves (an infinite loop, a
memory bomb, a fork bomb, a stray write, a crash), not a security boundary against a determined
attacker: the child can still read files the user can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TestRun", "run_tests"]

#: the harness run in the child: imports the solution, runs every test, prints one JSON line
_HARNESS = r'''
import io, json, os, sys, traceback, unittest, contextlib
sys.path.insert(0, os.getcwd())  # -I leaves the script's folder off the path
_HOME = os.path.realpath(os.getcwd())
_REFUSED = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
            "os.kill", "os.killpg", "pty.", "ctypes.", "os.setrlimit", "resource.setrlimit", "urllib.", "http.")

def _inside(path):
    try:
        path = os.fsdecode(path) if not isinstance(path, int) else None
    except Exception:
        return False
    return path is None or os.path.realpath(os.path.join(_HOME, path)).startswith(_HOME + os.sep)

def _guard(event, args):
    # refuse what generated code has no business doing: network, processes, writes outside its folder
    if event.startswith(_REFUSED) and not event.startswith("socket.gethostname"):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open" and args and len(args) > 1:
        mode, flags = args[1], (args[2] if len(args) > 2 else 0)
        writes = isinstance(mode, str) and any(c in mode for c in "wax+")
        writes = writes or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes and not _inside(args[0]):
            raise PermissionError("sandbox: writing " + str(args[0]) + " outside the sandbox folder is not allowed")
    elif event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                   "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"):
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if not all(_inside(p) for p in paths):
            raise PermissionError("sandbox: " + event + " outside the sandbox folder is not allowed")

sys.addaudithook(_guard)
out = io.StringIO()
result = {"passed": 0, "failed": 0, "errors": [], "compiles": True}
namespace = {"__name__": "test_solution"}
try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        import solution
        namespace.update({k: v for k, v in vars(solution).items() if not k.startswith("__")})
except BaseException as exc:
    result["compiles"] = not isinstance(exc, SyntaxError)
    result["failed"] = 1
    result["errors"].append("solution: " + "".join(traceback.format_exception_only(type(exc), exc)).strip())
else:
    try:
        source = open("test_solution.py").read()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            exec(compile(source, "test_solution.py", "exec"), namespace)
    except BaseException as exc:
        result["errors"].append("tests: " + "".join(traceback.format_exception_only(type(exc), exc)).strip())
        result["failed"] += 1
    else:
        for name, obj in list(namespace.items()):
            if name.startswith("test") and callable(obj) and not isinstance(obj, type):
                try:
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                        obj()
                    result["passed"] += 1
                except BaseException as exc:
                    result["failed"] += 1
                    result["errors"].append(name + ": " + (repr(exc) or type(exc).__name__)[:300])
            elif isinstance(obj, type) and issubclass(obj, unittest.TestCase) and obj is not unittest.TestCase:
                suite = unittest.defaultTestLoader.loadTestsFromTestCase(obj)
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    res = unittest.TextTestRunner(stream=out, verbosity=0).run(suite)
                bad = len(res.failures) + len(res.errors)
                result["failed"] += bad
                result["passed"] += res.testsRun - bad
                for case, text in res.failures + res.errors:
                    result["errors"].append(str(case) + ": " + text.strip().splitlines()[-1][:300])
sys.__stdout__.write("\n@@RESULT@@" + json.dumps(result) + "\n")
'''


@dataclass(frozen=True)
class TestRun:
    """What happened when the tests ran against the code."""

    __test__ = False  # not a pytest test class

    passed: int
    failed: int
    compiles: bool
    timed_out: bool = False
    errors: tuple[str, ...] = ()
    output: str = ""

    @property
    def total(self) -> int:
        return self.passed + self.failed

    @property
    def all_passed(self) -> bool:
        return self.compiles and not self.timed_out and self.failed == 0 and self.passed > 0


def _limits(memory_mb: int, cpu_s: int) -> None:
    """Runs in the child before ``exec``: its own process group and hard resource limits."""
    os.setsid()
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))


def run_tests(code: str, tests: str, timeout_s: float = 10.0, memory_mb: int = 512) -> TestRun:
    """Run ``tests`` against ``code`` in a limited subprocess; never raises for what the code does."""
    if timeout_s <= 0 or memory_mb < 32:
        raise ValueError("timeout_s must be > 0 and memory_mb at least 32")
    with tempfile.TemporaryDirectory(prefix="flywheel-sandbox-") as folder:
        Path(folder, "solution.py").write_text(code)
        Path(folder, "test_solution.py").write_text(tests)
        Path(folder, "harness.py").write_text(_HARNESS)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "harness.py"] if _stdlib_only() else [sys.executable, "-I", "harness.py"],
            cwd=folder,
            env={"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _limits(memory_mb, max(1, int(timeout_s) + 1)),
        )
        try:
            raw, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raw, _ = proc.communicate()
            return TestRun(0, 1, True, timed_out=True, errors=(f"timed out after {timeout_s:g}s",),
                           output=raw.decode(errors="replace")[-4000:])
    text = raw.decode(errors="replace")
    head, marker, tail = text.rpartition("\n@@RESULT@@")
    if not marker:  # killed by a limit (memory, CPU) or the interpreter itself failed
        reason = "killed by a resource limit" if proc.returncode and proc.returncode < 0 else "no result"
        return TestRun(0, 1, True, errors=(f"{reason} (exit {proc.returncode})",), output=text[-4000:])
    result = json.loads(tail.strip().splitlines()[0])
    return TestRun(
        passed=int(result["passed"]),
        failed=int(result["failed"]),
        compiles=bool(result["compiles"]),
        errors=tuple(result["errors"][:20]),
        output=head[-4000:],
    )


def _stdlib_only() -> bool:
    """Generated code gets the standard library only (``-S``: no site-packages) unless the
    ``FLYWHEEL_SANDBOX_SITE`` variable asks for the interpreter's packages."""
    return os.environ.get("FLYWHEEL_SANDBOX_SITE", "") != "1"
