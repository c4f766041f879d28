"""The concept head of a pretrained student: its own ImageNet classifier, cut to the concepts, and new rows."""
from __future__ import annotations

import torch


class ConceptHead(torch.nn.Module):
    """Per output, linear rows: the member ImageNet classes of a pooled output, whose logit is the logsumexp
    of its rows (the pooling the ImageNet teachers use; log weights of a weighted pool sit in the biases), or
    one row (an empty group: a fresh output, its row's value). Written out (max, exp, sum, log, keepdim,
    concat) so the ONNX graph is plain ReduceMax/ReduceSum ops: OpenVINO mis-converted ReduceLogSumExp + Unsqueeze."""

    def __init__(self, in_features: int, groups):
        super().__init__()
        sizes = [max(1, len(g)) for g in groups]
        self.fc = torch.nn.Linear(in_features, sum(sizes))
        ends = [0]
        for n in sizes:
            ends.append(ends[-1] + n)
        self.bounds = list(zip(ends[:-1], ends[1:]))
        self.pooled = [bool(g) for g in groups]

    def forward(self, x):
        z = self.fc(x)
        if not any(self.pooled):
            return z
        out = []
        for (a, b), pooled in zip(self.bounds, self.pooled):
            part = z[:, a:b]
            if pooled:
                m = part.amax(1, keepdim=True).detach()
                part = m + (part - m).exp().sum(1, keepdim=True).log()
            out.append(part)
        return torch.cat(out, 1)

    @torch.no_grad()
    def set_rows(self, outputs, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Write the rows of fresh ``outputs`` (weight [len, D], bias [len])."""
        for j, i in enumerate(outputs):
            a, _ = self.bounds[i]
            self.fc.weight[a] = weight[j].to(self.fc.weight)
            self.fc.bias[a] = bias[j].to(self.fc.bias)


class PooledStudent(torch.nn.Sequential):
    """A pretrained backbone (its classifier removed: it returns pre-logit features) and a ``ConceptHead``."""

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self[0](x)

    @property
    def head(self) -> ConceptHead:
        return self[1]
