"""Faults injected into a real train.py process by tests/commands/test_faults.py.

Python imports `sitecustomize` at start-up from the path; the tests put this folder on PYTHONPATH
and choose a fault with environment variables. Without them nothing is patched or even imported.

GPT_FAULT_BLOCK_SAVE=NAME   the write of the checkpoint file NAME stops half-way, flushed to disk;
GPT_FAULT_MARKER=PATH       then PATH is created and the process waits there to be killed.
GPT_FAULT_NAN_AT_STEP=N     the training loss of optimizer step N (0-based, as logged) is NaN.
GPT_FAULT_SIGNALS=SIG@WHERE,...
                            the process sends itself signal SIG (INT, TERM, USR1, KILL) once, at
                            WHERE: train:N (in the training step of optimizer step N, 0-based),
                            val:N (in a validation step after N steps), save:NAME (while the
                            checkpoint file NAME is written).
GPT_FAULT_RANK=R            the signals only in the process of local rank R (LOCAL_RANK).
"""

import os

if os.environ.get("GPT_FAULT_BLOCK_SAVE"):
    import io
    import time
    from pathlib import Path

    import torch

    _save = torch.save

    def _blocking_save(obj, f, *args, **kwargs):
        name = getattr(f, "name", f)
        if not isinstance(name, (str, os.PathLike)) or os.environ["GPT_FAULT_BLOCK_SAVE"] not in str(name):
            return _save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(name, "wb") if isinstance(f, (str, os.PathLike)) else f as out:
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
            Path(os.environ["GPT_FAULT_MARKER"]).write_text(str(name))
            time.sleep(3600)

    torch.save = _blocking_save

if os.environ.get("GPT_FAULT_NAN_AT_STEP"):
    from gpt.train.lit_module import GPTLitModule

    _training_step = GPTLitModule.training_step

    def _nan_training_step(self, batch, batch_idx):
        loss = _training_step(self, batch, batch_idx)
        if self.global_step == int(os.environ["GPT_FAULT_NAN_AT_STEP"]):
            loss = loss * float("nan")
        return loss

    GPTLitModule.training_step = _nan_training_step

if os.environ.get("GPT_FAULT_SIGNALS"):
    import signal

    import torch

    from gpt.train.lit_module import GPTLitModule

    _faults = [f.split("@") for f in os.environ["GPT_FAULT_SIGNALS"].split(",")]
    _fired: set[int] = set()

    def _fire(where: str, matches) -> None:
        if os.environ.get("LOCAL_RANK", "0") != os.environ.get(
            "GPT_FAULT_RANK", os.environ.get("LOCAL_RANK", "0")
        ):
            return
        for i, (sig, place) in enumerate(_faults):
            kind, _, arg = place.partition(":")
            if i not in _fired and kind == where and matches(arg):
                _fired.add(i)
                os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))

    def _hooked(name: str, where: str):
        original = getattr(GPTLitModule, name)

        def hook(self, batch, batch_idx):
            out = original(self, batch, batch_idx)
            _fire(where, lambda step: self.global_step == int(step))
            return out

        setattr(GPTLitModule, name, hook)

    _hooked("training_step", "train")
    _hooked("validation_step", "val")
    _save_for_signal = torch.save

    def _signalling_save(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        _fire("save", lambda wanted: wanted in name)
        return _save_for_signal(obj, f, *args, **kwargs)

    torch.save = _signalling_save
