"""The four DSMD losses, the peers' losses and the balancer, on hand-worked tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsmd.distill.balancer import Balancer, BalancerConfig
from dsmd.distill.losses import (
    clip_contrastive,
    contrastive_distill,
    feature_distill,
    hard_negative_distill,
    hardest_triplet,
    similarity_distill,
    similarity_kl,
)

T = torch.tensor


def test_contrastive_distill_by_hand_and_masks_same_image_queue_entries():
    s = T([[1.0, 0.0]])
    t = T([[1.0, 0.0]])
    queue = T([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    # the second queue entry is the same image (id 7): masked; the third is an empty slot (-1)
    loss = contrastive_distill(s, t, queue, T([7]), T([3, 7, -1]), tau=1.0)
    # logits [1, 0]: CE = log(1 + e^-1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    unmasked = contrastive_distill(s, t, queue, T([7]), T([3, 4, 5]), tau=1.0)
    assert unmasked.item() == pytest.approx(-math.log(math.e / (math.e + 1 + math.e + math.exp(0.6))))
    # temperature sharpens: tau 0.05 makes a clear positive nearly free
    assert contrastive_distill(s, t, queue, T([7]), T([3, 7, -1]), tau=0.05).item() < 1e-8


def test_feature_and_similarity_distill_by_hand():
    a = T([[1.0, 0.0], [0.0, 1.0]])
    assert feature_distill(a, a, a, a).item() == 0.0
    b = T([[0.0, 1.0], [0.0, 1.0]])  # first row differs by |1|+|1| = 2 over 4 entries
    assert feature_distill(a, b, a, a).item() == pytest.approx(0.5)
    assert similarity_distill(a, a, a, a).item() == pytest.approx(0.0)
    assert similarity_distill(a, -a, a, -a).item() == pytest.approx(2.0)
    # cos 0 and 1 → mean 0.5 → 1 - 0.75 = 0.25 for the image side
    assert similarity_distill(a, b, a, a).item() == pytest.approx(0.25)


def test_hardest_triplet_by_hand():
    a = T([[1.0, 0.0], [0.0, 1.0]])
    b = T([[0.8, 0.6], [0.6, 0.8]])
    # S = [[.8,.6],[.6,.8]]: hardest negatives .6 < positives .8 → no violation at margin 0
    assert hardest_triplet(a, b, T([0, 1]), margin=0.0).item() == pytest.approx(0.0)
    # margin 0.3: each of 2 rows and 2 columns violates by 0.1
    assert hardest_triplet(a, b, T([0, 1]), margin=0.3).item() == pytest.approx(0.4)
    # swap b's rows: negatives .8 beat positives .6 → 4 x 0.2
    assert hardest_triplet(a, b.flip(0), T([0, 1]), margin=0.0).item() == pytest.approx(0.8)
    # the same image twice in the batch: nothing is a negative
    assert hardest_triplet(a, b.flip(0), T([5, 5]), margin=0.0).item() == 0.0


def test_hard_negative_distill_sums_the_four_pairs():
    torch.manual_seed(0)
    x = [F.normalize(torch.randn(6, 4), dim=-1) for _ in range(4)]
    ids = torch.arange(6)
    expected = (hardest_triplet(x[0], x[1], ids, 0.2) + hardest_triplet(x[2], x[3], ids, 0.2)
                + hardest_triplet(x[0], x[3], ids, 0.2) + hardest_triplet(x[2], x[1], ids, 0.2))
    assert hard_negative_distill(x[0], x[1], x[2], x[3], ids, 0.2).item() == pytest.approx(expected.item())


def test_peer_losses():
    a = F.normalize(torch.randn(4, 8), dim=-1)
    assert similarity_kl(a, a, a, a).item() == pytest.approx(0.0, abs=1e-6)
    # a perfect pairing scores lower than a shuffled one; duplicates of an image are not negatives
    ids = torch.arange(4)
    assert clip_contrastive(a, a, ids) < clip_contrastive(a, a.flip(0), ids)
    dup = torch.cat([a[:1], a[:1]])
    assert clip_contrastive(dup, dup, T([3, 3])).item() == pytest.approx(0.0, abs=1e-6)


def test_losses_have_gradients():
    s = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(4, 8), dim=-1)
    q = F.normalize(torch.randn(16, 8), dim=-1)
    ids = torch.arange(4)
    total = (contrastive_distill(s, t, q, ids, torch.arange(16) + 10) + feature_distill(s, t, s, t)
             + similarity_distill(s, t, s, t) + hard_negative_distill(s, t, s, t, ids, 0.2))
    total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------- balancer

def _losses(**v):
    return {k: torch.tensor(x, requires_grad=True) for k, x in v.items()}


def test_magnitude_scaling_with_equal_rates():
    bal = Balancer(["a", "b"])
    total, factors = bal(_losses(a=1.0, b=4.0))
    # first step: rates 1, weights K/M = 1; scales 4 and 1 → each term has magnitude 4
    assert factors == pytest.approx({"a": 4.0, "b": 1.0})
    assert total.item() == pytest.approx(8.0)


def test_dwa_rates_favour_the_loss_that_falls_slowest():
    cfg = BalancerConfig(ema=0.0, window=0)  # no smoothing: rates are plain ratios of consecutive losses
    bal = Balancer(["fast", "slow"], cfg)
    bal(_losses(fast=4.0, slow=4.0))
    bal(_losses(fast=2.0, slow=4.0))
    _, factors = bal(_losses(fast=1.0, slow=4.0))
    # rates: fast 2/4 = 0.5, slow 1.0 → weights 2·softmax([0.5, 1])
    w_fast = 2 * math.exp(0.5) / (math.exp(0.5) + math.exp(1.0))
    w_slow = 2 - w_fast
    assert factors["fast"] == pytest.approx(w_fast * 4.0)  # scale 4/1
    assert factors["slow"] == pytest.approx(w_slow * 1.0)
    assert w_slow > w_fast


def test_ema_smooths_the_rates():
    bal = Balancer(["a", "b"], BalancerConfig(ema=0.5, window=0))
    bal(_losses(a=4.0, b=4.0))  # L̄ = 4, 4
    bal(_losses(a=2.0, b=4.0))  # L̄ = 3, 4
    _, f = bal(_losses(a=2.0, b=4.0))  # rates 3/4, 1
    w_a = 2 * math.exp(0.75) / (math.exp(0.75) + math.exp(1.0))
    assert f["a"] == pytest.approx(w_a * 2.0)


def test_scale_is_capped_when_a_loss_reaches_zero():
    bal = Balancer(["cd", "hnd"], BalancerConfig(max_scale=100.0))
    _, f = bal(_losses(cd=5.0, hnd=0.0))
    assert f["hnd"] == pytest.approx(100.0)
    assert math.isfinite(f["hnd"])


def test_reference_mode_keeps_equal_weights():
    bal = Balancer(["a", "b", "c"], BalancerConfig(mode="reference", ema=0.0, window=0))
    for a in (3.0, 1.0, 0.5, 0.1):
        _, f = bal(_losses(a=a, b=2.0, c=4.0))
    # weights K/M = 1: only the magnitude scaling acts
    assert f == pytest.approx({"a": 40.0, "b": 2.0, "c": 1.0})


def test_none_and_fixed_modes_and_state_round_trip():
    total, f = Balancer(["a", "b"], BalancerConfig(mode="none"))(_losses(a=1.0, b=3.0))
    assert total.item() == 4.0 and f == {"a": 1.0, "b": 1.0}
    total, _ = Balancer(["a", "b"], BalancerConfig(mode="fixed", fixed={"a": 2.0, "b": 0.5}))(_losses(a=1.0, b=3.0))
    assert total.item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="fixed weights"):
        Balancer(["a", "b"], BalancerConfig(mode="fixed", fixed={"a": 1.0}))
    with pytest.raises(ValueError, match="mode"):
        BalancerConfig(mode="magic")

    one, two = Balancer(["a", "b"]), Balancer(["a", "b"])
    for v in (4.0, 3.0):
        one(_losses(a=v, b=1.0))
    two.load_state_dict(one.state_dict())
    assert one(_losses(a=2.0, b=1.0))[1] == two(_losses(a=2.0, b=1.0))[1]


def test_weights_are_constants_for_autograd():
    losses = _losses(a=1.0, b=4.0)
    total, _ = Balancer(["a", "b"])(losses)
    total.backward()
    assert losses["a"].grad.item() == pytest.approx(4.0) and losses["b"].grad.item() == pytest.approx(1.0)


def _weights_along(cfg: BalancerConfig, steps: int = 300) -> list[dict[str, float]]:
    """The weights w_m (factor / scale) over a trajectory where `a` falls fast and `b` slowly, with noise."""
    import random

    rnd = random.Random(0)
    bal = Balancer(["a", "b"], cfg)
    out = []
    for t in range(steps):
        a = 4.0 * 0.99 ** t * (1 + 0.05 * rnd.uniform(-1, 1))
        b = 4.0 * 0.999 ** t * (1 + 0.05 * rnd.uniform(-1, 1))
        scales = bal._scales({"a": a, "b": b})
        _, f = bal(_losses(a=a, b=b))
        out.append({n: f[n] / scales[n] for n in f})
    return out


def test_window_means_give_dwa_rates_and_move_the_weights_where_the_per_step_ema_barely_does():
    ema = _weights_along(BalancerConfig(window=0))
    window = _weights_along(BalancerConfig(window=30))
    spread = lambda ws: max(abs(w["b"] - w["a"]) for w in ws[60:])  # noqa: E731
    # per-step EMA: consecutive smoothed values differ by ~1%: the weights stay within ~1% of equal
    assert spread(ema) < 0.02
    # window means 30 steps apart: a has fallen by 0.99^30 = 0.74, b by 0.97: the slow loss gets more weight
    assert spread(window) > 0.1 and window[-1]["b"] > window[-1]["a"]
    w_b = 2 * math.exp(0.999 ** 30) / (math.exp(0.99 ** 30) + math.exp(0.999 ** 30))
    assert window[-1]["b"] == pytest.approx(w_b, abs=0.03)
    # the weights change only at window boundaries
    assert window[62] == pytest.approx(window[61]) and window[89] == pytest.approx(window[61])
    assert abs(window[90]["a"] - window[89]["a"]) > 1e-3


def test_window_state_round_trips():
    one, two = Balancer(["a", "b"], BalancerConfig(window=3)), Balancer(["a", "b"], BalancerConfig(window=3))
    for v in (4.0, 3.0, 2.5, 2.0, 1.0):
        one(_losses(a=v, b=1.0))
    two.load_state_dict(one.state_dict())
    for v in (0.9, 0.8, 0.7, 0.6):
        assert one(_losses(a=v, b=1.0))[1] == two(_losses(a=v, b=1.0))[1]
