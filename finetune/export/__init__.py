"""After training: merge an adapter into its base (merge.py), as HF safetensors or GGUF (gguf.py)."""
