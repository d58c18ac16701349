"""The `--spectrum_<setting>` flags, shared by `spectrum-xdit generate` and `spectrum-xdit serve`."""

from __future__ import annotations

import argparse

from ..config import SETTINGS, SpectrumConfig, parse_setting


def _typed(name: str):
    def convert(text: str):
        try:
            return parse_setting(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = name   # argparse names the type in its error message
    return convert


def spectrum_settings(source) -> dict:
    """The Spectrum settings held as ``spectrum_<name>`` attributes (parsed flags, server settings)."""
    return {name: getattr(source, f"spectrum_{name}") for name in SETTINGS}


def add_spectrum_flags(parser, defaults: dict | None = None) -> None:
    """One ``--spectrum_<name>`` flag per :data:`spectrum_xdit.config.SETTINGS`, defaults from
    ``defaults`` (else ``SpectrumConfig()``)."""
    base = SpectrumConfig()
    for name in SETTINGS:
        default = (defaults or {}).get(name, getattr(base, name))
        extra = ' or "auto"' if name == "blend_weight" else ""
        choices = ' ("paper" or "adaptive")' if name == "schedule" else ""
        parser.add_argument(f"--spectrum_{name}", type=_typed(name), default=default,
                            help=f"SpectrumConfig.{name}{choices}{extra} (default {default})")
