"""Inducing-weight variational posterior over one weight matrix (docs/methods.md).

For a factor W (d_out x d_in), a small inducing matrix U (M_r x M_c) and W share one zero-mean
Gaussian prior built from learned inducing locations Z_r (M_r x d_out), Z_c (M_c x d_in) and diagonal
terms D_r, D_c (Ritter et al. 2021, the construction behind Bayesian-LoRA):

    vec W ~ N(0, I),   Cov(U) = K_r (x) K_c,   K_r = Z_r Z_r^T + D_r^2,   K_c = Z_c Z_c^T + D_c^2,
    Cov(U, W) = Z_r (x) Z_c,   i.e.  U = Z_r W Z_c^T + Z_r E_2 D_c + D_r E_3 Z_c^T + D_r E_4 D_c.

Conditioning gives p(W | U) = N(M_W, Sigma_W) with

    M_W = Z_r^T K_r^-1 U K_c^-1 Z_c,    Sigma_W = I - (Z_r^T K_r^-1 Z_r) (x) (Z_c^T K_c^-1 Z_c).

U is whitened, U = L_r u L_c^T with L L^T = K, so p(u) = N(0, I) and M_W = R^T u C with
R = L_r^-1 Z_r, C = L_c^-1 Z_c. The variational posterior is q(u) Gaussian (``diagonal`` or ``full``
covariance) or, with ``flow``, a diagonal Gaussian pushed through one affine autoregressive flow
(pyro's ``affine_autoregressive``, hidden width ``flow_hidden``), and q(W | u) = N(M_W, lambda^2 Sigma_W).
A draw uses Matheron's rule: draw (W~, U~) from the joint prior (above, with standard-normal W~, E_2,
E_3, E_4), then eps = W~ - R^T u~ C with u~ = L_r^-1 U~ L_c^-T is a draw from N(0, Sigma_W), never
forming Sigma_W. The factor is

    W = sigma_p (M_W + lambda eps),    sigma_p = prior_std (/ sqrt(d_in) with ``sqrt_width_scaling``),

and its KL terms are closed form (for the flow, KL(q(u) || p(u)) is the one-sample estimate
log q(u) - log N(u; 0, I) at a fresh draw):

    KL(q(u) || p(u))          = 1/2 (tr S + mu^T mu - M_r M_c - log det S),
    KL(q(W|u) || p(W|u))      = d_out d_in (lambda^2 / 2 - log lambda - 1/2)   (same mean, covariance x lambda^2).

lambda = max_lambda * sigmoid(rho) stays below ``max_lambda``; the std of a diagonal q(u) is
softplus(.) clipped at ``max_q_std``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pyro.distributions.transforms import affine_autoregressive
from torch import nn

from bayeslora import ConfigError
from bayeslora.config import Validated, check_choice

Q_INDUCING = ("diagonal", "full", "flow")
_JITTER = 1e-6


@dataclass
class InducingSettings(Validated):
    """``rows`` x ``cols``: the inducing matrix U; ``q_inducing``: diagonal | full covariance of q(u), or
    flow (a diagonal Gaussian through an affine autoregressive flow of hidden width ``flow_hidden``,
    at least rows x cols; None: rows x cols);
    ``prior_std``: sigma_p (divided by sqrt(d_in) with ``sqrt_width_scaling``); ``init_lambda`` /
    ``max_lambda``: the conditional noise scale and its bound; ``learn_lambda``; ``init_q_std`` /
    ``max_q_std``: std of q(u) at the start and its bound (diagonal q); ``init_d``: initial D_r, D_c."""

    rows: int = 9
    """Rows of the inducing matrix U."""
    cols: int = 9
    """Columns of the inducing matrix U."""
    q_inducing: str = "diagonal"
    """q(U): diagonal, full, or flow (an affine autoregressive flow)."""
    prior_std: float = 0.1
    """sigma_p, the prior scale of the factor."""
    sqrt_width_scaling: bool = True
    """Divide sigma_p by sqrt(d_in)."""
    init_lambda: float = 1e-3
    """Initial conditional noise scale lambda."""
    max_lambda: float = 0.03
    """Upper bound of lambda."""
    learn_lambda: bool = True
    """Train lambda (else keep it at init_lambda)."""
    init_q_std: float = 1e-3
    """Initial std of q(U) (diagonal q)."""
    max_q_std: float = 0.1
    """Upper bound of q(U)'s std (diagonal q)."""
    init_d: float = 1e-3
    """Initial D_r and D_c of the Kronecker prior."""
    flow_hidden: int | None = None
    """Hidden width of the flow (None: rows x cols)."""

    def check(self) -> None:
        check_choice("bayesian_lora q_inducing", self.q_inducing, Q_INDUCING)
        if self.rows < 1 or self.cols < 1:
            raise ConfigError(f"inducing rows and cols must be >= 1, got {self.rows} x {self.cols}")
        if self.flow_hidden is not None and self.flow_hidden < self.rows * self.cols:
            raise ConfigError(f"inducing flow_hidden must be >= rows x cols = {self.rows * self.cols} (an "
                              f"autoregressive network needs it), got {self.flow_hidden}")
        if self.prior_std <= 0 or self.init_q_std <= 0 or self.init_d <= 0:
            raise ConfigError("bayesian_lora prior_std, init_q_std and init_d must be positive")
        if self.max_lambda < 0 or self.max_q_std < 0:
            raise ConfigError("bayesian_lora max_lambda and max_q_std must be >= 0")
        if self.max_lambda > 0 and not 0 < self.init_lambda < self.max_lambda:
            raise ConfigError(f"bayesian_lora init_lambda must lie in (0, max_lambda={self.max_lambda}), "
                              f"got {self.init_lambda}")


