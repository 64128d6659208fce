"""The dynamic self-adaptive loss balancer (METHOD.md §3, Eq. 15-18) and its variants.

Per step, with raw losses L_m:
  1. magnitude scaling  s_m = max_j L_j / L_m   (detached; see the guard below)
  2. rate of each loss  r_m = L̄_m(t-1) / L̄_m(t-2), on *smoothed* raw losses. DWA (Liu et al.
     2019, which Eq. 16 follows) uses epoch means: with `window` N > 0 (default 100), L̄ is the
     mean of the raw losses over consecutive windows of N steps (N = the steps of an epoch gives
     DWA exactly; 100 steps give a two-epoch demo run twelve windows), and the weights change
     once per window. A step is a call: with gradient accumulation, a micro-batch. With
     `window` 0, L̄ is a per-step exponential moving average (factor `ema`, the earlier
     default): consecutive values differ little, so the rates stay near 1 and the weights
     within a few percent of equal after the first few hundred steps.
  3. weights            w_m = K · softmax(r / T)_m
  4. objective          L = Σ w_m · s_m · L_m       (weights and scales are constants for autograd)

Guard (METHOD.md §3 "Guard" and §7): with margin 0 the triplet loss can sit at exactly 0, and
s_m grows without bound, dragging the student to collapse. The denominator is floored at `eps`
and the factor capped at `max_scale` (default 1000, loose on purpose: in normal demo training
the cosine loss sits far below the contrastive one, so a tight cap would bend the method where
nothing is wrong). A loss whose smoothed value two steps back is below `eps` gets rate 1 (a
rate from zero is not a rate).

Variants (`mode`):
  dsmd       the paper, as above (default)
  reference  the released prototype: rates from the already-scaled losses, which are all
             equal, so the weights stay K/M and only the magnitude scaling acts
  none       plain sum Σ L_m
  fixed      Σ w_m L_m with the given `fixed` weights (no scaling)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("dsmd", "reference", "none", "fixed")


@dataclass
class BalancerConfig:
    mode: str = "dsmd"
    temperature: float = 1.0  # T
    total: float | None = None  # K, the sum of the weights; None = number of losses
    ema: float = 0.9  # smoothing of the raw losses for the rates (window 0)
    window: int = 100  # rates from means over windows of this many steps (DWA's epoch means); 0: per-step EMA
    max_scale: float = 1000.0  # cap on the magnitude-scaling factor
    eps: float = 1e-8  # floor on a loss in the scaling denominator
    fixed: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"balancer mode must be one of {MODES}, not {self.mode!r}")
        if self.window < 0:
            raise ValueError(f"balancer.window is a number of steps (0: per-step EMA), not {self.window}")


class Balancer:
    """Combines named losses into one objective and reports the weights it used."""

    def __init__(self, names: list[str], cfg: BalancerConfig | None = None):
        self.names = list(names)
        self.cfg = cfg or BalancerConfig()
        if self.cfg.mode == "fixed" and set(self.cfg.fixed) != set(self.names):
            raise ValueError(f"fixed weights must name exactly {self.names}, got {sorted(self.cfg.fixed)}")
        self.smoothed: list[dict[str, float]] = []  # L̄(t-2), L̄(t-1): at most two entries
        self.window_sum: dict[str, float] = {n: 0.0 for n in self.names}  # the window being filled
        self.window_steps = 0
        self.weights: dict[str, float] = {n: 1.0 for n in self.names}  # w_m of the last call (plots, logs)

    def __call__(self, losses: dict[str, torch.Tensor],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted objective and, per loss, the effective factor w_m · s_m it was given.

        `reduce` (e.g. an all-reduce mean across ranks) makes every rank compute the same weights.
        """
        values = torch.stack([losses[n].detach().float() for n in self.names])
        if reduce is not None:
            values = reduce(values)
        raw = dict(zip(self.names, values.tolist()))
        mode = self.cfg.mode
        if mode == "none":
            factors = {n: 1.0 for n in self.names}
            self.weights = dict(factors)
        elif mode == "fixed":
            factors = dict(self.cfg.fixed)
            self.weights = dict(factors)
        else:
            scales = self._scales(raw)
            tracked = raw if mode == "dsmd" else {n: scales[n] * raw[n] for n in self.names}
            self.weights = self._weights(tracked)
            factors = {n: self.weights[n] * scales[n] for n in self.names}
        total = sum(factors[n] * losses[n] for n in self.names)
        return total, factors

    def _scales(self, raw: dict[str, float]) -> dict[str, float]:
        top = max(raw.values())
        return {n: min(self.cfg.max_scale, top / max(v, self.cfg.eps)) for n, v in raw.items()}

    def _weights(self, tracked: dict[str, float]) -> dict[str, float]:
        """Softmax of the loss rates; updates the smoothed history with this step's values."""
        if len(self.smoothed) == 2:
            older, newer = self.smoothed
            # a loss that was (near) zero has no meaningful rate: treat it as steady
            rates = {n: newer[n] / older[n] if older[n] > self.cfg.eps else 1.0 for n in self.names}
        else:
            rates = {n: 1.0 for n in self.names}
        k = self.cfg.total if self.cfg.total is not None else len(self.names)
        top = max(rates.values())  # a stable softmax: subtract the largest rate
        exps = {n: math.exp((rates[n] - top) / self.cfg.temperature) for n in self.names}
        z = sum(exps.values())
        weights = {n: k * exps[n] / z for n in self.names}
        if not all(math.isfinite(v) for v in tracked.values()):
            return weights  # a non-finite step (fp16 overflow, skipped by the scaler) must not poison the history
        if self.cfg.window > 0:
            for n in self.names:
                self.window_sum[n] += tracked[n]
            self.window_steps += 1
            if self.window_steps == self.cfg.window:
                mean = {n: self.window_sum[n] / self.window_steps for n in self.names}
                self.smoothed = (self.smoothed + [mean])[-2:]
                self.window_sum, self.window_steps = {n: 0.0 for n in self.names}, 0
            return weights
        prev = self.smoothed[-1] if self.smoothed else tracked
        beta = self.cfg.ema
        self.smoothed = (self.smoothed + [{n: beta * prev[n] + (1 - beta) * tracked[n] for n in self.names}])[-2:]
        return weights

    def state_dict(self) -> dict:
        return {"smoothed": [dict(s) for s in self.smoothed], "window_sum": dict(self.window_sum),
                "window_steps": self.window_steps}

    def load_state_dict(self, state: dict) -> None:
        self.smoothed = [dict(s) for s in state["smoothed"]]
        self.window_sum = dict(state.get("window_sum", {n: 0.0 for n in self.names}))
        self.window_steps = int(state.get("window_steps", 0))
