"""Fixes for xfuser 0.7.0's padding path: a token count not divisible by the sequence degree.

When the image or video token count ``S`` of a transformer call is not a multiple of the
sequence-parallel degree ``N`` (Ulysses x Ring), xDiT's Wan2.1 and FLUX.1 wrappers append
``P = (-S) mod N`` zero tokens, give every rank ``(S + P) / N`` tokens, and drop the last ``P``
outputs after the all-gather. In xfuser 0.7.0 that path has two bugs, on GPUs as on CPUs;
:func:`apply_xdit_fixes` corrects both and changes nothing when ``S`` is divisible by ``N``.

1. **FLUX.1 calls a method that does not exist.**
   ``xfuser/model_executor/models/transformers/transformer_flux.py``,
   ``xFuserFlux1Transformer2DWrapper.forward`` calls ``self._pad_to_sp_divisible``, but the
   method is defined as ``pad_to_sp_divisible``, so every uneven call raises
   ``AttributeError``. Fixed by giving the class the name ``forward`` calls (same function).

2. **Neither wrapper masks the padding keys.**
   ``xFuserWanTransformer3DWrapper.forward`` (``transformer_wan.py``) and
   ``xFuserFlux1Transformer2DWrapper.forward`` pad, then the sequence self-attention
   (``xFuserWanAttnProcessor.__call__`` and ``xFuserFluxAttnProcessor.__call__``, both through
   ``xfuser/model_executor/layers/usp.py``, ``USP``) attends to the ``P`` padding tokens as if
   they were real keys, which changes the output of every real token. xDiT's own mechanism
   for a padded key suffix, ``attention_kwargs["valid_kv_len"]`` (read by
   ``usp._trim_trailing_kv_padding``), is set by neither wrapper, and it only fits Ulysses:
   it cuts the keys *before* ``usp.ring_attn``, where each rank holds just its ring share of
   them, so under Ring the full valid length exceeds that share and raises ``ValueError``
   (and a shorter one would cut real keys on every rank).

   The fix removes the padding keys inside the attention function, per ring step, which
   works for Ulysses, Ring and both. It rests on xDiT's layout (yunchang's
   ``use_ulysses_low``, checked at run time): sequence-parallel rank = ring rank x Ulysses
   degree + Ulysses rank; the Ulysses all-to-all concatenates its group's shards in rank
   order; and ``torch``'s ``_templated_ring_attention`` (called by ``usp.ring_attn``) calls the
   attention function once per ring step, rank ``r`` holding at step ``i`` the keys of ring
   rank ``(r - i) mod R``. So, as long as the padding fits in the last rank's shard
   (``P < (S + P) / N``; otherwise :class:`NotImplementedError`), the padding keys are the last
   ``P`` keys of exactly the key blocks that come from the last ring rank (for FLUX.1 each
   shard is ``[text, image]``, and the padding ends the last image shard). Dropping them there
   is the same as masking them, and Ring's log-sum-exp merge takes the shorter block as is.

   Pieces, all active only during a padded forward: the wrappers' ``forward`` records ``P``;
   ``USP`` as the processors call it (``transformer_flux.USP``, and the Wan processors'
   ``attention_function``) marks its call as the padded self-attention when it is given
   ``attn_layer``, which in xfuser 0.7.0 only the sequence self-attention passes (not the
   Wan2.1 I2V image-context call through the same processor, whose keys are not padded);
   ``usp._get_attention_function`` then returns the attention function with the ring-step
   trim described above.

Nothing is patched unless the installed xfuser is 0.7.0, and each fix first checks that what
it patches exists (and, for the rename, that ``_pad_to_sp_divisible`` is still missing);
anything else is left alone without an error, so a fixed xfuser runs untouched.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import sys
from types import ModuleType
from typing import Callable, Optional

from .cpu_support import _PatchOnImport

XFUSER_VERSION = "0.7.0"

_FIX_MARK = "_spectrum_xdit_fix"


class _Padding:
    """What the running wrapper forward padded (0: nothing).

    Plain attributes rather than context variables: ``torch.compile`` traces attribute reads
    (and guards on them) but breaks its graph at ``ContextVar.get``, and the attention calls
    of unpadded forwards read these too.
    """

    sequence = 0  # padding tokens of the running padded forward
    keys = 0  # padding keys to drop; set only inside its sequence self-attention


_padding = _Padding()

_installed = False


def apply_xdit_fixes() -> bool:
    """Install the fixes for xfuser 0.7.0's padding path; return whether they are installed.

    Idempotent and safe on any machine. Modules already imported are patched now, the others
    the moment they are imported (an import hook, as in ``cpu_support``); nothing is imported
    here, so this may run before or after ``import xfuser`` and before or after
    :func:`spectrum_xdit.parallel.cpu_support.enable_cpu_support`. Returns ``False`` and
    patches nothing when xfuser is absent or not version 0.7.0.
    """
    global _installed
    if _installed:
        return True
    if _installed_xfuser_version() != XFUSER_VERSION:
        return False
    patches: dict[str, Callable[[ModuleType], None]] = {
        "xfuser.model_executor.layers.usp": _patch_usp,
        "xfuser.model_executor.models.transformers.transformer_wan": _patch_wan,
        "xfuser.model_executor.models.transformers.transformer_flux": _patch_flux,
    }
    pending = {}
    for name, patch in patches.items():
        module = sys.modules.get(name)
        if module is None:
            pending[name] = patch
        else:
            patch(module)
    if pending:
        sys.meta_path.insert(0, _PatchOnImport(pending))
    _installed = True
    return True


def _installed_xfuser_version() -> Optional[str]:
    try:
        return importlib.metadata.version("xfuser")
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_fixed(function) -> bool:
    return getattr(function, _FIX_MARK, False)


def _mark_fixed(function):
    setattr(function, _FIX_MARK, True)
    return function


# ---- usp: the attention function of a padded self-attention drops the padding keys -----

def _patch_usp(usp: ModuleType) -> None:
    get_attention_function = getattr(usp, "_get_attention_function", None)
    if get_attention_function is None or _is_fixed(get_attention_function):
        return

    @functools.wraps(get_attention_function)
    def _get_attention_function(backend=None):
        function = get_attention_function(backend=backend)
        return _DropPaddingKeys(function, _padding.keys) if _padding.keys else function

    usp._get_attention_function = _mark_fixed(_get_attention_function)


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
    if _is_fixed(usp_function):
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

    return _mark_fixed(usp)


def _padding_for(tokens: int) -> int:
    """The padding xDiT's wrappers add to ``tokens``; refuses layouts the fix cannot serve."""
    from xfuser.core.distributed import (
        get_ring_parallel_rank,
        get_sequence_parallel_rank,
        get_sequence_parallel_world_size,
        get_ulysses_parallel_rank,
        get_ulysses_parallel_world_size,
    )

    degree = get_sequence_parallel_world_size()
    padding = -tokens % degree
    if not padding:
        return 0
    per_rank = (tokens + padding) // degree
    if padding >= per_rank:
        raise NotImplementedError(
            f"{tokens} tokens over a sequence-parallel degree of {degree} pad {padding} tokens, "
            f"not fewer than the {per_rank} each rank holds; use at least "
            f"{degree * (degree - 1)} tokens"
        )
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

    return _mark_fixed(padded_forward)


