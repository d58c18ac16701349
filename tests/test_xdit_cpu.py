"""xDiT's own sequence-parallel code (Ulysses, Ring, USP, CFG split) on CPU processes over gloo.

Each check starts N fresh processes (``spectrum_xdit.parallel.testing.run_distributed``), sets
up xDiT's parallel state, rebuilds a tiny random-weight diffusers Wan2.1 / FLUX.1 transformer as
xDiT's wrapper class, and compares the sharded result with the single-process diffusers result
computed in the same process. Checks that share a process layout share one launch.

Token counts not divisible by the degree take the wrappers' padding path, which needs
``spectrum_xdit.parallel.patches.padding`` (installed by ``setup_xdit_parallel``); each such case
is also run through xDiT's unfixed ``forward`` to show what the fix changes.
"""

import sys

import pytest
import torch

from spectrum_xdit.parallel.testing import DistributedError, DistributedTimeout, run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

TOLERANCE = 1e-5
LAUNCH_TIMEOUT = 180.0

# Token counts (after patchify): even ones split evenly over 2 and 4 ranks, odd ones take
# the wrappers' padding path (one padding token on 2 and on 4 ranks).
WAN_EVEN = dict(frames=2, height=4, width=8)  # 2 x 2 x 4 = 16 tokens
WAN_ODD = dict(frames=1, height=6, width=10)  # 1 x 3 x 5 = 15 tokens
FLUX_EVEN = dict(height=4, width=4)  # 16 image tokens
FLUX_ODD = dict(height=3, width=5)  # 15 image tokens
ODD_TOKENS = 15
TEXT_TOKENS = 8


# ---- rank side: runs in the spawned processes ----------------------------------------------

def _transformer(kind: str):
    from spectrum_xdit.models.tiny import tiny_flux_transformer, tiny_wan_transformer

    if kind == "wan":
        return tiny_wan_transformer(seed=0, num_layers=2, in_channels=4)
    return tiny_flux_transformer(seed=0, num_layers=1, num_single_layers=1, in_channels=16)


def _inputs(kind: str, batch: int = 1, shared_pooled: bool = False, **size) -> dict:
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    if kind == "wan":
        return dict(
            hidden_states=randn(batch, 4, size["frames"], size["height"], size["width"]),
            timestep=torch.full((batch,), 500),
            encoder_hidden_states=randn(batch, TEXT_TOKENS, 32),
            return_dict=False,
        )
    height, width = size["height"], size["width"]
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return dict(
        hidden_states=randn(batch, height * width, 16),
        encoder_hidden_states=randn(batch, TEXT_TOKENS, 32),
        pooled_projections=randn(1 if shared_pooled else batch, 32),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((1 if shared_pooled else batch,), 3.5),   # FLUX.1-dev's distilled guidance
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        return_dict=False,
    )


def _block_stack(transformer):
    if hasattr(transformer, "blocks"):
        return list(transformer.blocks)
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    if output.shape != reference.shape:
        return float("inf")
    return ((output - reference).norm() / reference.norm()).item()


def _xdit_checks(ulysses: int, ring: int, cfg: int, cases: dict, pipeline_steps: int) -> dict:
    """Set up xDiT's groups once, then run the forward cases and (if steps > 0) the pipelines."""
    from spectrum_xdit.parallel import patches

    patches.install()
    from spectrum_xdit.parallel.xdit_setup import setup_xdit_parallel

    engine_config = setup_xdit_parallel(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg)
    report = {"forward": _sharded_forwards(engine_config, cases), "fixes": _patched_functions()}
    if pipeline_steps:
        report["pipeline"] = _sharded_pipelines(engine_config, pipeline_steps)
    return report


