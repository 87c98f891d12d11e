"""The callbacks Lightning does not ship, called as Lightning calls them: ValidateOnLastStep,
NonFiniteGuard, SampleText, Evaluate, RunReport, ProgressBar and ModelSummary. Throughput in a real
run: tests/commands/test_train.py; what the console shows: tests/train/test_console.py."""

from __future__ import annotations

import io
import json
import logging
import re
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from gpt.config import DataConfig, DecodeConfig, OptimConfig, SamplingConfig
from gpt.data.pairs import data_format
from gpt.errors import NonFiniteError
from gpt.generate.text import generate_text
from gpt.tokenizer import CharTokenizer
from gpt.train.callbacks import (
    Evaluate,
    ModelSummary,
    NonFiniteGuard,
    ProgressBar,
    RunReport,
    SampleText,
    ValidateOnLastStep,
    held_out_examples,
)
from gpt.train.lit_module import GPTLitModule
from tests.helpers import CHARS, compose_train, tiny_config, tiny_model


def test_validate_on_last_step_asks_to_stop_at_max_steps_only():
    callback = ValidateOnLastStep()
    for max_steps, step, stops in ((5, 4, False), (5, 5, True), (-1, 10**6, False)):
        trainer = SimpleNamespace(max_steps=max_steps, global_step=step, should_stop=False)
        callback.on_train_batch_end(trainer)
        assert trainer.should_stop is stops, (max_steps, step)


def test_nonfinite_guard_refuses_an_unknown_action():
    with pytest.raises(ValueError, match=r"callbacks.nonfinite.action='ignore': use stop or skip"):
        NonFiniteGuard(action="ignore")


def guarded_step(tmp_path):
    """A one-layer module and the parts of a Trainer that NonFiniteGuard reads, at step 7."""
    layer = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=None),
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        global_step=7,
        world_size=1,
        default_root_dir=str(tmp_path),
    )
    return layer, trainer, SimpleNamespace(parameters=layer.parameters, device=torch.device("cpu"))


def test_guard_skips_at_most_max_skips_steps_in_a_row(tmp_path):
    """Called as Lightning calls it: a step whose gradient is NaN is skipped (its gradients
    dropped) up to max_skips times in a row, then training stops; a finite step resets the count."""
    layer, trainer, module = guarded_step(tmp_path)
    guard = NonFiniteGuard(action="skip", max_skips=2)

    def step(grad: float) -> None:
        for p in layer.parameters():
            p.grad = torch.full_like(p, grad)
        guard.on_before_backward(trainer, module, torch.tensor(1.0))
        guard.on_before_optimizer_step(trainer, module, None)

    step(float("nan"))
    assert all(p.grad is None for p in layer.parameters())  # the update is skipped
    step(float("nan"))
    step(1.0)  # a finite step: grads kept, count reset
    assert all(p.grad is not None for p in layer.parameters())
    step(float("nan"))
    step(float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 7 after 2 skipped steps in a row"):
        step(float("nan"))


def test_guard_stops_before_the_update_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    layer, trainer, module = guarded_step(tmp_path)
    guard = NonFiniteGuard()
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    guard.on_before_backward(trainer, module, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteError) as info:
        guard.on_before_optimizer_step(trainer, module, None)
    assert str(info.value).startswith(
        "non-finite loss at step 7; training stopped before updating the weights. "
        "No checkpoint was saved yet. Try a lower optim.lr"
    )
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 5}, tmp_path / "checkpoints" / "step-5.ckpt")
    guard = NonFiniteGuard()  # a stopped guard keeps naming the first step that went non-finite
    for p in layer.parameters():
        p.grad = torch.full_like(p, float("inf"))
    guard.on_before_backward(trainer, module, torch.tensor(1.0))
    with pytest.raises(
        NonFiniteError, match=r"non-finite gradient at step 7; .* Last good checkpoint: .*step-5"
    ):
        guard.on_before_optimizer_step(trainer, module, None)


