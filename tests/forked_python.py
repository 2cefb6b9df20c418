"""``python -m <module> ...`` / ``python <script> ...`` for the tests, without paying Python's start-up each time.

A command-line test would start a fresh interpreter and spend 6-8 s of its 2 cores importing torch and MONAI
before the command does anything. Here each command runs in a process forked from a *fork server* that imported
the heavy third-party packages once (and never computed anything, so forking it is safe); the child sets
``sys.argv``, the working folder, the environment and file-level stdout/stderr exactly as a fresh interpreter would
see them, runs the module or script as ``__main__``, and exits with its exit status. The bundle's own ``scripts``
package is not preloaded: each command imports it from its working folder, as a fresh process does.

:func:`run_python` returns a ``subprocess.CompletedProcess``; tests read ``returncode``, ``stdout`` and ``stderr``
as from ``subprocess.run``. ``FORKED_PYTHON=0`` in the environment falls back to real subprocesses.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["run_python", "start_python"]

#: imported once by the fork server: what every bundle command needs and takes seconds to import
PRELOAD = ["numpy", "torch", "ignite.engine", "monai", "monai.bundle", "monai.engines", "monai.networks.nets",
           "monai.transforms", "monai.inferers", "nibabel", "fire", "tqdm"]
_context = None


def _fork_server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(args: Sequence[str], cwd: str, env: Mapping[str, str], out: str, err: str) -> None:
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # the process's own stdout
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path[0:0] = [cwd]
    sys.orig_argv = [sys.executable, *args]
    code = 0
    try:
        if args[0] == "-m":
            sys.argv = ["-m", *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # as the interpreter does: the excepthook prints it (scripts installs a one-line summary)
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        atexit._run_exitfuncs()
    except Exception:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_python(args: Sequence[str], cwd: str | Path, env: Mapping[str, str], out: str | Path,
                 err: str | Path) -> multiprocessing.process.BaseProcess:
    """Start ``python *args`` in ``cwd`` forked from the server, its stdout and stderr written to the files ``out``
    and ``err``; returns the running process (``kill()`` sends it SIGKILL)."""
    process = _fork_server().Process(target=_child, args=(list(args), str(cwd), dict(env), str(out), str(err)))
    process.start()
    return process


def run_python(args: Sequence[str], cwd: str | Path, timeout: float = 600,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python *args`` in ``cwd`` (``args`` start with ``-m <module>`` or a script path), captured."""
    env = dict(os.environ if env is None else env)
    if env.get("FORKED_PYTHON", "1") == "0":
        return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
    with tempfile.TemporaryDirectory() as folder:
        out, err = str(Path(folder) / "stdout"), str(Path(folder) / "stderr")
        process = start_python(args, cwd, env, out, err)
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
        stdout, stderr = (Path(p).read_text(errors="replace") if Path(p).exists() else "" for p in (out, err))
    return subprocess.CompletedProcess([sys.executable, *args], process.exitcode, stdout, stderr)