# ---- Wan2.1 -----------------------------------------------------------------------------

def _patch_wan(transformer_wan: ModuleType) -> None:
    wrapper_cls = getattr(transformer_wan, "xFuserWanTransformer3DWrapper", None)
    xdit_usp = getattr(transformer_wan, "USP", None)
    if wrapper_cls is None or xdit_usp is None or _is_fixed(wrapper_cls.forward):
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

def _patch_flux(transformer_flux: ModuleType) -> None:
    wrapper_cls = getattr(transformer_flux, "xFuserFlux1Transformer2DWrapper", None)
    xdit_usp = getattr(transformer_flux, "USP", None)
    if wrapper_cls is None or xdit_usp is None or _is_fixed(wrapper_cls.forward):
        return
    if not hasattr(wrapper_cls, "_pad_to_sp_divisible") and hasattr(wrapper_cls, "pad_to_sp_divisible"):
        wrapper_cls._pad_to_sp_divisible = wrapper_cls.pad_to_sp_divisible
    # xFuserFluxAttnProcessor.__call__ looks USP up in its module at every call.
    transformer_flux.USP = _masking_padding(xdit_usp)

    def image_tokens(self, hidden_states) -> int:
        return hidden_states.shape[1]

    wrapper_cls.forward = _forward_recording_padding(wrapper_cls.forward, image_tokens)
