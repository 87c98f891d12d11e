"""Document masks (data.doc_mask): a window of several documents computes, for each, what the
document computes alone; the FlexAttention block mask is the dense mask (gpt/model/flex.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from gpt.config import OptimConfig
from gpt.data.windows import document_positions
from gpt.model import flex
from gpt.model.transformer import attention_mask
from gpt.tokenizer import CharTokenizer
from gpt.train.lit_module import GPTLitModule
from tests.helpers import tiny_config, tiny_model

SEP = 49  # the tiny model's last token stands for end-of-text
# A window of 32: the tail of a document cut by the window, then three documents, each from its
# separator; one is the separator alone.
LENGTHS = [7, 10, 1, 14]


def window(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, SEP, (sum(LENGTHS),), generator=g)
    for start in torch.tensor(LENGTHS).cumsum(0)[:-1].tolist():
        x[start] = SEP
    return x


def documents(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.split(LENGTHS))


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rope"])
def test_each_document_gets_the_logits_it_gets_alone(pos_emb):
    model = tiny_model(pos_emb=pos_emb)
    x = window()
    positions, segments = document_positions(x, SEP)
    with torch.no_grad():
        packed = model(x[None], positions=positions[None], segments=segments[None])[0]  # (T, V)
        alone = torch.cat([model(doc[None])[0] for doc in documents(x)])  # (T, V)
        plain = model(x[None])[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(packed, plain, rtol=1e-3, atol=1e-3)  # the mask changes what is seen


def test_the_training_loss_is_over_the_documents_alone():
    """GPTLitModule passes a doc_mask batch's positions and segments to the model."""
    torch.manual_seed(0)
    module = GPTLitModule.from_configs(
        tiny_config(), OptimConfig(), CharTokenizer("".join(map(chr, range(65, 115))))
    )
    module.eval()
    xs = torch.stack([window(0), window(1)])
    ys = torch.roll(xs, -1, dims=1)
    positions, segments = (
        torch.stack(p) for p in zip(*(document_positions(x, SEP) for x in xs), strict=True)
    )
    with torch.no_grad():
        loss = module.loss((xs, ys, positions, segments))
        logits = torch.stack([torch.cat([module.model(d[None])[0] for d in documents(x)]) for x in xs])
        expected = F.cross_entropy(logits.flatten(0, 1), ys.flatten())
        plain = module.loss((xs, ys))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert plain != pytest.approx(float(loss), rel=1e-4)


def test_flex_attention_stays_off_on_a_cpu_and_eagerly():
    idx = window()[None]
    segments = document_positions(idx[0], SEP)[1][None]
    assert not flex.applies(idx, 16, segments, (None, None, None), 0.0)


def test_the_document_block_mask_is_the_dense_mask():
    """FlexAttention's forward, eagerly on the CPU (its backward there is not implemented), with the
    block mask of 200 tokens of documents of 1 to 40 tokens equals SDPA with attention_mask."""
    torch.manual_seed(0)
    B, nh, T, hs = 2, 2, 200, 16
    lengths = torch.randint(1, 40, (B, T))
    segments = torch.stack([torch.repeat_interleave(torch.arange(T), row)[:T] for row in lengths])
    q, k, v = torch.randn(3, B, nh, T, hs).unbind(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        flexed = flex.attend(q, k, v, flex.document_block_mask(segments))
    dense = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask(torch.arange(T), T, segments=segments)
    )
    torch.testing.assert_close(flexed, dense, rtol=1e-5, atol=1e-5)
