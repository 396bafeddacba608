r"""The population optimum of a margin-ranking loss under label noise: what the demo's `predicted` column holds.

DPO, CPO and E-CPOC all minimise ``-log sigmoid(beta * (delta_pi - t))`` for a target ``t`` computed from the frozen
reference alone (DPO: ``t = delta_ref``; CPO: ``delta_ref + m / beta``; E-CPOC: its smoothed
``max(delta_ref, ecpoc_gamma)``). Take one pair type, a (good, bad) response pair, whose training label is flipped
with probability ``q`` (annotator disagreement). Write ``d`` for the policy's log-odds of good over bad, ``t1`` for
the target when the label is right (chosen = good) and ``t2`` for the target when it is flipped (chosen = bad, the
target computed from the swapped reference log-probs). A flipped pair sees ``delta_pi = -d``, so the expected loss is

    L(d) = (1 - q) * l(beta * (d - t1)) + q * l(beta * (-d - t2)),      l(x) = -log sigmoid(x).

``L`` is convex in ``d``. With ``l'(x) = -sigmoid(-x)``, ``L'(d) = 0`` reads
``(1 - q) * sigmoid(beta * (t1 - d)) = q * sigmoid(beta * (d + t2))``. With ``y = exp(beta * d)``,
``A = exp(-beta * t1)`` and ``B = exp(-beta * t2)`` this is ``(1 - q) * (1 + B / y) = q * (1 + A * y)``, i.e. the
quadratic ``q A y^2 - (1 - 2q) y - (1 - q) B = 0``, whose one positive root gives

    d* = t1 + log[ ((1 - 2q) + sqrt((1 - 2q)^2 + 4 q (1 - q) exp(-beta * (t1 + t2)))) / (2q) ] / beta.

Special cases: DPO has ``t2 = -t1``, so ``d* = delta_ref + logit(1 - q) / beta``; CPO's margin is symmetric in the
two responses (``t1 + t2 = 2m / beta``); ``q = 0`` has no finite optimum (the loss keeps pushing ``d`` up).
"""

from __future__ import annotations

import math

import torch


def population_optimum(
    target_labelled: torch.Tensor, target_flipped: torch.Tensor, *, beta: float, label_noise: float
) -> torch.Tensor | None:
    r"""Per-pair ``d*`` minimising ``(1-q) l(beta (d - t1)) + q l(beta (-d - t2))`` (see the module docstring).

    ``target_labelled`` is ``t1`` (the method's target with the majority label), ``target_flipped`` is ``t2`` (its
    target for the swapped pair), both in the loss's log-prob space; ``label_noise`` is ``q`` in ``[0, 1)``. Returns
    None for ``q = 0``: the expected loss then decreases without bound in ``d``.
    """
    if not 0 <= label_noise < 1:
        raise ValueError(f"label_noise={label_noise!r} must be in [0, 1): it is the probability a label is flipped.")
    if beta <= 0:
        raise ValueError(f"beta={beta!r} must be > 0.")
    if label_noise == 0:
        return None
    q = label_noise
    t1, t2 = target_labelled.double(), target_flipped.double()
    # log of the bracket, computed so that neither a very negative t1 + t2 overflows nor 1 - 2q cancels:
    # sqrt(c^2 + k e^z) = exp(0.5 * logaddexp(2 log c, log k + z)) for c = 1 - 2q > 0 (q < 0.5); for q >= 0.5 the
    # bracket is c + sqrt(c^2 + k e^z) with c <= 0, evaluated directly (it stays positive).
    c = 1 - 2 * q
    log_k = math.log(4 * q * (1 - q))
    z = -beta * (t1 + t2)
    if c > 0:
        root = torch.exp(0.5 * torch.logaddexp(torch.full_like(z, 2 * math.log(c)), log_k + z))
    else:
        root = torch.sqrt(c * c + torch.exp(log_k + z))
    log_y_minus_beta_t1 = torch.log(c + root) - math.log(2 * q)
    return (t1 + log_y_minus_beta_t1 / beta).to(target_labelled.dtype)


def expected_loss(
    d: torch.Tensor, target_labelled: torch.Tensor, target_flipped: torch.Tensor, *, beta: float, label_noise: float
) -> torch.Tensor:
    """``(1-q) l(beta (d - t1)) + q l(beta (-d - t2))``: the expected loss `population_optimum` minimises."""
    q = label_noise
    loss_right = -torch.nn.functional.logsigmoid(beta * (d - target_labelled))
    loss_flipped = -torch.nn.functional.logsigmoid(beta * (-d - target_flipped))
    return (1 - q) * loss_right + q * loss_flipped


def optimality_residual(
    d: torch.Tensor, target_labelled: torch.Tensor, target_flipped: torch.Tensor, *, beta: float, label_noise: float
) -> torch.Tensor:
    """``-L'(d) / beta = (1-q) sigmoid(beta (t1 - d)) - q sigmoid(beta (d + t2))``, per pair.

    Zero at the per-pair optimum `population_optimum`; positive below it (the loss still pushes ``d`` up), negative
    above. A model that cannot set every pair's ``d`` on its own can still make the *average* residual zero (its
    gradient, summed over pairs, vanishes) while the pairs spread around their optima.
    """
    q = label_noise
    return (1 - q) * torch.sigmoid(beta * (target_labelled - d)) - q * torch.sigmoid(beta * (d + target_flipped))
