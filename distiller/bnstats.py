"""A network's BatchNorm layers as a prior on its input: per layer, a gap between the batch's feature statistics
and the running ones the layer learnt on its training images. DeepInversion (the ImageNet teachers' synthesis)
and ZeroQ (calibration images made from the student itself, ``statimages``) both minimise it."""
from __future__ import annotations

import torch


def _bn_kl(mu, var, rm, rv, eps) -> torch.Tensor:
    """Mean over channels of the Gaussian KL between the batch's and the running statistics (scale-free)."""
    var, rv = var + eps, rv + eps
    return (0.5 * (torch.log(rv / var) + (var + (mu - rm) ** 2) / rv - 1)).mean()


def _bn_l2(mu, var, rm, rv, eps) -> torch.Tensor:
    """DeepInversion's: the L2 norms of the variance gap and of the mean gap."""
    return torch.norm(rv - var, 2) + torch.norm(rm - mu, 2)


# per layer term; how the layers' terms combine (the first layer's weighted): kl averages, l2 sums (DeepInversion)
BN_FORMS = {"kl": (_bn_kl, torch.mean), "l2": (_bn_l2, torch.sum)}


class BNStats:
    """Forward hooks collecting, per BatchNorm layer in order, a gap between batch and running statistics."""

    def __init__(self, model):
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.active, self.form = False, "kl"

    def _hook(self, module, inputs, output):
        if not self.active:
            return
        x = inputs[0].float()
        mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        self.terms.append(BN_FORMS[self.form][0](mu, var, module.running_mean.float(), module.running_var.float(), module.eps))

    def prior(self, first_weight: float) -> torch.Tensor:
        weights = torch.ones(len(self.terms), device=self.terms[0].device)
        weights[0] = first_weight
        return BN_FORMS[self.form][1](torch.stack(self.terms) * weights)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
