"""The shipped sampler and the training objective agree (else samples are noise with a falling loss)."""

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from erasekit.world.train import scheduler_kwargs


def test_oracle_v_prediction_through_the_sampler_recovers_the_clean_latent():
    train = DDPMScheduler(**scheduler_kwargs())
    sample = DDIMScheduler(**scheduler_kwargs(), timestep_spacing="trailing", set_alpha_to_one=False, steps_offset=1)
    sample.set_timesteps(20)
    assert int(sample.timesteps[0]) == 999  # starts from pure noise, like training's t = 999
    assert float(train.alphas_cumprod[-1]) < 1e-4  # and t = 999 is (almost) pure noise
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    x = torch.randn(2, 4, 16, 16, generator=g) * sample.init_noise_sigma
    for t in sample.timesteps:
        a = train.alphas_cumprod[t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        v = train.get_velocity(x0, eps, torch.full((2,), int(t)))  # what a perfect model predicts
        x = sample.step(v, t, x).prev_sample
    # the last step lands on alpha_bar[0] (set_alpha_to_one=False): a trace of noise remains
    residual = (1 - train.alphas_cumprod[0]).sqrt()
    assert (x - x0).abs().max() < 10 * residual, ((x - x0).abs().max(), residual)
    # a sampler that disagreed with the objective (say, epsilon-prediction) would not come near
    wrong = DDIMScheduler(**{**scheduler_kwargs(), "prediction_type": "epsilon"}, timestep_spacing="trailing")
    wrong.set_timesteps(20)
    y = torch.randn(2, 4, 16, 16, generator=g)
    for t in wrong.timesteps:
        a = train.alphas_cumprod[t]
        eps = (y - a.sqrt() * x0) / (1 - a).sqrt()
        y = wrong.step(train.get_velocity(x0, eps, torch.full((2,), int(t))), t, y).prev_sample
    assert (y - x0).abs().max() > 100 * residual
