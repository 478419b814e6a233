from fastlm.models.registry import DEFAULT_TARGET_MODULES, SUPPORTED, ModelSpec, spec_for

__all__ = ["DEFAULT_TARGET_MODULES", "SUPPORTED", "ModelSpec", "spec_for"]
