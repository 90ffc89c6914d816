"""gradcheck helper shared by the architecture tests: SAE.loss as a function of its parameters."""
from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call

from models.sae import SAE


def loss_of_params(sae: SAE, names: Sequence[str], **loss_kwargs) -> Callable[..., torch.Tensor]:
    """f(x, *params) = sae.loss(x, **loss_kwargs)["loss"] with the named parameters replaced."""

    class LossOf(torch.nn.Module):  # lets functional_call reach SAE.loss rather than forward
        def __init__(self) -> None:
            super().__init__()
            self.sae = sae

        def forward(self, x):
            return self.sae.loss(x, **loss_kwargs)["loss"]

    wrapper = LossOf()

    def f(x, *ps):
        return functional_call(wrapper, {f"sae.{n}": p for n, p in zip(names, ps)}, (x,))

    return f
