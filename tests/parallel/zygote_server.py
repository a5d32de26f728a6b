"""A pre-warmed process that forks rank processes for the multi-process tests (see zygote.py).

Every rank process of a test would otherwise import torch, DeepSpeed and megatron-core again (about 8 s of CPU each on
this 2-core machine, more than the tiny training run itself). This process imports them once, never runs a tensor
operation (so no OpenMP or intra-op thread pool exists to be broken by fork), and forks one child per request.

Protocol, one JSON object per line. stdin: {"argv": [script, args...] or ["-m", module, args...], "env": {...}, "cwd": str, "log": path}.
stdout: {"ready": true} once, then {"pid": N} per request and {"exited": N, "rc": R} when a child ends.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import sys
import traceback

import deepspeed  # noqa: F401  (the imports being shared; torch comes with them)
import megatron.core.tensor_parallel  # noqa: F401
import torch  # noqa: F401

import ofa_scale.model.ofa  # noqa: F401
import ofa_scale.parallel.context  # noqa: F401


def _run_child(request: dict) -> None:
    """In the forked child: become the requested script and exit with its status (never returns)."""
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = list(request["argv"])
        try:
            if argv[0] == "-m":  # `python -m module args...`: the working directory leads sys.path, as there
                sys.argv = argv[1:]
                sys.path.insert(0, os.getcwd())
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = argv
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child must always report, never fall back into the server loop
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reap(out) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        out.write(json.dumps({"exited": pid, "rc": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


def main() -> None:
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    stdin = sys.stdin.buffer
    pending = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.05)
        if ready:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:  # the test session ended: leave running children to their parent's kill
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _run_child(request)
                out.write(json.dumps({"pid": pid}) + "\n")
                out.flush()
        _reap(out)


if __name__ == "__main__":
    main()
