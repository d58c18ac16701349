"""Ray Serve 2.60.0's one listener on every interface: each replica's inter-deployment gRPC server.

``ray/serve/_private/replica.py``, ``Replica._on_initialized``, binds it with
``add_port_to_grpc_server(self._server, "[::]:0")``, hard-coded, past Serve's HTTP host setting.
Deployment handles reach it at the replica's node address (``ray.util.get_node_ip_address()``,
which the replica reports as its ``node_ip``) and that port. Where that address is loopback (a
local instance in Ray's single-machine mode) no other machine could use the port anyway, so the
patch binds it to the node address and the replica opens nothing beyond loopback; on a node with
a routable address the bind is left to Ray. Call :func:`install` in the replica's process before
Serve starts that server: a deployment's constructor runs before it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import ipaddress
import warnings
from types import ModuleType
from typing import Callable

from .importing import is_marked, mark

RAY_VERSION = "2.60.0"
MODULE = "ray.serve._private.replica"
EVERY_INTERFACE = "[::]:0"
PATCHED_CALL = f'add_port_to_grpc_server(self._server, "{EVERY_INTERFACE}")'


def install() -> dict:
    """Patch this process's Ray Serve, once; return what was done (``installed`` or ``skipped``
    with why). Another Ray, or a ``replica.py`` without the call, is left alone with a warning."""
    import ray

    if ray.__version__ != RAY_VERSION:
        return _skipped(ray.__version__, f"ray {ray.__version__}; this patch is for {RAY_VERSION}")
    replica = importlib.import_module(MODULE)
    if PATCHED_CALL not in inspect.getsource(replica.Replica._on_initialized):
        return _skipped(ray.__version__, f"{MODULE}.Replica._on_initialized does not call {PATCHED_CALL}")
    patch_replica(replica, ray.util.get_node_ip_address)
    return {"ray_version": ray.__version__, "installed": ["ray_serve_grpc"], "skipped": {}}


def patch_replica(replica: ModuleType, node_address: Callable[[], str]) -> None:
    """Replace ``replica.add_port_to_grpc_server`` (imported there from ``ray._common.tls_utils``,
    which keeps TLS settings) by one that binds the every-interface address to
    ``node_address()`` when that is loopback."""
    original = replica.add_port_to_grpc_server
    if is_marked(original):
        return

    @functools.wraps(original)
    def add_port_to_grpc_server(server, address):
        return original(server, loopback_bind(address, node_address()))

    replica.add_port_to_grpc_server = mark(add_port_to_grpc_server)


def loopback_bind(address: str, node: str) -> str:
    """``address``, or ``node``'s port-0 address in its place when ``address`` is every interface
    and ``node`` is a loopback address."""
    if address != EVERY_INTERFACE or not ipaddress.ip_address(node).is_loopback:
        return address
    return f"[{node}]:0" if ":" in node else f"{node}:0"


def _skipped(version: str, why: str) -> dict:
    warnings.warn(f"spectrum-xdit: the Ray Serve gRPC loopback patch is skipped: {why}", RuntimeWarning, stacklevel=3)
    return {"ray_version": version, "installed": [], "skipped": {"ray_serve_grpc": why}}