@pytest.fixture
def char_module():
    """What SampleText reads of a GPTLitModule: its model (in training mode) and tokenizer."""
    tok = CharTokenizer(CHARS)
    model = tiny_model(vocab_size=tok.vocab_size, init_std=0.5).train()
    return SimpleNamespace(model=model, tokenizer=tok), tok


def test_sample_text_is_generate_text_with_its_own_seed_and_leaves_training_as_it_was(char_module):
    module, tok = char_module
    callback = SampleText(prompt="ROMEO:", max_new_tokens=12)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    text = callback.sample(module)
    assert torch.equal(torch.get_rng_state(), before)  # dropout's stream untouched
    assert module.model.training
    module.model.eval()
    expected = generate_text(module.model, tok, "ROMEO:", 12, seed=0, temperature=0.8, top_k=200)
    assert text == "ROMEO:" + expected and len(expected) == 12
    assert callback.sample(module) == text  # the same text at every call: one seed


def test_sample_text_prompts_a_pairs_model_with_its_template(char_module):
    module, tok = char_module
    fmt = data_format(DataConfig(source="pairs", path="x", template="Q {prompt}: "))
    module.hparams = {"data_format": fmt}
    text = SampleText(prompt="AB", max_new_tokens=6).sample(module)
    module.model.eval()
    expected = generate_text(module.model, tok, "Q AB: ", 6, seed=0, temperature=0.8, top_k=200)
    assert text == "Q AB: " + expected


def test_sample_text_is_written_every_n_optimizer_steps(char_module, tmp_path):
    module, _ = char_module
    callback = SampleText(every_n_steps=2, prompt="A", max_new_tokens=5)
    trainer = SimpleNamespace(
        global_step=0,
        fit_loop=SimpleNamespace(_should_accumulate=lambda: False),
        is_global_zero=True,
        default_root_dir=str(tmp_path),
        loggers=[],
    )
    for step in range(5):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module)
    text = (tmp_path / "samples.txt").read_text()
    sample = callback.sample(module)
    assert text == f"=== step 2\n{sample}\n=== step 4\n{sample}\n"


def test_run_report_summary_reads_the_checkpoint_callbacks(tmp_path):
    torch.save({"global_step": 6}, tmp_path / "best-step=6.ckpt")
    best = SimpleNamespace(
        monitor="val/loss",
        best_model_score=torch.tensor(1.23456),
        best_model_path=str(tmp_path / "best-step=6.ckpt"),
    )
    last = SimpleNamespace(monitor="step", last_model_path=str(tmp_path / "last.ckpt"))
    trainer = SimpleNamespace(
        global_step=12, checkpoint_callbacks=[best, last], callback_metrics={"val/loss": torch.tensor(1.5)}
    )
    report = RunReport()
    report.on_fit_start(trainer, None)
    trainer.global_step = 4  # resumed at step 4
    report.on_train_start(trainer, None)
    trainer.global_step = 12
    report._last_validation_step = 12
    lines = report.summary(trainer, SimpleNamespace(tokens_seen=8 * 32 * 8))
    assert lines[0].startswith("training finished at step 12: 8 steps (resumed at step 4) in ")
    assert lines[0].endswith(" s (training and validation), 2,048 training tokens")
    assert lines[1:] == [
        "final val/loss 1.5000 at step 12, best 1.2346 at step 6",
        f"last checkpoint: {tmp_path / 'last.ckpt'}",
        f"best checkpoint: {tmp_path / 'best-step=6.ckpt'}",
    ]


# ----------------------------------------------------------------------------- ProgressBar, ModelSummary


def test_the_progress_bar_shows_numbers_to_four_decimals_as_the_report_does():
    trainer = SimpleNamespace(progress_bar_metrics={"val/loss": 3.39841, "val/ppl": 29.916108}, loggers=[])
    module = SimpleNamespace(bar_metrics={"loss": 3.36})
    metrics = ProgressBar().get_metrics(trainer, module)
    assert metrics == {"loss": "3.3600", "val/loss": "3.3984", "val/ppl": "29.9161"}
    bar = Tqdm(disable=True)  # the class Lightning draws the bars with; formats the postfix as drawn
    bar.set_postfix({"v_num": 0, **metrics}, refresh=False)
    assert bar.postfix == "v_num=0, loss=3.3600, val/loss=3.3984, val/ppl=29.9161"
    bar.set_postfix({"loss": 3.36}, refresh=False)  # what Lightning's bar alone would show
    assert bar.postfix == "loss=3.360"


class Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize("terminal", [True, False])
@pytest.mark.parametrize("terminal_only", [True, False])
def test_the_progress_bar_is_drawn_only_where_stdout_is_a_terminal(monkeypatch, terminal, terminal_only):
    monkeypatch.setattr("sys.stdout", Stream(terminal))
    bar = ProgressBar(refresh_rate=10, terminal_only=terminal_only)
    bar.setup(SimpleNamespace(is_global_zero=True), None, "fit")
    assert bar.is_enabled is (terminal or not terminal_only)
    assert bar.init_train_tqdm().disable is not bar.is_enabled  # Lightning's bars follow the switch


def test_the_model_summary_lists_the_model_without_metric_objects_or_flops(caplog):
    module = GPTLitModule.from_configs(tiny_config(), OptimConfig(), CharTokenizer(CHARS))
    assert {"train_loss", "val_nats"} <= {name for name, _ in module.named_children()}  # torchmetrics objects
    with caplog.at_level(logging.INFO, logger="gpt.train.callbacks"):
        ModelSummary().on_fit_start(SimpleNamespace(is_global_zero=True, strategy=None), module)
    (table,) = [r.getMessage() for r in caplog.records]
    lines = table.splitlines()
    assert re.fullmatch(r" +\| Name +\| Type +\| Params +\| Mode", lines[0])
    assert set(lines[1]) == set(lines[3]) == {"-"}
    assert re.fullmatch(r"0 \| model \| GPT  \| [\d.]+ K +\| train", lines[2])  # the model's only row
    modules = len(list(module.model.modules()))
    assert [line[10:] for line in lines[4:]] == [  # Lightning's: a value 10 wide, then its name
        "Trainable params",
        "Non-trainable params",
        "Total params",
        "Total estimated model params size (MB)",
        "Modules in train mode",
        "Modules in eval mode",
    ]
    assert lines[8].split()[0] == str(modules)  # the model's modules, not the metric objects
    assert not re.search("flop|metric", table, re.IGNORECASE) and table == table.rstrip()


def test_sample_settings_come_from_conf_and_are_checked():
    """callbacks.samples.sampling in conf/ reaches SampleText as a SamplingConfig, validated."""
    cfg = compose_train("callbacks.samples.sampling.temperature=0.3", "+callbacks.samples.sampling.min_p=0.1")
    callback = instantiate(cfg.callbacks.samples)
    assert callback.sampling == SamplingConfig(temperature=0.3, top_k=200, min_p=0.1)
    assert instantiate(compose_train().callbacks.samples).sampling == SamplingConfig()
    with pytest.raises(InstantiationException, match="temperature=-1 must be >= 0"):
        instantiate(compose_train("callbacks.samples.sampling.temperature=-1").callbacks.samples)


# ----------------------------------------------------------------------------- Evaluate


def test_the_evaluate_entry_in_conf_is_off_until_configured_and_checked(tmp_path):
    callback = instantiate(compose_train().callbacks.evaluate)
    assert isinstance(callback, Evaluate)
    assert callback.every_n_steps is None and callback.path is None
    assert callback.decoding == DecodeConfig()
    assert callback.template == "checkpoint" and Evaluate(template=None).template == "checkpoint"
    with pytest.raises(ValueError, match=r"callbacks.evaluate.limit=0 must be >= 1 \(or null: all\)"):
        Evaluate(limit=0)
    with pytest.raises(ValueError, match="callbacks.evaluate.windows='some' is not one of val, all"):
        Evaluate(windows="some")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "completion": "b"}\n')
    callback = instantiate(
        compose_train(
            "callbacks.evaluate.every_n_steps=50",
            f"callbacks.evaluate.path={pairs}",
            "callbacks.evaluate.decoding.methods=[greedy,beam]",
            "callbacks.evaluate.decoding.num_beams=2",
        ).callbacks.evaluate
    )
    assert callback.every_n_steps == 50 and callback.decoding.methods == ["greedy", "beam"]
    assert callback.decoding.num_beams == 2
    with pytest.raises(InstantiationException, match="num_beams=0 must be >= 1"):
        instantiate(compose_train("callbacks.evaluate.decoding.num_beams=0").callbacks.evaluate)
    with pytest.raises(InstantiationException, match="callbacks.evaluate.path=nope.jsonl does not exist"):
        instantiate(
            compose_train(
                "callbacks.evaluate.every_n_steps=5", "callbacks.evaluate.path=nope.jsonl"
            ).callbacks.evaluate
        )


