"""xfuser 0.7.0's padding path: a token count not divisible by the sequence-parallel degree.

xDiT's Wan2.1 and FLUX.1 wrappers pad the image/video tokens to a multiple of the degree, but
the FLUX.1 wrapper calls a method that does not exist and neither masks the padding keys, so
they change every real token's attention. These patches drop the padding keys inside the
attention function, per ring step, which works for Ulysses, Ring and both, as long as the
padding is shorter than each rank's shard. Nothing changes when the count is divisible. The
derivation: docs/xfuser-0.7.0.md, "Padding".
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Callable

from .importing import Patch, is_marked, mark


class _Padding:
    """What the running wrapper forward padded (0: nothing).

    Plain attributes rather than context variables: ``torch.compile`` traces attribute reads
    (and guards on them) but breaks its graph at ``ContextVar.get``, and the attention calls
    of unpadded forwards read these too.
    """

    sequence = 0  # padding tokens of the running padded forward
    keys = 0  # padding keys to drop; set only inside its sequence self-attention


_padding = _Padding()


# ---- usp: the attention function of a padded self-attention drops the padding keys -----

def patch_usp(usp: ModuleType) -> None:
    """``xfuser/model_executor/layers/usp.py``, ``_get_attention_function``: inside a padded
    sequence self-attention, the attention function drops the padding keys."""
    get_attention_function = getattr(usp, "_get_attention_function", None)
    if get_attention_function is None or is_marked(get_attention_function):
        return

    @functools.wraps(get_attention_function)
    def _get_attention_function(backend=None):
        function = get_attention_function(backend=backend)
        return _DropPaddingKeys(function, _padding.keys) if _padding.keys else function

    usp._get_attention_function = mark(_get_attention_function)


class _DropPaddingKeys:
    """One USP call's attention function, dropping the padding keys from the last ring rank.

    Called once without Ring and once per ring step with Ring; at step ``i`` ring rank ``r``
    holds the keys and values of ring rank ``(r - i) mod R``, whose last ``padding`` keys are
    padding when it is the last ring rank. The keys are cut before the function runs, which
    also puts them in front of any joint (text) keys xDiT's decorator appends.
    """

    def __init__(self, function: Callable, padding: int):
        from xfuser.core.distributed import get_ring_parallel_rank, get_ring_parallel_world_size

        self._function = function
        self._padding = padding
        self._ring_rank = get_ring_parallel_rank()
        self._ring_size = get_ring_parallel_world_size()
        self._step = 0

    def __call__(self, query, key, value, *args, **kwargs):
        source = (self._ring_rank - self._step) % self._ring_size
        self._step += 1
        if source == self._ring_size - 1:
            valid = key.shape[2] - self._padding
            key, value = key[:, :, :valid], value[:, :, :valid]
        return self._function(query, key, value, *args, **kwargs)


def _masking_padding(usp_function: Callable) -> Callable:
    """``USP`` that drops the padding keys when called as the padded sequence self-attention."""
    if is_marked(usp_function):
        return usp_function

    @functools.wraps(usp_function)
    def usp(query, key, value, *args, attn_layer=None, **kwargs):
        if not _padding.sequence or attn_layer is None:
            return usp_function(query, key, value, *args, attn_layer=attn_layer, **kwargs)
        outer, _padding.keys = _padding.keys, _padding.sequence
        try:
            return usp_function(query, key, value, *args, attn_layer=attn_layer, **kwargs)
        finally:
            _padding.keys = outer

    return mark(usp)


class PaddingUnsupported(ValueError):
    """A token count whose padding the fix cannot mask (the message says how many tokens would do)."""


def sequence_padding(tokens: int, degree: int) -> int:
    """The padding xDiT's wrappers add to ``tokens`` over a sequence-parallel ``degree``.

    The padding keys are dropped from the last rank's shard, so the padding must be shorter than
    that shard: :class:`PaddingUnsupported` otherwise. The request checks call this too, so that
    a request is refused by the same rule the forward would fail on."""
    padding = -tokens % degree
    per_rank = (tokens + padding) // degree
    if padding and padding >= per_rank:
        raise PaddingUnsupported(
            f"give {tokens} tokens, which the sequence-parallel degree {degree} (ulysses x ring) would pad by "
            f"{padding}, not fewer than each rank's {per_rank}; use at least {degree * (degree - 1)} tokens")
    return padding


def _padding_for(tokens: int) -> int:
    """The padding xDiT's wrappers add to ``tokens``; refuses layouts the fix cannot serve."""
    from xfuser.core.distributed import (
        get_ring_parallel_rank,
        get_sequence_parallel_rank,
        get_sequence_parallel_world_size,
        get_ulysses_parallel_rank,
        get_ulysses_parallel_world_size,
    )

    try:
        padding = sequence_padding(tokens, get_sequence_parallel_world_size())
    except PaddingUnsupported as error:
        raise NotImplementedError(str(error)) from None
    if not padding:
        return 0
    expected_rank = get_ring_parallel_rank() * get_ulysses_parallel_world_size() + get_ulysses_parallel_rank()
    if get_sequence_parallel_rank() != expected_rank:
        raise NotImplementedError(
            "padding keys can only be masked with xDiT's Ulysses-major sequence layout "
            f"(sequence rank {get_sequence_parallel_rank()}, expected {expected_rank})"
        )
    return padding


