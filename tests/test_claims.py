"""interpbook.claims: glued values are remembered and comparisons between them checked."""

import numpy as np
import pytest
import torch
from interpbook import claims


@pytest.fixture(autouse=True)
def fresh():
    claims.reset()
    yield
    claims.reset()


def test_claim_passes_and_fails_with_the_values_named():
    claims.glue("ours", np.float64(0.8))
    claims.glue("base", torch.tensor(0.5))
    assert claims.value("base") == 0.5 and isinstance(claims.value("base"), float)
    claims.claim("ours", ">", "base")
    claims.claim("ours", ">=", 0.8)
    claims.claim("ours", "~", 0.79, tol=0.02)
    with pytest.raises(AssertionError, match=r"'ours'=0.8 < 'base'=0.5.*the probe beats"):
        claims.claim("ours", "<", "base", why="the probe beats the baseline")


def test_claim_errors_are_specific():
    claims.glue("a", 1)
    with pytest.raises(KeyError, match="nothing was glued under 'b'.*glued keys: a"):
        claims.claim("a", ">", "b")
    with pytest.raises(ValueError, match="unknown comparison '=>'"):
        claims.claim("a", "=>", 0)
    with pytest.raises(TypeError, match="not list"):
        claims.claim("a", ">", [1])
