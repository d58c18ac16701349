"""Set up xDiT's parallel state in a running torch.distributed world and wrap transformers.

This follows what xDiT's own runner (``xfuser/model_executor/models/runner_models``) does for
Wan2.1 T2V and FLUX.1 without PipeFusion, minus checkpoint loading and CUDA timing:

1. ``init_distributed_environment`` + ``initialize_model_parallel`` build xDiT's world, CFG,
   sequence (with yunchang's Ulysses and Ring sub-groups), pipeline and data groups.
2. The diffusers transformer is rebuilt as xDiT's wrapper class (a subclass of the diffusers
   model with xDiT attention processors; same state_dict keys), as the runner's
   ``loader.load_transformer(wrapper_cls)`` does, and put into a plain diffusers pipeline.
3. ``initialize_runtime_state`` creates the runtime state the wrappers read (attention backend,
   ``split_text_embed_in_sp``, ...); for FLUX the runner also calls ``set_input_parameters``.

The wrappers shard inside ``forward``: every rank passes the full, identical inputs; the
wrapper pads the image/video token sequence to a multiple of the sequence-parallel degree,
keeps this rank's chunk, runs the blocks on it, and all-gathers the output, so every rank
returns the full output. Pipelines therefore run unchanged and redundantly on every rank
(same seed, same latents).

Call :func:`spectrum_xdit.parallel.patches.install` before xfuser is imported (on CPU it must
come first); :func:`init_xdit_engine` calls it too, for the padding fixes.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import patches


def setup_xdit_parallel(
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    cfg_degree: int = 1,
    attention_backend: Optional[str] = None,
):
    """Initialise xDiT's process groups inside the current torch.distributed world.

    The world size must be a multiple of ``ulysses_degree * ring_degree * cfg_degree``; the
    remaining factor becomes xDiT's data-parallel degree. ``cfg_degree`` is 1 or 2 (xDiT's
    ``--use_cfg_parallel``). ``attention_backend`` is an xDiT ``AttentionBackendType`` name
    such as ``"sdpa_flash"``; ``None`` keeps xDiT's automatic choice.

    Returns xDiT's ``EngineConfig`` for these degrees, as its runner builds it from its flags.
    """
    if cfg_degree not in (1, 2):
        raise ValueError(f"cfg_degree must be 1 or 2, got {cfg_degree}")
    return init_xdit_engine(ulysses_degree=ulysses_degree, ring_degree=ring_degree, cfg_degree=cfg_degree,
                            attention_backend=attention_backend)


def init_xdit_engine(ulysses_degree: int = 1, ring_degree: int = 1, cfg_degree: int = 1,
                     pipefusion_degree: int = 1, attention_backend: Optional[str] = None, **runner_args):
    """xDiT's process groups and ``EngineConfig`` for these degrees (the rest of the world is data
    parallel), with this project's xfuser patches installed; ``runner_args`` are further ``xFuserArgs``
    (e.g. PipeFusion's ``num_pipeline_patch``, ``warmup_steps``)."""
    patches.install()
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel

    if not dist.is_initialized():
        raise RuntimeError("xDiT's parallel setup needs an initialised torch.distributed world")
    world_size = dist.get_world_size()
    model_parallel = ulysses_degree * ring_degree * cfg_degree * pipefusion_degree
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not a multiple of ulysses {ulysses_degree} x "
            f"ring {ring_degree} x cfg {cfg_degree} x pipefusion {pipefusion_degree}"
        )
    backend = dist.get_backend()
    init_distributed_environment(world_size=world_size, rank=dist.get_rank(), backend=backend)
    initialize_model_parallel(
        data_parallel_degree=world_size // model_parallel,
        classifier_free_guidance_degree=cfg_degree,
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        pipeline_parallel_degree=pipefusion_degree,
        backend=backend,
    )
    args = xFuserArgs(
        model="spectrum-xdit",
        data_parallel_degree=world_size // model_parallel,
        use_cfg_parallel=cfg_degree == 2,
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        pipefusion_parallel_degree=pipefusion_degree,
        attention_backend=attention_backend,
        **runner_args,
    )
    engine_config, _ = args.create_config()
    return engine_config


