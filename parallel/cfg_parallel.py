"""CFG parallelism for Wan2.1 text-to-video, which xfuser 0.7.0 does not have.

diffusers' ``WanPipeline`` runs the two guidance branches of a step one after the other: the
transformer under ``cache_context("cond")`` with the prompt's embeddings, then under
``cache_context("uncond")`` with the negative prompt's. With :class:`GuidanceSplit` installed, the
job's CFG group (xDiT's ``get_cfg_group()``, two halves of the job, each possibly sequence
parallel inside) runs both at once: at the ``cond`` call, CFG rank 0 computes the conditional
branch and CFG rank 1 the unconditional one (with the negative embeddings it was given), the two
outputs are all-gathered over the CFG group, the call returns the conditional one and keeps the
unconditional one for the ``uncond`` call that follows, which then returns it without running the
transformer. Every rank ends the step with the same two outputs, so the pipeline's guidance
combination and scheduler step stay identical on all ranks.

Each rank's hooks see one branch only: CFG rank 1 runs its transformer under
``cache_context("uncond")`` (same step fields), so Spectrum keeps the unconditional forecaster on
that half and the conditional one on the other: per-rank state is one branch's.

Requires guidance (every step makes the ``uncond`` call) and the negative prompt's embeddings up
front (``set_negative_embeddings``); the runner encodes the prompts itself and passes the
embeddings to the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..hooks import find_spectrum_policy

_ATTRIBUTE = "_spectrum_xdit_guidance_split"


class GuidanceSplit:
    """Installed on a transformer instance: its ``forward`` computes this rank's branch at the
    ``cond`` call and serves the other branch from the all-gather at the ``uncond`` call."""

    def __init__(self, transformer: torch.nn.Module, group, rank_in_group: int):
        if rank_in_group not in (0, 1):
            raise ValueError(f"CFG parallelism splits two branches; rank in the CFG group is {rank_in_group}")
        self.transformer = transformer
        self.group = group
        self.rank = rank_in_group
        self.negative: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._forward = transformer.forward

    def set_negative_embeddings(self, negative: torch.Tensor) -> None:
        self.negative = negative
        self._pending = None

    def forward(self, *args, **kwargs):
        return_dict = kwargs.get("return_dict", True)
        if self._pending is not None:               # the uncond call: already computed
            sample, self._pending = self._pending, None
            return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)
        if self.rank == 1:
            if self.negative is None:
                raise RuntimeError("GuidanceSplit needs the negative prompt's embeddings: set_negative_embeddings()")
            if "encoder_hidden_states" not in kwargs:
                raise RuntimeError("GuidanceSplit expects the pipeline to pass encoder_hidden_states by name")
            kwargs["encoder_hidden_states"] = self.negative.to(kwargs["encoder_hidden_states"])
            with _as_unconditional(self.transformer):
                output = self._forward(*args, **kwargs)
        else:
            output = self._forward(*args, **kwargs)
        sample = (output[0] if isinstance(output, tuple) else output.sample).contiguous()
        both = [torch.empty_like(sample) for _ in range(2)]
        dist.all_gather(both, sample, group=self.group)
        self._pending = both[1]
        return Transformer2DModelOutput(sample=both[0]) if return_dict else (both[0],)


@contextlib.contextmanager
def _as_unconditional(transformer: torch.nn.Module):
    """The call as the ``uncond`` branch (same step fields), for Spectrum's hooks when applied:
    diffusers' public ``cache_context``, with the fields of the context Spectrum received."""
    policy = find_spectrum_policy(transformer)
    current = policy.context.current if policy is not None else None
    if current is None:
        yield
        return
    steps = {field.name: getattr(current, field.name) for field in dataclasses.fields(current) if field.name != "name"}
    with transformer.cache_context("uncond", **steps):
        yield


def enable_guidance_split(transformer: torch.nn.Module) -> GuidanceSplit:
    """Split the guidance branches of ``transformer`` over xDiT's CFG group (degree 2)."""
    from xfuser.core.distributed import get_cfg_group

    if getattr(transformer, _ATTRIBUTE, None) is not None:
        return getattr(transformer, _ATTRIBUTE)
    group = get_cfg_group()
    if group.world_size != 2:
        raise ValueError(f"CFG parallelism needs a CFG group of 2 ranks, got {group.world_size}")
    split = GuidanceSplit(transformer, group.device_group, group.rank_in_group)
    transformer.forward = split.forward
    setattr(transformer, _ATTRIBUTE, split)
    return split


def guidance_split(transformer: torch.nn.Module) -> GuidanceSplit | None:
    return getattr(transformer, _ATTRIBUTE, None)
