"""A decoder-only GPT trainer. The library API needs no Lightning:

from gpt import load_model, generate
model, tokenizer = load_model("runs/.../checkpoints/last.ckpt")
"""

from gpt.checkpoint import load_model
from gpt.config import DataConfig, GenerateConfig, ModelConfig, OptimConfig
from gpt.generation import generate, sample_next
from gpt.model import GPT
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer, get_tokenizer

__all__ = [
    "GPT",
    "CharTokenizer",
    "DataConfig",
    "GenerateConfig",
    "ModelConfig",
    "OptimConfig",
    "TiktokenTokenizer",
    "generate",
    "get_tokenizer",
    "load_model",
    "sample_next",
]
