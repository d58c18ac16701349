"""Run xDiT's (xfuser 0.7.0) sequence-parallel code on CPU-only machines, over gloo.

xfuser assumes an accelerator. Without CUDA, ``import xfuser`` fails, and once that is fixed
its configuration refuses sequence parallelism and its Ring path has no process group and no
attention kernel that returns a log-sum-exp. :func:`enable_cpu_support` fixes exactly those
points and nothing else, so that the real Ulysses, Ring and USP code paths of xDiT (all-to-all,
ring exchange, LSE merge, sequence split/gather in the transformer wrappers) run unchanged on
CPU processes, which is what the tests and CPU benchmarks of this project need.

Every patch is applied the moment the patched xfuser module finishes executing (an import
hook), because several xfuser modules copy the values being fixed into module globals while
they are imported (``HAS_LONG_CTX_ATTN = env_info["has_long_ctx_attn"]``, ``PROCESS_GROUP``).
So :func:`enable_cpu_support` must run before the first ``import xfuser``.

The patches, by xfuser module:

``xfuser.envs``
    * ``get_device_version`` raises ``NotImplementedError("No Accelerators ...")`` on a CPU-only
      machine, and ``xfuser/config/config.py`` evaluates ``envs.CUDA_VERSION`` (which calls it)
      at import, so ``import xfuser`` fails. Patched to return ``None`` without an accelerator,
      which xfuser already maps to version ``0.0`` (only its CUDA-graph check reads it).
    * ``get_torch_distributed_backend`` raises the same way; ``init_distributed_environment``,
      ``initialize_model_parallel`` and the runtime state call it when no backend is passed.
      Patched to return ``"gloo"`` (also when CPU support is forced on a CUDA machine).
    * ``PACKAGES_CHECKER.packages_info["has_long_ctx_attn"]`` is ``False`` whenever CUDA is
      absent, even with yunchang installed; ``SequenceParallelConfig`` then raises for any
      ``sp_degree > 1`` and ``initialize_model_parallel`` builds no Ulysses/Ring groups. Set to
      whether yunchang's sequence-parallel API imports, the check xfuser makes on GPUs.

``xfuser.model_executor.layers.usp``
    * binds ``PROCESS_GROUP = None`` unless CUDA or an NPU is present, so Ring attention fails
      with ``AttributeError: 'NoneType' object has no attribute 'RING_PG'``. Rebound to
      ``yunchang.globals.PROCESS_GROUP``, the singleton ``initialize_model_parallel`` fills in.

``xfuser.core.distributed.attention_backend``
    * Ring attention merges partial results by log-sum-exp, so the attention function must
      return ``(out, lse)``. xDiT's ``SDPA_FLASH`` entry calls
      ``aten._scaled_dot_product_flash_attention``, which has no CPU kernel. For CPU tensors the
      entry now calls ``aten._scaled_dot_product_flash_attention_for_cpu``, which returns
      ``(out, logsumexp)`` in the same layout; other devices keep xDiT's call.

``xfuser.core.distributed.runtime_state``
    * Without CUDA, xDiT's automatic backend choice is ``SDPA`` (no LSE), which its own check
      rejects for ``ring_degree > 1`` ("Selected attention backend does not support ring
      parallelism"). The automatic choice becomes ``SDPA_FLASH`` (on a CUDA machine forced
      into CPU mode too, where xDiT would pick a GPU-only kernel); an explicitly configured
      ``attention_backend`` is left alone.

``xfuser.core.distributed.group_coordinator`` (PipeFusion's stage-to-stage exchange)
    * The module binds ``synchronize = torch.cuda.synchronize`` and
      ``PipelineGroupCoordinator._communicate_shapes`` calls it after each exchange, which
      raises ``AssertionError: Torch not compiled with CUDA enabled``. Rebound to
      ``torch.cpu.synchronize`` (CPU ops are synchronous).
    * ``_communicate_shapes`` waits for its *sends* (the number of dimensions, then the shape,
      sent to the next stage the first time a (name, patch) pair is sent). gloo's send does not
      complete before the receiver posts the matching receive, so in the asynchronous
      (patch-pipelined) loop the last stage blocks sending its first patch's shape to stage 0
      while stage 0 blocks sending its next patch's shape to the last stage, and neither
      receives: a deadlock (``pipeline_flux.py``, ``xFuserFluxPipeline._async_pipeline``,
      both ranks inside ``pipeline_isend``/``get_pipeline_recv_data``); on GPUs the same loop
      runs, NCCL evidently completing these few-byte sends before the receiver asks. On CPU
      the two shape messages are now sent with ``isend`` and not waited for; receives still
      block. The messages, their order, groups and tags are xDiT's, so both sides still match
      them one to one.
    * xDiT drops the ``Work`` of every patch it sends with ``pipeline_isend`` (and
      ``pipeline_isend_skip``), and the shape messages above are not waited for either; a
      gloo send needs its ``Work`` (which holds the tensor) until the receiver has taken it.
      The coordinator keeps these ``Work`` objects (not those xDiT waits for itself: a second
      ``wait`` on a gloo send blocks for good) and waits for them at the start of the next
      generation (``DiTRuntimeState.set_input_parameters``, which every xDiT pipeline call
      makes first): by then this rank has made every send and receive of the previous
      generation, so its receivers can take them without its help.
      :func:`wait_for_pipeline_sends` does the same on demand.

On a machine with CUDA nothing is patched (unless asked for with ``SPECTRUM_XDIT_CPU=1``) and
xDiT runs untouched with NCCL.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from types import ModuleType
from typing import Callable

import torch

ENV_VAR = "SPECTRUM_XDIT_CPU"

_enabled = False


def cpu_support_wanted() -> bool:
    """Whether the CPU patches should be applied in this process.

    ``SPECTRUM_XDIT_CPU=1`` forces them on and ``SPECTRUM_XDIT_CPU=0`` forces them off;
    otherwise they are on exactly when CUDA (or ROCm, which torch reports as CUDA) is absent.
    """
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting in ("1", "0"):
        return setting == "1"
    if setting:
        raise ValueError(f"{ENV_VAR} must be '0' or '1', got {setting!r}")
    return not torch.cuda.is_available()


def enable_cpu_support() -> bool:
    """Install the CPU/gloo patches for xfuser if :func:`cpu_support_wanted`; return whether on.

    Must be called before ``xfuser`` is first imported. Calling it again is harmless. Raises
    ``RuntimeError`` if xfuser was imported earlier and the patches are wanted, because modules
    that already copied the unpatched values cannot be fixed afterwards.
    """
    global _enabled
    if _enabled:
        return True
    if not cpu_support_wanted():
        return False
    already_imported = sorted(
        name for name in sys.modules if name == "xfuser" or name.startswith("xfuser.")
    )
    if already_imported:
        raise RuntimeError(
            "enable_cpu_support() must run before xfuser is imported; already imported: "
            + ", ".join(already_imported[:5])
        )
    sys.meta_path.insert(0, _PatchOnImport(_PATCHES))
    _enabled = True
    return True


def _patch_envs(envs: ModuleType) -> None:
    original_device_version = envs.get_device_version

    def get_device_version():
        try:
            return original_device_version()
        except NotImplementedError:
            return None

    def get_torch_distributed_backend() -> str:
        return "gloo"

    envs.get_device_version = get_device_version
    envs.get_torch_distributed_backend = get_torch_distributed_backend
    envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = _yunchang_importable()


def _yunchang_importable() -> bool:
    try:
        from yunchang import (  # noqa: F401
            LongContextAttention,
            UlyssesAttention,
            set_seq_parallel_pg,
        )
    except ImportError:
        return False
    return True


def _patch_usp(usp: ModuleType) -> None:
    from yunchang.globals import PROCESS_GROUP

    usp.PROCESS_GROUP = PROCESS_GROUP


def _patch_attention_backend(attention_backend: ModuleType) -> None:
    registry = attention_backend.ATTENTION_FUNCTION_REGISTRY
    sdpa_flash = attention_backend.AttentionBackendType.SDPA_FLASH
    device_call = registry[sdpa_flash]

    def sdpa_flash_attn_call(query, key, value, dropout_p, is_causal, attention_kwargs=None):
        """``(out, lse)`` attention; CPU tensors use ATen's CPU flash-attention kernel."""
        if query.device.type != "cpu":
            return device_call(query, key, value, dropout_p, is_causal, attention_kwargs)
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal
        )
        return output, logsumexp

    registry[sdpa_flash] = sdpa_flash_attn_call


