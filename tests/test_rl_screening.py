"""orthotorch.rl.screening: ARS perturbations screened in imagination by a world model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats

import test_rl
from orthotorch._threads import torch_threads
from orthotorch.rl import world_model as wm
from orthotorch.rl.checkpoint import load_checkpoint, save_checkpoint
from orthotorch.rl.es import ARSConfig, ARSTrainer, ars_update
from orthotorch.rl.policies import LinearPolicy, MLPPolicy, RunningStat
from orthotorch.rl.screening import batched_actions, predicted_returns, rank_correlation

CHEAP_ENV = test_rl.CHEAP_ENV
gym_env_info = test_rl.gym_env_info  # the module-scoped environment fixture, shared

TIMING = ("iteration_s", "wall_s", "screen_train_s", "screen_imagine_s", "screen_model_s")

#: The config keys and trainer state keys from before screening existed (checkpoints must not change).
OLD_CONFIG_KEYS = {
    "env_id", "policy", "hidden", "directions", "norms", "num_directions", "top_directions",
    "step_size", "noise", "reward_shift", "seed", "max_episode_steps", "eval_every",
    "eval_episodes", "env_kwargs",
}  # fmt: skip
OLD_STATE_KEYS = {
    "config", "policy", "sampler", "params", "obs_stat", "rng", "iteration", "env_steps",
    "eval_env_steps", "best",
}  # fmt: skip


# ----------------------------------------------------------------------------- without gymnasium


def test_batched_actions_match_the_actors():
    rng = np.random.default_rng(0)
    for policy in (
        LinearPolicy(3, 2, [-1, -1], [1, 1]),
        MLPPolicy(3, 2, [-0.5, -1], [0.5, 1], hidden=[5, 4]),
    ):
        params = rng.normal(size=(6, policy.num_params))
        x = rng.normal(size=(6, 3)) * 2
        got = batched_actions(policy, params, x)
        ref = np.stack([policy.actor(p)(xi) for p, xi in zip(params, x)])
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="params"):
        batched_actions(policy, np.zeros((2, 3)), np.zeros((2, 3)))


def test_rank_correlation_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30)
    b[:5] = b[5]  # ties
    assert rank_correlation(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], rel=1e-12)
    assert rank_correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert np.isnan(rank_correlation(a, np.ones(30))) and np.isnan(rank_correlation(a[:1], a[:1]))


_A = np.array([[0.9, 0.2, 0.0], [-0.2, 0.9, 0.1], [0.0, -0.1, 0.95]])
_B = np.array([0.5, 0.0, 0.3])


def _true_returns(params, starts, horizon):
    """Returns of linear policies on o' = A o + B a with reward −‖o'‖², averaged over the starts."""
    out = []
    for p in params:
        total = 0.0
        for o in starts:
            for _ in range(horizon):
                a = np.clip(p @ o, -1, 1)
                o = _A @ o + _B * a
                total -= float(o @ o)
        out.append(total / len(starts))
    return np.array(out)


def test_imagined_ranking_of_policies_on_a_learnable_system_beats_chance():
    # data from random linear policies with action noise; the model then ranks unseen policies
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(24):
        p = rng.normal(scale=0.7, size=3)
        obs = [rng.normal(size=3)]
        acts = []
        for _ in range(30):
            a = np.clip(np.array([p @ obs[-1]]) + 0.3 * rng.normal(size=1), -1, 1)
            acts.append(a)
            obs.append(_A @ obs[-1] + _B * a[0])
        obs_arr = np.stack(obs)
        episodes.append(
            wm.Episode(
                obs_arr, np.stack(acts), -np.sum(obs_arr[1:] ** 2, axis=1), np.zeros(30, bool)
            )
        )
    import torch

    model = wm.DynamicsModel(3, 1, hidden=16, kind="orthogonal")
    model.fit_normaliser(episodes)
    with torch_threads(1):  # tiny batches: more threads only spin next to other work
        wm.train_model(model, episodes, steps=300, window=8, batch=32, lr=1e-2)
    policy = LinearPolicy(3, 1, [-1], [1])
    cand = rng.normal(scale=0.7, size=(24, 3))
    starts = rng.normal(size=(4, 3))
    pred = predicted_returns(model, policy, cand, starts, np.zeros(3), np.ones(3), 10)
    true = _true_returns(cand, starts, 10)
    rho = rank_correlation(pred, true)
    # chance is 0 with standard deviation 1/sqrt(23) ≈ 0.21; an untrained model does not rank
    assert rho > 0.6, rho
    untrained = wm.DynamicsModel(3, 1, hidden=16, kind="orthogonal")
    untrained.fit_normaliser(episodes)
    with torch.no_grad():
        untrained.head.weight.zero_()
        untrained.head.bias.zero_()
    flat = predicted_returns(untrained, policy, cand, starts, np.zeros(3), np.ones(3), 10)
    assert np.ptp(flat) < 1e-3 * np.ptp(pred)


def test_predicted_terminations_end_imagined_episodes():
    import torch

    eps = [
        wm.Episode(np.zeros((11, 2)) + k, np.zeros((10, 1)), np.ones(10), np.zeros(10, bool))
        for k in range(2)
    ]
    model = wm.DynamicsModel(2, 1, hidden=4, kind="mlp")
    model.fit_normaliser(eps)  # reward std floors at 1e-6 around mean 1
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    policy = LinearPolicy(2, 1, [-1], [1])
    p, s = np.zeros((1, 2)), np.zeros((1, 2))
    alive = predicted_returns(model, policy, p, s, np.zeros(2), np.ones(2), 5)
    assert alive[0] == pytest.approx(
        sum(0.5**t for t in range(5))
    )  # P(done) = sigmoid(0) each step
    with torch.no_grad():
        model.head.bias[-1] = 50.0  # certain termination after the first step
    assert predicted_returns(model, policy, p, s, np.zeros(2), np.ones(2), 5)[0] == pytest.approx(
        1.0, rel=1e-6
    )
    shifted = predicted_returns(model, policy, p, s, np.zeros(2), np.ones(2), 5, reward_shift=1)
    assert shifted[0] == pytest.approx(0.0, abs=1e-6)


def test_screening_config_errors_name_the_field():
    with pytest.raises(
        ValueError, match=r"`screen_directions` must be <= num_directions \(4\), got 5"
    ):
        ARSConfig(num_directions=4, screen_directions=5)
    with pytest.raises(ValueError, match=r"`top_directions` must be <= screen_directions \(2\)"):
        ARSConfig(num_directions=8, top_directions=3, screen_directions=2)
    with pytest.raises(ValueError, match="screen_directions"):
        ARSConfig(screen_directions=-1)
    with pytest.raises(TypeError, match="screen_directions"):
        ARSConfig(screen_directions=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="screen_model"):
        ARSConfig(screen_directions=2, screen_model="gru")
    for name in ("screen_horizon", "screen_every", "screen_updates", "screen_buffer"):
        with pytest.raises(ValueError, match=name):
            ARSConfig(screen_directions=2, **{name: 0})
    # without screening the screen_* fields are not part of the saved config
    assert set(ARSConfig().to_dict()) == OLD_CONFIG_KEYS
    d = ARSConfig(num_directions=8, screen_directions=4).to_dict()
    assert d["screen_directions"] == 4 and d["screen_model"] == "orthogonal"
    assert ARSConfig(**{**d, "hidden": tuple(d["hidden"])}) == ARSConfig(
        num_directions=8, screen_directions=4
    )


# ----------------------------------------------------------------------------- with gymnasium


def _cfg(**kw):
    base = dict(
        env_id=CHEAP_ENV, num_directions=8, top_directions=2, step_size=0.1, noise=0.1,
        eval_every=2, eval_episodes=1, max_episode_steps=60, screen_directions=3,
        screen_hidden=8, screen_horizon=10, screen_starts=4, screen_updates=15, screen_every=2,
        screen_buffer=12,
    )  # fmt: skip
    return ARSConfig(**{**base, **kw})


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_recorded_rollouts_are_the_same_episodes_with_their_transitions(gym_env_info):
    from orthotorch.rl.rollout import make_env, rollout

    env = make_env(CHEAP_ENV)
    act = LinearPolicy(4, 1, [-3], [3]).actor(np.array([0.0, 0.0, 1.0, 0.0]))
    a = rollout(env, act, np.zeros(4), np.ones(4), seed=5, collect_stats=True)
    b = rollout(env, act, np.zeros(4), np.ones(4), seed=5, collect_stats=True, record=True)
    env.close()
    assert (a.ret, a.length, a.forward, a.trace) == (b.ret, b.length, b.forward, None)
    assert np.array_equal(a.stats.m2, b.stats.m2)
    obs, act_, rew, term = b.trace
    assert obs.shape == (b.length + 1, 4) and act_.shape == (b.length, 1)
    assert rew.sum() == pytest.approx(b.ret) and term[-1] and not term[:-1].any()
    np.testing.assert_array_equal(RunningStat.of(obs[:-1]).m2, b.stats.m2)


def test_screening_off_is_plain_ars(gym_env_info):
    # the trainer with the default (no screening) against the ARS iteration written out by hand
    from orthotorch.rl.workers import PairTask, SerialBackend

    cfg = _cfg(screen_directions=0, eval_every=0)
    tr = ARSTrainer(cfg, gym_env_info)
    ref = ARSTrainer(cfg, gym_env_info)
    with SerialBackend(tr.worker_spec()) as be:
        for _ in range(2):
            rec = tr.step(be)
            seed = int(ref.rng.integers(2**63))
            mean, inv = ref.obs_stat.normaliser()
            pairs = be.pairs(PairTask(seed, 8, 0.1, list(range(8)), ref.params, mean, inv))
            rp = np.array([p.ret for p, _ in pairs])
            rm = np.array([m.ret for _, m in pairs])
            ref.params, _ = ars_update(
                ref.params, ref.sampler.sample(seed, 8), rp, rm, step_size=0.1, top=2
            )
            for p, m in pairs:
                assert p.trace is None and m.trace is None  # nothing recorded without screening
                ref.obs_stat.merge(p.stats)
                ref.obs_stat.merge(m.stats)
    assert np.array_equal(tr.params, ref.params) and np.array_equal(tr.obs_stat.m2, ref.obs_stat.m2)
    assert not any(k.startswith("screen") for k in rec)
    assert set(tr.state_dict()) == OLD_STATE_KEYS and tr.screener is None


class _CountingBackend:
    """A serial backend that records the direction indices of every pairs call."""

    def __init__(self, spec):
        from orthotorch.rl.workers import SerialBackend

        self.inner = SerialBackend(spec)
        self.calls = []

    def pairs(self, task):
        self.calls.append((task.num_directions, list(task.indices), task.record))
        return self.inner.pairs(task)

    def episodes(self, *args):
        return self.inner.episodes(*args)

    def close(self):
        self.inner.close()


def test_screening_runs_only_the_kept_directions(gym_env_info):
    tr = ARSTrainer(_cfg(), gym_env_info)
    be = _CountingBackend(tr.worker_spec())
    try:
        recs = []
        for _ in range(4):
            before = tr.env_steps
            rec = tr.step(be)
            recs.append(rec)
            assert rec["screen_real_episodes"] == 2 * 3
            num, idx, record = be.calls[-1]
            assert num == 8 and len(idx) == 3 and record and idx == rec["screen_kept"]
            assert rec["env_steps"] - before == 2 * 3 * rec["length_mean"]
    finally:
        be.close()
    assert not recs[0]["screen_active"] and recs[0]["screen_kept"] == [0, 1, 2]
    assert all(r["screen_active"] for r in recs[1:])
    rhos = [r["screen_rank_corr"] for r in recs[1:]]
    assert all(-1 <= rho <= 1 for rho in rhos if not np.isnan(rho))
    assert len(tr.screener.episodes) == 12  # the buffer keeps the last 12 episodes
    assert recs[1]["screen_train_s"] > 0 and recs[2]["screen_train_s"] > 0  # first, then every 2
    assert recs[3]["screen_train_s"] == 0
    model, _ = tr.screener.trained_model(0, 1)  # not due (odd iteration): the current model
    assert model is tr.screener.model


def test_screening_resume_is_deterministic(gym_env_info, tmp_path):
    from orthotorch.rl.workers import SerialBackend

    cfg = _cfg(screen_model="orthogonal")
    a = ARSTrainer(cfg, gym_env_info)
    with SerialBackend(a.worker_spec()) as be:
        full = [a.step(be) for _ in range(5)]
        b = ARSTrainer(cfg, gym_env_info)
        first = [b.step(be) for _ in range(3)]
        path = save_checkpoint(tmp_path / "c.json", b.state_dict())
        doc = load_checkpoint(path)
        assert doc["state"]["config"]["screen_directions"] == 3
        c = ARSTrainer.from_state_dict(json.loads(json.dumps(doc["state"])), gym_env_info)
        second = [c.step(be) for _ in range(2)]
    assert np.array_equal(c.params, a.params)
    assert _strip(first + second) == _strip(full)
    assert json.dumps(c.state_dict()) == json.dumps(a.state_dict())
    state = b.state_dict()
    del state["screen"]
    with pytest.raises(ValueError, match="screen"):
        ARSTrainer(cfg, gym_env_info).load_state_dict(state)


def test_cli_screen_flags_log_and_resume(gym_env_info, tmp_path, capsys):
    from orthotorch.apps.cli import main

    argv = [
        "humanoid", "train", "--env", CHEAP_ENV, "--num-directions", "6", "--top-directions", "2",
        "--step-size", "0.1", "--noise", "0.1", "--eval-every", "0", "--max-episode-steps", "50",
        "--backend", "serial", "--no-progress", "--screen", "3", "--screen-horizon", "8",
        "--screen-model", "mlp", "--screen-hidden", "8", "--screen-updates", "10",
        "--screen-starts", "2", "--screen-buffer", "10", "--screen-every", "1",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*argv, "--out", str(one), "--budget-steps", "900"]) == 0
    assert main([*argv, "--out", str(two), "--budget-steps", "400"]) == 0
    assert main(["humanoid", "train", "--out", str(two), "--resume", "--budget-steps", "900",
                 "--no-progress", "--screen", "3"]) == 0  # fmt: skip
    rows = [json.loads(ln) for ln in (one / "log.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and all(r["screen_real_episodes"] == 6 for r in rows)
    assert all("screen_model_s" in r for r in rows) and "screen_rank_corr" in rows[-1]
    rows2 = [json.loads(ln) for ln in (two / "log.jsonl").read_text().splitlines()]
    assert _strip(rows2) == _strip(rows)
    with pytest.raises(SystemExit) as exc:  # another screening setting than the checkpoint's
        main(["humanoid", "train", "--out", str(two), "--resume", "--screen-horizon", "9"])
    assert exc.value.code == 2 and "--screen-horizon" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "bad"), "--top-directions", "4"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "error:" in err and "screen_directions (3)" in err
