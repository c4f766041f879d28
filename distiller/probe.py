"""Linear probe: a fresh concept head fitted on a pretrained student's frozen features.

The first half of LP-FT (Kumar et al., ICLR 2022): a random head fine-tuned at once sends large,
random gradients into the backbone and distorts the features it was chosen for. Fitting the head
first, on frozen features of the eval view of each image and of its mirror, against the teacher's
soft labels, gives fine-tuning a head that already agrees with the teacher (and "as initialised",
epoch 0, is then the probed student, which competes with every fine-tuned epoch).
"""
from __future__ import annotations

import torch

from .augment import resize_center


@torch.no_grad()
def features(student, spec, images_u8, device="cpu", batch_size=64, mirror=True) -> torch.Tensor:
    """Pre-logit features of the eval view (and its mirror) of uint8 [N, H, W, 3] images: [N or 2N, D]."""
    from .distill import Normalizer, to_float
    student.eval()
    norm = Normalizer(spec.preprocess).to(device)
    out, flipped = [], []
    for i in range(0, len(images_u8), batch_size):
        x = norm(resize_center(to_float(images_u8[i:i + batch_size], device), spec.preprocess.size, spec.preprocess.resize))
        for views, acc in ((x, out), (x.flip(-1), flipped)) if mirror else ((x, out),):
            acc.append(student.forward_head(student.forward_features(views), pre_logits=True).float().cpu())
    return torch.cat(out + flipped)


def fit_head(student, spec, images_u8, teacher_logits, weights, cfg, device="cpu") -> float:
    """Fit ``student``'s classifier on frozen features to the teacher's soft labels (at the KD temperature),
    full batch, Adam for ``cfg.probe_steps``; returns the final loss. Deterministic (no sampling)."""
    feats = features(student, spec, images_u8, device)
    reps = len(feats) // len(images_u8)
    t = torch.as_tensor(teacher_logits).float().repeat(reps, 1)
    w = torch.as_tensor(weights).float().repeat(reps)
    w = w / w.sum()
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-4)
    z = (feats - mean) / std                    # standardised: one learning rate suits every backbone
    k = t.shape[1]
    weight = torch.zeros(k, z.shape[1], requires_grad=True)
    bias = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.01)
    temp = cfg.temperature
    loss = torch.tensor(0.0)
    for _ in range(cfg.probe_steps):
        s = z @ weight.T + bias
        per = torch.nn.functional.kl_div(torch.log_softmax(s / temp, -1), torch.softmax(t / temp, -1),
                                         reduction="none").sum(-1) * temp * temp
        loss = (per * w).sum() + cfg.probe_weight_decay * weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fc = student.get_classifier()
    with torch.no_grad():                       # fold the standardisation into the layer
        wf = weight / std
        fc.weight.copy_(wf.to(fc.weight))
        fc.bias.copy_((bias - wf @ mean).to(fc.bias))
    return float(loss.detach())