def _forward_recording_padding(forward: Callable, count_tokens: Callable, before=None) -> Callable:
    """Wrap a wrapper's ``forward`` so that its attention calls know the padding."""

    @functools.wraps(forward)
    def padded_forward(self, hidden_states, *args, **kwargs):
        padding = _padding_for(count_tokens(self, hidden_states))
        if not padding:
            return forward(self, hidden_states, *args, **kwargs)
        if before is not None:
            before(self)
        outer, _padding.sequence = _padding.sequence, padding
        try:
            return forward(self, hidden_states, *args, **kwargs)
        finally:
            _padding.sequence = outer

    return mark(padded_forward)


# ---- Wan2.1 -----------------------------------------------------------------------------

def patch_wan(transformer_wan: ModuleType) -> None:
    """``xfuser/model_executor/models/transformers/transformer_wan.py``,
    ``xFuserWanTransformer3DWrapper.forward`` pads without masking the padding keys."""
    wrapper_cls = getattr(transformer_wan, "xFuserWanTransformer3DWrapper", None)
    xdit_usp = getattr(transformer_wan, "USP", None)
    if wrapper_cls is None or xdit_usp is None or is_marked(wrapper_cls.forward):
        return
    masking_usp = _masking_padding(xdit_usp)

    def video_tokens(self, hidden_states) -> int:
        sizes = hidden_states.shape[2:]
        return math.prod(size // patch for size, patch in zip(sizes, self.config.patch_size))

    def route_self_attention_through_mask(self) -> None:
        # xFuserWanAttnProcessor stores USP when it is built; swap in the masking one.
        for block in self.blocks:
            processor = block.attn1.processor
            if getattr(processor, "attention_function", None) is xdit_usp:
                processor.attention_function = masking_usp

    wrapper_cls.forward = _forward_recording_padding(
        wrapper_cls.forward, video_tokens, before=route_self_attention_through_mask
    )


# ---- FLUX.1 -----------------------------------------------------------------------------

def patch_flux(transformer_flux: ModuleType) -> None:
    """``xfuser/model_executor/models/transformers/transformer_flux.py``,
    ``xFuserFlux1Transformer2DWrapper.forward`` calls a misnamed ``_pad_to_sp_divisible`` and does
    not mask the padding keys."""
    wrapper_cls = getattr(transformer_flux, "xFuserFlux1Transformer2DWrapper", None)
    xdit_usp = getattr(transformer_flux, "USP", None)
    if wrapper_cls is None or xdit_usp is None or is_marked(wrapper_cls.forward):
        return
    if not hasattr(wrapper_cls, "_pad_to_sp_divisible") and hasattr(wrapper_cls, "pad_to_sp_divisible"):
        wrapper_cls._pad_to_sp_divisible = wrapper_cls.pad_to_sp_divisible
    # xFuserFluxAttnProcessor.__call__ looks USP up in its module at every call.
    transformer_flux.USP = _masking_padding(xdit_usp)

    def image_tokens(self, hidden_states) -> int:
        return hidden_states.shape[1]

    wrapper_cls.forward = _forward_recording_padding(wrapper_cls.forward, image_tokens)


PATCHES: dict[str, list[Patch]] = {
    "xfuser.model_executor.layers.usp": [patch_usp],
    "xfuser.model_executor.models.transformers.transformer_wan": [patch_wan],
    "xfuser.model_executor.models.transformers.transformer_flux": [patch_flux],
}
