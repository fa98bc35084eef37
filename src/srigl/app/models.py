"""Image classifiers registered by name, all accepting 1x28x28 and 3x32x32 inputs.

``create_model(name, in_channels, image_size, num_classes, **kwargs)`` builds one;
``list_models()`` names them all; ``@register_model("name")`` adds one.

Every model names its output layer in the class attribute ``classifier_name`` (``"fc"`` for
the MLP and the CNNs, ``"head"`` for the ViT) and its input layer in ``first_layer_name``, so
that a sparsifier can treat them specially (the output layer is never ablated) by name:
``model.get_submodule(model.classifier_name)``.

Construction draws its initial weights from the global RNG; call ``torch.manual_seed``
before ``create_model`` for reproducible weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from srigl.errors import SriglError

__all__ = [
    "LeNet5",
    "MLP",
    "ResNet18",
    "UnknownModelError",
    "ViT",
    "WideResNet",
    "create_model",
    "list_models",
    "register_model",
]


class UnknownModelError(SriglError, ValueError):
    """A model name is not in the registry. The message lists the valid names."""


ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers a model factory under ``name``.

    The factory is called as ``factory(in_channels=..., image_size=..., num_classes=...,
    **kwargs)`` and must return an ``nn.Module`` with ``classifier_name`` and
    ``first_layer_name`` attributes.

    Args:
        name: Registry key, e.g. ``"resnet18"``.

    Returns:
        The decorator, which returns the factory unchanged.

    Raises:
        ValueError: If ``name`` is already registered.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, **kwargs: object
) -> nn.Module:
    """Build a registered model for ``(in_channels, image_size, image_size)`` inputs.

    Args:
        name: Registry key, see ``list_models()``.
        in_channels: Channels of the input images.
        image_size: Height and width of the square input images.
        num_classes: Outputs of the classifier layer.
        **kwargs: Model-specific options (``width`` for resnet18, ``depth`` and
            ``widen_factor`` for wrn-22-2, ``dim``/``depth``/``heads``/... for vit-tiny).

    Returns:
        The model, in training mode, initialised from the global RNG.

    Raises:
        UnknownModelError: If ``name`` is not registered; the message lists valid names.
    """
    try:
        factory = _MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None
    return factory(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **kwargs)


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ValueError(f"{key} must be positive, got {value}")


def _init_cnn(module: nn.Module) -> None:
    """He initialisation for ReLU convolutions; BatchNorm as identity; Linear left at torch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# MLP: LeNet-300-100
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened image (LeNet-300-100 by default).

    Layers are ``fc1``, ``fc2``, ... for the hidden layers and ``fc`` for the classifier.
    """

    classifier_name = "fc"
    first_layer_name = "fc1"

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (300, 100)) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        self.hidden = len(hidden)
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"fc{i}", nn.Linear(fan_in, fan_out))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (B, C, H, W) -> (B, C*H*W)
        for i in range(1, self.hidden + 1):
            x = torch.relu(getattr(self, f"fc{i}")(x))
        return self.fc(x)


@register_model("mlp")
def mlp(in_channels: int, image_size: int, num_classes: int, hidden: Sequence[int] = (300, 100)) -> MLP:
    """LeNet-300-100: flatten -> 300 -> 100 -> classes, ReLU (266,610 weights for MNIST)."""
    return MLP(in_channels * image_size * image_size, num_classes, hidden)


# ---------------------------------------------------------------------------------------------
# LeNet-5
# ---------------------------------------------------------------------------------------------


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling: conv 6@5x5 (pad 2) -> pool -> conv 16@5x5 -> pool ->
    fc 120 -> fc 84 -> fc classes. Layers ``conv1, conv2, fc1, fc2, fc``."""

    classifier_name = "fc"
    first_layer_name = "conv1"

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        # 28 -> conv1 28 -> pool 14 -> conv2 10 -> pool 5; 32 -> 32 -> 16 -> 12 -> 6.
        side = (image_size // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet5 needs images of at least 12x12, got {image_size}x{image_size}")
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2)
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 6, S/2, S/2)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 16, side, side)
        x = x.flatten(1)  # (B, 16 * side * side)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc(x)


@register_model("lenet5")
def lenet5(in_channels: int, image_size: int, num_classes: int) -> LeNet5:
    """LeNet-5 (conv 6-16, fc 120-84), flatten size computed from ``image_size``."""
    return LeNet5(in_channels, image_size, num_classes)


