"""orthotorch.rl.world_model: shards, dynamics models (orthogonal RNN stays orthogonal), k-step errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orthotorch.nn import orthogonality_error
from orthotorch.rl import world_model as wm


def _linear_system_episodes(n=6, T=40, seed=0):
    """o_{t+1} = A o_t + B a_t with a stable A (a known, learnable dynamics)."""
    rng = np.random.default_rng(seed)
    a_mat = np.array([[0.9, 0.2, 0.0], [-0.2, 0.9, 0.1], [0.0, -0.1, 0.95]])
    b_mat = np.array([[0.5], [0.0], [0.3]])
    out = []
    for _ in range(n):
        obs = [rng.normal(size=3)]
        act = rng.uniform(-1, 1, size=(T, 1))
        for t in range(T):
            obs.append(a_mat @ obs[-1] + b_mat @ act[t])
        obs = np.stack(obs)
        rew = -np.sum(obs[1:] ** 2, axis=1)
        term = np.zeros(T, dtype=bool)
        out.append(wm.Episode(obs, act, rew, term))
    return out


def test_orthogonal_model_keeps_its_recurrent_matrix_orthogonal_while_learning():
    eps = _linear_system_episodes()
    model = wm.DynamicsModel(3, 1, hidden=12, kind="orthogonal")
    model.fit_normaliser(eps)
    w0 = model.recurrent_matrix().detach().clone()
    losses = wm.train_model(model, eps, steps=40, window=8, batch=16, lr=1e-2)
    w = model.recurrent_matrix().detach()
    assert orthogonality_error(w) < 1e-5
    assert float(orthogonality_error(model)) < 1e-5
    assert not torch.allclose(w, w0)  # it did move
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


@pytest.mark.parametrize("kind", ["rnn", "lstm", "mlp"])
def test_baseline_models_learn_and_are_unconstrained(kind):
    eps = _linear_system_episodes()
    model = wm.DynamicsModel(3, 1, hidden=12, kind=kind)
    model.fit_normaliser(eps)
    losses = wm.train_model(model, eps, steps=40, window=8, batch=16, lr=1e-2)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    w = model.recurrent_matrix()
    if w is not None:  # the check above can fail: an unconstrained matrix is not orthogonal
        assert orthogonality_error(w.detach()) > 1e-2


def test_k_step_error_is_zero_for_an_exact_model_of_static_data():
    # every episode stands still (Δo = 0), at a different place (so the observations vary)
    eps = [
        wm.Episode(
            np.tile(np.array(o), (21, 1)), np.zeros((20, 1)), np.zeros(20), np.zeros(20, dtype=bool)
        )
        for o in ([1.0, -2.0], [3.0, 0.5])
    ]
    for kind in wm.MODEL_KINDS:
        model = wm.DynamicsModel(2, 1, hidden=4, kind=kind)
        model.fit_normaliser(eps)
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()  # predicts Δo = mean Δo = 0: exact on static data
        for k in (1, 5, 20):
            assert wm.k_step_error(model, eps, k, windows=4) == 0.0
        assert math.isnan(wm.k_step_error(model, eps, 21))


def test_k_step_error_matches_an_explicit_loop():
    eps = _linear_system_episodes(n=2, T=12)
    model = wm.DynamicsModel(3, 1, hidden=6, kind="lstm")
    model.fit_normaliser(eps)
    k = 3
    gen = torch.Generator().manual_seed(5)
    got = wm.k_step_error(model, eps, k, windows=1, generator=gen)
    wins = [(e, s) for e in range(2) for s in range(12 - k + 1)]
    e, s = wins[int(torch.randint(len(wins), (1,), generator=torch.Generator().manual_seed(5)))]
    ep = eps[e]
    with torch.no_grad():
        o = torch.tensor(ep.obs[s], dtype=torch.float32).reshape(1, 1, 3)
        state = None
        for t in range(k):
            a = torch.tensor(ep.act[s + t], dtype=torch.float32).reshape(1, 1, 1)
            delta, _, _, state = model(o, a, state)
            o = o + delta * model.delta_std + model.delta_mean
        ref = float(
            (((o.reshape(3) - torch.tensor(ep.obs[s + k]).float()) / model.obs_std) ** 2).mean()
        )
    assert got == pytest.approx(ref, rel=1e-6)


def test_shards_round_trip(tmp_path):
    eps = _linear_system_episodes(n=3, T=5)
    path = wm.save_shard(tmp_path / "s.npz", eps, policy_version=7, env_id="Toy-v0")
    back, meta = wm.load_shard(path)
    assert meta == {"policy_version": 7, "env_id": "Toy-v0"}
    assert len(back) == 3
    for a, b in zip(eps, back):
        assert np.array_equal(a.obs, b.obs) and np.array_equal(a.act, b.act)
        assert np.array_equal(a.reward, b.reward) and np.array_equal(a.terminated, b.terminated)
    assert not list(tmp_path.glob("*.tmp*"))


def test_record_episodes_and_imagine_on_a_gymnasium_task():
    pytest.importorskip("gymnasium", reason="the rl extra (gymnasium[mujoco]) is not installed")
    pytest.importorskip("mujoco", reason="the rl extra (mujoco) is not installed")
    from orthotorch.rl.policies import LinearPolicy
    from orthotorch.rl.rollout import make_env

    env = make_env("InvertedPendulum-v5")
    act = LinearPolicy(4, 1, [-3], [3]).actor(np.array([0.0, 0.0, 1.0, 0.0]))
    eps = wm.record_episodes(
        env, act, np.zeros(4), np.ones(4), [1, 2], action_noise=0.1, rng=np.random.default_rng(0)
    )
    env.close()
    for e in eps:
        assert e.obs.shape == (len(e) + 1, 4) and e.act.shape == (len(e), 1)
        assert e.terminated[-1] and not e.terminated[:-1].any()
        assert np.all(np.abs(e.act) <= 3)
    model = wm.DynamicsModel(4, 1, hidden=8, kind="orthogonal")
    model.fit_normaliser(eps)
    sizes = wm.imagine(model, eps[0].obs[0], act, np.zeros(4), np.ones(4), 50)
    assert sizes.shape == (51,) and np.isfinite(sizes[0])
    with pytest.raises(ValueError, match="rng"):
        wm.record_episodes(env, act, np.zeros(4), np.ones(4), [1], action_noise=0.1)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="kind"):
        wm.DynamicsModel(3, 1, kind="gru")
    with pytest.raises(ValueError, match="steps"):
        wm.train_model(wm.DynamicsModel(3, 1), _linear_system_episodes(n=1, T=5))
    with pytest.raises(ValueError, match="window"):
        wm.train_model(wm.DynamicsModel(3, 1), _linear_system_episodes(n=1, T=5), steps=1, window=8)


def test_constant_coordinates_do_not_dominate_the_error():
    # coordinate 1 is constant in the training data and jumps in the test data: it is left out
    rng = np.random.default_rng(0)
    train = [
        wm.Episode(
            np.stack([rng.normal(size=11), np.zeros(11)], axis=1),
            np.zeros((10, 1)),
            np.zeros(10),
            np.zeros(10, dtype=bool),
        )
    ]
    test = [
        wm.Episode(
            train[0].obs + np.array([0.0, 5.0]),
            *[getattr(train[0], f) for f in ("act", "reward", "terminated")],
        )
    ]
    model = wm.DynamicsModel(2, 1, hidden=4, kind="mlp")
    model.fit_normaliser(train)
    assert model.obs_varies.tolist() == [True, False]
    assert model.obs_std[1] == 1.0
    # with a 1e-6 floor instead, the jump alone would give an error of (5 / 1e-6)² ≈ 2.5e13
    assert wm.k_step_error(model, test, 2, windows=4) < 1e3
