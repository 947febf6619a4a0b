"""orthotorch.rl: direction samplers, policies, the ARS update, backends, checkpoints, the missing extra."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from orthotorch.rl._extra import MissingExtraError
from orthotorch.rl.checkpoint import load_checkpoint, save_checkpoint
from orthotorch.rl.directions import chi_mean_var, make_sampler
from orthotorch.rl.es import ARSConfig, ARSTrainer, ars_update
from orthotorch.rl.policies import LinearPolicy, MLPPolicy, RunningStat

ORTHO = ("orthogonal", "givens")
CHEAP_ENV = "InvertedPendulum-v5"


# ----------------------------------------------------------------------------- directions


def test_chi_moments_match_scipy():
    for d in (1, 2, 17, 348):
        mean, var = chi_mean_var(d)
        assert mean == pytest.approx(scipy.stats.chi(d).mean(), rel=1e-12)
        assert var == pytest.approx(scipy.stats.chi(d).var(), rel=1e-9)


@pytest.mark.parametrize("name", ORTHO)
@pytest.mark.parametrize("num", [5, 24, 40])
def test_directions_orthogonal_within_a_block(name, num):
    dim = 24
    s = make_sampler(name, dim)
    d = s.sample(seed=7, num=num)
    assert d.shape == (num, dim) and d.dtype == np.float64 and d.flags.c_contiguous
    size = s.block_size(num)
    assert size == min(num, dim)
    for start in range(0, num, size):
        blk = d[start : start + size]
        g = blk @ blk.T
        off = g - np.diag(np.diag(g))
        assert np.abs(off).max() < 1e-10 * dim
    # blocks are independent draws: rows of different blocks are not orthogonal
    if num > dim:
        assert np.abs(d[:dim] @ d[dim:].T).max() > 1e-3


@pytest.mark.parametrize("name", ["gaussian", *ORTHO])
def test_direction_norms_are_chi_distributed(name):
    dim, num = 12, 3000  # many blocks of 12 rows
    norms = np.linalg.norm(make_sampler(name, dim).sample(seed=1, num=num), axis=1)
    mean, var = chi_mean_var(dim)
    se_mean = math.sqrt(var / num)
    assert abs(norms.mean() - mean) < 5 * se_mean
    # variance of the sample variance ~ (μ4 − σ⁴)/n; χ(12) is close to normal, so ~2σ⁴/n
    assert abs(norms.var() - var) < 5 * math.sqrt(2 * var**2 / num) + 0.02
    ks = scipy.stats.kstest(norms, scipy.stats.chi(dim).cdf)
    assert ks.pvalue > 1e-4


@pytest.mark.parametrize("name", ORTHO)
def test_fixed_norms_are_sqrt_dim(name):
    d = make_sampler(name, 10, norms="fixed").sample(seed=0, num=10)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), math.sqrt(10), rtol=1e-12)
    np.testing.assert_allclose(d @ d.T, 10 * np.eye(10), atol=1e-11)


@pytest.mark.parametrize("name", ["gaussian", *ORTHO])
def test_directions_regenerate_from_seed_and_block(name):
    s = make_sampler(name, 9)
    num = 20
    full = s.sample(seed=3, num=num)
    size = s.block_size(num)
    for b in range(math.ceil(num / size)):
        np.testing.assert_array_equal(s.block(3, b, num), full[b * size : (b + 1) * size])
    assert not np.array_equal(s.sample(seed=4, num=num), full)
    assert np.array_equal(make_sampler(**s.spec()).sample(3, num), full)


def test_orthogonal_directions_are_haar_like():
    # for Haar rows, E[u_i²] = 1/d for every coordinate: no coordinate is preferred
    dim = 8
    s = make_sampler("orthogonal", dim, norms="fixed")
    d = np.concatenate([s.sample(seed, dim) for seed in range(300)]) / math.sqrt(dim)
    np.testing.assert_allclose((d**2).mean(axis=0), 1 / dim, atol=0.02)


def test_givens_directions_mix_every_coordinate():
    dim = 64
    d = make_sampler("givens", dim, norms="fixed").sample(seed=0, num=dim) / math.sqrt(dim)
    # each unit row spreads over many coordinates (a coordinate vector would have max |u| = 1)
    assert np.abs(d).max(axis=1).max() < 0.9
    assert (np.abs(d) > 1e-3).sum(axis=1).min() > dim // 4


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="name"):
        make_sampler("sobol", 4)
    with pytest.raises(ValueError, match="norms"):
        make_sampler("orthogonal", 4, norms="unit")
    with pytest.raises(ValueError, match="dim"):
        make_sampler("givens", 1)
    with pytest.raises(TypeError, match="dim"):
        make_sampler("gaussian", 2.5)
    with pytest.raises(ValueError, match="block"):
        make_sampler("gaussian", 3).block(0, 5, 5)


# ----------------------------------------------------------------------------- policies and statistics


def test_running_stat_merge_matches_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 5)) * 3 + 1 for n in (1, 7, 30)]
    s = RunningStat(5)
    for p in parts:
        s.merge(RunningStat.of(p))
    allx = np.concatenate(parts)
    np.testing.assert_allclose(s.mean, allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.std, allx.std(0, ddof=1), rtol=1e-12)
    mean, inv = s.normaliser()
    np.testing.assert_allclose(
        (allx[0] - mean) * inv, (allx[0] - allx.mean(0)) / allx.std(0, ddof=1)
    )
    t = RunningStat.from_state_dict(s.state_dict())
    assert t.count == s.count and np.array_equal(t.m2, s.m2)


def test_running_stat_ignores_constant_coordinates():
    x = np.stack([np.arange(4.0), np.zeros(4) + 3.0], axis=1)
    _, inv = RunningStat.of(x).normaliser()
    assert inv[1] == 0.0 and np.isfinite(inv).all()
    assert np.array_equal(RunningStat(2).normaliser()[1], np.ones(2))  # no data: identity


def test_linear_and_mlp_policies_match_explicit_loops():
    rng = np.random.default_rng(1)
    lin = LinearPolicy(3, 2, [-1, -1], [1, 1])
    theta = rng.normal(size=lin.num_params)
    x = rng.normal(size=3)
    expect = [min(1, max(-1, sum(theta[3 * r + c] * x[c] for c in range(3)))) for r in range(2)]
    np.testing.assert_allclose(lin.actor(theta)(x), expect, rtol=1e-12)

    mlp = MLPPolicy(3, 2, [-0.5, -0.5], [0.5, 0.5], hidden=[4])
    assert mlp.num_params == 4 * 3 + 4 + 2 * 4 + 2
    theta = rng.normal(size=mlp.num_params)
    w1, b1 = theta[:12].reshape(4, 3), theta[12:16]
    w2, b2 = theta[16:24].reshape(2, 4), theta[24:]
    h = [math.tanh(sum(w1[i, c] * x[c] for c in range(3)) + b1[i]) for i in range(4)]
    out = [sum(w2[r, i] * h[i] for i in range(4)) + b2[r] for r in range(2)]
    np.testing.assert_allclose(mlp.actor(theta)(x), np.clip(out, -0.5, 0.5), rtol=1e-12)
    init = mlp.init_params(np.random.default_rng(0))
    assert np.all(init[16:] == 0) and np.any(init[:12] != 0)
    with pytest.raises(ValueError, match="params"):
        lin.actor(np.zeros(5))


# ----------------------------------------------------------------------------- the ARS update


def _quadratic(theta_star):
    return lambda th: -float(np.sum((th - theta_star) ** 2))


def test_ars_step_with_a_full_orthogonal_block_is_the_exact_gradient():
    # For a quadratic, (f(θ+νδ) − f(θ−νδ)) = 2ν ∇f·δ exactly; with d orthogonal rows of norm √d,
    # Σ_k (∇f·δ_k) δ_k = d ∇f, so the ARS step is a positive multiple of the analytic gradient.
    dim, nu = 6, 0.1
    rng = np.random.default_rng(0)
    star, theta = rng.normal(size=dim), rng.normal(size=dim)
    f = _quadratic(star)
    dirs = make_sampler("orthogonal", dim, norms="fixed").sample(seed=0, num=dim)
    rp = np.array([f(theta + nu * d) for d in dirs])
    rm = np.array([f(theta - nu * d) for d in dirs])
    new, info = ars_update(theta, dirs, rp, rm, step_size=0.5)
    grad = -2 * (theta - star)
    sigma = np.std(np.concatenate([rp, rm]))
    assert info["reward_std"] == pytest.approx(sigma)
    np.testing.assert_allclose(new - theta, 0.5 / (dim * sigma) * 2 * nu * dim * grad, rtol=1e-9)


def test_ars_top_b_matches_an_explicit_loop():
    rng = np.random.default_rng(2)
    theta, dirs = rng.normal(size=4), rng.normal(size=(6, 4))
    rp, rm = rng.normal(size=6), rng.normal(size=6)
    new, _ = ars_update(theta, dirs, rp, rm, step_size=0.3, top=2)
    best = sorted(range(6), key=lambda k: -max(rp[k], rm[k]))[:2]
    kept = [rp[k] for k in best] + [rm[k] for k in best]
    mu = sum(kept) / 4
    sigma = math.sqrt(sum((r - mu) ** 2 for r in kept) / 4)
    step = sum((rp[k] - rm[k]) * dirs[k] for k in best) * 0.3 / (2 * sigma)
    np.testing.assert_allclose(new, theta + step, rtol=1e-12)


def test_ars_no_signal_no_step_and_errors():
    theta = np.ones(3)
    new, info = ars_update(theta, np.eye(3), np.ones(3), np.ones(3), step_size=1.0)
    assert np.array_equal(new, theta) and info["step_norm"] == 0.0
    with pytest.raises(ValueError, match="top"):
        ars_update(theta, np.eye(3), np.ones(3), np.zeros(3), step_size=1.0, top=4)
    with pytest.raises(ValueError, match="finite"):
        ars_update(theta, np.eye(3), np.array([1, np.nan, 0]), np.zeros(3), step_size=1.0)
    with pytest.raises(ValueError, match="directions"):
        ars_update(theta, np.eye(2), np.ones(2), np.zeros(2), step_size=1.0)


@pytest.mark.parametrize("name", ["gaussian", *ORTHO])
def test_ars_improves_a_quadratic(name):
    dim, nu = 20, 0.05
    rng = np.random.default_rng(3)
    star = rng.normal(size=dim)
    f = _quadratic(star)
    sampler = make_sampler(name, dim)
    theta = np.zeros(dim)
    start = f(theta)
    for it in range(60):
        dirs = sampler.sample(seed=it, num=10)
        rp = np.array([f(theta + nu * d) for d in dirs])
        rm = np.array([f(theta - nu * d) for d in dirs])
        theta, _ = ars_update(theta, dirs, rp, rm, step_size=0.05, top=5)
    assert f(theta) > 0.1 * start  # the distance to θ* shrank by more than 90 % (in squared norm)


def test_config_validation():
    with pytest.raises(ValueError, match="top_directions"):
        ARSConfig(num_directions=4, top_directions=5)
    with pytest.raises(ValueError, match="noise"):
        ARSConfig(noise=0.0)
    with pytest.raises(ValueError, match="directions"):
        ARSConfig(directions="sobol")
    with pytest.raises(TypeError, match="num_directions"):
        ARSConfig(num_directions=2.0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- with gymnasium


@pytest.fixture(scope="module")
def gym_env_info():
    pytest.importorskip("gymnasium", reason="the rl extra (gymnasium[mujoco]) is not installed")
    pytest.importorskip("mujoco", reason="the rl extra (mujoco) is not installed")
    from orthotorch.rl.rollout import env_info, make_env

    env = make_env(CHEAP_ENV)
    info = env_info(env)
    env.close()
    return info


def _cfg(**kw):
    base = dict(
        env_id=CHEAP_ENV,
        num_directions=8,
        top_directions=4,
        step_size=0.1,
        noise=0.1,
        eval_every=2,
        eval_episodes=2,
        max_episode_steps=100,
    )
    return ARSConfig(**{**base, **kw})


def _records_without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("iteration_s", "wall_s")} for r in records]


def test_ars_improves_inverted_pendulum(gym_env_info):
    from orthotorch.rl.workers import SerialBackend

    tr = ARSTrainer(_cfg(directions="orthogonal", eval_every=0), gym_env_info)
    seeds = [11, 12, 13]
    with SerialBackend(tr.worker_spec()) as be:
        before = np.mean([e.ret for e in tr.evaluate(be, seeds)])
        for _ in range(10):
            rec = tr.step(be)
        after = np.mean([e.ret for e in tr.evaluate(be, seeds)])
    assert rec["env_steps"] == tr.env_steps > 0
    assert after >= 2 * before and after >= 40, (before, after)


def test_rollout_is_deterministic_and_reports_length_and_displacement(gym_env_info):
    from orthotorch.rl.rollout import make_env, rollout

    env = make_env(CHEAP_ENV)
    act = LinearPolicy(4, 1, [-3], [3]).actor(np.array([0.0, 0.0, 1.0, 0.0]))
    a = rollout(env, act, np.zeros(4), np.ones(4), seed=5, collect_stats=True)
    b = rollout(env, act, np.zeros(4), np.ones(4), seed=5, collect_stats=True)
    assert (a.ret, a.length, a.forward) == (b.ret, b.length, b.forward)
    assert a.ret in (a.length, a.length - 1)  # v5: reward 1 per step, 0 on the terminal step
    assert math.isfinite(a.forward) and a.forward != 0.0  # the cart moves
    assert a.stats is not None and a.stats.count == a.length
    env.close()


def test_make_env_unknown_id(gym_env_info):
    from orthotorch.rl.rollout import make_env

    with pytest.raises(ValueError, match="NoSuchEnv-v0"):
        make_env("NoSuchEnv-v0")


def test_checkpoint_resume_is_bit_identical(gym_env_info, tmp_path):
    from orthotorch.rl.workers import SerialBackend

    cfg = _cfg(directions="givens")
    a = ARSTrainer(cfg, gym_env_info)
    with SerialBackend(a.worker_spec()) as be:
        full = [a.step(be) for _ in range(4)]
        b = ARSTrainer(cfg, gym_env_info)
        first = [b.step(be) for _ in range(2)]
        path = save_checkpoint(tmp_path / "c.json", b.state_dict(), wall_s=1.0)
        doc = load_checkpoint(path, env_id=CHEAP_ENV)
        assert doc["wall_s"] == 1.0 and doc["versions"]["gymnasium"] != "not installed"
        c = ARSTrainer.from_state_dict(doc["state"], gym_env_info)
        second = [c.step(be) for _ in range(2)]
    assert np.array_equal(c.params, a.params)
    assert np.array_equal(c.obs_stat.m2, a.obs_stat.m2) and c.best == a.best
    assert _records_without_timing(first + second) == _records_without_timing(full)
    with pytest.raises(ValueError, match="Humanoid-v5"):
        load_checkpoint(path, env_id="Humanoid-v5")
    assert not (tmp_path / "c.json.tmp").exists()


def _two_iterations(backend_name, info, workers, directions="orthogonal"):
    from orthotorch.rl.workers import make_backend

    tr = ARSTrainer(_cfg(directions=directions, num_directions=6, top_directions=3), info)
    with make_backend(backend_name, tr.worker_spec(), workers) as be:
        recs = [tr.step(be) for _ in range(2)]
    return tr.params, _records_without_timing(recs)


def test_process_backend_matches_serial_bit_for_bit(gym_env_info):
    ref_params, ref = _two_iterations("serial", gym_env_info, 1)
    params, recs = _two_iterations("process", gym_env_info, 2)
    assert np.array_equal(params, ref_params) and recs == ref


def test_ray_backend_matches_serial_bit_for_bit(gym_env_info):
    ray = pytest.importorskip("ray", reason="the rl extra (ray) is not installed")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"a local Ray instance cannot start here: {type(exc).__name__}: {exc}")
    try:
        params, recs = _two_iterations("ray", gym_env_info, 2, directions="gaussian")
    finally:
        ray.shutdown()
    # serial == process is the test above; serial is the cheaper reference
    ref_params, ref = _two_iterations("serial", gym_env_info, 1, directions="gaussian")
    assert np.array_equal(params, ref_params) and recs == ref


# ----------------------------------------------------------------------------- missing extra


def test_missing_extra_gives_one_clear_message(monkeypatch):
    from orthotorch.rl import rollout

    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` now raises ImportError
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[rl\]"') as exc:
        rollout.make_env("Humanoid-v5")
    assert "gymnasium" in str(exc.value) and "\n" not in str(exc.value)
    assert isinstance(exc.value, ImportError)


def test_package_and_cli_import_without_the_extra():
    code = (
        "import sys\n"
        "for m in ('gymnasium', 'mujoco', 'ray'):\n"
        "    sys.modules[m] = None\n"
        "import orthotorch.rl, orthotorch.rl.es, orthotorch.rl.workers, orthotorch.rl.checkpoint\n"
        "import orthotorch.apps.humanoid\n"
        "from orthotorch.apps.cli import main\n"
        "sys.exit(main(['humanoid', 'train', '--budget-steps', '10', '--out', sys.argv[1]]))\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.run(
            [sys.executable, "-c", code, d], capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'pip install -e ".[rl]"' in lines[0], proc.stderr
