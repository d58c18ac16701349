"""xDiT integration: process groups, rank-consistent decisions, CPU/gloo support.

Installed as ``spectrum_xdit.parallel``. On a machine without CUDA, call
:func:`spectrum_xdit.parallel.cpu_support.enable_cpu_support` before anything imports
``xfuser``.
"""
