import math

import pytest
import torch

from gpt.config import OptimConfig
from gpt.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from tests.conftest import tiny_model


def test_decay_groups_split_matrices_from_vectors():
    model = tiny_model(bias=True, norm="layernorm")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # every parameter exactly once (the tied head/embedding too)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.wte.weight) in {id(p) for p in decay["params"]}


def test_warmup_then_cosine_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.55)  # halfway: min + (1 - min) / 2
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(500, cfg, 110) == pytest.approx(0.1)


def test_constant_schedule_and_explicit_horizon():
    assert lr_factor(1000, OptimConfig(warmup_steps=0, schedule="constant"), 10) == 1.0
    cfg = OptimConfig(warmup_steps=0, min_lr_ratio=0.0, decay_steps=100)
    assert lr_factor(50, cfg, total_steps=10_000) == pytest.approx(0.5)


def test_scheduler_steps_the_optimizer_lr_and_state_is_plain():
    model = tiny_model()
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3 * f for f in (0.25, 0.5, 0.75, 1.0)] + [
        1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(0, 4)
    ]
    assert lrs == pytest.approx(expected)
    assert sched.state_dict()["lr_lambdas"] == [None, None]  # nothing pickled beyond plain data
    assert isinstance(opt, torch.optim.AdamW)
