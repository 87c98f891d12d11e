"""A warm Python for tests/helpers.py's run_forked and start_forked: it imports what every root
script imports first (torch, numpy, hydra, omegaconf, and the torchmetrics and torch._dynamo that
`import lightning` pulls in: 3 s of the 4.6 s a tiny training run takes on a 2-core machine), then, for
each command line it is sent, forks a child that runs the script as `python script.py args` would,
in a process of its own: its own working directory, environment (with a sitecustomize.py on the
request's PYTHONPATH imported first, as Python's start does), stdout and stderr files, signals,
exit code and interpreter shutdown.

Lightning and gpt are not imported here: the order of their imports is the script's own (console.py
depends on it). Not for what needs a fresh interpreter: import-time environment variables and
warnings, or a check of what a command imports.

Protocol, one JSON object a line: a request {"args", "cwd", "env", "stdout", "stderr"} on stdin;
the answers {"pid": child} at once, then {"rc": exit code, or -signal as subprocess reports it}.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import signal
import sys
import threading
import types

import hydra  # noqa: F401
import numpy  # noqa: F401
import omegaconf  # noqa: F401
import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import torchmetrics  # noqa: F401

SERVER_PATH = list(sys.path)


def start_site(env: dict[str, str]) -> None:
    """What Python's start does with the PYTHONPATH of `env` that this server was not started with:
    its folders go first on sys.path (after the script's), and a sitecustomize.py in one of them is
    imported before the script runs (tests/commands/fault_injection does its work there)."""
    new = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    new = [p for p in new if p not in SERVER_PATH]
    sys.path[1:1] = new
    if any(os.path.isfile(os.path.join(p, "sitecustomize.py")) for p in new):
        sys.modules.pop("sitecustomize", None)
        importlib.import_module("sitecustomize")


def run(request: dict) -> None:
    """In the child: become `python *args` and run it; an exception or SystemExit ends the child as it
    ends a Python process (traceback, exit code, atexit handlers, non-daemon threads joined)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    start_site(request["env"])
    args = request["args"]
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path[0] = ""  # python -c puts the working directory first
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(args[1], "<string>", "exec"), main.__dict__)
    elif args[0] == "-m":
        sys.argv = [args[1], *args[2:]]  # runpy puts the module's path in argv[0]
        sys.path[0] = os.getcwd()  # as python -m does
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as python script.py does
        runpy.run_path(args[0], run_name="__main__")


def answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def exit_code(error: BaseException | None) -> int:
    """What the interpreter does with how the script ended: its exit code, a traceback printed."""
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        if error.code is None or isinstance(error.code, int):
            return error.code or 0
        print(error.code, file=sys.stderr)
        return 1
    sys.excepthook(type(error), error, error.__traceback__)
    return 1


def finish(code: int) -> None:
    """Py_FinalizeEx's steps a script can see (non-daemon threads joined, atexit handlers, stdio
    flushed), then exit without tearing down the modules: that takes a second of every child."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


for line in sys.stdin:
    request = json.loads(line)
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            run(request)
            error = None
        except BaseException as e:  # noqa: BLE001  ended as a Python process ends on it
            error = e
        if isinstance(error, KeyboardInterrupt):  # as Python does: killed by SIGINT
            sys.excepthook(type(error), error, error.__traceback__)
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        finish(exit_code(error))
    answer({"pid": pid})
    _, status = os.waitpid(pid, 0)
    answer({"rc": -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)})
