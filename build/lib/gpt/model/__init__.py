"""The network: a decoder-only transformer in plain PyTorch and the KV cache generation passes into it."""
