"""Plain functions and constants the tests share (fixtures are in conftest.py). Test modules import
from here, never from each other.

Importing this module points the library at what ../shared provides (the corpus, the tiktoken
cache) unless the caller chose otherwise: conftest.py imports it before any test runs.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from filelock import FileLock

from gpt.config import DataConfig, ModelConfig
from gpt.data.sources import SHAKESPEARE_FILE
from gpt.errors import EXIT_USER_ERROR
from gpt.model.encoder_decoder import build_model
from gpt.model.transformer import GPT
from gpt.runs.checkpoint import newest_checkpoint
from gpt.runs.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"

if (SHARED / "data" / SHAKESPEARE_FILE).is_file():
    os.environ.setdefault("GPT_DATA_DIR", str(SHARED / "data"))
if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
os.environ.setdefault("WANDB_MODE", "offline")

SHAKESPEARE = Path(os.environ.get("GPT_DATA_DIR", "data")) / SHAKESPEARE_FILE
# The characters of Tiny Shakespeare: the vocabulary of the tests' character models.
CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# ----------------------------------------------------------------------------- models


def tiny_config(**overrides) -> ModelConfig:
    """The 2-layer, 32-wide model most tests need."""
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50)
    return ModelConfig(**(base | overrides))


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """tiny_config's model (an EncoderDecoder with arch="encoder_decoder"), seeded, in eval mode."""
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides)).eval()


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# ----------------------------------------------------------------------------- data


def write_corpus(path: Path) -> Path:
    """40,000 characters of Tiny Shakespeare at `path`: enough for a few training steps and a
    validation split. Skips the test where the corpus is missing."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found; set GPT_DATA_DIR")
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def write_documents(folder: Path, n: int = 40, seed: int = 0) -> Path:
    """A folder of n short documents (one file each: 50 to 600 characters of Tiny Shakespeare, one
    after another), for data.doc_mask: in a BPE, each starts with an end-of-text token. Skips the
    test where the corpus is missing."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found; set GPT_DATA_DIR")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    sizes = np.random.default_rng(seed).integers(50, 600, n).tolist()
    folder.mkdir(parents=True, exist_ok=True)
    at = 0
    for i, size in enumerate(sizes):
        (folder / f"doc{i:03d}.txt").write_text(text[at : at + size], encoding="utf-8")
        at += size
    return folder


def split_tokens(prepared, split: str) -> np.ndarray:
    """The whole split, read from its shards."""
    parts = [np.fromfile(p, dtype=prepared.meta["dtype"]) for p in prepared.shard_paths(split)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=prepared.meta["dtype"])


def write_rows(path: Path, rows: list, gz: bool = False) -> Path:
    """One JSON object per line (a str row is written as it is); gzip-compressed if `gz`."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def fake_trainer(
    world: int = 1,
    rank: int = 0,
    accumulate: int = 1,
    max_steps: int = -1,
    processed: int = 0,
    device: str = "cpu",
) -> SimpleNamespace:
    """What a data module reads of a Trainer (`processed`: micro-batches of epoch 0 trained on), on a
    device this machine need not have."""
    current = SimpleNamespace(processed=processed)
    return SimpleNamespace(
        world_size=world,
        global_rank=rank,
        accumulate_grad_batches=accumulate,
        max_steps=max_steps,
        current_epoch=0,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=current))),
        strategy=SimpleNamespace(root_device=torch.device(device)),
        num_devices=world,
    )


def text_cfg(path: str | Path, tmp_path: Path, **kw) -> DataConfig:
    """data=text on `path`, cached under tmp_path/cache."""
    return DataConfig(source="text", path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `name` that make(folder) fills, made once for the whole test run: the xdist
    workers of one run share a temporary root, and the first to get there makes it while the
    others wait on a file lock (pytest-xdist's recipe for a session fixture run once)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's root, above each worker's own folder
    folder = root / f"once-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".done").is_file():
            folder.mkdir(exist_ok=True)
            make(folder)
            (folder / ".done").touch()
    return folder


# ----------------------------------------------------------------------------- commands


def free_port() -> int:
    """A port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
    timeout: float = 300,
):
    """Run train.py / generate.py (or `-c code`) in a subprocess, as a user would."""
    cmd = [sys.executable, *(str(ROOT / a) if a.endswith(".py") else a for a in args)]
    full_env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"} | (env or {})
    for name in unset:
        full_env.pop(name, None)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


