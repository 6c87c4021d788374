"""Grid schedulers against exact answers: a Gaussian data distribution whose optimal denoiser is known in closed form,
hand-derived plans and variances, and MONAI's (and, when installed, diffusers') schedulers.

Exact Gaussian case: x_0 ~ N(mu, s^2) per element, so x_t ~ N(sqrt(a) mu, a s^2 + 1 - a) (a = alpha_bar_t), the
optimal eps predictor is E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), and the probability-flow ODE
maps x_T to x_0 = mu + s (x_T - sqrt(a_T) mu) / sqrt(a_T s^2 + 1 - a_T). Errors are collected in ``RESULTS`` and printed
(visible with ``pytest -s``).
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler as MonaiDDIM
from monai.networks.schedulers import DDPMScheduler as MonaiDDPM

from meddiff.losses import HybridLoss, discretized_gaussian_log_likelihood
from meddiff.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    GridScheduler,
    RePaintScheduler,
    make_scheduler,
)

T = 1000
MU, S = 0.3, 0.5
STEPS = (5, 10, 20, 50)
N_STOCHASTIC = 20000
RESULTS: dict[str, dict] = {}


def gaussian_eps(scheduler: GridScheduler, mu: float, s: float):
    """The exact E[eps | x_t] for x_0 ~ N(mu, s^2); for s = 0, (x_t - sqrt(a) mu) / sqrt(1 - a)."""

    def network(x: torch.Tensor, t: int) -> torch.Tensor:
        a = scheduler.alpha_bar(t)
        return math.sqrt(1.0 - a) * (x - math.sqrt(a) * mu) / (a * s * s + 1.0 - a)

    return network


def run(scheduler: GridScheduler, x: torch.Tensor, network, generator=None, skip_steps: int = 0) -> torch.Tensor:
    for t, t_next in scheduler.plan(skip_steps):
        if t_next > t:
            x = scheduler.undo(x, t, t_next, generator)
        else:
            x, _ = scheduler.step(network(x, t), t, t_next, x, generator)
    return x


def exact_flow(scheduler: GridScheduler, x_T: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    a = scheduler.alpha_bar(int(scheduler.timesteps[0]))
    return mu + s * (x_T - math.sqrt(a) * mu) / math.sqrt(a * s * s + 1.0 - a)


def from_marginal(scheduler: GridScheduler, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of x_T from the exact q(x_T), so that stochastic errors measure the solver alone."""
    a = scheduler.alpha_bar(int(scheduler.timesteps[0]))
    z = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    return math.sqrt(a) * MU + math.sqrt(a * S * S + 1.0 - a) * z


# ---- schedule and grid ----


@pytest.mark.parametrize(
    ("schedule", "kwargs"),
    [
        ("linear_beta", {}),
        ("linear_beta", {"beta_start": 5e-4, "beta_end": 3e-2}),
        ("scaled_linear_beta", {"beta_start": 8.5e-4, "beta_end": 1.2e-2}),
        ("sigmoid_beta", {}),
        ("cosine", {}),
    ],
)
def test_alphas_cumprod_equal_monai(schedule, kwargs):
    ours = DDPMScheduler(schedule=schedule, **kwargs)
    monai = MonaiDDPM(schedule=schedule, **kwargs)
    assert ours.alphas_cumprod.dtype == torch.float64 and ours.alphas_cumprod.device.type == "cpu"
    # MONAI's cumulative product runs in float32: equal to float32 precision
    torch.testing.assert_close(ours.alphas_cumprod, monai.alphas_cumprod.double(), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(ours.betas, monai.betas.double())


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, RePaintScheduler])
@pytest.mark.parametrize("n", [1, 7, 10, 16, 30, 50, 999, 1000])
def test_trailing_grid_starts_at_top_and_ends_clean(cls, n):
    scheduler = cls(jump_n_sample=1) if cls is RePaintScheduler else cls()
    scheduler.set_timesteps(n)
    grid = scheduler.timesteps.tolist()
    assert scheduler.timesteps.dtype == torch.long and len(set(grid)) == n
    assert grid[0] == T - 1 and grid[-1] >= 0
    assert all(a > b for a, b in zip(grid, grid[1:]))
    moves = scheduler.plan()
    assert moves == list(zip(grid, grid[1:] + [-1]))
    assert moves[-1][1] == -1 and scheduler.alpha_bar(moves[-1][1]) == 1.0


