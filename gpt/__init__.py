"""A decoder-only GPT trainer. The library API needs no Lightning:

from gpt import load_model, generate_text
model, tokenizer = load_model("runs/.../checkpoints/last.ckpt")   # once
generate_text(model, tokenizer, "ROMEO:", 100, temperature=0.8)    # as often as you like
"""

from gpt.config import DataConfig, GenerateConfig, ModelConfig, OptimConfig, SamplingConfig
from gpt.generate.text import generate_text
from gpt.generate.tokens import beam_search, generate, sample_next
from gpt.model.kv_cache import KVCache
from gpt.model.transformer import GPT
from gpt.runs.checkpoint import load_model
from gpt.tokenizer import BPETokenizer, CharTokenizer, TiktokenTokenizer, get_tokenizer

__all__ = [
    "GPT",
    "BPETokenizer",
    "CharTokenizer",
    "DataConfig",
    "GenerateConfig",
    "KVCache",
    "ModelConfig",
    "OptimConfig",
    "SamplingConfig",
    "TiktokenTokenizer",
    "beam_search",
    "generate",
    "generate_text",
    "get_tokenizer",
    "load_model",
    "sample_next",
]
