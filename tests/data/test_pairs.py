"""Paired data: row formats -> tokens, bad rows, the split by example and the cache (prepare_pairs);
packing, the batch's keys, step_tokens across devices and accumulation, resuming (pairs_datamodule)."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gpt.config import DataConfig
from gpt.data.pairs import data_format, prepare_pairs
from gpt.data.pairs_datamodule import IGNORE, PackedRows, Packing, PairsDataModule, StreamSampler, best_fit
from gpt.errors import UserError
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer
from tests.helpers import fake_trainer, write_rows

PAIRS = [("What is 2+2?", "4"), ("Name a colour.", "Blue, or green."), ("Say nothing.", "")]


def pairs_cfg(path: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source="pairs", path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def random_rows(n: int, seed: int = 0, longest: int = 14) -> list[dict[str, str]]:
    """Rows of random lengths: prompts of 1 to `longest` letters, completions of 0 to `longest`."""
    rng = random.Random(seed)

    def word(k: int) -> str:
        return "".join(rng.choice("abcdefgh") for _ in range(k))

    return [
        {"prompt": word(rng.randint(1, longest)), "completion": word(rng.randint(0, longest))}
        for _ in range(n)
    ]


def prepared_rows(tmp_path: Path, n: int = 60, **kw):
    path = write_rows(tmp_path / "rows.jsonl", random_rows(n))
    return prepare_pairs(pairs_cfg(path, tmp_path, **kw), verbose=False)


def in_read_order(prepared) -> list[tuple[list[int], list[bool]]]:
    """Every example of both splits, as (ids, completion), in the order the rows were read."""
    found = {}
    for split in ("train", "val"):
        examples = prepared.examples(split)
        for i, index in enumerate(examples.index.tolist()):
            ids, completion = examples[i]
            found[index] = (ids.tolist(), completion.tolist())
    return [found[i] for i in range(len(found))]


def datamodule(prepared, cfg: DataConfig, block_size: int = 16, **trainer) -> PairsDataModule:
    dm = PairsDataModule(cfg, block_size=block_size, seed=3, prepared=prepared)
    dm.trainer = fake_trainer(**trainer)
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------- rows -> tokens


FORMATS = {
    "trl": lambda p, c: {"prompt": p, "completion": c},
    "alpaca": lambda p, c: {"instruction": p, "output": c},
    "alpaca_empty_input": lambda p, c: {"instruction": p, "input": "", "output": c},
    "source_target": lambda p, c: {"source": p, "target": c},
    "chat": lambda p, c: {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]},
}


@pytest.mark.parametrize("fmt", [*FORMATS, "fields", "gz", "alpaca_input"])
def test_every_row_format_gives_the_same_tokens(tmp_path, fmt):
    """With the plain template each row is prompt, line break, completion, end-of-text; only the
    completion and its end-of-text are trained on."""
    kw, gz = {}, fmt == "gz"
    if fmt == "fields":
        rows, kw = (
            [{"question": p, "answer": c} for p, c in PAIRS],
            {"fields": {"prompt": "question", "completion": "answer"}},
        )
    elif fmt == "alpaca_input":  # an input is joined to the instruction by a blank line
        rows = [{"instruction": p[:4], "input": p[4:], "output": c} for p, c in PAIRS]
    else:
        rows = [FORMATS.get(fmt, FORMATS["trl"])(p, c) for p, c in PAIRS]
    path = write_rows(tmp_path / ("rows.jsonl.gz" if gz else "rows.jsonl"), rows, gz=gz)
    prepared = prepare_pairs(
        pairs_cfg(path, tmp_path, tokenizer="r50k_base", val_fraction=0.4, **kw), verbose=False
    )
    tok = TiktokenTokenizer("r50k_base")
    expected = []
    for p, c in PAIRS:
        prompt = f"{p[:4]}\n\n{p[4:]}\n" if fmt == "alpaca_input" else f"{p}\n"
        ids, completion = tok.encode(prompt), tok.encode(c) + [tok.eot_token]
        expected.append((ids + completion, [False] * len(ids) + [True] * len(completion)))
    assert in_read_order(prepared) == expected
    assert prepared.tokenizer().to_dict() == tok.to_dict()
    assert (
        prepared.data_format == data_format(pairs_cfg(path, tmp_path))
        and prepared.data_format["template"] == "plain"
    )


def test_char_vocabulary_comes_from_the_rows_and_has_an_end_of_text(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    prepared = prepare_pairs(pairs_cfg(path, tmp_path), verbose=False)
    tok = prepared.tokenizer()
    assert (
        tok.to_dict() == CharTokenizer.from_text("".join(p + "\n" + c for p, c in PAIRS), eot=True).to_dict()
    )
    first = in_read_order(prepared)[0][0]
    assert first == tok.encode("What is 2+2?\n4") + [tok.eot_token]


def test_a_given_tokenizer_is_used_and_a_character_one_gets_an_end_of_text(tmp_path):
    path = write_rows(
        tmp_path / "rows.jsonl", [{"prompt": "ab", "completion": "ba"}, {"prompt": "b", "completion": "a"}]
    )
    prepared = prepare_pairs(pairs_cfg(path, tmp_path), tokenizer=CharTokenizer("\nabc"), verbose=False)
    assert prepared.tokenizer().to_dict() == {"kind": "char", "chars": "\nabc", "eot": True}
    assert in_read_order(prepared)[1][0] == [2, 0, 1, 4]
    # not in the given vocabulary: said of the row, not of a prompt as generate.py says it
    message = f"{path}:1 holds 'b' (U+0062), a character not in the 2-character vocabulary of the model"
    with pytest.raises(UserError, match=re.escape(message)):
        prepare_pairs(pairs_cfg(path, tmp_path), tokenizer=CharTokenizer("\na"), verbose=False)


# ----------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    ("name", "second_row", "message"),
    [
        ("rows.jsonl", '{"prompt": "broken\n', "rows.jsonl:2 is not JSON"),
        ("rows.jsonl", '["a", "list"]\n', "rows.jsonl:2 is not a JSON object"),
        (
            "rows.jsonl",
            '{"question": "a", "answer": "b"}\n',
            "rows.jsonl:2 has none of the paired formats' fields",
        ),
        (
            "rows.jsonl",
            '{"prompt": "a", "completion": 4}\n',
            "rows.jsonl:2: field 'completion' is int, not a string",
        ),
        (
            "rows.jsonl",
            '{"instruction": "a", "input": null, "output": null}\n',
            "rows.jsonl:2: field 'output' is null, not a string",
        ),
        (
            "rows.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}]}\n',
            "rows.jsonl:2 has no assistant turn",
        ),
        ("rows.jsonl", '{"messages": [{"role": "user"}]}\n', "rows.jsonl:2: turn 0 needs string fields"),
        ("rows.txt", '{"prompt": "a", "completion": "b"}\n', "rows.txt is not a .jsonl file"),
    ],
)
def test_a_bad_row_is_one_line_naming_file_and_line_and_nothing_is_written(
    tmp_path, name, second_row, message
):
    path = tmp_path / name
    path.write_text(
        '{"prompt": "fine", "completion": "row"}\n' + second_row + '{"prompt": "c", "completion": "d"}\n'
    )
    with pytest.raises(UserError) as e:
        prepare_pairs(pairs_cfg(path, tmp_path), verbose=False)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "cache").exists()


def test_too_few_examples_is_one_line(tmp_path):
    path = write_rows(tmp_path / "one.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserError, match="holds 1 example; paired data needs at least 2"):
        prepare_pairs(pairs_cfg(path, tmp_path), verbose=False)
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- the split and the cache


def test_split_is_by_example_seeded_and_reproducible(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", random_rows(40))

    def val_index(seed: int, fraction: float = 0.25, cache: str = "a") -> list[int]:
        cfg = pairs_cfg(path, tmp_path / cache, split_seed=seed, val_fraction=fraction)
        prepared = prepare_pairs(cfg, verbose=False)
        train, val = prepared.examples("train").index.tolist(), prepared.examples("val").index.tolist()
        assert sorted(train + val) == list(range(40)) and train == sorted(train)
        assert prepared.n_examples("val") == len(val) and prepared.n_examples("train") == len(train)
        return val

    assert len(val_index(0)) == 10
    assert val_index(0) == val_index(0, cache="b")  # reproducible from a fresh cache
    assert val_index(0) != val_index(1)
    assert len(val_index(0, fraction=0.001)) == 1 and len(val_index(0, fraction=0.999)) == 39
    # each example's tokens stay together: the splits hold the examples' own tokens
    prepared = prepare_pairs(pairs_cfg(path, tmp_path / "a", val_fraction=0.25), verbose=False)
    tok = prepared.tokenizer()
    rows = random_rows(40)
    for split in ("train", "val"):
        examples = prepared.examples(split)
        for i, index in enumerate(examples.index.tolist()):
            row = rows[index]
            assert examples[i][0].tolist() == tok.encode(f"{row['prompt']}\n{row['completion']}") + [
                tok.eot_token
            ]


def test_prepare_is_cached_and_keyed_by_what_changes_the_tokens(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", random_rows(20))
    first = prepare_pairs(pairs_cfg(path, tmp_path), verbose=False)
    again = prepare_pairs(pairs_cfg(path, tmp_path), verbose=False)
    assert first.fresh and not again.fresh and again.dir == first.dir and again.meta == first.meta
    assert sorted(p.name for p in first.dir.iterdir()) == sorted(
        [f"{s}-{a}.npy" for s in ("train", "val") for a in ("ids", "completion", "offsets", "index")]
        + ["meta.json"]
    )
    for change in [
        {"template": "alpaca"},
        {"tokenizer": "r50k_base"},
        {"split_seed": 1},
        {"val_fraction": 0.3},
    ]:
        assert prepare_pairs(pairs_cfg(path, tmp_path, **change), verbose=False).dir != first.dir, change
    # mask_prompt and packing are applied when loading, and fields that map a name to itself change
    # nothing: the same cache
    same = pairs_cfg(path, tmp_path, mask_prompt=False, packing=False, fields={"prompt": "prompt"})
    assert prepare_pairs(same, verbose=False).dir == first.dir
    write_rows(path, random_rows(21))
    assert prepare_pairs(pairs_cfg(path, tmp_path), verbose=False).dir != first.dir


def test_an_interrupted_write_leaves_no_folder_a_later_run_trusts(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "rows.jsonl", random_rows(20))
    real_save, calls = np.save, []

    def dying_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_pairs(pairs_cfg(path, tmp_path), verbose=False)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(np, "save", real_save)
    assert prepare_pairs(pairs_cfg(path, tmp_path), verbose=False).fresh


# ----------------------------------------------------------------------------- packing


def test_best_fit_puts_each_size_in_the_fullest_row_that_still_fits_it():
    assert best_fit(np.array([8, 5, 4, 3, 3, 2, 1]), 10).tolist() == [0, 1, 1, 2, 2, 0, 1]
    assert best_fit(np.array([10, 10]), 10).tolist() == [0, 1]


def check_row(
    row: dict[str, np.ndarray], members: list[int], examples, block_size: int, mask_prompt: bool
) -> None:
    """The row holds exactly `members`, in order, each as its own (x, y) pairs, then padding."""
    at = 0
    for segment, i in enumerate(members):
        ids, completion = (a[: block_size + 1] for a in examples[i])
        first_trained = int(np.argmax(examples[i][1]))
        n = len(ids) - 1
        here = slice(at, at + n)
        assert (row["segments"][here] == segment).all()
        assert row["idx"][here].tolist() == ids[:-1].tolist()
        assert row["positions"][here].tolist() == list(range(n))  # restarts at 0 per example
        expected = [
            y if (c or not mask_prompt) else IGNORE
            for y, c in zip(ids[1:].tolist(), completion[1:], strict=True)
        ]
        assert row["targets"][here].tolist() == expected  # the last target is the example's own last token
        assert row["prefix"][here].tolist() == [k < first_trained for k in range(n)]
        at += n
    pad = slice(at, block_size)
    assert (row["idx"][pad] == 0).all() and (row["targets"][pad] == IGNORE).all()
    assert (
        (row["positions"][pad] == 0).all()
        and (row["segments"][pad] == -1).all()
        and not row["prefix"][pad].any()
    )


@pytest.mark.parametrize(("packed", "mask_prompt"), [(True, True), (True, False), (False, True)])
def test_rows_hold_whole_examples_each_on_its_own(tmp_path, packed, mask_prompt):
    prepared = prepared_rows(tmp_path)
    examples, block_size = prepared.examples("train"), 16
    packing = Packing(examples, block_size, mask_prompt, packed, seed=0)
    stream = PackedRows(examples, packing, block_size, mask_prompt, step_items=1)
    seen = []
    for g in range(packing.n_rows):
        members = stream.members(g).tolist()
        row = {k: v.numpy() for k, v in stream[g].items()}
        assert all(v.shape == (block_size,) for k, v in row.items() if k != "step_tokens")
        check_row(row, members, examples, block_size, mask_prompt)
        assert row["step_tokens"] == (row["targets"] != IGNORE).sum()
        seen += members
    assert sorted(seen) == list(range(len(examples)))  # every example once a data epoch, none split
    truncated = int((examples.lengths > block_size + 1).sum())
    assert prepared.n_truncated(block_size) == truncated > 0
    if packed:  # best fit leaves at most one row at most half full
        fill = [(row["segments"] >= 0).sum() for row in (stream[g] for g in range(packing.n_rows))]
        assert sum(f <= block_size / 2 for f in fill) <= 1 and packing.n_rows < len(examples)
    else:
        assert packing.n_rows == len(examples)


def epoch_rows(packing: Packing, epoch: int) -> list[list[int]]:
    """The examples of each row of one data epoch, in stream order."""
    return [packing.members(packing.epoch(epoch), j).tolist() for j in range(packing.n_rows)]


def test_each_epoch_repacks_the_same_number_of_rows_in_a_seeded_order(tmp_path):
    examples = prepared_rows(tmp_path).examples("train")
    packing, same, other = (Packing(examples, 16, True, True, seed=s) for s in (0, 0, 1))
    assert epoch_rows(packing, 1) == epoch_rows(same, 1) != epoch_rows(other, 1)
    assert epoch_rows(packing, 0) != epoch_rows(packing, 1)
    partners = [sorted(map(sorted, epoch_rows(packing, e))) for e in (0, 1)]
    assert partners[0] != partners[1]  # not only the rows' order changes
    totals = [packing.epoch(e).targets_before[-1] for e in (0, 1)]
    assert totals == [packing.targets_per_epoch] * 2


def test_check_fits_refuses_rows_without_a_completion_token(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [{"prompt": "a" * 30, "completion": "b"}] * 4)
    prepared = prepare_pairs(pairs_cfg(path, tmp_path), verbose=False)
    prepared.check_fits(31)  # 30 prompt characters and a line break, then "b" is the 32nd token
    with pytest.raises(
        UserError, match="no example of the train split has a completion token among its first"
    ):
        prepared.check_fits(30)
    with pytest.raises(UserError, match="model.block_size=1 is too small"):
        prepared.check_fits(1)
    with pytest.raises(UserError, match="no example of the train split"):
        PairsDataModule(pairs_cfg(path, tmp_path), block_size=16, prepared=prepared)


# ----------------------------------------------------------------------------- step_tokens and the stream


def steps_of(prepared, cfg, world: int, accumulate: int, batch: int, n_steps: int) -> list[list[tuple]]:
    """For each optimizer step, the rows all ranks trained on (as their examples), checking that
    every micro-batch's step_tokens is the true count of targets over the step."""
    steps: list[list[tuple]] = [[] for _ in range(n_steps)]
    counts: list[int] = [0] * n_steps
    claimed: list[set] = [set() for _ in range(n_steps)]
    for rank in range(world):
        cfg_b = replace(cfg, batch_size=batch)
        dm = datamodule(prepared, cfg_b, world=world, rank=rank, accumulate=accumulate, max_steps=n_steps)
        loader = dm.train_dataloader()
        assert len(loader) == n_steps * accumulate
        stream = loader.dataset
        for k, (items, b) in enumerate(zip(batched(list(loader.sampler), batch), loader, strict=True)):
            step = k // accumulate
            steps[step] += [tuple(stream.members(g).tolist()) for g in items]
            counts[step] += int((b["targets"] != IGNORE).sum())
            claimed[step] |= set(b["step_tokens"].tolist())
    assert all(len(c) == 1 for c in claimed)  # one value per step, the same on every rank
    assert [c.pop() for c in claimed] == counts
    return [sorted(rows) for rows in steps]


