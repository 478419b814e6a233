"""Saving a trained model for inference elsewhere: merged checkpoints (merge.py) and GGUF files (gguf.py)."""
import types

from fastlm.export.gguf import save_pretrained_gguf
from fastlm.export.merge import save_pretrained_merged


def attach_save_methods(model) -> None:
    """Give this model instance Unsloth's `save_pretrained_merged` and `save_pretrained_gguf`; nothing else changes."""
    model.save_pretrained_merged = types.MethodType(save_pretrained_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, model)
