"""Attention kernels for passes that are differentiated (training steps, Laplace curvature and Jacobians).

PyTorch's cuDNN kernel for ``scaled_dot_product_attention`` returns NaN in dL/dQ on H100/H200
(PyTorch 2.11 to at least 2.13; pytorch/pytorch#196678) when all three hold: an explicit mask is
passed, the padded length T satisfies T mod 128 = 64, and some query row has
logsumexp_j(q.k_j / sqrt(d)) < -ln(FLT_MAX) ~ -88.7. A left-padding row attends to nothing,
so its logsumexp is -inf: every padded batch of such a length hits the bug, and one NaN gradient
turns every LoRA parameter into NaN at the next optimiser step. The forward pass is correct, so
prediction without gradients keeps every kernel; passes that are differentiated run without cuDNN,
on the flash, memory-efficient or math kernels, which are exact on the same inputs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch.nn.attention import SDPBackend, sdpa_kernel

DIFFERENTIABLE_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def differentiable_attention() -> AbstractContextManager[None]:
    """Within this context (forward *and* backward), SDPA picks among every kernel except cuDNN's.

    Wrap the backward too: gradient checkpointing recomputes the forward inside it.
    """
    return sdpa_kernel(list(DIFFERENTIABLE_SDPA_BACKENDS))
