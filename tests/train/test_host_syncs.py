"""No host-device sync in the training hot loop: a short CPU run counts every read of a tensor's
value on the host (`.item()`, `bool()`, `int()`, `float()`, `.tolist()`, and NumPy) and finds them
only on the steps that are logged. On a GPU each one would wait for the queued work."""

from __future__ import annotations

from collections import Counter

import lightning as L
import pytest
import torch

from gpt.config import OptimConfig
from gpt.tokenizer import CharTokenizer
from gpt.train.callbacks import NonFiniteGuard, ProgressBar, Throughput
from gpt.train.lit_module import GPTLitModule
from gpt.train.optim import MuonWithAdamW, muon_split
from tests.helpers import bare_trainer, tiny_config

READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy")


class FusedAdamW(GPTLitModule):
    """The GPU default: fused AdamW, which skips an update on the device (CPU runs it too)."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)


class FusedMuon(GPTLitModule):
    """optim=muon as on a GPU: Muon with fused AdamW, which both skip an update on the device."""

    def configure_optimizers(self):
        hidden, rest = muon_split(self.model)
        muon, adamw = dict(ns_dtype=torch.float32), dict(lr=1e-3, fused=True)
        return MuonWithAdamW(hidden, [{"params": rest, "weight_decay": 0.0}], muon, adamw)


OPTIMIZERS = {"adamw": FusedAdamW, "muon": FusedMuon}


class CountReads(L.Callback):
    """Counts host reads of tensor values, by the optimizer step they happen in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_step: Counter[int] = Counter()
        self.step = 0
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(t, *args, _original=original, **kwargs):
                self.by_step[self.step] += 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, read)

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.step = trainer.global_step + 1  # the step this batch belongs to


def batches(n: int, vocab: int, B: int = 2, T: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n * B, T + 1), generator=g)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:, :-1], x[:, 1:]), batch_size=B, shuffle=False
    )


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("action", ["stop", "skip"])
def test_training_reads_tensors_on_the_host_only_on_logging_steps(tmp_path, monkeypatch, action, optimizer):
    tok = CharTokenizer("abcdefgh\n")
    module = OPTIMIZERS[optimizer].from_configs(tiny_config(vocab_size=16), OptimConfig(), tok)
    every = 4
    trainer = bare_trainer(
        tmp_path,
        max_steps=12,
        log_every_n_steps=every,
        enable_progress_bar=True,
        callbacks=[
            NonFiniteGuard(action=action),
            Throughput(),
            # train.py's bar, redrawn after every batch (drawn here too, where stdout is not a terminal)
            bar := ProgressBar(refresh_rate=1, terminal_only=False),
            counter := CountReads(monkeypatch),
        ],
    )
    trainer.fit(module, train_dataloaders=batches(12, 16))
    assert trainer.global_step == 12
    read_on = {step for step, n in counter.by_step.items() if n}
    assert read_on - {0} <= {4, 8, 12}, dict(counter.by_step)  # step 0: setup, before training
    assert bar.is_enabled
    loss = module.bar_metrics["loss"]
    assert isinstance(loss, float) and bar.get_metrics(trainer, module)["loss"] == f"{loss:.4f}"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_nan_is_skipped_on_the_device_and_reported_on_the_next_logging_step(tmp_path, optimizer):
    tok = CharTokenizer("abcdefgh\n")
    module = OPTIMIZERS[optimizer].from_configs(tiny_config(vocab_size=16), OptimConfig(), tok)
    seen = {}

    class NanAtStep3(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:  # the third step
                seen["before"] = [p.detach().clone() for p in pl_module.parameters()]
                next(iter(pl_module.parameters())).grad[0] = float("nan")

        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 3:
                seen["after"] = [p.detach().clone() for p in pl_module.parameters()]

    trainer = bare_trainer(
        tmp_path, max_steps=6, log_every_n_steps=4, callbacks=[NanAtStep3(), NonFiniteGuard(action="skip")]
    )
    with pytest.warns(UserWarning, match="step 2: non-finite gradient, update skipped"):
        trainer.fit(module, train_dataloaders=batches(6, 16))
    for a, b in zip(seen["before"], seen["after"], strict=True):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in module.parameters())
