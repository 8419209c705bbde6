"""float32 master weights for half-precision parameters (``master=true``).

The model keeps its bfloat16/float16 parameters; the optimizer is handed float32 copies in
their place, so its state (Adam's moments) is float32 too.  Each step moves the model's
gradients onto the copies (upcast to float32; the model's ``.grad`` becomes None, so
gradient accumulation and ``optimizer.zero_grad()`` keep working), the optimizer updates the
copies, and the copies are rounded back into the model (round-to-nearest-even).

Weights loaded into the model after setup (a pretrained checkpoint) reach the copies: at
the first step, a copy that no longer rounds to its model parameter is taken from the model.
"""

from __future__ import annotations

import torch

from dualprec import PolicyError

from .casts import HALF_TORCH_DTYPES

__all__ = ["MasterWeights"]


class MasterWeights:
    def __init__(self, optimizer: torch.optim.Optimizer):
        if optimizer.state:
            raise PolicyError("master=true: the optimizer already has state for the half-precision "
                              "parameters; pass it to setup() before its first step, then load its "
                              "state_dict")
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if p.dtype in HALF_TORCH_DTYPES:
                    master = p.detach().to(torch.float32).requires_grad_(p.requires_grad)
                    self.pairs.append((p, master))
                    params.append(master)
                else:
                    params.append(p)
            group["params"] = params
        self._checked = False
        # optimizer.zero_grad() clears the copies' gradients; the model's own gradients (from a
        # backward since the last step, e.g. a GAN's generator loss reaching the critic) must
        # go too, or they leak into the next step as they would not without master weights
        plain_zero_grad = optimizer.zero_grad

        def zero_grad(set_to_none: bool = True) -> None:
            plain_zero_grad(set_to_none)
            for p, _ in self.pairs:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

        optimizer.zero_grad = zero_grad

    @torch.no_grad()
    def _refresh_from_model(self) -> None:
        for p, master in self.pairs:
            if not torch.equal(master.to(p.dtype), p):
                master.copy_(p)
        self._checked = True

    def move_grads(self) -> None:
        if not self._checked:
            self._refresh_from_model()
        for p, master in self.pairs:
            if p.grad is not None:
                master.grad = p.grad.to(torch.float32)
                p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, master in self.pairs:
            p.copy_(master)

    def state_dict(self) -> list[torch.Tensor]:
        return [master.detach() for _, master in self.pairs]

    @torch.no_grad()
    def load_state_dict(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) != len(self.pairs):
            raise PolicyError(f"master weights: the checkpoint holds {len(tensors)} tensors, this optimizer "
                              f"has {len(self.pairs)} half-precision parameters; was it saved for another model?")
        for (_, master), saved in zip(self.pairs, tensors):
            if saved.shape != master.shape:
                raise PolicyError(f"master weights: shape {tuple(saved.shape)} in the checkpoint, "
                                  f"{tuple(master.shape)} here")
            master.copy_(saved)
        self.copy_to_model()
        self._checked = True
