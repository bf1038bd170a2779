"""ParamSpace: the flat θ and the model's tensors, both ways, and its backward cost."""

from __future__ import annotations

import torch

from basins.engine.params import ParamSpace


def _space() -> ParamSpace:
    return ParamSpace({"a.weight": torch.zeros(3, 4), "a.bias": torch.zeros(3), "b.weight": torch.zeros(2, 3)})


def test_flatten_and_unflatten_are_inverse_with_leading_dims() -> None:
    space = _space()
    v = torch.arange(2 * space.num_params, dtype=torch.float64).reshape(2, space.num_params)
    d = space.unflatten(v)
    assert [tuple(t.shape) for t in d.values()] == [(2, 3, 4), (2, 3), (2, 2, 3)]
    assert torch.equal(d["a.bias"][1], v[1, 12:15])
    assert torch.equal(space.flatten(d), v)


def test_gradient_through_unflatten_is_one_split() -> None:
    """Differentiated through a flat θ, the pieces come from one split (whose backward concatenates
    the gradients once), not one slice per tensor (each slice's backward fills a whole zero
    gradient of length P: seconds per product at 10⁷ parameters and ~150 tensors)."""
    space = _space()
    theta = torch.randn(space.num_params, dtype=torch.float64, requires_grad=True)
    d = space.unflatten(theta)
    names = {t.grad_fn.next_functions[0][0].name() for t in d.values()}
    assert names == {"SplitWithSizesBackward0"}, names
    loss = sum((t**2).sum() * (i + 1) for i, t in enumerate(d.values()))
    (g,) = torch.autograd.grad(loss, theta)
    expected = torch.cat([2 * (i + 1) * t.reshape(-1) for i, t in enumerate(d.values())])
    assert torch.allclose(g, expected.detach(), rtol=0, atol=0)
