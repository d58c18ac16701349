"""`spectrum-xdit serve` on Ray Serve, by job: ``settings`` (flags and YAML, no Ray), ``worker``
(one rank's actor), ``rank_group`` (a replica's ranks: failures, stops, probes, rebuilds),
``engine`` (the replica's job loop), ``app`` (the HTTP API and the deployment), ``main`` (the
command). Installed as ``spectrum_xdit.launch.serve``."""