def _patched_functions() -> dict:
    """How many of this project's wrappers sit on each patched xfuser function after installing
    again and running every padding patch a second time."""
    from xfuser.config.args import xFuserArgs
    from xfuser.model_executor.cache import adapters
    from xfuser.model_executor.layers import usp
    from xfuser.model_executor.models.transformers import transformer_flux, transformer_wan

    from spectrum_xdit.parallel import patches
    from spectrum_xdit.parallel.patches import cache_method, padding
    from spectrum_xdit.parallel.patches.importing import is_marked

    def layers(function) -> int:
        count = 0
        while is_marked(function):
            count, function = count + 1, function.__wrapped__
        return count

    first = patches.record()
    again = patches.install()
    for patch, module in ((padding.patch_usp, usp), (padding.patch_wan, transformer_wan),
                          (padding.patch_flux, transformer_flux), (cache_method.patch_adapters, adapters)):
        patch(module)
    flux_cls = transformer_flux.xFuserFlux1Transformer2DWrapper
    return {
        "record": first,
        "installed_again": again == first,
        "layers": {
            "adapters.apply_cache": layers(adapters.apply_cache),
            "xFuserArgs.add_cli_args": layers(xFuserArgs.add_cli_args),
            "usp._get_attention_function": layers(usp._get_attention_function),
            "transformer_flux.USP": layers(transformer_flux.USP),
            "xFuserWanTransformer3DWrapper.forward": layers(transformer_wan.xFuserWanTransformer3DWrapper.forward),
            "xFuserFlux1Transformer2DWrapper.forward": layers(flux_cls.forward),
        },
        "flux_alias": flux_cls._pad_to_sp_divisible is flux_cls.pad_to_sp_divisible,
    }


def _sharded_forwards(engine_config, cases: dict) -> dict:
    """Run each case's forward through xDiT's wrapper and plain diffusers; report per case.

    Per case: the relative error, the output shape, and the ``hidden_states`` shape each rank's
    first block received; or the exception xDiT raised. A case whose name ends in ``_odd`` also
    reports the relative error of xDiT's own ``forward`` without the padding-key mask of
    ``patches.padding`` (the fix wraps it; ``__wrapped__`` is the original).
    """
    import torch.distributed as dist

    from spectrum_xdit.parallel.xdit_setup import (
        init_xdit_runtime,
        set_flux_input_parameters,
        xdit_transformer,
    )

    report = {}
    for name, (kind, input_kwargs) in cases.items():
        model = _transformer(kind)
        wrapper = xdit_transformer(model)
        init_xdit_runtime(wrapper, engine_config)
        inputs = _inputs(kind, **input_kwargs)
        if kind == "flux":
            set_flux_input_parameters(TEXT_TOKENS, batch_size=inputs["hidden_states"].shape[0])
        block_inputs = []
        _block_stack(wrapper)[0].register_forward_pre_hook(
            lambda module, args, kwargs: block_inputs.append(
                tuple((args[0] if args else kwargs["hidden_states"]).shape)
            ),
            with_kwargs=True,
        )
        with torch.no_grad():
            reference = model(**inputs)[0]
            try:
                output = wrapper(**inputs)[0]
            except Exception as error:  # reported, not raised: some cases document xDiT failures
                report[name] = {"error": f"{type(error).__name__}: {error}"}
                continue
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, block_inputs[0])
        report[name] = {
            "relative_error": _relative_error(output, reference),
            "shape": tuple(output.shape),
            "reference_shape": tuple(reference.shape),
            "block_input_shapes": per_rank,
        }
        if name.endswith("_odd"):
            with torch.no_grad():
                unmasked = type(wrapper).forward.__wrapped__(wrapper, **inputs)[0]
            report[name]["unmasked_relative_error"] = _relative_error(unmasked, reference)
    return report


def _sharded_pipelines(engine_config, steps: int) -> dict:
    """Whole diffusers pipeline calls with xDiT's wrapper as the transformer, on every rank."""
    from spectrum_xdit.models.tiny import build_tiny_flux_pipeline, build_tiny_wan_pipeline
    from spectrum_xdit.parallel.xdit_setup import (
        init_xdit_runtime,
        set_flux_input_parameters,
        xdit_transformer,
    )

    calls = {
        "wan": (build_tiny_wan_pipeline, dict(height=32, width=32, num_frames=5, guidance_scale=4.0)),
        "flux": (build_tiny_flux_pipeline, dict(height=16, width=16, max_sequence_length=16)),
    }
    report = {}
    for kind, (build, call_kwargs) in calls.items():
        pipe = build(seed=0)
        pipe.set_progress_bar_config(disable=True)
        call_kwargs = dict(call_kwargs, prompt="a red square", num_inference_steps=steps,
                           output_type="latent")
        reference = pipe(generator=torch.Generator().manual_seed(0), **call_kwargs)
        pipe.transformer = xdit_transformer(pipe.transformer)
        init_xdit_runtime(pipe, engine_config)
        if kind == "flux":
            set_flux_input_parameters(call_kwargs["max_sequence_length"])
        sharded = pipe(generator=torch.Generator().manual_seed(0), **call_kwargs)
        field = "frames" if kind == "wan" else "images"
        report[kind] = _relative_error(getattr(sharded, field), getattr(reference, field))
    return report


