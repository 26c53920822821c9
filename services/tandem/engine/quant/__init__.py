"""Quantized weights: compressed-tensors checkpoints (FP8 W8A8, INT8 W8A16) and `--quantization fp8`.

`scheme` decides which linear layers are quantized and how (`QuantPlan`), `weights` turns
checkpoint tensors into the tensors those layers hold, `linear` holds them and runs the
matmul, `fp8` is the FP8 quantization math, and `writer` produces compressed-tensors
checkpoints with the library itself (tests and benchmarks).

No imports here: `tandem.engine.config` reads `scheme.QUANTIZATION_NAMES` without torch.
"""
