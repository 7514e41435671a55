"""Each preference loss against its formula computed independently in f64 numpy, and its gradient's sign."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polm_jax.algorithms import preference as pref
from polm_jax.config import PreferenceSection

P = 64
RNG = np.random.default_rng(0)
LOGPS = {k: -RNG.uniform(1.0, 40.0, P) for k in ("c", "r", "rc", "rr")}
LENGTHS = {"c": RNG.integers(1, 30, P).astype(float), "r": RNG.integers(1, 30, P).astype(float)}


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def pairs(dtype=jnp.float32) -> pref.Pairs:
    a = {k: jnp.asarray(v, dtype) for k, v in LOGPS.items()}
    return pref.Pairs(a["c"], a["r"], jnp.asarray(LENGTHS["c"], dtype), jnp.asarray(LENGTHS["r"], dtype), a["rc"], a["rr"])


def expected(name: str, o: PreferenceSection) -> np.ndarray:
    c, r, rc, rr = LOGPS["c"], LOGPS["r"], LOGPS["rc"], LOGPS["rr"]
    lc, lr = LENGTHS["c"], LENGTHS["r"]
    h = (c - rc) - (r - rr)
    eps, b = o.label_smoothing, o.beta
    if name == "sigmoid":
        return -(1 - eps) * log_sigmoid(b * h) - eps * log_sigmoid(-b * h)
    if name == "robust":
        return (-(1 - eps) * log_sigmoid(b * h) + eps * log_sigmoid(-b * h)) / (1 - 2 * eps)
    if name == "hinge":
        return np.maximum(0.0, 1 - b * h)
    if name == "ipo":
        return ((c - rc) / lc - (r - rr) / lr - 1 / (2 * b)) ** 2
    if name == "simpo":
        x = b * c / lc - b * r / lr - o.gamma
        return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)
    if name == "sft":
        return -c / lc
    if name == "orpo":
        pw, pl = np.exp(c / lc), np.exp(r / lr)
        log_odds = np.log(pw / (1 - pw)) - np.log(pl / (1 - pl))
        return -c / lc - o.lambda_ * log_sigmoid(log_odds)
    raise AssertionError(name)


SETTINGS = [{"beta": 0.1}, {"beta": 0.5, "label_smoothing": 0.1}, {"beta": 2.0, "label_smoothing": 0.3, "gamma": 1.0,
            "lambda_": 0.25}]


@pytest.mark.parametrize("name", sorted(pref.PAIR_LOSSES))
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_pair_loss_equals_formula(name, setting):
    o = PreferenceSection(loss_type=name, **SETTINGS[setting])
    with jax.enable_x64():
        got = pref.PAIR_LOSSES[name](pairs(jnp.float64), o)
        np.testing.assert_allclose(np.asarray(got), expected(name, o), rtol=1e-10, atol=1e-12)
    got32 = pref.PAIR_LOSSES[name](pairs(), o)
    np.testing.assert_allclose(np.asarray(got32), expected(name, o), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(pref.PAIR_LOSSES))
def test_raising_the_chosen_logprob_lowers_the_loss(name):
    o = PreferenceSection(loss_type=name, beta=0.5)
    base = pairs()
    if name in ("hinge", "ipo"):  # margin 0: inside the hinge, below IPO's target margin 1 / (2 beta)
        base = base._replace(chosen_logps=base.ref_chosen_logps, rejected_logps=base.ref_rejected_logps)

    def total(chosen, rejected):
        return pref.PAIR_LOSSES[name](base._replace(chosen_logps=chosen, rejected_logps=rejected), o).sum()

    d_chosen, d_rejected = jax.grad(total, argnums=(0, 1))(base.chosen_logps, base.rejected_logps)
    assert np.all(np.asarray(d_chosen) < 0)
    if name != "sft":  # the SFT term does not see the rejected response
        assert np.all(np.asarray(d_rejected) > 0)


def test_kto_equals_formula_and_z0_has_no_gradient():
    o = PreferenceSection(loss_type="kto", beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    c, rc, kl, rkl = (LOGPS[k] for k in ("c", "rc", "r", "rr"))
    desirable = RNG.random(P) < 0.5
    valid = RNG.random(P) < 0.9
    z0 = max(0.0, np.mean((kl - rkl)[valid]))
    r = c - rc
    want = np.where(desirable, 1.5 * (1 - 1 / (1 + np.exp(-0.3 * (r - z0)))),
                    0.7 * (1 - 1 / (1 + np.exp(-0.3 * (z0 - r)))))
    with jax.enable_x64():
        args = [jnp.asarray(x, jnp.float64) for x in (c, rc, kl, rkl)]
        got, got_z0 = pref.kto(*args, jnp.asarray(desirable), jnp.asarray(valid), o)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10)
        assert float(got_z0) == pytest.approx(z0, rel=1e-12)
        d_kl = jax.grad(lambda k: pref.kto(args[0], args[1], k, args[3], jnp.asarray(desirable),
                                           jnp.asarray(valid), o)[0].sum())(args[2])
        assert not np.any(np.asarray(d_kl))  # no gradient through z0
        d_logps = jax.grad(lambda x: pref.kto(x, *args[1:], jnp.asarray(desirable), jnp.asarray(valid),
                                              o)[0].sum())(args[0])
        assert np.all(np.asarray(d_logps)[desirable] < 0) and np.all(np.asarray(d_logps)[~desirable] > 0)


def test_log1mexp_is_stable():
    x = jnp.asarray([-1e-8, -0.5, -0.7, -5.0, -50.0], jnp.float32)
    want = np.log1p(-np.exp(np.asarray(x, np.float64)))  # accurate enough in f64 at both ends
    np.testing.assert_allclose(np.asarray(pref.log1mexp(x)), want, rtol=1e-5)


def test_weighted_loss_list_is_the_weighted_sum():
    o = PreferenceSection(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    p = pairs()
    combined = sum(w * pref.PAIR_LOSSES[n](p, o) for n, w in o.losses)
    np.testing.assert_allclose(np.asarray(combined),
                               expected("sigmoid", o) + 0.5 * expected("sft", dataclasses.replace(o)), rtol=2e-4)
