import math

import pytest
import torch
import torch.nn.functional as F

from trl_cpo.logps import completion_lengths, is_length_normalized, per_token, to_loss_space
from trl_cpo.losses import (
    DEFAULT_MAX_MARGIN,
    check_margin_hyperparameters,
    check_target_hyperparameters,
    cpo_loss,
    cpo_margin,
    dpo_loss,
    ecpoc_loss,
    ecpoc_target,
)
from trl_cpo.metrics import in_undesirable_space, ref_misaligned_fraction, u_fraction


def _logps(n=64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g) * scale + 0.01) for _ in range(4)]


def test_dpo_loss_matches_definition():
    pc, pr, rc, rr = _logps()
    expected = -F.logsigmoid(0.5 * ((pc - pr) - (rc - rr)))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.5), expected)


@pytest.mark.parametrize("margin_type", ["inverse_prob", "inverse_logp"])
def test_cpo_with_gamma_zero_is_dpo(margin_type):
    pc, pr, rc, rr = _logps()
    cpo = cpo_loss(pc, pr, rc, rr, beta=2.5, gamma=0.0, margin_type=margin_type)
    torch.testing.assert_close(cpo, dpo_loss(pc, pr, rc, rr, beta=2.5))


def test_cpo_loss_is_dpo_with_margin_subtracted_from_the_logit():
    pc, pr, rc, rr = _logps()
    m = cpo_margin(rc, rr, gamma=0.05)
    expected = -F.logsigmoid(2.5 * ((pc - pr) - (rc - rr)) - m)
    torch.testing.assert_close(cpo_loss(pc, pr, rc, rr, beta=2.5, gamma=0.05), expected)
    # a positive margin asks for more: the loss is larger than DPO's on every pair
    assert (cpo_loss(pc, pr, rc, rr, beta=2.5, gamma=0.05) > dpo_loss(pc, pr, rc, rr, beta=2.5)).all()


def test_cpo_loss_takes_its_margin_from_per_token_logps_when_given():
    # Summed log-probs of completions of 3 and 5 tokens: the trainers' margin reads the per-token values, while the
    # target and delta_pi stay in the summed space.
    pc, pr, rc, rr = _logps(n=2, scale=8.0)
    lengths = torch.tensor([3.0, 5.0])
    rc_token, rr_token = rc / lengths, rr / lengths.flip(0)
    m = cpo_margin(rc_token, rr_token, gamma=0.05)
    expected = -F.logsigmoid(2.5 * ((pc - pr) - (rc - rr)) - m)
    loss = cpo_loss(
        pc, pr, rc, rr, beta=2.5, gamma=0.05, ref_chosen_token_logps=rc_token, ref_rejected_token_logps=rr_token
    )
    torch.testing.assert_close(loss, expected)
    # without them the margin reads the log-probs as passed (here summed): a different, larger margin
    assert not torch.allclose(cpo_loss(pc, pr, rc, rr, beta=2.5, gamma=0.05), expected)


def test_inverse_prob_margin_matches_paper_form_below_cap():
    rc = torch.tensor([-0.5, -1.0, -2.0])
    rr = torch.tensor([-1.5, -0.2, -2.5])
    expected = 0.05 * (torch.exp(-rc) + torch.exp(-rr))
    torch.testing.assert_close(cpo_margin(rc, rr, gamma=0.05), expected)


def test_inverse_prob_margin_is_capped_on_summed_logps():
    # a 200-token completion: exp(400) overflows float32; the margin must be exactly the cap
    rc = torch.tensor([-400.0, -30.0])
    rr = torch.tensor([-380.0, -2.0])
    margin = cpo_margin(rc, rr, gamma=0.05, max_margin=7.0)
    assert torch.isfinite(margin).all()
    torch.testing.assert_close(margin, torch.tensor([7.0, 7.0]))
    assert cpo_margin(rc, rr, gamma=0.05).max().item() == pytest.approx(DEFAULT_MAX_MARGIN)


def test_inverse_logp_margin_matches_released_numerics():
    rc = torch.tensor([-0.5, -1.0, -2.0])
    rr = torch.tensor([-1.5, -0.2, -2.5])
    margin = cpo_margin(rc, rr, gamma=0.05, margin_type="inverse_logp")
    torch.testing.assert_close(margin, 0.05 * (1 / rc + 1 / rr))
    assert (margin < 0).all()  # it lowers the target