def _patch_runtime_state(runtime_state: ModuleType) -> None:
    runtime_cls = runtime_state.RuntimeState
    backend_type = runtime_state.AttentionBackendType
    select = runtime_cls._select_attention_backend

    def _select_attention_backend(self, engine_config=None):
        if engine_config is not None and engine_config.runtime_config.attention_backend:
            return select(self, engine_config)
        return backend_type.SDPA_FLASH

    runtime_cls._select_attention_backend = _select_attention_backend

    dit_runtime_cls = runtime_state.DiTRuntimeState
    set_input_parameters = dit_runtime_cls.set_input_parameters

    def set_input_parameters_after_pending_sends(self, *args, **kwargs):
        wait_for_pipeline_sends()
        return set_input_parameters(self, *args, **kwargs)

    dit_runtime_cls.set_input_parameters = set_input_parameters_after_pending_sends


_PENDING_SENDS = "_spectrum_xdit_pending_sends"


def _patch_group_coordinator(group_coordinator: ModuleType) -> None:
    import torch.distributed as dist

    group_coordinator.synchronize = torch.cpu.synchronize
    coordinator_cls = group_coordinator.PipelineGroupCoordinator

    def keep_until_received(coordinator, work) -> None:
        pending = coordinator.__dict__.setdefault(_PENDING_SENDS, [])
        pending.append(work)

    def _communicate_shapes(self, tensor_send_to_next=None, recv_prev=False):
        """xDiT's shape exchange (dimensions, then shape, to the next stage), sends unwaited."""
        if tensor_send_to_next is not None:
            dims = torch.tensor(tensor_send_to_next.dim(), device=self.device, dtype=torch.int64)
            shape = torch.tensor(tensor_send_to_next.size(), device=self.device, dtype=torch.int64)
            for message in (dims, shape):
                keep_until_received(self, dist.isend(message, self.next_rank, group=self.device_group))
        if not recv_prev:
            return torch.Size([0, 0, 0])
        dims = torch.empty(1, device=self.device, dtype=torch.int64)
        dist.recv(dims, self.prev_rank, group=self.device_group)
        shape = torch.empty(int(dims.item()), device=self.device, dtype=torch.int64)
        dist.recv(shape, self.prev_rank, group=self.device_group)
        return torch.Size(shape.tolist())

    def pipeline_isend(self, tensor, name="latent", segment_idx=-1):
        """xDiT's ``pipeline_isend``, keeping the ``Work`` it drops."""
        tensor = tensor.contiguous()
        self._check_shape_and_buffer(tensor_send_to_next=tensor, name=name, segment_idx=segment_idx)
        keep_until_received(self, self._pipeline_isend(tensor))

    def pipeline_isend_skip(self, tensor):
        """xDiT's ``pipeline_isend_skip``, keeping the ``Work`` it drops."""
        keep_until_received(self, self._pipeline_isend_skip(tensor.contiguous()))

    coordinator_cls._communicate_shapes = _communicate_shapes
    coordinator_cls.pipeline_isend = pipeline_isend
    coordinator_cls.pipeline_isend_skip = pipeline_isend_skip