def batched(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def test_step_tokens_count_the_whole_step_whatever_its_split(tmp_path):
    prepared = prepared_rows(tmp_path, n=80)
    cfg = pairs_cfg(tmp_path / "rows.jsonl", tmp_path, val_windows=None)
    n_steps = 12  # several data epochs: the steps cross epoch boundaries
    one = steps_of(prepared, cfg, world=1, accumulate=1, batch=4, n_steps=n_steps)
    assert steps_of(prepared, cfg, world=1, accumulate=2, batch=2, n_steps=n_steps) == one
    assert steps_of(prepared, cfg, world=2, accumulate=1, batch=2, n_steps=n_steps) == one
    assert len({row for step in one for row in step}) > 4 * n_steps / 2  # rows differ across epochs


def test_epoch_based_training_uses_whole_steps_of_one_data_epoch(tmp_path):
    prepared = prepared_rows(tmp_path)
    cfg = pairs_cfg(tmp_path / "rows.jsonl", tmp_path, batch_size=2)
    dm = datamodule(prepared, cfg, accumulate=3)
    loader = dm.train_dataloader()
    assert len(loader.sampler) == dm.train_packing.n_rows // 6 * 6 and len(loader) % 3 == 0


def test_a_restored_sampler_continues_with_the_same_items(tmp_path):
    prepared = prepared_rows(tmp_path)
    cfg = pairs_cfg(tmp_path / "rows.jsonl", tmp_path, batch_size=2)
    sampler = StreamSampler(40, rank=1, world_size=2)
    sampler.set_epoch(2)
    items = list(sampler)
    assert items == list(range(2 * 80 + 1, 3 * 80, 2))
    restored = StreamSampler(40, rank=1, world_size=2)
    restored.load_state_dict({"epoch": 2, "start": 14})
    restored.set_epoch(2)  # as Lightning does on resume: the position is kept
    assert list(restored) == items[14:] and len(restored) == 40

    # the data module: saved after 5 micro-batches, restored into a new process's data module
    full = [b for b in datamodule(prepared, cfg, max_steps=20).train_dataloader()]
    state = datamodule(prepared, cfg, max_steps=20, processed=5).state_dict()
    assert state == {"epoch": 0, "start": 10}
    resumed = datamodule(prepared, cfg, max_steps=20)
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(full) - 5
    for a, b in zip(full[5:], rest, strict=True):
        assert all((a[k] == b[k]).all() for k in a)


def test_validation_rows_are_fixed_capped_and_shared_out(tmp_path):
    prepared = prepared_rows(tmp_path, n=120, val_fraction=0.5)
    cfg = pairs_cfg(tmp_path / "rows.jsonl", tmp_path, val_fraction=0.5, batch_size=3)
    every = [b for b in datamodule(prepared, cfg).val_dataloader()]
    again = [b for b in datamodule(prepared, cfg).val_dataloader()]
    assert all((a[k] == b[k]).all() for a, b in zip(every, again, strict=True) for k in a)
    n_rows = datamodule(prepared, cfg).val_packing.n_rows
    assert sum(len(b["idx"]) for b in every) == n_rows
    for b in every:  # step_tokens: the count of the batch itself
        assert (b["step_tokens"] == (b["targets"] != IGNORE).sum()).all()
    capped = replace(cfg, val_windows=5)
    ranks = [
        list(datamodule(prepared, capped, world=2, rank=r).val_dataloader().dataset.select) for r in (0, 1)
    ]
    assert ranks == [[0, 2, 4], [1, 3]]


class Recorder(L.LightningModule):
    """Records what each training micro-batch holds; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, list[int], list[int]]] = []

    def training_step(self, batch, batch_idx):
        targets = int((batch["targets"] != IGNORE).sum())
        self.seen.append(
            (self.trainer.global_step, targets, batch["step_tokens"].tolist(), batch["idx"].sum(1).tolist())
        )
        return self.w.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(prepared, cfg, tmp_path, ckpt: str | None = None) -> Recorder:
    """Four optimizer steps of two micro-batches, with a checkpoint after the second."""
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=2, save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    module = Recorder()
    datamodule = PairsDataModule(cfg, block_size=16, seed=3, prepared=prepared)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    return module


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_groups_micro_batches_into_the_steps_step_tokens_counts_and_resumes_exactly(
    tmp_path, num_workers
):
    prepared = prepared_rows(tmp_path)
    cfg = pairs_cfg(tmp_path / "rows.jsonl", tmp_path, batch_size=2, num_workers=num_workers)
    whole = fit(prepared, cfg, tmp_path / "ckpt").seen
    for step in range(4):
        micro = [s for s in whole if s[0] == step]
        assert len(micro) == 2 and all(s[2] == [sum(m[1] for m in micro)] * 2 for s in micro)
    rest = fit(prepared, cfg, tmp_path / "resumed", ckpt=str(tmp_path / "ckpt" / "step=2.ckpt")).seen
    assert rest == whole[4:]
