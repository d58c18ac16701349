"""xDiT (xfuser 0.7.0) on CPU-only machines, over gloo: the real Ulysses, Ring, USP and
PipeFusion code paths run unchanged on CPU processes. Wanted only without CUDA (or with
``SPECTRUM_XDIT_CPU=1``), and before the first ``import xfuser``. Why each is needed:
docs/xfuser-0.7.0.md, "CPU and gloo"."""

from __future__ import annotations

import os
from types import ModuleType

import torch

from .importing import Patch, mark

ENV_VAR = "SPECTRUM_XDIT_CPU"
_PENDING_SENDS = "_spectrum_xdit_pending_sends"


def cpu_support_wanted() -> bool:
    """``SPECTRUM_XDIT_CPU=1`` forces the CPU patches on, ``0`` off; otherwise they are on exactly
    when CUDA (or ROCm, which torch reports as CUDA) is absent."""
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting in ("1", "0"):
        return setting == "1"
    if setting:
        raise ValueError(f"{ENV_VAR} must be '0' or '1', got {setting!r}")
    return not torch.cuda.is_available()


def patch_envs(envs: ModuleType) -> None:
    """``xfuser/envs.py``: ``get_device_version`` and ``get_torch_distributed_backend`` raise
    ``NotImplementedError`` without an accelerator (the first at ``import xfuser``), and
    ``PACKAGES_CHECKER`` reports no long-context attention without CUDA."""
    original_device_version = envs.get_device_version

    def get_device_version():
        try:
            return original_device_version()
        except NotImplementedError:
            return None

    envs.get_device_version = mark(get_device_version)
    envs.get_torch_distributed_backend = mark(lambda: "gloo")
    envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = _yunchang_importable()


def _yunchang_importable() -> bool:
    try:
        from yunchang import LongContextAttention, UlyssesAttention, set_seq_parallel_pg  # noqa: F401
    except ImportError:
        return False
    return True


def patch_usp_process_group(usp: ModuleType) -> None:
    """``xfuser/model_executor/layers/usp.py``: ``PROCESS_GROUP`` is bound to None without CUDA
    or an NPU; rebound to the yunchang singleton that ``initialize_model_parallel`` fills."""
    from yunchang.globals import PROCESS_GROUP

    usp.PROCESS_GROUP = PROCESS_GROUP


def patch_attention_backend(attention_backend: ModuleType) -> None:
    """``xfuser/core/distributed/attention_backend.py``: the ``SDPA_FLASH`` entry (the ``(out,
    lse)`` attention Ring needs) calls a CUDA-only kernel; CPU tensors get ATen's CPU one."""
    registry = attention_backend.ATTENTION_FUNCTION_REGISTRY
    sdpa_flash = attention_backend.AttentionBackendType.SDPA_FLASH
    device_call = registry[sdpa_flash]

    def sdpa_flash_attn_call(query, key, value, dropout_p, is_causal, attention_kwargs=None):
        if query.device.type != "cpu":
            return device_call(query, key, value, dropout_p, is_causal, attention_kwargs)
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal)
        return output, logsumexp

    registry[sdpa_flash] = mark(sdpa_flash_attn_call)


def patch_runtime_state(runtime_state: ModuleType) -> None:
    """``xfuser/core/distributed/runtime_state.py``: without CUDA the automatic attention backend
    is ``SDPA``, which Ring refuses (no LSE); it becomes ``SDPA_FLASH``. And every pipeline call
    (``DiTRuntimeState.set_input_parameters``) first waits for the previous generation's
    stage-to-stage sends (see :func:`patch_group_coordinator`)."""
    runtime_cls = runtime_state.RuntimeState
    backend_type = runtime_state.AttentionBackendType
    select = runtime_cls._select_attention_backend

    def _select_attention_backend(self, engine_config=None):
        if engine_config is not None and engine_config.runtime_config.attention_backend:
            return select(self, engine_config)
        return backend_type.SDPA_FLASH

    runtime_cls._select_attention_backend = mark(_select_attention_backend)

    dit_runtime_cls = runtime_state.DiTRuntimeState
    set_input_parameters = dit_runtime_cls.set_input_parameters

    def set_input_parameters_after_pending_sends(self, *args, **kwargs):
        wait_for_pipeline_sends()
        return set_input_parameters(self, *args, **kwargs)

    dit_runtime_cls.set_input_parameters = mark(set_input_parameters_after_pending_sends)


def patch_group_coordinator(group_coordinator: ModuleType) -> None:
    """``xfuser/core/distributed/group_coordinator.py``, PipeFusion's exchange: ``synchronize`` is
    ``torch.cuda.synchronize``; ``PipelineGroupCoordinator._communicate_shapes`` waits for its
    sends, which gloo completes only once received (a deadlock after the warm-up); and
    ``pipeline_isend`` drops the ``Work`` that gloo needs until the receiver has the tensor. The
    shape sends are no longer waited for, and every dropped ``Work`` is kept until the next
    generation starts."""
    import torch.distributed as dist

    group_coordinator.synchronize = torch.cpu.synchronize
    coordinator_cls = group_coordinator.PipelineGroupCoordinator

    def keep_until_received(coordinator, work) -> None:
        coordinator.__dict__.setdefault(_PENDING_SENDS, []).append(work)

    def _communicate_shapes(self, tensor_send_to_next=None, recv_prev=False):
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
        tensor = tensor.contiguous()
        self._check_shape_and_buffer(tensor_send_to_next=tensor, name=name, segment_idx=segment_idx)
        keep_until_received(self, self._pipeline_isend(tensor))

    def pipeline_isend_skip(self, tensor):
        keep_until_received(self, self._pipeline_isend_skip(tensor.contiguous()))

    coordinator_cls._communicate_shapes = mark(_communicate_shapes)
    coordinator_cls.pipeline_isend = mark(pipeline_isend)
    coordinator_cls.pipeline_isend_skip = mark(pipeline_isend_skip)


def wait_for_pipeline_sends() -> None:
    """Wait for every stage-to-stage send this rank started (CPU support only). Call it only
    where every matching receive is sure to be posted without this rank's help, e.g. after
    this rank finished a pipeline call. A no-op before xDiT's pipeline group exists."""
    from xfuser.core.distributed import parallel_state

    group = getattr(parallel_state, "_PP", None)
    pending = group.__dict__.pop(_PENDING_SENDS, []) if group is not None else []
    for work in pending:
        work.wait()


PATCHES: dict[str, list[Patch]] = {
    "xfuser.envs": [patch_envs],
    "xfuser.model_executor.layers.usp": [patch_usp_process_group],
    "xfuser.core.distributed.attention_backend": [patch_attention_backend],
    "xfuser.core.distributed.runtime_state": [patch_runtime_state],
    "xfuser.core.distributed.group_coordinator": [patch_group_coordinator],
}
