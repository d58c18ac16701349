"""Entry points: the torchrun CLI `spectrum-xdit` and the demo run of `make run`."""
