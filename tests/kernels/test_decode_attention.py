"""natsl's split-KV decode read (`natsl.kernels.decode_attention`) under the Triton interpreter, float32, against
its PyTorch twin (`natsl.layers.state.attend_rows(impl="sdpa")`, float64): one and several queries per head, limits
from 0 to the full buffer, row counts that split into several ranges and do not fill the last tile, head dims that
are not powers of two; and decoding a model with `decode_attention="triton"` equals `"sdpa"`."""

import pytest
import torch
from helpers import assert_close, gen

from natsl.kernels.decode_attention import decode_attention, num_splits
from natsl.layers.state import attend_rows


@pytest.mark.parametrize("B,T,H,R,D,DV", [(1, 1, 3, 700, 16, 32), (2, 5, 2, 90, 24, 16), (1, 16, 1, 1200, 16, 40)])
def test_kernel_matches_sdpa(B, T, H, R, D, DV):
    gn = gen(B * 100 + R)
    q = torch.randn(B, T, H, D, generator=gn)
    k, v = torch.randn(B, H, R, D, generator=gn), torch.randn(B, H, R, DV, generator=gn)
    limit = torch.randint(1, R + 1, (B, H, T), generator=gn)
    limit.view(-1)[0] = R  # the whole buffer
    limit.view(-1)[-1] = 1  # one row
    out = decode_attention(q, k, v, limit, D ** -0.5)
    ref = attend_rows(q.double(), k.double(), v.double(), limit, D ** -0.5, impl="sdpa")
    assert out.dtype == q.dtype and out.shape == (B, T, H, DV)
    assert_close("o", ref, out, 1e-5, atol=1e-6)


def test_splits_cover_the_rows():
    for R, B, H in ((700, 1, 3), (131072, 1, 12), (64, 8, 12), (1, 1, 1)):
        ns, split = num_splits(R, B, H)
        assert split % 64 == 0 and (ns - 1) * split < R <= ns * split
    assert num_splits(131072, 1, 12)[0] > 1  # batch 1: the rows are read by several programs


def test_empty_rows_and_errors():
    q = torch.randn(1, 2, 2, 16)
    k, v = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    limit = torch.tensor([[[0, 3], [50, 0]]])
    out = decode_attention(q, k, v, limit, 0.25)
    assert (out[0, 0, 0] == 0).all() and (out[0, 1, 1] == 0).all() and torch.isfinite(out).all()
    ref = attend_rows(q.double(), k.double(), v.double(), limit.clamp(min=1), 0.25)
    torch.testing.assert_close(out[0, 1, 0], ref[0, 1, 0].float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at most 128"):
        decode_attention(torch.randn(1, 129, 2, 16), k, v, torch.ones(1, 2, 129, dtype=torch.long), 0.25)
    with pytest.raises(ValueError, match="must match"):
        decode_attention(q, k, v, limit[..., :1], 0.25)
    with pytest.raises(ValueError, match="impl"):
        attend_rows(q, k, v, limit.clamp(min=1), 0.25, impl="flash")


def test_model_decoding_with_the_triton_read():
    """Prefill then token-by-token decoding through natsl and softmax layers: `decode_attention="triton"` gives the
    logits of `"sdpa"` (float32, across block commits)."""
    from natsl import NAtSLConfig, NAtSLForCausalLM
    from natsl.models.cache import NAtSLCache

    C = NAtSLConfig.preset("tiny").block_size
    ids = torch.randint(1, 256, (2, 2 * C + 9), generator=gen(5))
    logits = {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(0)
        cfg = NAtSLConfig.preset("tiny", "natsl", num_hidden_layers=2, layer_layout=["natsl", "softmax"],
                                 linear_impl="torch", softmax_backend="sdpa", decode_attention=impl)
        model = NAtSLForCausalLM(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():  # routers that mix both block types
                p.add_(torch.randn(p.shape, generator=gen(p.numel())) * (3.0 if "router" in name else 0.1))
            cache = NAtSLCache()
            out = [model(ids[:, :5], cache=cache).logits]
            out += [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, ids.shape[1])]
        logits[impl] = torch.cat(out, 1)
    torch.testing.assert_close(logits["triton"], logits["sdpa"], rtol=1e-4, atol=1e-4)