def test_default_grid_is_full_chain_and_half_steps_round_up():
    assert DDIMScheduler().timesteps.tolist() == list(range(T - 1, -1, -1))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(16)  # i T / n = 62.5 i: odd i round up
    assert scheduler.timesteps[:4].tolist() == [999, 936, 874, 811]
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


def test_bad_arguments_are_refused_clearly():
    scheduler = DDIMScheduler()
    for n in (0, T + 1, 2.5):
        with pytest.raises(ValueError, match=r"1\.\.1000"):
            scheduler.set_timesteps(n)
    with pytest.raises(ValueError, match="linear_beta"):
        DDIMScheduler(schedule="quadratic")
    with pytest.raises(ValueError, match="v_prediction"):
        DDIMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="clip_sample_values"):
        DDIMScheduler(clip_sample_values=(1.0, -1.0))
    with pytest.raises(ValueError, match="beta_stop"):
        DDIMScheduler(beta_stop=0.02)
    with pytest.raises(ValueError, match="eta"):
        DDIMScheduler(eta=-0.1)
    with pytest.raises(ValueError, match="fixed_small"):
        DDPMScheduler(variance_type="learned")
    with pytest.raises(ValueError, match="jump_length"):
        RePaintScheduler(jump_length=0)
    with pytest.raises(ValueError, match="ddpm.*ddim.*dpmpp_2m.*dpmpp_2m_sde"):
        make_scheduler("euler", 10)
    with pytest.raises(ValueError, match="sde"):
        make_scheduler("dpmpp_2m", 10, sde=True)
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="undo"):
        scheduler.step(x, 10, 20, x)
    with pytest.raises(ValueError, match="0..999"):
        scheduler.step(x, T, 5, x)
    with pytest.raises(ValueError, match="up"):
        scheduler.undo(x, 20, 10)
    with pytest.raises(ValueError, match="skip_steps"):
        scheduler.plan(T)
    with pytest.raises(ValueError, match="channels"):
        scheduler.step(torch.zeros(1, 3), 10, 5, x)


def test_plan_skip_steps_drops_the_first_moves():
    scheduler = make_scheduler("ddim", 10)
    assert scheduler.plan(3) == scheduler.plan()[3:]
    assert scheduler.plan(3)[0][0] == 699
    assert scheduler.plan(9) == [(99, -1)]


def test_make_scheduler():
    assert isinstance(make_scheduler("ddpm", 50, variance_type="fixed_large"), DDPMScheduler)
    ddim = make_scheduler("ddim", 20, eta=0.5, clip_sample=False)
    assert isinstance(ddim, DDIMScheduler) and ddim.eta == 0.5 and not ddim.clip_sample
    assert len(ddim.timesteps) == 20
    assert not make_scheduler("dpmpp_2m", 10).sde and make_scheduler("dpmpp_2m_sde", 10).sde
    with pytest.raises(ValueError, match="choose one of"):
        make_scheduler("euler", 10)


# ---- predictions, noising ----


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_predictions_invert_the_forward_process(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 2, 5, generator=g, dtype=torch.float64) * 4 - 2, torch.randn(4, 2, 5, generator=g)
    scheduler = DDIMScheduler(clip_sample=False, prediction_type=prediction_type)
    t = 400
    a = scheduler.alpha_bar(t)
    timesteps = torch.full((4,), t)
    x_t = scheduler.add_noise(x0, eps.double(), timesteps)
    torch.testing.assert_close(x_t, math.sqrt(a) * x0 + math.sqrt(1 - a) * eps.double())
    output = {
        "epsilon": eps.double(),
        "sample": x0,
        "v_prediction": scheduler.get_velocity(x0, eps.double(), timesteps),
    }
    out = output[prediction_type]
    torch.testing.assert_close(scheduler.predict_x0(out, t, x_t), x0)
    torch.testing.assert_close(scheduler.predict_eps(out, t, x_t), eps.double())
    clipped = DDIMScheduler(prediction_type=prediction_type).predict_x0(out, t, x_t)
    torch.testing.assert_close(clipped, x0.clamp(-1, 1))
    torch.testing.assert_close(
        scheduler.predict_eps(out, t, x_t, x0=clipped), (x_t - math.sqrt(a) * clipped) / math.sqrt(1 - a)
    )