def test_without_examples_the_evaluation_says_so_once_and_does_nothing(monkeypatch):
    said = []
    monkeypatch.setattr("gpt.train.callbacks.evaluate.report", said.append)
    trainer = SimpleNamespace(strategy=None, datamodule=None, global_step=4)
    assert held_out_examples(None) is None
    callback = Evaluate(every_n_steps=2)
    callback.on_fit_start(trainer, None)
    callback.on_train_end(trainer, None)
    assert callback.examples == [] and len(said) == 1 and "evaluation is off" in said[0]
    Evaluate().on_fit_start(trainer, None)  # off: not a word
    assert len(said) == 1


def test_a_short_run_logs_eval_columns_every_n_steps_and_at_the_end(tmp_path):
    """A small Trainer with the CSV logger and a second one (wandb's place: every logger gets the
    scores): eval/generate/<method>/<metric> at steps 3 and 5 (the end), and each evaluation's outputs in
    <run dir>/evals/."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, Logger

    class Recorder(Logger):
        name, version = "recorder", 0
        logged: list[tuple[int, dict[str, float]]] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params: object) -> None:
            pass

    from gpt.config import ModelConfig, OptimConfig
    from gpt.runs.metrics import read_metrics
    from gpt.train.lit_module import GPTLitModule

    tok = CharTokenizer(CHARS, eot=True)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"prompt": "ROMEO:", "completion": "Ay me."}\n{"prompt": "JULIET:", "completion": "Romeo!"}\n'
        '{"prompt": "not", "completion": "read"}\n'
    )
    module = GPTLitModule.from_configs(
        ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size),
        OptimConfig(warmup_steps=1),
        tok,
    )
    torch.manual_seed(0)
    windows = torch.randint(0, len(CHARS), (10, 17))
    loader = torch.utils.data.DataLoader(
        list(zip(windows[:, :-1], windows[:, 1:], strict=True)), batch_size=2
    )
    callback = Evaluate(
        every_n_steps=3,
        path=str(pairs),
        limit=2,
        decoding={"methods": ["greedy", "beam"], "num_beams": 2, "max_new_tokens": 3},
    )
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        devices=1,
        logger=[CSVLogger(tmp_path, name="csv"), Recorder()],
        callbacks=[callback],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=loader)
    rows = [r for r in read_metrics(tmp_path) if "eval/generate/greedy/exact_match" in r]
    assert [int(r["step"]) for r in rows] == [3, 5]
    columns = {
        f"eval/generate/{m}/{k}"
        for m in ("greedy", "beam")
        for k in ("exact_match", "token_accuracy", "chrf", "bleu")
    }
    assert all(columns <= r.keys() for r in rows)
    evaluations = [(step, m) for step, m in Recorder.logged if "eval/generate/greedy/exact_match" in m]
    assert [step for step, _ in evaluations] == [3, 5]
    assert all(m[c] == r[c] for (_, m), r in zip(evaluations, rows, strict=True) for c in columns)
    assert all(0 <= r[c] <= 100 for r in rows for c in columns)
    assert sorted(p.name for p in (tmp_path / "evals").iterdir()) == ["step-3.jsonl", "step-5.jsonl"]
    records = (tmp_path / "evals/step-5.jsonl").read_text().splitlines()
    assert [json.loads(r)["prompt"] for r in records] == ["ROMEO:\n", "JULIET:\n"]  # limit 2, plain template
    assert module.model.training  # back to training after each evaluation
