"""Fused Triton kernels, one op per file, each with its plain-PyTorch `reference`."""