def test_inverse_logp_margin_is_finite_at_zero_logp():
    margin = cpo_margin(torch.tensor([0.0, -0.0]), torch.tensor([-1.0, 0.0]), gamma=0.05, margin_type="inverse_logp")
    assert torch.isfinite(margin).all()
    assert margin.abs().max().item() == pytest.approx(DEFAULT_MAX_MARGIN)


def test_ecpoc_target_is_smooth_max_and_exact_at_infinite_tau():
    rc, rr = torch.tensor([-1.0, -3.0, -0.2, -2.0]), torch.tensor([-2.0, -1.0, -0.2, -2.6])
    delta_ref = rc - rr
    hard = torch.maximum(delta_ref, torch.tensor(0.5))
    gaps = [
        (ecpoc_target(rc, rr, gamma=0.5, tau=tau, alpha=1.0) - hard).abs().max().item() for tau in (1, 10, 100, 1000)
    ]
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-3
    torch.testing.assert_close(ecpoc_target(rc, rr, gamma=0.5, tau=math.inf, alpha=1.0), hard)
    # never below gamma, for any tau, with alpha = 1
    for tau in (0.5, 2.0, math.inf):
        assert (ecpoc_target(rc, rr, gamma=0.5, tau=tau, alpha=1.0) >= 0.5 - 1e-6).all()


def test_ecpoc_loss_matches_definition():
    pc, pr, rc, rr = _logps()
    target = (rc - rr) + F.softplus(2.0 * (0.5 - (rc - rr))) / 2.0
    expected = -F.logsigmoid(2.5 * ((pc - pr) - target))
    torch.testing.assert_close(ecpoc_loss(pc, pr, rc, rr, beta=2.5, gamma=0.5, tau=2.0, alpha=1.0), expected)


LOSSES = {
    "dpo": lambda *x: dpo_loss(*x, beta=2.5),
    "cpo_inverse_prob": lambda *x: cpo_loss(*x, beta=2.5, gamma=0.05),
    "cpo_inverse_logp": lambda *x: cpo_loss(*x, beta=2.5, gamma=0.05, margin_type="inverse_logp"),
    "ecpoc": lambda *x: ecpoc_loss(*x, beta=2.5, gamma=0.5, tau=2.0, alpha=1.0),
    "ecpoc_hard": lambda *x: ecpoc_loss(*x, beta=2.5, gamma=0.5, tau=math.inf, alpha=1.0),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_and_gradients_finite_at_extreme_logps(name, dtype):
    # thousands of tokens of summed log-probs, log-probs of exactly 0, and mixed signs of the log-odds
    values = torch.tensor([-1e4, -9.5e3, -1.0, 0.0, -5e3, -1e-3, -2e3, -1e4], dtype=dtype)
    policy_chosen = values.clone().requires_grad_(True)
    policy_rejected = values.flip(0).clone().requires_grad_(True)
    ref_chosen, ref_rejected = values.roll(1), values.roll(3)
    loss = LOSSES[name](policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    assert torch.isfinite(loss).all(), loss
    loss.mean().backward()
    assert torch.isfinite(policy_chosen.grad).all() and torch.isfinite(policy_rejected.grad).all()
    if name.startswith("cpo"):
        margin = cpo_margin(ref_chosen, ref_rejected, gamma=0.05, margin_type=name.split("_", 1)[1])
        assert torch.isfinite(margin).all()


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: cpo_margin(torch.zeros(1), torch.zeros(1), gamma=-0.1), "gamma"),
        (lambda: cpo_margin(torch.zeros(1), torch.zeros(1), gamma=0.1, margin_type="exp"), "margin_type"),
        (lambda: cpo_margin(torch.zeros(1), torch.zeros(1), gamma=0.1, max_margin=math.inf), "max_margin"),
        (lambda: cpo_margin(torch.zeros(1), torch.zeros(1), gamma=0.1, max_margin=0.0), "max_margin"),
        (lambda: ecpoc_target(torch.zeros(1), torch.zeros(1), gamma=0.5, tau=0.0, alpha=1.0), "tau"),
        (lambda: ecpoc_target(torch.zeros(1), torch.zeros(1), gamma=0.5, tau=2.0, alpha=-1.0), "alpha"),
        (lambda: dpo_loss(*[torch.zeros(1)] * 4, beta=0.0), "beta"),
    ],
)
def test_functions_reject_bad_hyperparameters(call, field):
    with pytest.raises(ValueError, match=field):
        call()


