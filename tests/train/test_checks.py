"""Checks and decisions train.py makes before Lightning is imported: trainer arguments, devices,
gradient accumulation, validation windows."""

from __future__ import annotations

import os

import pytest
import torch

from gpt.errors import ConfigError
from gpt.train.checks import (
    CPU_VAL_WINDOWS,
    FULL_VAL_WINDOWS,
    accumulation_steps,
    check_devices,
    check_trainer_args,
    val_windows,
)


def test_more_devices_than_the_machine_has_are_refused(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # two CPU cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator, devices in (("cpu", 2), ("auto", 1), ("auto", "auto"), ("cpu", -1)):
        check_devices(accelerator, devices)
    with pytest.raises(ConfigError, match="trainer.devices=3 on CPU but this process may use 2 CPU core"):
        check_devices("auto", 3)
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu but torch finds no CUDA GPU"):
        check_devices("gpu", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with four GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for accelerator, devices in (("gpu", 4), ("auto", 4), ("cpu", 2), ("gpu", [0, 3])):
        check_devices(accelerator, devices)
    with pytest.raises(ConfigError, match=r"trainer.devices=8 but this machine has 4 CUDA GPU\(s\)"):
        check_devices("auto", 8)


def test_accumulation_steps_reach_tokens_per_step_or_name_the_multiple():
    assert accumulation_steps(8192, 4, 256, 2) == 4
    assert accumulation_steps(2048, 4, 256, 2) == 1
    with pytest.raises(ConfigError) as info:
        accumulation_steps(3000, 4, 256, 2)
    assert str(info.value) == (
        "tokens_per_step=3000 is not a multiple of data.batch_size x model.block_size x devices x nodes "
        "= 4 x 256 x 2 = 2048; pick a multiple"
    )


def test_val_windows_fewer_on_cpu_with_a_large_vocabulary():
    assert val_windows(None, "cpu", 65) == (FULL_VAL_WINDOWS, None)
    assert val_windows(None, "cuda", 50257) == (FULL_VAL_WINDOWS, None)
    windows, line = val_windows(None, "cpu", 50257)
    assert windows == CPU_VAL_WINDOWS and "50,257-token vocabulary" in line
    assert val_windows(200, "cpu", 50257) == (200, None)


@pytest.mark.parametrize(
    "trainer",
    [
        {"max_steps": 10, "devices": "0,1", "precision": 16, "gradient_clip_val": None},
        {"val_check_interval": 0.25, "max_time": {"hours": 1}, "deterministic": "warn"},
        {"not_a_checked_argument": object()},  # Lightning's to check
    ],
)
def test_trainer_args_of_accepted_types_pass(trainer):
    check_trainer_args(trainer)


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"max_steps": True}, "trainer.max_steps=true must be an integer (-1: no limit)"),
        ({"max_steps": None}, "trainer.max_steps=null must be an integer (-1: no limit)"),
        ({"log_every_n_steps": 2.0}, "trainer.log_every_n_steps=2.0 must be an integer (or null)"),
        (
            {"gradient_clip_algorithm": "l2"},
            "trainer.gradient_clip_algorithm='l2' must be norm or value (or null)",
        ),
        ({"max_time": "1h"}, "trainer.max_time='1h' must be a duration 'DD:HH:MM:SS' (or null)"),
    ],
)
def test_trainer_args_of_a_wrong_type_are_one_line(trainer, message):
    with pytest.raises(ConfigError) as info:
        check_trainer_args(trainer)
    assert str(info.value) == message