# ---- test side ------------------------------------------------------------------------------

LAYOUTS = {
    "ulysses2": (2, 1, 1),
    "ring2": (1, 2, 1),
    "usp2x2": (2, 2, 1),
    "cfg2": (1, 1, 2),
}
SEQUENCE_CASES = {
    "wan": ("wan", WAN_EVEN),
    "flux": ("flux", FLUX_EVEN),
    "wan_odd": ("wan", WAN_ODD),
    "flux_odd": ("flux", FLUX_ODD),
}
LAYOUT_CASES = {
    "ulysses2": SEQUENCE_CASES,
    "ring2": SEQUENCE_CASES,
    "usp2x2": SEQUENCE_CASES,
    "cfg2": {"flux_batch2": ("flux", dict(FLUX_EVEN, batch=2, shared_pooled=True))},
}

# Whole pipeline calls ride along with the forward checks of these layouts.
PIPELINE_STEPS = {"ulysses2": 3, "ring2": 3}

_reports: dict = {}


def _layout_report(layout: str) -> dict:
    """One launch per layout, shared by its tests; a failed launch is not retried."""
    if layout not in _reports:
        ulysses, ring, cfg = LAYOUTS[layout]
        try:
            _reports[layout] = run_distributed(
                _xdit_checks,
                ulysses * ring * cfg,
                args=(ulysses, ring, cfg, LAYOUT_CASES[layout], PIPELINE_STEPS.get(layout, 0)),
                timeout=LAUNCH_TIMEOUT,
            )
        except (DistributedError, DistributedTimeout) as error:
            _reports[layout] = error
    report = _reports[layout]
    if isinstance(report, Exception):
        raise report
    return report


@pytest.mark.parametrize("kind", ["wan", "flux"])
@pytest.mark.parametrize("layout", ["ulysses2", "ring2", "usp2x2"])
def test_sharded_forward_matches_diffusers(layout, kind):
    result = _layout_report(layout)["forward"][kind]
    assert "error" not in result, result
    assert result["shape"] == result["reference_shape"]
    assert result["relative_error"] <= TOLERANCE


