"""A Gaussian target ``x0 ~ N(MU, SD^2)`` per coordinate, whose exact denoiser is known in closed
form: the analytic case the sampler tests compare against."""

MU, SD = 1.5, 0.5


def gaussian_denoiser(schedule, mu=MU, sd=SD):
    """E[x0 | x_t] for x0 ~ N(mu, sd^2) and x_t = a x0 + s eps."""
    ab = schedule.alphas_cumprod

    def denoise(x, t, cond):
        a2 = ab[t].to(x.dtype).unsqueeze(-1)
        a = a2.sqrt()
        return mu + a * sd**2 / (a2 * sd**2 + 1 - a2) * (x - a * mu)

    return denoise
