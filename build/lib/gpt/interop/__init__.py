"""Hugging Face interop: config and weight mapping for GPT-2 and Llama, loading their checkpoint
directories, and exporting ours."""
