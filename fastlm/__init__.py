"""fastlm: fast, light fine-tuning of large language models, with Unsloth's FastLanguageModel API."""
from fastlm.api import FastLanguageModel

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "__version__"]