def inducing_factor_parameter_count(d_out: int, d_in: int, settings: InducingSettings) -> int:
    """Parameters of one :class:`InducingFactor`: Z_r, Z_c, D_r, D_c, q(u) and lambda."""
    m = settings.rows * settings.cols
    q_scale = m * (m + 1) // 2 if settings.q_inducing == "full" else m
    if settings.q_inducing == "flow":  # MADE layers m -> h -> 2m, weights and biases
        h = settings.flow_hidden or m
        q_scale += m * h + h + h * 2 * m + 2 * m
    return (settings.rows * d_out + settings.cols * d_in + settings.rows + settings.cols + m + q_scale
            + int(settings.learn_lambda))


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class InducingFactor(nn.Module):
    """A d_out x d_in weight drawn from the inducing-weight posterior; see the module docstring."""

    def __init__(self, d_out: int, d_in: int, settings: InducingSettings, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        settings.check()
        self.d_out, self.d_in, self.settings = d_out, d_in, settings
        rows, cols = settings.rows, settings.cols
        self.sigma_p = settings.prior_std / (math.sqrt(d_in) if settings.sqrt_width_scaling else 1.0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device)

        self.z_row = nn.Parameter(randn(rows, d_out) / math.sqrt(rows))
        self.z_col = nn.Parameter(randn(cols, d_in) / math.sqrt(cols))
        raw_d = _inverse_softplus(settings.init_d)
        self.raw_d_row = nn.Parameter(torch.full((rows,), raw_d, device=device))
        self.raw_d_col = nn.Parameter(torch.full((cols,), raw_d, device=device))
        self.q_mean = nn.Parameter(randn(rows, cols))
        m = rows * cols
        raw_std = _inverse_softplus(settings.init_q_std)
        if settings.q_inducing in ("diagonal", "flow"):
            self.q_raw_scale = nn.Parameter(torch.full((rows, cols), raw_std, device=device))
        else:  # full: lower-triangular Cholesky factor, row-major tril entries, softplus on the diagonal
            index = torch.tril_indices(m, m)
            init = torch.where(index[0] == index[1], torch.tensor(raw_std), torch.tensor(0.0))
            self.q_raw_scale = nn.Parameter(init.to(device))
            self.register_buffer("tril_index", index.to(device), persistent=False)
        self.flow = None
        if settings.q_inducing == "flow":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
                self.flow = affine_autoregressive(m, hidden_dims=[settings.flow_hidden or m]).to(device)
        rho = 0.0 if settings.max_lambda == 0 else math.log(settings.init_lambda / (settings.max_lambda
                                                                                     - settings.init_lambda))
        if settings.learn_lambda:
            self.rho = nn.Parameter(torch.tensor(rho, device=device))
        else:
            self.register_buffer("rho", torch.tensor(rho, device=device))

    # ------------------------------------------------------------------ constrained values
    @property
    def lam(self) -> torch.Tensor:
        """lambda = max_lambda * sigmoid(rho)."""
        return self.settings.max_lambda * torch.sigmoid(self.rho)

    def diagonals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_r, D_c) as vectors."""
        return F.softplus(self.raw_d_row), F.softplus(self.raw_d_col)

    def q_scale_tril(self) -> torch.Tensor:
        """Cholesky factor of q(u)'s covariance over row-major vec(u), (M, M)."""
        if self.settings.q_inducing != "full":
            std = F.softplus(self.q_raw_scale).clamp(max=self.settings.max_q_std)
            return torch.diag(std.flatten())
        m = self.settings.rows * self.settings.cols
        values = self.q_raw_scale
        diagonal = self.tril_index[0] == self.tril_index[1]
        values = torch.where(diagonal, F.softplus(values), values)
        tril = values.new_zeros(m, m)
        return tril.index_put((self.tril_index[0], self.tril_index[1]), values)

    def prior_covariances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K_r, K_c) = (Z_r Z_r^T + D_r^2, Z_c Z_c^T + D_c^2)."""
        d_row, d_col = self.diagonals()
        k_row = self.z_row @ self.z_row.T + torch.diag(d_row**2)
        k_col = self.z_col @ self.z_col.T + torch.diag(d_col**2)
        return k_row, k_col

    def whitening(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_r, L_c, R, C): Cholesky factors of K_r, K_c and R = L_r^-1 Z_r, C = L_c^-1 Z_c."""
        k_row, k_col = self.prior_covariances()
        l_row, l_col = _cholesky(k_row), _cholesky(k_col)
        r = torch.linalg.solve_triangular(l_row, self.z_row, upper=False)
        c = torch.linalg.solve_triangular(l_col, self.z_col, upper=False)
        return l_row, l_col, r, c

    # ------------------------------------------------------------------ draws
    def sample_u(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """u ~ q(u), (M_r, M_c), reparameterised."""
        return self._draw_u(generator)[0]

    def mean_u(self) -> torch.Tensor:
        """E_q[u]; for the flow, the image of the base mean."""
        if self.flow is None:
            return self.q_mean
        return self.flow(self.q_mean.flatten()).view_as(self.q_mean)

    def _draw_u(self, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(u, log q(u)); log q only for the flow: log N(z; mu, S) - log |det dT/dz|."""
        eps = torch.randn(self.q_mean.numel(), generator=generator, device=self.q_mean.device,
                          dtype=self.q_mean.dtype)
        tril = self.q_scale_tril()
        z = self.q_mean.flatten() + tril @ eps
        if self.flow is None:
            return z.view_as(self.q_mean), None
        u = self.flow(z)
        std = torch.diagonal(tril)
        log_base = -0.5 * (eps**2).sum() - std.log().sum() - 0.5 * eps.numel() * math.log(2 * math.pi)
        return u.view_as(self.q_mean), log_base - self.flow.log_abs_det_jacobian(z, u)

    def matheron_noise(self, l_row: torch.Tensor, l_col: torch.Tensor, r: torch.Tensor, c: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """eps ~ N(0, Sigma_W), (d_out, d_in), by Matheron's rule from one joint prior draw."""
        rows, cols = self.settings.rows, self.settings.cols
        d_row, d_col = self.diagonals()

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, device=self.z_row.device, dtype=self.z_row.dtype)

        w_prior = randn(self.d_out, self.d_in)
        u_prior = (self.z_row @ w_prior @ self.z_col.T + (self.z_row @ randn(self.d_out, cols)) * d_col
                   + d_row[:, None] * (randn(rows, self.d_in) @ self.z_col.T)
                   + d_row[:, None] * randn(rows, cols) * d_col)
        u_white = torch.linalg.solve_triangular(l_row, u_prior, upper=False)
        u_white = torch.linalg.solve_triangular(l_col, u_white.T, upper=False).T
        return w_prior - r.T @ u_white @ c

    def forward(self, generator: torch.Generator | None = None, stochastic: bool = True) -> torch.Tensor:
        """W = sigma_p (M_W(u) + lambda eps) with u ~ q(u); ``stochastic`` False: u = E_q[u], no eps.

        Always in the parameters' precision (float32): under bf16 autocast K = Z Z^T would be rounded far
        beyond its diagonal jitter and the Cholesky could fail."""
        with torch.autocast(self.z_row.device.type, enabled=False):
            return self._weight(generator, stochastic)

    def _weight(self, generator: torch.Generator | None, stochastic: bool) -> torch.Tensor:
        l_row, l_col, r, c = self.whitening()
        if not stochastic:
            return self.sigma_p * (r.T @ self.mean_u() @ c)
        u = self.sample_u(generator)
        mean = r.T @ u @ c
        if self.settings.max_lambda == 0:
            return self.sigma_p * mean
        return self.sigma_p * (mean + self.lam * self.matheron_noise(l_row, l_col, r, c, generator))

    # ------------------------------------------------------------------ KL terms
    def kl_inducing(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """KL(q(u) || N(0, I)) = 1/2 (tr S + mu^T mu - M - log det S), S = L L^T; for the flow the unbiased
        one-sample estimate log q(u) - log N(u; 0, I) at a fresh draw."""
        if self.flow is not None:
            u, log_q = self._draw_u(generator)
            log_p = -0.5 * (u**2).sum() - 0.5 * u.numel() * math.log(2 * math.pi)
            return log_q - log_p
        tril = self.q_scale_tril()
        diag = torch.diagonal(tril)
        return 0.5 * (tril.pow(2).sum() + self.q_mean.pow(2).sum() - diag.numel() - 2 * diag.log().sum())

    def kl_conditional(self) -> torch.Tensor:
        """KL(N(M, lambda^2 Sigma) || N(M, Sigma)) over d_out d_in entries = d (lambda^2/2 - log lambda - 1/2).

        With ``max_lambda`` 0 the factor is the deterministic conditional mean and the term is left out."""
        if self.settings.max_lambda == 0:
            return self.rho.new_zeros(())
        lam = self.lam
        return self.d_out * self.d_in * (0.5 * lam**2 - lam.log() - 0.5)

    def kl(self) -> torch.Tensor:
        with torch.autocast(self.z_row.device.type, enabled=False):
            return self.kl_inducing() + self.kl_conditional()

    def variational_parameter_count(self) -> int:
        """Parameters of q(u) (and its flow) and lambda; Z and D are the prior's hyperparameters."""
        prior = self.z_row.numel() + self.z_col.numel() + self.raw_d_row.numel() + self.raw_d_col.numel()
        return sum(p.numel() for p in self.parameters()) - prior


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Cholesky factor with a relative jitter on the diagonal (1e-6 x its mean)."""
    jitter = _JITTER * matrix.detach().diagonal().mean()
    return torch.linalg.cholesky(matrix + jitter * torch.eye(matrix.shape[0], device=matrix.device,
                                                               dtype=matrix.dtype))
