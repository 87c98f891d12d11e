import io
import math

import pytest
import torch

import gpt.train.precision
import train
from gpt.config import OptimConfig
from gpt.errors import ConfigError
from gpt.train.optim import (
    Muon,
    MuonWithAdamW,
    build_optimizer,
    build_scheduler,
    lr_factor,
    muon_split,
    newton_schulz,
    param_groups,
)
from gpt.train.precision import Bf16Speed
from tests.helpers import compose_train, tiny_model

NS = dict(coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7)
needs_torch_muon = pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon: torch >= 2.9"
)


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


def twin_params(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Two identical sets of tall, wide and square matrices, two of them of each shape but one (Muon
    orthogonalizes matrices of one shape as a stack)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(48, 16), (16, 40), (24, 24), (48, 16), (24, 24)]
    ps = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
    return ps, [torch.nn.Parameter(p.detach().clone()) for p in ps]


def step_both(a: torch.optim.Optimizer, b: torch.optim.Optimizer, ps: list, qs: list, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(ps, qs, strict=True):
            grad = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()


@needs_torch_muon
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_in_bf16_updates_exactly_as_torch_muon(nesterov, adjust_lr_fn):
    ps, qs = twin_params()
    hyper = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, theirs = Muon(ps, ns_dtype=torch.bfloat16, **hyper), torch.optim.Muon(qs, **hyper)
    step_both(ours, theirs, ps, qs, steps=4)
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


def reference_newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """The iteration written out in float64 without addmm (Keller Jordan's formulation)."""
    a, b, c = coefficients
    x = g.double()
    x = x.T if g.size(0) > g.size(1) else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_fp32_newton_schulz_matches_float64_and_is_not_bf16(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ref = reference_newton_schulz(g, **NS)
    fp32 = newton_schulz(g, **NS, dtype=torch.float32)
    bf16 = newton_schulz(g, **NS, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and fp32.shape == g.shape
    torch.testing.assert_close(fp32.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(bf16.double(), ref, rtol=0, atol=0.05)  # bf16: 8 mantissa bits
    # the dtype is really switched: bf16's error is orders of magnitude above fp32's
    assert (bf16.double() - ref).abs().max() > 100 * (fp32.double() - ref).abs().max()
    torch.testing.assert_close(g, torch.randn(shape, generator=torch.Generator().manual_seed(0)))  # g intact


@needs_torch_muon
def test_muon_in_fp32_steps_close_to_torch_muon_but_not_equal():
    ps, qs = twin_params()
    ours, theirs = Muon(ps, lr=0.02, ns_dtype=torch.float32), torch.optim.Muon(qs, lr=0.02)
    step_both(ours, theirs, ps, qs, steps=3)
    for p, q in zip(ps, qs, strict=True):
        assert not torch.equal(p, q)
        torch.testing.assert_close(p, q, rtol=0, atol=3e-3)  # 3 steps of lr 0.02 times bf16's error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 16), (16, 40), (24, 24)])
def test_newton_schulz_of_a_stack_is_each_matrix_alone_bit_for_bit(shape, dtype):
    gs = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    stacked = newton_schulz(gs, **NS, dtype=dtype)
    assert torch.equal(stacked, torch.stack([newton_schulz(g, **NS, dtype=dtype) for g in gs]))


def test_newton_schulz_leaves_a_bf16_momentum_buffer_alone():
    # torch.optim.Muon normalizes in place after .bfloat16(), a no-op cast for a bf16 tensor: with
    # nesterov=False and bf16 parameters that would scale the momentum buffer itself.
    buf = torch.randn(8, 4).bfloat16()
    before = buf.clone()
    newton_schulz(buf, **NS, dtype=torch.bfloat16)
    assert torch.equal(buf, before)


@pytest.mark.parametrize(("fast", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_muon_ns_dtype_auto_follows_bf16_speed_of_the_params_device(monkeypatch, fast, expected):
    asked = []

    def fake_speed(device: str) -> Bf16Speed:
        asked.append(device)
        return Bf16Speed(fast, "mocked")

    monkeypatch.setattr(gpt.train.precision, "bf16_speed", fake_speed)
    opt = build_optimizer(tiny_model(), OptimConfig(name="muon"))
    assert opt.muon.ns_dtype == expected
    assert asked == ["cpu"]


@pytest.mark.parametrize(("name", "dtype"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_muon_ns_dtype_explicit_is_kept_without_measuring(monkeypatch, name, dtype):
    monkeypatch.setattr(gpt.train.precision, "bf16_speed", lambda device: pytest.fail("measured"))
    opt = build_optimizer(tiny_model(), OptimConfig(name="muon", muon_ns_dtype=name))
    assert opt.muon.ns_dtype == dtype


def test_muon_ns_dtype_bogus_is_refused():
    message = "optim.muon_ns_dtype='bogus' is not one of auto, float32, bfloat16"
    with pytest.raises(ConfigError, match=message):
        train.to_dataclasses(compose_train("optim=muon", "optim.muon_ns_dtype=bogus"))
    assert train.to_dataclasses(compose_train("optim=muon"))[2].muon_ns_dtype == "auto"


@needs_torch_muon
def test_muon_resumes_from_a_state_dict_written_with_torch_muon():
    """A checkpoint from before our Muon (MuonWithAdamW over torch.optim.Muon) loads and resumes
    exactly where torch's Muon would have gone on."""
    model = tiny_model()
    cfg = OptimConfig(name="muon", muon_ns_dtype="bfloat16", weight_decay=0.1)
    hidden, rest = muon_split(model)
    old_muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=0.1)
    old_adamw = torch.optim.AdamW([{"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    model(torch.randint(50, (2, 8))).sum().backward()
    old_muon.step()
    old_adamw.step()
    buffer = io.BytesIO()  # through a file, as a checkpoint goes: no tensor shared with old_muon
    torch.save({"muon": old_muon.state_dict(), "adamw": old_adamw.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = build_optimizer(model, cfg)
    resumed.load_state_dict(checkpoint)
    assert resumed.muon.ns_dtype == torch.bfloat16  # the dtype comes from the config, not the file
    weights = [p.detach().clone() for p in hidden]
    old_muon.step()  # same grads: torch's next step, from a copy of the weights
    expected = [p.detach().clone() for p in hidden]
    with torch.no_grad():
        for p, w in zip(hidden, weights, strict=True):
            p.copy_(w)
    resumed.muon.step()
    for p, e in zip(hidden, expected, strict=True):
        assert torch.equal(p, e)


def test_wsd_schedule_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(5, cfg, 100) == pytest.approx(0.6)
    assert lr_factor(50, cfg, 100) == 1.0 and lr_factor(79, cfg, 100) == 1.0
    assert lr_factor(90, cfg, 100) == pytest.approx(0.5)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.0)


def test_muon_state_round_trip():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    model(torch.randint(50, (2, 8))).sum().backward()
    opt.step()
    again = build_optimizer(model, OptimConfig(name="muon"))
    again.load_state_dict(opt.state_dict())
    hidden, rest = muon_split(model)
    assert len(hidden) == 4 * 2  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in each of 2 blocks
    assert {id(p) for p in rest} == {
        id(p) for n, p in model.named_parameters() if not n.startswith("h.") or p.dim() < 2
    }
    p = hidden[0]
    torch.testing.assert_close(again.muon.state[p]["momentum_buffer"], opt.muon.state[p]["momentum_buffer"])


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_skips_a_step_on_the_device_exactly_and_steps_as_usual_otherwise(nesterov):
    """found_inf (GradScaler's and NonFiniteGuard's flag): 1 keeps every weight and momentum buffer
    bit for bit; 0 gives the same bits as a step without the flag."""
    ps, qs = twin_params()
    hyper = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov, ns_dtype=torch.float32)
    flagged, plain = Muon(ps, **hyper), Muon(qs, **hyper)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        skip = step in (0, 3)  # a first step (no momentum yet) and a later one
        for p, q in zip(ps, qs, strict=True):
            grad = torch.randn(p.shape, generator=gen)
            p.grad = grad.clone()
            q.grad = grad.clone()
            if skip:
                p.grad[0, 0] = float("nan")
        before = [(p.detach().clone(), flagged.state[p].get("momentum_buffer")) for p in ps]
        before = [(w, None if b is None else b.clone()) for w, b in before]
        flagged.found_inf = torch.tensor(float(skip))
        flagged.step()
        del flagged.found_inf
        if skip:
            for p, (w, b) in zip(ps, before, strict=True):
                assert torch.equal(p, w)
                assert torch.equal(
                    flagged.state[p]["momentum_buffer"], torch.zeros_like(p) if b is None else b
                )
        else:
            plain.step()
            for p, q in zip(ps, qs, strict=True):
                assert torch.equal(p, q)
                assert torch.equal(flagged.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"])


def test_muon_grad_scale_divides_the_gradients_first():
    ps, qs = twin_params()
    scaled, plain = Muon(ps, ns_dtype=torch.float32), Muon(qs, ns_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    for p, q in zip(ps, qs, strict=True):
        grad = torch.randn(p.shape, generator=gen)
        p.grad, q.grad = grad * 1024, grad.clone()
    scaled.grad_scale, scaled.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    scaled.step()
    plain.step()
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("fused", [True, None])
def test_muon_with_adamw_skips_on_the_device_only_with_fused_adamw(fused):
    model = tiny_model()
    hidden, rest = muon_split(model)
    adamw = dict(lr=1e-3, fused=fused)
    opt = MuonWithAdamW(hidden, [{"params": rest, "weight_decay": 0.0}], dict(ns_dtype=torch.float32), adamw)
    assert getattr(opt, "_step_supports_amp_scaling", False) == bool(fused)
    if not fused:
        return
    model(torch.randint(50, (2, 8))).sum().backward()
    opt.step()  # the moments exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [t.clone() for s in (opt.muon.state, opt.adamw.state) for st in s.values() for t in st.values()]
    opt.found_inf, opt.grad_scale = torch.tensor(1.0), None
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    after = [t for s in (opt.muon.state, opt.adamw.state) for st in s.values() for t in st.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, after, strict=True))
    assert not hasattr(opt.muon, "found_inf") and not hasattr(opt.adamw, "found_inf")


@pytest.mark.parametrize("unscale_first", [True, False])  # Lightning unscales first (for clipping)
def test_grad_scaler_steps_muon_with_fused_adamw_on_the_device(unscale_first):
    """GradScaler hands its flag to an optimizer that can skip on the device instead of reading it:
    a step with an inf gradient changes nothing, a finite one is the unscaled gradients' step."""
    scaled_model, plain_model = tiny_model(), tiny_model()
    plain_model.load_state_dict(scaled_model.state_dict())

    def build(model):
        hidden, rest = muon_split(model)
        adamw = dict(lr=1e-3, fused=True)
        return MuonWithAdamW(
            hidden, [{"params": rest, "weight_decay": 0.0}], dict(ns_dtype=torch.float32), adamw
        )

    scaled, plain = build(scaled_model), build(plain_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    idx = torch.randint(50, (2, 8), generator=torch.Generator().manual_seed(0))
    for bad in (False, True, False):
        before = {k: v.clone() for k, v in scaled_model.state_dict().items()}
        scaler.scale(scaled_model(idx).float().pow(2).mean()).backward()
        if bad:
            next(iter(scaled_model.parameters())).grad[0] = float("inf")
        if unscale_first:
            scaler.unscale_(scaled)
        scaler.step(scaled)
        scaler.update()
        scaled.zero_grad()
        if bad:
            assert all(torch.equal(v, before[k]) for k, v in scaled_model.state_dict().items())
            continue
        plain_model(idx).float().pow(2).mean().backward()
        plain.step()
        plain.zero_grad()
        # Scales are powers of two: unscaling is exact, so are the steps.
        for (name, a), b in zip(
            scaled_model.state_dict().items(), plain_model.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name
