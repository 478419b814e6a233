"""fastlm: fast, light fine-tuning of large language models, with Unsloth's FastLanguageModel API."""
import os

# CUDA memory in expandable segments (one growing mapping per stream instead of fixed-size blocks: less
# fragmentation; reserved 2.84 -> 2.59 GiB for the same step at Llama-3.2-1B QLoRA, bench/RESULTS.md run 25), as
# Unsloth sets it, unless the caching allocator's settings are given (PYTORCH_ALLOC_CONF, or its older name
# PYTORCH_CUDA_ALLOC_CONF: set either, e.g. to "expandable_segments:False", to keep your own). torch reads it at
# the first CUDA allocation, so it applies where fastlm is imported before anything is put on a GPU.
ALLOCATOR_SETTINGS = "expandable_segments:True"
if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_ALLOC_CONF"] = ALLOCATOR_SETTINGS

from fastlm.api import FastLanguageModel  # noqa: E402  (after the allocator settings: it imports torch)

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "__version__"]
