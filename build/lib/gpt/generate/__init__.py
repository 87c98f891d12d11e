"""Generation: the token-level engine (sampling, KV cache, beam search), text-level streaming with stop
strings, and the generate command."""