class _ForkServer:
    """tests/forkserver.py, started on first use; `busy` while a child of it runs."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.buffer = b""
        self.busy = False
        self.child = 0

    def request(self, message: dict) -> None:
        if self.proc is None or self.proc.poll() is not None:
            env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "forkserver.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                bufsize=0,
            )
            self.buffer = b""
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")

    def answer(self, timeout: float | None = None) -> dict:
        """The server's next line; TimeoutError after `timeout` seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            assert chunk, f"tests/forkserver.py ended (exit {self.proc.wait()})"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


# One per command running at once in this process (one xdist worker): most tests need one, a test
# that starts a second command while the first runs gets a second server.
_FORK_SERVERS: list[_ForkServer] = []


class Forked:
    """A command started by start_forked, handled as a subprocess.Popen: pid, send_signal, kill,
    poll, wait, returncode, and communicate for its stdout and stderr once it has ended."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]):
        self.args, self.returncode, self._output = cmd, None, None
        self._out = tempfile.TemporaryDirectory()
        self._files = {k: Path(self._out.name) / k for k in ("stdout", "stderr")}
        idle = [s for s in _FORK_SERVERS if not s.busy]
        if not idle:
            _FORK_SERVERS.append(_ForkServer())
        self._server = idle[0] if idle else _FORK_SERVERS[-1]
        self._server.busy = True
        request = {"args": cmd[1:], "cwd": str(cwd), "env": env}
        self._server.request(request | {k: str(f) for k, f in self._files.items()})
        self.pid = self._server.child = self._server.answer()["pid"]

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(TimeoutError):
                self._ended(self._server.answer(0))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self._ended(self._server.answer(timeout))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def _ended(self, message: dict) -> None:
        self.returncode = message["rc"]
        self._server.busy = False

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if self._output is None:
            self._output = tuple(f.read_text(errors="replace") for f in self._files.values())
            self._out.cleanup()
        return self._output


@atexit.register
def _stop_fork_servers() -> None:
    """Children a failed test left running (a training blocked on purpose), then the servers."""
    for server in _FORK_SERVERS:
        if server.busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.child, signal.SIGKILL)
        if server.proc is not None:
            server.proc.kill()


def start_forked(
    *args: str, cwd: Path, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> Forked:
    """run_forked in the background: for a test that signals or stops the command."""
    cmd = [sys.executable, *(str(ROOT / a) if a.endswith(".py") else a for a in args)]
    full_env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"} | (env or {})
    for name in unset:
        full_env.pop(name, None)
    return Forked(cmd, cwd, full_env)


def run_forked(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """run_script's answer (exit code, stdout, stderr of a process of its own), from a child forked
    off a warm Python that has imported torch, numpy, hydra and torchmetrics already
    (tests/forkserver.py): a second and a half instead of four and a half for a tiny training run. A
    sitecustomize.py on env's PYTHONPATH is imported first, as Python does; under DDP the other ranks
    are fresh processes Lightning starts. A test of a terminal, stdin, or of what a fresh process
    imports or warns about at its start uses run_script."""
    proc = start_forked(*args, cwd=cwd, env=env, unset=unset)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, output=stdout, stderr=stderr) from None
    stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for(path: Path, proc: Forked, timeout: float = 300) -> None:
    """Until `path` exists, while `proc` still runs."""
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"exit {proc.returncode} before {path} existed:\n{proc.communicate()[1][-3000:]}"
            )
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def assert_ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )


def kill_then_resume(args: list[str], run: Path, cwd: Path, at_step: int, max_steps: int) -> None:
    """Start train.py with `args` (its run dir `run`), SIGKILL it once step-{at_step}.ckpt is saved
    (a periodic checkpoint), check it stopped between that step and the end, and run the same command
    again to the end."""
    proc = start_forked(*args, cwd=cwd)
    try:
        wait_for(run / f"checkpoints/step-{at_step}.ckpt", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert at_step <= torch.load(newest_checkpoint(run), weights_only=True)["global_step"] < max_steps
    assert_ok(run_forked(*args, cwd=cwd))  # the same command again


def assert_ddp_equals_one(command: Callable[..., list[str]], cwd: Path, steps: int) -> None:
    """The same `steps` steps of 4 rows in one process and on 2 DDP ranks of 2 rows each end with the
    same weights and losses (1e-5). `command(run_dir, *extra)`: train.py's arguments for a run in
    run_dir, the run's max_steps set to `steps`, with `extra` added."""
    one, ddp = cwd / "one", cwd / "ddp"
    assert_ok(run_forked(*command(one, "data.batch_size=4"), cwd=cwd))
    two_ranks = ("trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=2")
    assert_ok(run_forked(*command(ddp, *two_ranks), cwd=cwd, timeout=600))
    assert_same_weights(final_state(one), final_state(ddp), atol=1e-5)
    a, b = losses(one), losses(ddp)
    assert a.keys() == b.keys() == set(range(steps))
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def assert_one_line_exit(entry: Callable[[list[str]], None], args: list[str], message: str, capsys) -> None:
    """A user error: exit code 2 and one line on stderr that contains `message`."""
    with pytest.raises(SystemExit) as exit_:
        entry(args)
    assert exit_.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def compose_train(*overrides: str):
    """train.py's config as Hydra composes it, with the hydra node."""
    from hydra import compose, initialize_config_dir

    import train  # noqa: F401  (registers the schemas, as train.py does)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def command(
    config: str, schema: type, run: Callable[[object], None], to_object: Callable | None = None
) -> Callable[[list[str]], None]:
    """What the root script <config>.py does with these overrides, in this process: compose
    conf/<config>.yaml over its schema, validate (OmegaConf.to_object, or the script's own
    `to_object`), run; user errors exit 2."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from gpt.errors import exit_on_user_error

    @exit_on_user_error
    def main(overrides: list[str]) -> None:
        ConfigStore.instance().store(name="_schema", node=schema)  # as the root script does
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config, overrides=overrides)
        run((to_object or OmegaConf.to_object)(cfg))

    return main


def generate_config(**settings: Any):
    """generate.py's config as conf/generate.yaml composes it (its own decoding defaults), with these
    fields replaced (validated again)."""
    from dataclasses import replace

    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from gpt.config import GenerateConfig

    ConfigStore.instance().store(name="_schema", node=GenerateConfig)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("generate")
    return replace(OmegaConf.to_object(cfg), **settings)


# ----------------------------------------------------------------------------- training runs

# conf/experiment/tiny.yaml plus what the training-system tests (tests/commands/test_train.py,
# test_faults.py) vary: dropout, so that a resume must restore the global RNG, and batches of 16.
BASE = [
    "experiment=tiny",
    "data=text",
    "model.dropout=0.1",  # dropout draws from the global RNG: resume must restore it
    "data.batch_size=16",
    "~callbacks.progress_bar",
]
# conf/experiment/tiny.yaml plus what the runs a user would type vary (tests/commands/test_e2e.py,
# tests/train/test_console.py): nano's 4 layers, two validations and the progress bar.
FAST = [
    "experiment=tiny",
    "data=text",
    "model.n_layer=4",
    "data.val_windows=32",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=2",
]

# What conftest.py's ddp_run varies on BASE (DDP_COMMON, then DDP_ONLY: batches of 4 on each of two
# ranks); tests/commands/test_train.py runs one process with DDP_COMMON and batches of 8 against it.
DDP_COMMON = ["trainer.max_steps=10", "model.dropout=0.0", "trainer.accelerator=cpu"]
DDP_ONLY = ["data.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp"]


def train_cmd(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """train.py with BASE on `corpus` in `run_dir`; flags such as -m go before the overrides."""
    flags = [e for e in extra if e.startswith("-") and "=" not in e]
    overrides = [e for e in extra if e not in flags]
    return ["train.py", *flags, *BASE, f"data.path={corpus}", f"hydra.run.dir={run_dir}", *overrides]


def train_args(corpus: Path, *extra: str) -> list[str]:
    """train.py with FAST on `corpus`, in the default run dir."""
    return ["train.py", *FAST, f"data.path={corpus}", *extra]


def bare_trainer(root: Path, **kwargs):
    """A CPU Lightning Trainer with nothing around the module (no logger, checkpointing, progress bar
    or model summary), writing under `root`; kwargs add to or override that."""
    import lightning as L

    quiet = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    return L.Trainer(**(quiet | kwargs))


def build_in_process(
    corpus: Path, run_dir: Path, *overrides: str, ckpt_path: str | None = None, base: list[str] = BASE
):
    """gpt.train.setup.build with `base` (BASE: text) in this process, on the config train.py would
    hand it: (trainer, module, datamodule). `ckpt_path`: the checkpoint train.py would resume from."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import train
    from gpt.train.setup import build

    cfg = compose_train(*base, f"data.path={corpus}", *overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.data.cache_dir = str(run_dir.parent / "cache")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it to train.py
    return build(train.to_job(cfg), train.hydra_run(cfg), ckpt_path)


def fit(corpus: Path, run_dir: Path, *overrides: str, base: list[str] = BASE):
    """build_in_process + fit (seconds, not a subprocess): returns the module."""
    trainer, module, datamodule = build_in_process(corpus, run_dir, *overrides, base=base)
    trainer.fit(module, datamodule=datamodule)
    return module


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