def xdit_transformer(model: torch.nn.Module, **init_kwargs: Any) -> torch.nn.Module:
    """xDiT's wrapper for a diffusers Wan or FLUX.1 transformer, with the same weights.

    ``WanTransformer3DModel`` becomes ``xFuserWanTransformer3DWrapper`` and
    ``FluxTransformer2DModel`` becomes ``xFuserFlux1Transformer2DWrapper`` (the classes xDiT's
    runner loads for Wan2.1 and FLUX.1). Needs :func:`setup_xdit_parallel` first: the FLUX
    attention processor reads the sequence-parallel group when it is constructed.
    ``init_kwargs`` go to the wrapper (for Wan, ``attention_kwargs``). The wrapper shares the
    model's parameters: use it in the model's place.
    """
    from accelerate import init_empty_weights

    # As diffusers' from_pretrained does: the parameters on the meta device (a random float32
    # model would cost twice a bf16 checkpoint's size in host memory, and minutes of initialisation
    # for 14B parameters); the buffers, small and partly the wrapper's own (xDiT's head
    # permutation), built for real.
    with init_empty_weights():
        wrapper = xdit_wrapper_class(model).from_config(model.config, **init_kwargs)
    # assign=True takes each tensor as it is (dtype, device and storage, including modules diffusers
    # keeps in float32 inside a bf16 model): the wrapper holds the model's own weights, no copy.
    wrapper.load_state_dict(model.state_dict(), strict=True, assign=True)
    return wrapper.train(model.training)


def xdit_wrapper_class(model: torch.nn.Module) -> type:
    """The xDiT class that :func:`xdit_transformer` makes of ``model``."""
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    if isinstance(model, WanTransformer3DModel):
        from xfuser.model_executor.models.transformers.transformer_wan import xFuserWanTransformer3DWrapper

        return xFuserWanTransformer3DWrapper
    if isinstance(model, FluxTransformer2DModel):
        from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper

        return xFuserFlux1Transformer2DWrapper
    raise TypeError(f"no xDiT wrapper known for {type(model).__name__}")


def init_xdit_runtime(pipeline_or_transformer: Any, engine_config) -> None:
    """Create xDiT's runtime state for a pipeline, or for a bare transformer.

    A bare transformer is given to xDiT inside a minimal pipeline stand-in: the runtime state
    only reads ``transformer.config`` (head count check) and a VAE scale factor (PipeFusion
    patch bookkeeping, unused without PipeFusion).
    """
    from xfuser.core.distributed import initialize_runtime_state

    pipeline = pipeline_or_transformer
    if isinstance(pipeline, torch.nn.Module):
        pipeline = types.SimpleNamespace(transformer=pipeline, vae_scale_factor=1)
    initialize_runtime_state(pipeline, engine_config)


def set_flux_input_parameters(max_sequence_length: int, batch_size: int = 1) -> None:
    """What xDiT's FLUX.1 runner does before each pipeline call (``xFuserFluxModel._run_pipe``).

    The FLUX attention processor reads ``max_condition_sequence_length`` from the runtime state.
    """
    from xfuser.core.distributed import get_pipeline_parallel_world_size, get_runtime_state

    get_runtime_state().set_input_parameters(
        batch_size=batch_size,
        max_condition_sequence_length=max_sequence_length,
        split_text_embed_in_sp=get_pipeline_parallel_world_size() == 1,
    )


def teardown_xdit_parallel() -> None:
    """Destroy xDiT's groups and its world, which also destroys the default process group."""
    from xfuser.core.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )

    destroy_model_parallel()
    destroy_distributed_environment()
