"""fedseg's "grouped" per-sample-gradient mode: faster Opacus samplers for convolutions and PReLU.

Opacus computes per-sample gradients with one sampler per layer type (its hooks mode); this
module gives a model made private in the ``GROUPED`` mode its own sampler table, where
convolutions (1-3d, transposed too) use one grouped ``convolution_backward`` per layer and PReLU
a closed form. Shapes: activations (B, C_in, *spatial), backprops (B, C_out, *spatial'),
per-sample gradients (B, *parameter.shape). Clipping, noise and accounting stay Opacus's
(``site_app.privacy``).
"""

from __future__ import annotations

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from torch import nn

from jobs.spec import GradSampleMode

__all__ = ["GROUPED", "wrap_private"]

GROUPED = GradSampleMode.GROUPED
"""fedseg's per-sample-gradient mode: Opacus's hooks mode with the samplers below for
convolutions and PReLU (measured in benchmarks/dp_overhead.py; docs/performance.md)."""


def _fold_batch_into_channels(tensor: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (1, B*C, *spatial), channel b*C + c = sample b's channel c.

    A channels-last input stays channels-last (one copy, like the layer's own kernels); a
    contiguous one is a free view.
    """
    if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        batch, channels, *spatial = tensor.shape
        # Physical (B, D, H, W, C) -> (D, H, W, B, C), then view the last two axes as one.
        folded = tensor.permute(2, 3, 4, 0, 1).contiguous().view(*spatial, batch * channels)
        return folded.permute(3, 0, 1, 2).unsqueeze(0)
    return tensor.reshape(1, -1, *tensor.shape[2:])


def _conv_per_sample_grads(
    layer: nn.modules.conv._ConvNd, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample weight (B, *weight.shape) and bias (B, C_out) gradients of a (transposed) conv.

    ``activations[0]`` is the layer's input (B, C_in, *spatial), ``backprops`` the loss
    gradient at its output (B, C_out, *spatial'), scaled by Opacus to one sample's loss. One
    grouped ``convolution_backward`` call computes every sample's weight gradient and nothing
    else: the batch is folded into the channel axis (B samples = B groups), so sample b's
    gradient is built from sample b's tensors alone. Opacus's own conv sampler unfolds k³
    patches (im2col); its functorch fallback re-runs each layer's forward pass.
    """
    activation = activations[0].to(backprops.dtype)
    batch = activation.shape[0]
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    weight = layer.weight
    if weight.requires_grad:
        if batch == 0:
            grads[weight] = weight.new_zeros((0, *weight.shape))
        else:
            spatial_dims = activation.dim() - 2
            folded_weight = weight.detach().repeat(batch, *([1] * (weight.dim() - 1)))
            if weight.dim() == 5 and activation.is_contiguous(memory_format=torch.channels_last_3d):
                folded_weight = folded_weight.contiguous(memory_format=torch.channels_last_3d)
            _, grad_weight, _ = torch.ops.aten.convolution_backward(
                _fold_batch_into_channels(backprops),
                _fold_batch_into_channels(activation),
                folded_weight,  # only its shape (B x the weight's first axis) is read
                None,
                layer.stride,
                layer.padding,
                layer.dilation,
                transposed,
                layer.output_padding if transposed else (0,) * spatial_dims,
                layer.groups * batch,
                (False, True, False),
            )
            grads[weight] = grad_weight.reshape(batch, *weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=tuple(range(2, backprops.dim())))
    return grads


def _prelu_per_sample_grads(
    layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient (B, *weight.shape) of PReLU's slope a in max(0, x) + a * min(0, x).

    d loss_b / d a = sum of min(0, x) * backprop over sample b's positions (one shared a) or
    over each channel's positions (one a per channel, channel axis 1).
    """
    activation = activations[0].to(backprops.dtype)
    contribution = torch.clamp(activation, max=0) * backprops
    if layer.weight.numel() == 1:
        grad = contribution.flatten(1).sum(1).view(-1, *layer.weight.shape)
    else:
        grad = contribution.flatten(2).sum(2)
    return {layer.weight: grad}


def _grouped_sampler(layer: nn.Module, activations, backprops):
    """fedseg's sampler where it applies; Opacus's own sampler (or functorch) elsewhere."""
    if isinstance(layer, nn.PReLU):
        return _prelu_per_sample_grads(layer, activations, backprops)
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        # Padding computed at call time (or non-zero padding) is not what the formula assumes.
        from opacus.grad_sample.functorch import ft_compute_per_sample_gradient

        fallback = GradSampleModule.GRAD_SAMPLERS.get(type(layer), ft_compute_per_sample_gradient)
        return fallback(layer, activations, backprops)
    return _conv_per_sample_grads(layer, activations, backprops)


_GROUPED_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.PReLU,
)


def wrap_private(engine: PrivacyEngine, *, grad_sample_mode: GradSampleMode, **make_private_args):
    """``engine.make_private`` for an Opacus mode or for fedseg's ``GROUPED`` mode.

    GROUPED runs Opacus's "hooks" mode and gives the returned GradSampleModule its own sampler
    table (Opacus looks the table up on the module at each backward pass), so only this model
    uses fedseg's samplers; Opacus's global registry is left as it is. Returns what
    ``make_private`` returns for the Opacus mode run.
    """
    opacus_mode = "hooks" if grad_sample_mode == GROUPED else grad_sample_mode
    wrapped = engine.make_private(grad_sample_mode=opacus_mode, **make_private_args)
    if grad_sample_mode == GROUPED:
        module = wrapped[0]
        module.GRAD_SAMPLERS = {
            **GradSampleModule.GRAD_SAMPLERS,
            **dict.fromkeys(_GROUPED_LAYERS, _grouped_sampler),
        }
    return wrapped
