"""benchmarks.wan_rank: its rank attention, and every section rehearsed at CPU size."""

from __future__ import annotations

import json

import torch

from benchmarks import wan_rank


def test_the_rank_attention_is_diffusers_at_degree_one_and_keeps_shapes_at_two():
    """Ulysses' layout on one device: at degree 1 the processor computes what diffusers' does;
    at degree 2 it attends at half the heads over twice the tokens and gives the same shape back."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    torch.manual_seed(0)
    model = wan_rank.build_model(wan_rank.SMALL_WAN, torch.device("cpu"), torch.float32)
    inputs = wan_rank.Inputs(wan_rank.SMALL_WAN, wan_rank.SMALL_RANK, 1, torch.device("cpu"), torch.float32)
    timestep = inputs.timestep(500.0)
    stock = wan_rank.call(model, inputs.latents, timestep, inputs.text)
    shapes = []

    def attention(q, k, v):
        shapes.append(tuple(q.shape))
        return wan_rank.torch_attention(q, k, v)

    for degree in (1, 2):
        for block in model.blocks:
            block.attn1.set_processor(wan_rank.UlyssesRankAttention(degree, attention))
        out = wan_rank.call(model, inputs.latents, timestep, inputs.text)
        assert out.shape == stock.shape and torch.isfinite(out).all()
        if degree == 1:
            torch.testing.assert_close(out, stock, rtol=1e-4, atol=1e-5)
    tokens, heads = wan_rank.SMALL_RANK.tokens(), wan_rank.SMALL_WAN["num_attention_heads"]
    assert shapes[0] == (1, heads, tokens, 16) and shapes[-1] == (1, heads // 2, 2 * tokens, 16)
    for block in model.blocks:
        block.attn1.set_processor(WanAttnProcessor())
    torch.testing.assert_close(wan_rank.call(model, inputs.latents, timestep, inputs.text), stock)


def test_wan_rank_rehearses_every_section_on_cpu(tmp_path):
    result = wan_rank.main(["--small", "--json", str(tmp_path / "rank.json")])
    assert result["status"] == 0 and json.loads((tmp_path / "rank.json").read_text())["status"] == 0
    loops = result["loops"]
    assert loops["none"]["nfe"] == wan_rank.SMALL_RANK.steps and loops["none"]["speedup_wall"] == 1.0
    assert loops["paper"]["nfe"] < wan_rank.SMALL_RANK.steps
    assert loops[f"target_nfe_{wan_rank.SMALL_RANK.target_nfe}"]["nfe"] <= wan_rank.SMALL_RANK.target_nfe
    assert all(row["host_syncs"] is None and row["finite"] for row in loops.values())   # counted on CUDA only
    assert result["calls"]["forecast_ms"] < result["calls"]["real_ms"]
    assert [row["rows"] for row in result["batch"]] == list(wan_rank.ROWS)
    assert set(result["forecaster"]) >= {"update", "forecast", "score"}
    assert result["vae"]["frames"] == 1 + 4 * (wan_rank.SMALL_RANK.video_latent[0] - 1)