@pytest.mark.parametrize(
    "check, kwargs, name",
    [
        (check_margin_hyperparameters, {"gamma": -1.0}, "cpo_gamma"),
        (check_margin_hyperparameters, {"gamma": 0.1, "margin_type": "exp"}, "cpo_margin_type"),
        (check_margin_hyperparameters, {"gamma": 0.1, "max_margin": 0.0}, "cpo_max_margin"),
        (check_target_hyperparameters, {"gamma": -1.0, "tau": 2.0, "alpha": 1.0}, "ecpoc_gamma"),
        (check_target_hyperparameters, {"gamma": 0.5, "tau": 0.0, "alpha": 1.0}, "ecpoc_tau"),
        (check_target_hyperparameters, {"gamma": 0.5, "tau": 2.0, "alpha": 0.0}, "ecpoc_alpha"),
    ],
)
def test_validation_messages_name_the_config_field_with_its_prefix(check, kwargs, name):
    prefix = name.split("_")[0] + "_"
    with pytest.raises(ValueError) as excinfo:
        check(**kwargs, prefix=prefix)
    assert str(excinfo.value).startswith(f"{name}=")


def test_log_prob_space_helpers():
    assert is_length_normalized("sigmoid_norm") and is_length_normalized(["sft", "sigmoid_norm"])
    assert not is_length_normalized("sigmoid") and not is_length_normalized(["sigmoid", "sft"])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])  # [chosen; rejected] of 2 pairs
    chosen_lengths, rejected_lengths = completion_lengths(mask)
    assert chosen_lengths.tolist() == [2.0, 4.0] and rejected_lengths.tolist() == [0.0, 1.0]
    chosen, rejected = torch.tensor([-4.0, -8.0]), torch.tensor([-3.0, -1.5])
    summed = to_loss_space(chosen, rejected, chosen_lengths, rejected_lengths, False)
    assert [t.tolist() for t in summed] == [[-4.0, -8.0], [-3.0, -1.5]]
    averaged = to_loss_space(chosen, rejected, chosen_lengths, rejected_lengths, True)
    assert [t.tolist() for t in averaged] == [[-2.0, -2.0], [-3.0, -1.5]]  # an empty completion counts as 1 token
    assert per_token(chosen, chosen_lengths).tolist() == [-2.0, -2.0]


def test_u_fraction_and_misalignment_by_hand():
    # pair 0: in U (ref -2 < pi -1 < 0); pair 1: pi > 0, not U; pair 2: pi below ref, not U; pair 3: ref aligned
    policy_chosen = torch.tensor([-3.0, -1.0, -5.0, -1.0])
    policy_rejected = torch.tensor([-2.0, -2.0, -1.0, -1.5])
    ref_chosen = torch.tensor([-4.0, -3.0, -4.0, -1.0])
    ref_rejected = torch.tensor([-2.0, -1.0, -1.0, -2.0])
    mask = in_undesirable_space(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    assert mask.tolist() == [True, False, False, False]
    assert u_fraction(policy_chosen, policy_rejected, ref_chosen, ref_rejected).item() == 0.25
    assert ref_misaligned_fraction(ref_chosen, ref_rejected).item() == 0.75


def test_u_fraction_tolerance_ignores_round_off_only():
    ref_chosen, ref_rejected = torch.tensor([-2.0, -2.0]), torch.tensor([-1.0, -1.0])
    # pair 0 moved by float noise only, pair 1 really moved towards the chosen response but still prefers the rejected
    policy_chosen, policy_rejected = torch.tensor([-2.0 + 1e-6, -1.5]), torch.tensor([-1.0, -1.0])
    assert u_fraction(policy_chosen, policy_rejected, ref_chosen, ref_rejected).item() == 1.0
    assert u_fraction(policy_chosen, policy_rejected, ref_chosen, ref_rejected, atol=1e-3).item() == 0.5
