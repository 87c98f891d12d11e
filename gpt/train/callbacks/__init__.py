"""Callbacks Lightning does not ship, one module each: validate on the last step, stop on non-finite
values, throughput, text samples, evaluation tasks, the run report, a progress bar drawn only on a
terminal and a plain model summary. Named here as conf/callbacks/default.yaml's `_target_`s name them."""

from gpt.train.callbacks.evaluate import Evaluate, held_out_examples
from gpt.train.callbacks.model_summary import ModelSummary
from gpt.train.callbacks.nonfinite_guard import NonFiniteGuard
from gpt.train.callbacks.progress_bar import ProgressBar
from gpt.train.callbacks.run_report import RunReport
from gpt.train.callbacks.sample_text import SampleText
from gpt.train.callbacks.throughput import Throughput
from gpt.train.callbacks.validate_on_last_step import ValidateOnLastStep

__all__ = [
    "Evaluate",
    "ModelSummary",
    "NonFiniteGuard",
    "ProgressBar",
    "RunReport",
    "SampleText",
    "Throughput",
    "ValidateOnLastStep",
    "held_out_examples",
]