# ---------------------------------------------------------------------------------------------
# ResNet-18, CIFAR variant
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stem, no max pool, BasicBlocks [2, 2, 2, 2] with
    ``64, 128, 256, 512`` channels times ``width``, global average pool, ``fc``.

    The stem is ``conv1``; stages are ``layer1`` .. ``layer4``.
    """

    classifier_name = "fc"
    first_layer_name = "conv1"

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        _check_positive(width=width)
        channels = [max(1, round(64 * width * 2**i)) for i in range(4)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        stages = []
        in_planes = channels[0]
        for i, planes in enumerate(channels):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, 64w, S, S)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512w, S/8, S/8)
        x = self.pool(x).flatten(1)  # (B, 512w, 1, 1) -> (B, 512w)
        return self.fc(x)


@register_model("resnet18")
def resnet18(in_channels: int, image_size: int, num_classes: int, width: float = 1.0) -> ResNet18:
    """CIFAR ResNet-18 (11.17M parameters at ``width=1`` for 10 classes); ``width`` scales channels."""
    del image_size  # global average pooling makes the network size-agnostic
    return ResNet18(in_channels, num_classes, width)


# ---------------------------------------------------------------------------------------------
# Wide ResNet
# ---------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus a shortcut.

    When the shape changes, the 1x1 projection shortcut reads the pre-activated input, as in
    Zagoruyko & Komodakis (2016).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k: conv 16 -> three groups of ``(depth - 4) / 6`` wide blocks with
    ``16k, 32k, 64k`` channels (strides 1, 2, 2) -> BN-ReLU -> average pool -> ``fc``."""

    classifier_name = "fc"
    first_layer_name = "conv1"

    def __init__(
        self, in_channels: int, num_classes: int, depth: int = 22, widen_factor: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        _check_positive(widen_factor=widen_factor)
        blocks_per_group = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        groups = []
        in_planes = channels[0]
        for i, planes in enumerate(channels[1:]):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(blocks_per_group):
                blocks.append(WideBasicBlock(in_planes, planes, stride if j == 0 else 1, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (B, 16, S, S)
        x = self.block3(self.block2(self.block1(x)))  # (B, 64k, S/4, S/4)
        x = torch.relu(self.bn(x))
        x = self.pool(x).flatten(1)  # (B, 64k, 1, 1) -> (B, 64k)
        return self.fc(x)


@register_model("wrn-22-2")
def wrn_22_2(
    in_channels: int,
    image_size: int,
    num_classes: int,
    depth: int = 22,
    widen_factor: int = 2,
    dropout: float = 0.0,
) -> WideResNet:
    """Wide ResNet 22-2 by default; ``depth`` (6n + 4) and ``widen_factor`` are options."""
    del image_size  # global average pooling makes the network size-agnostic
    return WideResNet(in_channels, num_classes, depth, widen_factor, dropout)


# ---------------------------------------------------------------------------------------------
# Vision Transformer
# ---------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, MLP Linear-GELU-Linear."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)  # (B, T, D)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer: conv patch embedding, class token, learned position embedding,
    pre-norm blocks, final LayerNorm, and a linear ``head`` on the class token.

    The patch embedding is ``patch_embed`` (a Conv2d with kernel = stride = ``patch_size``).
    """

    classifier_name = "head"
    first_layer_name = "patch_embed"

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive(patch_size=patch_size, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim)
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if dim % heads != 0:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_dim, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The usual ViT recipe: small truncated-normal embeddings and linear weights, zero
        # biases, LayerNorm as identity; the patch embedding is initialised like a linear layer
        # on the flattened patch.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        weight = self.patch_embed.weight  # (D, C, P, P)
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # (D, C*P*P)
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)  # (3D, D)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (B, T, D), T = (S/P)^2 patches in row-major order
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, T + 1, D)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # class token (B, D) -> (B, classes)


@register_model("vit-tiny")
def vit_tiny(
    in_channels: int,
    image_size: int,
    num_classes: int,
    patch_size: int = 4,
    dim: int = 128,
    depth: int = 4,
    heads: int = 4,
    mlp_dim: int = 256,
    dropout: float = 0.0,
) -> ViT:
    """A small ViT that trains on a CPU: 4x4 patches (7x7 of them at 28, 8x8 at 32), dim 128,
    4 blocks of 4 heads, MLP 256 (about 0.54M parameters)."""
    return ViT(in_channels, image_size, num_classes, patch_size, dim, depth, heads, mlp_dim, dropout)



@register_model("vit-b16")
def vit_b16(
    in_channels: int,
    image_size: int,
    num_classes: int,
    patch_size: int = 16,
    dim: int = 768,
    depth: int = 12,
    heads: int = 12,
    mlp_dim: int = 3072,
    dropout: float = 0.0,
) -> ViT:
    """ViT-B/16 at its real size (about 86M parameters at 224): 16x16 patches, dim 768,
    12 blocks of 12 heads, MLP 3072. The image size must be a multiple of ``patch_size``."""
    return ViT(in_channels, image_size, num_classes, patch_size, dim, depth, heads, mlp_dim, dropout)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, each conv-BN, with an identity or
    1x1 conv-BN projection shortcut (the torchvision "ResNet v1.5" layout)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    """ImageNet ResNet-50: 7x7 stride-2 stem and 3x3 stride-2 max pool, Bottlenecks [3, 4, 6, 3]
    with ``64, 128, 256, 512`` (times ``width``) inner channels expanded 4x, global average pool, ``fc``."""

    classifier_name = "fc"
    first_layer_name = "conv1"

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        _check_positive(width=width)
        channels = [max(1, round(64 * width * 2**i)) for i in range(4)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        in_planes = channels[0]
        for i, (planes, blocks) in enumerate(zip(channels, (3, 4, 6, 3))):
            stride = 1 if i == 0 else 2
            stage = [Bottleneck(in_planes, planes, stride)]
            stage += [Bottleneck(planes * 4, planes, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))  # (B, 64w, S/4, S/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048w, S/32, S/32)
        x = self.pool(x).flatten(1)  # (B, 2048w, 1, 1) -> (B, 2048w)
        return self.fc(x)


@register_model("resnet50")
def resnet50(in_channels: int, image_size: int, num_classes: int, width: float = 1.0) -> ResNet50:
    """ImageNet ResNet-50 (25.56M parameters at ``width=1`` for 1000 classes, meant for 224x224);
    ``width`` scales channels."""
    del image_size  # global average pooling makes the network size-agnostic
    return ResNet50(in_channels, num_classes, width)
