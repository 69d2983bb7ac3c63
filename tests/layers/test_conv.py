"""`ShortConv.forward_with_state` (the inference cache's short convolution, spec §1.8): any split of a sequence into
calls gives the full forward's rows, and the state a call returns holds only its `W-1` rows."""

import pytest
import torch
from helpers import gen

from natsl.layers.conv import ShortConv


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("cuts", [(1,), (2,), (3,), (1, 2), (5, 1, 1, 4), (17,), (2, 9, 1)])
def test_chunks_match_the_full_forward(W, cuts):
    conv = ShortConv(6, conv_size=W).double()
    torch.nn.init.normal_(conv.weight, generator=gen(0))
    B, T = 2, sum(cuts)
    x = torch.randn(B, T, 6, dtype=torch.float64, generator=gen(1))
    with torch.no_grad():
        full = conv(x)
        ys, state, t = [], None, 0
        for n in cuts:
            y, state = conv.forward_with_state(x[:, t:t + n], state)
            assert state.shape == (B, W - 1, 6)
            if n > 1:  # a prefill chunk's state owns its W-1 rows: it does not keep the chunk alive in the cache
                assert state.untyped_storage().nbytes() == state.numel() * state.element_size()
            ys.append(y)
            t += n
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-12, atol=1e-12)
    want = torch.nn.functional.pad(x, (0, 0, W - 1, 0))[:, -(W - 1):]
    torch.testing.assert_close(state, want, rtol=0, atol=0)
