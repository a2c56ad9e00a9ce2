import math

import pytest
import torch
import torch.nn.functional as F

from entrep.losses import caption_targets, joint_loss, multi_positive_infonce, positive_mask, supcon
from entrep.model.slerp import slerp


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_slerp_unit_norm_endpoints_and_linear_angle():
    a, b = _unit(5, 16), _unit(5, 16, seed=1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    theta = torch.acos((a * b).sum(-1))
    t = torch.tensor([0.1, 0.25, 0.5, 0.7, 0.9])
    out = slerp(a, b, t)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(torch.acos((a * out).sum(-1).clamp(-1, 1)), t * theta, atol=1e-4)
    assert torch.allclose(torch.acos((out * b).sum(-1).clamp(-1, 1)), (1 - t) * theta, atol=1e-4)


def test_slerp_near_parallel_falls_back_with_finite_gradients():
    a = _unit(3, 8).requires_grad_(True)
    b = (a.detach() + 1e-7).requires_grad_(True)
    out = slerp(a, b, 0.3)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert torch.allclose(out, F.normalize(a.detach(), dim=-1), atol=1e-5)


def test_slerp_gradients_finite_in_general():
    a, b = _unit(4, 8).requires_grad_(True), _unit(4, 8, seed=2).requires_grad_(True)
    slerp(a, b, torch.rand(4)).pow(2).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def _clip_loss(img, txt, scale):
    logits = scale * img @ txt.t()
    y = torch.arange(len(img))
    return (F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y)) / 2


def test_infonce_equals_clip_loss_when_targets_are_unique():
    img, txt = _unit(6, 16), _unit(6, 16, seed=3)
    ours = multi_positive_infonce(img, txt, torch.eye(6, dtype=torch.bool), 10.0)
    assert ours.item() == pytest.approx(_clip_loss(img, txt, 10.0).item(), rel=1e-6)


def test_aligned_batch_beats_shuffled():
    txt = _unit(8, 16)
    img = F.normalize(txt + 0.1 * _unit(8, 16, seed=4), dim=-1)
    pos = torch.eye(8, dtype=torch.bool)
    assert multi_positive_infonce(img, txt, pos, 20.0) < multi_positive_infonce(img[torch.randperm(8)], txt, pos, 20.0)


def test_duplicate_captions_are_positives_not_negatives():
    names, pos = caption_targets([["superior septal deviation"], ["superior septal deviation"], ["a polyp"]])
    assert names == ["superior septal deviation", "a polyp"]
    assert pos.tolist() == [[True, False], [True, False], [False, True]]
    t = _unit(2, 16)
    img = torch.stack([t[0], t[0], t[1]])  # both images sit exactly on their shared caption
    ours = multi_positive_infonce(img, t, pos, 50.0)
    naive = _clip_loss(img, torch.stack([t[0], t[0], t[1]]), 50.0)  # duplicate as its own negative
    assert ours < 0.01 and naive > 0.4  # a naive CLIP loss keeps a log(2) floor on the shared rows


def test_images_without_captions_sit_out():
    img, txt = _unit(3, 8), _unit(1, 8)
    pos = torch.tensor([[True], [False], [False]])
    assert multi_positive_infonce(img, txt, pos, 10.0).item() == pytest.approx(0.0, abs=1e-6)


def test_supcon_hand_case_and_masks():
    e = F.normalize(torch.tensor([[1.0, 0], [1.0, 0.01], [0, 1.0]]), dim=-1)
    pos = positive_mask(torch.tensor([0, 0, 1]), torch.tensor([-1, -1, -1]))
    loss = supcon(e, pos, 1.0)
    # anchor 0: -log(e^{s01} / (e^{s01} + e^{s02})); anchor 1 likewise; anchor 2 has no positive
    s01, s02, s12 = (e[0] @ e[1]).item(), (e[0] @ e[2]).item(), (e[1] @ e[2]).item()
    want = (-math.log(math.exp(s01) / (math.exp(s01) + math.exp(s02)))
            - math.log(math.exp(s01) / (math.exp(s01) + math.exp(s12)))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    g = positive_mask(torch.tensor([-1, -1, 2]), torch.tensor([5, 5, -1]))
    assert g.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_joint_loss_every_lambda_can_be_zero():
    from entrep.config import LossConfig

    out = {"emb": _unit(4, 8), "head_logits": torch.randn(4, 3), "prompt_logits": torch.randn(4, 3)}
    y, g = torch.tensor([0, 1, -1, 2]), torch.tensor([0, 0, 1, 2])
    zero = LossConfig(ce=0, prompt=0, text=0, image=0)
    loss, parts = joint_loss(out, y, g, _unit(2, 8), torch.ones(4, 2, dtype=torch.bool), torch.tensor(10.0), zero)
    assert loss.item() == 0.0 and parts == {}
    full, parts = joint_loss(out, y, g, _unit(2, 8), torch.ones(4, 2, dtype=torch.bool), torch.tensor(10.0),
                             LossConfig(), slerp_views=_unit(4, 8, seed=9))
    assert set(parts) == {"ce", "prompt", "text", "image"} and torch.isfinite(full)