def wait_for_pipeline_sends() -> None:
    """Wait for every stage-to-stage send this rank started (CPU support only).

    Call it only where every receive that matches them is sure to be posted without this rank
    doing anything more, e.g. after this rank finished a pipeline call. A no-op before xDiT's
    pipeline group exists.
    """
    from xfuser.core.distributed import parallel_state

    group = getattr(parallel_state, "_PP", None)
    pending = group.__dict__.pop(_PENDING_SENDS, []) if group is not None else []
    for work in pending:
        work.wait()


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "xfuser.envs": _patch_envs,
    "xfuser.model_executor.layers.usp": _patch_usp,
    "xfuser.core.distributed.attention_backend": _patch_attention_backend,
    "xfuser.core.distributed.runtime_state": _patch_runtime_state,
    "xfuser.core.distributed.group_coordinator": _patch_group_coordinator,
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the listed modules with the other finders and patches each right after it runs.

    Several of these finders may be installed (``spectrum_xdit.parallel.xdit_fixes`` adds
    one); each asks the others, so a finder already searching for a module declines to search
    for it again, and the patches of all of them are applied in turn.
    """

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]):
        self._patches = patches
        self._searching: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        patch = self._patches.get(fullname)
        if patch is None or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    spec.loader = _PatchingLoader(spec.loader, patch)
                    return spec
            return None
        finally:
            self._searching.discard(fullname)


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then applies one patch to the executed module."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)
