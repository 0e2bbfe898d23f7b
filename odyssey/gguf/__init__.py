"""llama.cpp GGUF files read as Odyssey models: `reader` (header, metadata, tensor ranges,
structural checks, ModelConfig, HF names) and `dequant` (GGML block types -> float tensors in
torch, bit-exact against the `gguf` package's reference)."""
