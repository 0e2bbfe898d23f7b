"""llama.cpp GGUF files read as Odyssey models: `reader` (header, metadata, tensor ranges,
structural checks, ModelConfig, HF names) and `dequant` (GGML block types -> float tensors in
torch, bit-exact against the `gguf` package's reference); `quantize` goes the other way, for
export (float -> GGML blocks: gguf's quantizers, and llama.cpp's k-quant algorithms in torch)."""
