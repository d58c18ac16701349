"""spectrum-xdit: Spectrum feature forecasting for diffusion transformers, on xDiT.

The names below load on first use, so that ``spectrum_xdit.config`` (and a launcher checking its
arguments) does not import torch and diffusers.
"""

import importlib

_EXPORTS = {
    "SpectrumConfig": "config",
    "SpectrumForecaster": "forecaster",
    "SpectrumState": "hooks",
    "apply_spectrum": "hooks",
    "apply_spectrum_to_pipeline": "experts",
    "expert_states": "experts",
    "expert_steps": "experts",
    "paper_schedule": "schedule",
    "pipeline_spectrum_stats": "experts",
    "remove_spectrum": "hooks",
    "remove_spectrum_from_pipeline": "experts",
    "spectrum_stats": "hooks",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spectrum_xdit' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
