"""The concept head of a pretrained student: its own ImageNet classifier, cut to the concepts."""
from __future__ import annotations

import torch


class ConceptHead(torch.nn.Module):
    """Linear rows of the member ImageNet classes; a concept's logit is the logsumexp of its rows,
    the same pooling the ImageNet teachers use. Written out (max, exp, sum, log, keepdim, concat) so
    the ONNX graph is plain ReduceMax/ReduceSum ops: OpenVINO mis-converted ReduceLogSumExp + Unsqueeze."""

    def __init__(self, in_features: int, groups):
        super().__init__()
        self.fc = torch.nn.Linear(in_features, sum(len(g) for g in groups))
        ends = [0]
        for g in groups:
            ends.append(ends[-1] + len(g))
        self.bounds = list(zip(ends[:-1], ends[1:]))

    def forward(self, x):
        z = self.fc(x)
        out = []
        for a, b in self.bounds:
            part = z[:, a:b]
            m = part.amax(1, keepdim=True).detach()
            out.append(m + (part - m).exp().sum(1, keepdim=True).log())
        return torch.cat(out, 1)
