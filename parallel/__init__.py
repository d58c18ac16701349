"""xDiT integration: process groups, rank-consistent decisions, CFG and pipeline parallelism,
and the patches of xfuser 0.7.0 (``patches``). Installed as ``spectrum_xdit.parallel``; call
:func:`spectrum_xdit.parallel.patches.install` before anything imports ``xfuser``.
"""