@pytest.mark.parametrize("layout", ["ulysses2", "ring2", "usp2x2"])
def test_blocks_see_this_ranks_sequence_shard(layout):
    """Each rank's blocks get (batch, tokens / sequence-parallel degree, width)."""
    ulysses, ring, _ = LAYOUTS[layout]
    degree = ulysses * ring
    report = _layout_report(layout)["forward"]
    wan_tokens = WAN_EVEN["frames"] * (WAN_EVEN["height"] // 2) * (WAN_EVEN["width"] // 2)
    assert report["wan"]["block_input_shapes"] == [(1, wan_tokens // degree, 32)] * degree
    flux_tokens = FLUX_EVEN["height"] * FLUX_EVEN["width"]
    assert report["flux"]["block_input_shapes"] == [(1, flux_tokens // degree, 32)] * degree


@pytest.mark.parametrize("kind", ["wan", "flux"])
@pytest.mark.parametrize("layout", ["ulysses2", "ring2", "usp2x2"])
def test_uneven_sequence_matches_diffusers(layout, kind):
    """15 tokens: the wrapper pads to 16, every rank gets 16 / degree, the output is exact.

    Needs both fixes of ``patches.padding``: the FLUX.1 wrapper's misnamed ``_pad_to_sp_divisible``
    and the mask of the padding keys (Ulysses, and per ring step under Ring).
    """
    degree = LAYOUTS[layout][0] * LAYOUTS[layout][1]
    result = _layout_report(layout)["forward"][f"{kind}_odd"]
    print(f"{kind} {layout} uneven: relative error {result.get('relative_error')}")
    assert "error" not in result, result["error"]
    assert result["shape"] == result["reference_shape"]
    assert result["relative_error"] <= TOLERANCE
    assert result["block_input_shapes"] == [(1, (ODD_TOKENS + 1) // degree, 32)] * degree


@pytest.mark.parametrize("kind", ["wan", "flux"])
@pytest.mark.parametrize("layout", ["ulysses2", "ring2", "usp2x2"])
def test_uneven_sequence_is_wrong_without_the_padding_mask(layout, kind):
    """xfuser 0.7.0's own forward lets the padding token into every real token's attention.

    (FLUX.1's runs with the rename fix; without it, it raises ``AttributeError``.)
    """
    result = _layout_report(layout)["forward"][f"{kind}_odd"]
    print(f"{kind} {layout} uneven, unmasked: relative error {result['unmasked_relative_error']:.2e}")
    assert result["unmasked_relative_error"] > 1e-3


def test_patches_are_installed_once_and_recorded():
    """The ranks installed every patch; installing again, or running a patch again, wraps nothing
    twice, and the record lists each patch applied once."""
    fixes = _layout_report("ulysses2")["fixes"]
    assert fixes["installed_again"] is True
    assert fixes["layers"] == dict.fromkeys(fixes["layers"], 1)
    assert fixes["flux_alias"]
    record = fixes["record"]
    assert record["xfuser_version"] == "0.7.0" and record["skipped"] == {}
    assert record["installed"] == ["cpu_gloo", "padding", "cache_method"]
    assert len(record["applied"]) == len(set(record["applied"]))
    for applied in ("xfuser.envs: patch_envs", "xfuser.model_executor.layers.usp: patch_usp_process_group",
                    "xfuser.model_executor.layers.usp: patch_usp",
                    "xfuser.model_executor.models.transformers.transformer_wan: patch_wan",
                    "xfuser.model_executor.cache.adapters: patch_adapters"):
        assert applied in record["applied"]


def test_another_xfuser_version_is_left_untouched_with_a_warning(monkeypatch):
    from spectrum_xdit.parallel import patches
    from spectrum_xdit.parallel.patches.importing import _PatchOnImport

    monkeypatch.setattr(patches, "_record", None)
    monkeypatch.setattr(patches, "installed_xfuser_version", lambda: "0.8.0")
    meta_path = list(sys.meta_path)
    with pytest.warns(RuntimeWarning, match="xfuser 0.8.0 is installed.*skipped: cpu_gloo, padding, cache_method"):
        record = patches.install()
    # no import hook of ours (importing the concerns may load libraries that add their own)
    assert not [finder for finder in sys.meta_path if finder not in meta_path and isinstance(finder, _PatchOnImport)]
    assert record["installed"] == [] and set(record["skipped"]) == {"cpu_gloo", "padding", "cache_method"}
    assert patches.install() == record   # once per process


def test_flux_cfg_parallel_splits_the_batch():
    """xDiT's FLUX.1 wrapper splits a [cond, uncond] batch over the CFG group and gathers it.

    It splits hidden states, text states and timestep but not ``pooled_projections`` or
    ``guidance``, so this holds only when those are shared by the batch (one row).
    """
    result = _layout_report("cfg2")["forward"]["flux_batch2"]
    assert result["shape"] == result["reference_shape"]
    assert result["relative_error"] <= TOLERANCE
    assert result["block_input_shapes"] == [(1, FLUX_EVEN["height"] * FLUX_EVEN["width"], 32)] * 2


@pytest.mark.parametrize("kind", ["wan", "flux"])
@pytest.mark.parametrize("layout", sorted(PIPELINE_STEPS))
def test_sharded_pipeline_call_matches_diffusers(layout, kind):
    """A whole diffusers pipeline call (same seed on every rank) with xDiT's wrapper inside."""
    assert _layout_report(layout)["pipeline"][kind] <= TOLERANCE
