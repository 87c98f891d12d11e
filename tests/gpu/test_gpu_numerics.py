"""What only a CUDA GPU can check: bf16 training, torch.compile, bf16 decoding, the SDPA kernel the
training path gets, and the chunked loss. Run with `pytest -m gpu` (bench/device.sh does); without
CUDA every test here is skipped, and the default run never selects them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt.generate.tokens import generate
from tests.helpers import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB = 65


def gpu_model(seed: int = 0, **overrides):
    shape = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=VOCAB) | overrides
    return tiny_model(seed, **shape).cuda()


def losses(precision: str, steps: int = 20) -> list[float]:
    """Per-step training losses of the same model, data and AdamW in fp32 or bf16 autocast."""
    model = gpu_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for _ in range(steps):
        x = torch.randint(VOCAB, (8, 64), device="cuda", generator=g)
        y = torch.roll(x, -1, dims=1)  # a learnable target: the next token of the row
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def test_bf16_mixed_losses_track_fp32_over_20_steps():
    """Tolerance: every step's bf16-mixed loss within 2% of the fp32 one (bf16 keeps 8 bits of mantissa,
    about 0.4% per rounding; 20 AdamW steps compound it), and both losses fall."""
    fp32, bf16 = losses("32-true"), losses("bf16-mixed")
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=0.02, atol=0)
    assert fp32[-1] < fp32[0] - 0.1 and bf16[-1] < bf16[0] - 0.1


def test_compiled_logits_equal_eager():
    """Tolerance: 1e-3 absolute and relative in fp32 (inductor fuses and reorders the reductions)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = gpu_model().eval()
    idx = torch.randint(VOCAB, (4, 64), device="cuda")
    with torch.no_grad():
        eager = model(idx)
        compiled = torch.compile(model)(idx)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_cached_greedy_equals_uncached_in_bf16(pos_emb):
    """The same 40 tokens with and without the KV cache, in bf16 on the GPU. The two paths run
    different kernel shapes, so a logit can differ by bf16 rounding: where the tokens first differ,
    the uncached logits of the two tokens must be a near tie (within 1%), else the cache is wrong."""
    model = gpu_model(pos_emb=pos_emb).to(torch.bfloat16).eval()
    idx = torch.randint(VOCAB, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        cached = torch.stack(list(generate(model, idx, 40, temperature=0, use_cache=True)), dim=1)
        uncached = torch.stack(list(generate(model, idx, 40, temperature=0, use_cache=False)), dim=1)
        if torch.equal(cached, uncached):
            return
        row, step = (cached != uncached).nonzero()[0].tolist()
        context = torch.cat([idx[row], uncached[row, :step]])[None]
        logits = model(context)[0, -1].float()
        a, b = logits[cached[row, step]], logits[uncached[row, step]]
        assert (b - a).abs() <= 0.01 * b.abs().clamp(min=1), f"row {row} step {step}: {a} vs {b}"


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "masked"])
def test_training_path_gets_a_flash_or_memory_efficient_kernel(masked):
    """With only flash and memory-efficient SDPA allowed, a bf16 forward and backward must not raise:
    it would if the model fell back to the math kernel (a mask flash refuses goes to memory-efficient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = gpu_model(block_size=128, n_embd=256).train()
    idx = torch.randint(VOCAB, (4, 128), device="cuda")
    kwargs = {}
    if masked:  # left padding: the dense boolean mask path
        kwargs["pad"] = torch.tensor([0, 3, 0, 7], device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx, **kwargs)
        F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_plain_one(dtype):
    """fused_linear_cross_entropy (summed, fp32) against cross_entropy of the full logits, loss and
    gradients. Tolerance: 1e-4 relative in fp32; 1e-2 in bf16 (the chunks round differently)."""
    loss_module = pytest.importorskip("gpt.model.loss")
    torch.manual_seed(0)
    n, c, v = 1000, 128, 5000
    hidden = torch.randn(n, c, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, c, device="cuda") * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(v, (n,), device="cuda")
    targets[::7] = -100  # ignored positions
    chunked = loss_module.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=256)
    grads = torch.autograd.grad(chunked, (hidden, weight))
    plain = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum", ignore_index=-100)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=tol, atol=tol)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


def test_recomputed_swiglu_equals_autograds_in_bf16():
    """gpt.model.swiglu under bf16 autocast on the GPU: the same output as autograd through
    c_proj(silu(gate) * up), and gradients within 1e-2 of their largest entry (bf16 rounding of
    the product it recomputes)."""
    from gpt.model.swiglu import swiglu_projection

    torch.manual_seed(0)
    gate_up = torch.randn(4, 64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(128, 256, device="cuda", requires_grad=True)
    grad_out = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = swiglu_projection(gate_up, weight, None)
        gate, up = gate_up.chunk(2, dim=-1)
        expected = F.linear(F.silu(gate) * up, weight)
    assert torch.equal(out, expected)
    got = torch.autograd.grad(out, (gate_up, weight), grad_out)
    want = torch.autograd.grad(expected, (gate_up, weight), grad_out)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=1e-2 * w.abs().max().item())


def test_training_waits_for_the_device_only_on_logging_steps(tmp_path):
    """tests/train/test_host_syncs.py counts the reads Python makes; this asks CUDA itself:
    torch.cuda.set_sync_debug_mode("warn") warns on every synchronizing call (an .item(), a copy to
    the host, a nonzero). GPTLitModule with the GPU's default optimizer (fused AdamW), the NaN guard,
    Throughput and the progress bar, 12 steps logged every 4: warnings on steps 4, 8 and 12 only
    (step 0 is setup)."""
    import warnings
    from collections import Counter

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from gpt.config import OptimConfig
    from gpt.tokenizer import CharTokenizer
    from gpt.train.callbacks import NonFiniteGuard, ProgressBar, Throughput
    from gpt.train.lit_module import GPTLitModule
    from tests.helpers import bare_trainer, tiny_config

    class CountSyncs(L.Callback):
        def __init__(self, record: list) -> None:
            self.record, self.seen, self.step, self.by_step = record, 0, 0, Counter()

        def close_step(self) -> None:
            new = self.record[self.seen :]
            self.by_step[self.step] += sum("synchroniz" in str(w.message) for w in new)
            self.seen = len(self.record)

        def on_train_batch_start(self, trainer, *args) -> None:
            self.close_step()
            self.step = trainer.global_step + 1

        def on_train_end(self, trainer, *args) -> None:
            self.close_step()

    module = GPTLitModule.from_configs(tiny_config(vocab_size=16), OptimConfig(), CharTokenizer("abcdefgh\n"))
    x = torch.randint(0, 16, (24, 17), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=2, pin_memory=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        counter = CountSyncs(record)
        trainer = bare_trainer(
            tmp_path,
            accelerator="gpu",
            devices=1,
            max_steps=12,
            log_every_n_steps=4,
            enable_progress_bar=True,
            # the bar drawn as on a terminal (stdout is not one here)
            callbacks=[NonFiniteGuard(), Throughput(), ProgressBar(1, terminal_only=False), counter],
        )
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(module, train_dataloaders=loader)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert trainer.optimizers[0].defaults.get("fused")
    synced = {step for step, n in counter.by_step.items() if n}
    assert synced - {0} <= {4, 8, 12}, dict(counter.by_step)
