"""spectrum-xdit: Spectrum feature forecasting for diffusion transformers, on xDiT."""

from .config import SpectrumConfig
from .forecaster import SpectrumForecaster
from .hooks import apply_spectrum, remove_spectrum, spectrum_stats
from .schedule import paper_schedule

__all__ = [
    "SpectrumConfig",
    "SpectrumForecaster",
    "apply_spectrum",
    "paper_schedule",
    "remove_spectrum",
    "spectrum_stats",
]
__version__ = "0.1.0"
