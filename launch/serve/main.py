"""`spectrum-xdit serve`: start Ray (or join a cluster), deploy the app, serve until interrupted."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from .auth import exposure_warning
from .settings import settings_from_args

# Ray's single-machine mode (its default on macOS and Windows): the node's address is loopback,
# so the GCS, raylet, agents and workers listen on 127.0.0.1 only. Read when Ray is imported.
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def wait_until_ready(url: str, timeout: float, interval: float = 1.0) -> dict:
    """Poll ``url``/healthz until it answers 200; its body. Raises ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            last = error.read().decode(errors="replace")[:500]
        except (urllib.error.URLError, OSError) as error:
            last = str(error)
        time.sleep(interval)
    raise TimeoutError(f"{url}/healthz not ready after {timeout:.0f} s: {last}")


def serve_main(args, parser) -> None:
    """With no ``--address``, a local Ray instance that listens on loopback only (``--host``
    opens HTTP alone to other machines); with one, Ray's own settings apply."""
    try:
        settings = settings_from_args(args).with_api_keys()
        settings.check()
    except ValueError as error:
        parser.error(str(error))
    warning = exposure_warning(args.host, settings.api_key)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    if args.address is None:
        for name, value in LOCAL_ONLY_ENV.items():
            os.environ.setdefault(name, value)
    import ray
    from ray import serve

    from .app import APP_NAME, build_app

    if args.address is None:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    else:
        ray.init(address=args.address)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        print(f"spectrum-xdit: serving {settings.model} at {url} ({settings.num_replicas} replica(s) x "
              f"{settings.world_size} rank(s)); waiting for the ranks ...", flush=True)
        health = wait_until_ready(url, settings.setup_timeout_s)
        print(f"spectrum-xdit: ready ({len(health['workers'])} ranks); POST {url}/v1/generate, Ctrl-C to stop",
              flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("spectrum-xdit: shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