def test_add_noise_equals_monai_per_batch_item():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    timesteps = torch.tensor([0, 500, 999])
    ours = DDPMScheduler().add_noise(x0, noise, timesteps)
    torch.testing.assert_close(ours, MonaiDDPM().add_noise(x0, noise, timesteps))
    assert ours.dtype == torch.float32


def test_steps_compute_at_least_float32():
    x = torch.randn(2, 1, 3).to(torch.bfloat16)
    for name in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        x_next, x0 = make_scheduler(name, 10).step(x, 999, 899, x, torch.Generator().manual_seed(0))
        assert x_next.dtype == torch.float32 and x0.dtype == torch.float32


# ---- MONAI equivalence ----


def monai_in_float64(scheduler):
    """A MONAI scheduler whose tables are recomputed in float64 from its float32 betas, as ours are."""
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = scheduler.one.double()
    return scheduler


@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_full_chain_ddpm_step_equals_monai(t):
    g = torch.Generator().manual_seed(t)
    sample, eps = 2 * torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    ours = DDPMScheduler()  # full chain, fixed_small, clip_sample=True: x0 is clipped on this input
    x_ours, x0_ours = ours.step(eps, t, t - 1, sample, torch.Generator().manual_seed(7))
    x_monai, x0_monai = MonaiDDPM().step(eps, t, sample, torch.Generator().manual_seed(7))
    # MONAI's float32 1 - alpha_bar loses digits near t = 0 (1 - 0.9999): equal to 2e-4
    torch.testing.assert_close(x0_ours, x0_monai, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(x_ours, x_monai, rtol=2e-4, atol=2e-4)
    x_ours, x0_ours = ours.step(eps.double(), t, t - 1, sample.double(), torch.Generator().manual_seed(7))
    monai = monai_in_float64(MonaiDDPM())
    x_monai, x0_monai = monai.step(eps.double(), t, sample.double(), torch.Generator().manual_seed(7))
    torch.testing.assert_close(x0_ours, x0_monai, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_ours, x_monai, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("t", "t_next"), [(999, 899), (499, 399), (99, -1)])
def test_ddim_step_equals_monai_where_grids_coincide(t, t_next):
    g = torch.Generator().manual_seed(t)
    sample, eps = 2 * torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    ours = make_scheduler("ddim", 10)
    assert t in ours.timesteps.tolist()
    monai = MonaiDDIM()
    monai.set_timesteps(10)  # MONAI's step goes from t to t - T // n = t - 100
    x_ours, x0_ours = ours.step(eps, t, t_next, sample)
    x_monai, x0_monai = monai.step(eps, t, sample, eta=0.0)
    torch.testing.assert_close(x0_ours, x0_monai, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_ours, x_monai, rtol=1e-4, atol=1e-5)
    x_ours, x0_ours = ours.step(eps.double(), t, t_next, sample.double())
    x_monai, x0_monai = monai_in_float64(monai).step(eps.double(), t, sample.double(), eta=0.0)
    torch.testing.assert_close(x0_ours, x0_monai, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_ours, x_monai, rtol=1e-10, atol=1e-10)


# ---- equivalences between samplers ----


def test_respaced_ddpm_equals_ddim_eta1_unless_clipped():
    mu, s = 0.8, 0.6  # predicted x0 often leaves [-1, 1], so clipping acts
    x_T = torch.randn(512, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for clip, equal in ((False, True), (True, False)):
        ddpm = make_scheduler("ddpm", 20, clip_sample=clip)
        ddim = make_scheduler("ddim", 20, clip_sample=clip, eta=1.0)
        a = run(ddpm, x_T, gaussian_eps(ddpm, mu, s), torch.Generator().manual_seed(4))
        b = run(ddim, x_T, gaussian_eps(ddim, mu, s), torch.Generator().manual_seed(4))
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9) is equal


def test_first_order_dpm_solver_moves_are_ddim_and_ddpm():
    x = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ode, ddim = make_scheduler("dpmpp_2m", 10, clip_sample=False), make_scheduler("ddim", 10, clip_sample=False)
    sde, ddpm = make_scheduler("dpmpp_2m_sde", 10, clip_sample=False), make_scheduler("ddpm", 10, clip_sample=False)
    eps = gaussian_eps(ode, MU, S)(x, 999)
    ode.plan()
    torch.testing.assert_close(ode.step(eps, 999, 899, x)[0], ddim.step(eps, 999, 899, x)[0])
    sde.plan()
    a = sde.step(eps, 999, 899, x, torch.Generator().manual_seed(6))[0]
    torch.testing.assert_close(a, ddpm.step(eps, 999, 899, x, torch.Generator().manual_seed(6))[0])


def test_multistep_state_is_reset_by_plan_and_set_timesteps():
    scheduler = make_scheduler("dpmpp_2m", 10, clip_sample=False)
    ddim = make_scheduler("ddim", 10, clip_sample=False)
    network = gaussian_eps(scheduler, MU, S)
    x_T = torch.randn(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    first = run(scheduler, x_T, network)
    torch.testing.assert_close(run(scheduler, x_T, network), first)
    x, _ = scheduler.step(network(x_T, 999), 999, 899, x_T)
    second_order = scheduler.step(network(x, 899), 899, 799, x)[0]
    for forget in (scheduler.plan, lambda: scheduler.set_timesteps(10)):
        scheduler.step(network(x_T, 999), 999, 899, x_T)  # a move whose end the next one starts from
        forget()
        first_order = scheduler.step(network(x, 899), 899, 799, x)[0]
        torch.testing.assert_close(first_order, ddim.step(network(x, 899), 899, 799, x)[0])
        assert not torch.allclose(first_order, second_order)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_a_cuda_generator():
    device = torch.device("cuda")
    for name in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        scheduler = make_scheduler(name, 10, clip_sample=False)
        generator = torch.Generator(device=device).manual_seed(0)
        x_T = torch.randn(8, 1, 4, 4, generator=generator, device=device)
        x = run(scheduler, x_T, gaussian_eps(scheduler, MU, S), generator)
        assert x.device.type == "cuda" and x.dtype == torch.float32
        if name in ("ddim", "dpmpp_2m"):
            expected = run(scheduler, x_T.double().cpu(), gaussian_eps(scheduler, MU, S))
            torch.testing.assert_close(x.cpu().double(), expected, rtol=1e-4, atol=1e-4)
    scheduler = RePaintScheduler(jump_length=2, jump_n_sample=2)
    scheduler.set_timesteps(10, device=device)
    assert scheduler.timesteps.device.type == "cuda"
    x = run(scheduler, x_T, gaussian_eps(scheduler, MU, S), torch.Generator(device=device).manual_seed(1))
    assert torch.isfinite(x).all()
    timesteps = torch.tensor([0, 5, 999, 500, 1, 2, 3, 4], device=device)
    noise = torch.randn_like(x_T)
    x_t = scheduler.add_noise(x_T, noise, timesteps)
    output = torch.cat([noise, torch.zeros_like(noise)], dim=1).requires_grad_(True)
    HybridLoss(scheduler)(output, noise, x_T, x_t, timesteps).backward()
    assert output.grad.device.type == "cuda"


# ---- RePaint ----


def test_repaint_plan_counts():
    scheduler = RePaintScheduler(jump_length=10, jump_n_sample=5)
    scheduler.set_timesteps(200)
    moves = scheduler.plan()
    down = [m for m in moves if m[1] < m[0]]
    up = [m for m in moves if m[1] > m[0]]
    # 19 jump positions (0, 10, ..., 180) x 4 resamplings x 10 positions up, and as many extra down moves
    assert (len(down), len(up)) == (960, 760)
    assert moves[0][0] == T - 1 and moves[-1] == (scheduler.timesteps[-1].item(), -1)
    position = {t: p for p, t in enumerate(reversed(scheduler.timesteps.tolist()))} | {-1: -1}
    assert all(abs(position[a] - position[b]) == 1 for a, b in moves)
    assert all(b == a for (_, a), (b, _) in zip(moves, moves[1:]))


def test_repaint_plan_by_hand():
    # T = 12, 6 steps: grid 11, 9, 7, 5, 3, 1 = positions 5..0 from the clean end. jump_length 2 excludes the top 2
    # positions, so the jump positions are 0 and 2, each jumped from once (jump_n_sample - 1 = 1):
    # down 11 9 7 5 | arrive at position 2: up 7 9 | down 7 5 (second arrival: no jump) 3 1 |
    # arrive at position 0: up 3 5 | down 3 1 (second arrival) | to the clean end -1
    scheduler = RePaintScheduler(num_train_timesteps=12, jump_length=2, jump_n_sample=2)
    scheduler.set_timesteps(6)
    path = [11, 9, 7, 5, 7, 9, 7, 5, 3, 1, 3, 5, 3, 1, -1]
    assert scheduler.plan() == list(zip(path, path[1:]))


def test_undo_draws_from_the_forward_marginal():
    scheduler = make_scheduler("ddpm", 50)
    n, value = 200000, 0.7
    for t, t_next in ((299, 319), (-1, 19)):
        x = torch.full((n, 1), value, dtype=torch.float64)
        y = scheduler.undo(x, t, t_next, torch.Generator().manual_seed(9))
        ratio = scheduler.alpha_bar(t_next) / scheduler.alpha_bar(t)
        var = 1.0 - ratio
        assert abs(float(y.mean()) - math.sqrt(ratio) * value) < 4 * math.sqrt(var / n)
        assert abs(float(y.var()) - var) < 4 * var * math.sqrt(2.0 / n)


# ---- learned variance ----


def test_learned_range_variance_by_hand():
    scheduler = make_scheduler("ddpm", 10, variance_type="learned_range", clip_sample=False)
    t, t_next, v = 499, 399, 0.3
    a, a_next = scheduler.alpha_bar(t), scheduler.alpha_bar(t_next)
    b = 1 - a / a_next
    posterior = (1 - a_next) / (1 - a) * b
    frac = (v + 1) / 2  # 0.65
    expected = b**frac * posterior ** (1 - frac)
    assert float(scheduler.variance(t, t_next, torch.tensor(v, dtype=torch.float64))) == pytest.approx(
        expected, rel=1e-12
    )

    sample = torch.full((1, 1, 2), 0.2, dtype=torch.float64)
    eps = torch.full_like(sample, 0.1)
    model_output = torch.cat([eps, torch.full_like(sample, v)], dim=1)
    x_next, x0 = scheduler.step(model_output, t, t_next, sample, torch.Generator().manual_seed(10))
    z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    mean = math.sqrt(a_next) * b / (1 - a) * x0 + math.sqrt(1 - b) * (1 - a_next) / (1 - a) * sample
    torch.testing.assert_close(x_next, mean + math.sqrt(expected) * z)

    # the final move's posterior variance is 0; its clipped value is that of the move into 99 from 199
    a_top = scheduler.alpha_bar(199)
    clipped = (1 - scheduler.alpha_bar(99)) / (1 - a_top) * (1 - a_top / scheduler.alpha_bar(99))
    assert float(scheduler.variance(99, -1, torch.tensor(-1.0, dtype=torch.float64))) == pytest.approx(
        clipped, rel=1e-12
    )
    with pytest.raises(ValueError, match="twice"):
        scheduler.step(eps, t, t_next, sample)


def test_hybrid_loss_kl_vanishes_at_the_true_posterior_and_vlb_trains_only_the_variance():
    scheduler = DDPMScheduler()
    loss = HybridLoss(scheduler, lambda_vlb=0.001)
    g = torch.Generator().manual_seed(11)
    x0, noise = torch.rand(4, 2, 6, 6, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(4, 2, 6, 6, generator=g)
    noise = noise.double()
    timesteps = torch.tensor([1, 10, 500, 999])
    x_t = scheduler.add_noise(x0, noise, timesteps)
    # v = -1: the model variance is the (clipped) posterior variance; eps exact: the model mean is the posterior mean
    output = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    kl = loss.vlb_terms(output, x0, x_t, timesteps)
    assert kl.abs().max() < 1e-9
    assert float(loss(output, noise, x0, x_t, timesteps)) == pytest.approx(0.0, abs=1e-9)

    output = torch.cat([noise + 0.1 * torch.randn(noise.shape, generator=g), torch.rand(noise.shape, generator=g)], 1)
    output.requires_grad_(True)
    vlb = loss.vlb_terms(output, x0, x_t, torch.tensor([0, 10, 500, 999]))
    assert (vlb > 0).all()
    vlb.sum().backward()
    assert output.grad[:, :2].abs().max() == 0 and output.grad[:, 2:].abs().max() > 0

    total = loss(output.detach(), noise, x0, x_t, timesteps)
    mse = ((output.detach()[:, :2] - noise) ** 2).mean()
    expected = mse + 0.001 * T * loss.vlb_terms(output.detach(), x0, x_t, timesteps).mean()
    torch.testing.assert_close(total, expected)


def test_decoder_nll_is_the_gaussian_mass_of_the_bin():
    x = torch.tensor([-1.0, -1 + 2 / 255 * 100, 1.0], dtype=torch.float64)
    mean, std = torch.tensor([-0.95, -0.2, 0.9], dtype=torch.float64), 0.05

    def cdf(u):
        return 0.5 * (1 + math.erf(u / math.sqrt(2)))

    expected = [
        math.log(cdf((x[0] - mean[0] + 1 / 255) / std)),
        math.log(cdf((x[1] - mean[1] + 1 / 255) / std) - cdf((x[1] - mean[1] - 1 / 255) / std)),
        math.log(1 - cdf((x[2] - mean[2] - 1 / 255) / std)),
    ]
    got = discretized_gaussian_log_likelihood(x, mean, torch.full_like(x, math.log(std**2)))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


# ---- the exact Gaussian case ----


@pytest.mark.parametrize("n", [1, 7, 10, 16, 30, 50, 999])
def test_ddim_final_move_lands_on_a_point_mass(n):
    # s = 0: every x0 prediction is mu, and the final move to alpha_bar = 1 returns it. The old stride grid
    # (T // n, MONAI's prev = t - T // n) stopped one step short: 16 steps ended with 69 -> 7 and 30 steps with
    # 42 -> 9, leaving x = sqrt(a_7) mu + 0.037 eps and sqrt(a_9) mu + 0.044 eps.
    # In float32 the x0 prediction at T-1 (alpha_bar = 4e-5) alone carries ~1e-7 / sqrt(4e-5) = 2e-5 of rounding.
    for name in ("ddim", "dpmpp_2m", "ddpm"):
        scheduler = make_scheduler(name, n)
        for dtype, tolerance in ((torch.float64, 1e-5), (torch.float32, 2e-4)):
            x_T = torch.randn(256, 1, 4, generator=torch.Generator().manual_seed(n), dtype=dtype)
            x = run(scheduler, x_T, gaussian_eps(scheduler, MU, 0.0), torch.Generator().manual_seed(0))
            assert x.dtype == dtype
            assert (x - MU).abs().max() < tolerance, (name, n, dtype)


def test_deterministic_samplers_converge_to_the_probability_flow_map():
    x_T = torch.randn(4096, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    table = {}
    for name in ("ddim", "dpmpp_2m"):
        for n in STEPS:
            scheduler = make_scheduler(name, n, clip_sample=False)
            x = run(scheduler, x_T, gaussian_eps(scheduler, MU, S))
            table[(name, n)] = float(((x - exact_flow(scheduler, x_T, MU, S)) ** 2).mean().sqrt())
    RESULTS["deterministic_rms"] = table
    print("\nRMS error against the exact probability-flow map (mu=0.3, s=0.5)")
    print("steps  " + "  ".join(f"{n:>9d}" for n in STEPS))
    for name in ("ddim", "dpmpp_2m"):
        print(f"{name:<9s}" + "  ".join(f"{table[(name, n)]:9.2e}" for n in STEPS))
    for n in STEPS:
        assert table[("dpmpp_2m", n)] < table[("ddim", n)]
    for name in ("ddim", "dpmpp_2m"):
        errors = [table[(name, n)] for n in STEPS]
        assert all(b < a for a, b in zip(errors, errors[1:])), (name, errors)
    assert table[("dpmpp_2m", 50)] < 2e-3


def fixed_small_moments(scheduler: DDPMScheduler) -> tuple[float, float]:
    """Exact mean and std of a fixed-small DDPM run from q(x_T) with the exact denoiser (Ho et al. eq. 6-7)."""
    grid = scheduler.timesteps.tolist() + [-1]
    a = scheduler.alpha_bar(grid[0])
    mean, var = math.sqrt(a) * MU, a * S * S + 1 - a
    for t, t_next in zip(grid, grid[1:]):
        a, a_next = scheduler.alpha_bar(t), scheduler.alpha_bar(t_next)
        alpha = a / a_next
        # E[x0 | x_t] = mu + gain (x_t - sqrt(a) mu); posterior mean = c0 x0 + c1 x_t
        gain = math.sqrt(a) * S * S / (a * S * S + 1 - a)
        c0, c1 = math.sqrt(a_next) * (1 - alpha) / (1 - a), math.sqrt(alpha) * (1 - a_next) / (1 - a)
        slope, offset = c0 * gain + c1, c0 * (MU - gain * math.sqrt(a) * MU)
        mean, var = slope * mean + offset, slope**2 * var + (1 - a_next) / (1 - a) * (1 - alpha)
    return mean, math.sqrt(var)


def test_stochastic_samplers_reproduce_the_data_distribution():
    se_mean, se_std = S / math.sqrt(N_STOCHASTIC), S / math.sqrt(2 * N_STOCHASTIC)
    table = {}
    for name in ("ddpm", "dpmpp_2m_sde"):
        for n in (*STEPS, T) if name == "ddpm" else STEPS:
            scheduler = make_scheduler(name, n, clip_sample=False)
            generator = torch.Generator().manual_seed(13)
            x = run(
                scheduler, from_marginal(scheduler, N_STOCHASTIC, generator), gaussian_eps(scheduler, MU, S), generator
            )
            table[(name, n)] = (float(x.mean()) - MU, float(x.std()) - S)
            if name == "ddpm":
                mean, std = fixed_small_moments(scheduler)
                assert abs(float(x.mean()) - mean) < 4 * se_mean and abs(float(x.std()) - std) < 4 * se_std, n
    RESULTS["stochastic_errors"] = table
    print(f"\nmean - mu, std - s over {N_STOCHASTIC} samples (se {se_mean:.4f}, {se_std:.4f}), from the exact q(x_T)")
    for (name, n), (dm, ds) in table.items():
        print(f"{name:<13s} {n:>5d}  {dm:+.4f}  {ds:+.4f}")
    # the full chain: sampling error plus its small discretisation bias (exactly -0.0039 in std)
    dm, ds = table[("ddpm", T)]
    assert abs(dm) < 4 * se_mean and abs(ds) < 4 * se_std + 0.005
    # 50 steps: fixed-small DDPM misses the variance of E[x_next | x_t, x0] over x0 (exactly -0.056 in std);
    # SDE-DPM-Solver++(2M) is within 0.02
    dm, ds = table[("dpmpp_2m_sde", 50)]
    assert abs(dm) < 4 * se_mean + 0.002 and abs(ds) < 4 * se_std + 0.02
    dm, ds = table[("ddpm", 50)]
    assert abs(dm) < 4 * se_mean and -0.07 < ds < -0.04
    for name in ("ddpm", "dpmpp_2m_sde"):
        assert abs(table[(name, 50)][1]) < abs(table[(name, 5)][1])


# ---- diffusers (optional) ----


@pytest.mark.parametrize(("algorithm", "sampler"), [("dpmsolver++", "dpmpp_2m"), ("sde-dpmsolver++", "dpmpp_2m_sde")])
def test_dpm_solver_equals_diffusers(algorithm, sampler):
    diffusers = pytest.importorskip("diffusers")
    for n in (5, 20):
        ours = make_scheduler(sampler, n, clip_sample=False)
        theirs = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=T,
            beta_start=1e-4,
            beta_end=2e-2,
            beta_schedule="linear",
            algorithm_type=algorithm,
            solver_order=2,
            timestep_spacing="trailing",
            final_sigmas_type="zero",
        )
        theirs.set_timesteps(n)
        assert theirs.timesteps.tolist() == ours.timesteps.tolist()
        network = gaussian_eps(ours, MU, S)
        x = y = torch.randn(64, 1, 4, generator=torch.Generator().manual_seed(14))
        g_ours, g_theirs = torch.Generator().manual_seed(15), torch.Generator().manual_seed(15)
        for (t, t_next), t_theirs in zip(ours.plan(), theirs.timesteps):
            x, _ = ours.step(network(x, t), t, t_next, x, g_ours)
            y = theirs.step(network(y, int(t_theirs)), t_theirs, y, generator=g_theirs).prev_sample
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
