"""Library models by name: any torchvision classification model, or any timm model.

``torchvision_model(input_shape, num_classes, name=...)`` and ``timm_model(...)`` follow the
signature of every distillab architecture and return a plain ``nn.Module`` that maps a batch of
``input_shape`` images to ``num_classes`` logits. The library model is adapted to the data:

* **classes**: without pretrained weights the model is built with ``num_classes`` outputs;
  with them, the pretrained classifier (the last layer with one output per ImageNet class) is
  replaced by a freshly initialised one with ``num_classes`` outputs, unless the counts match.
  timm does both itself (``create_model(num_classes=...)``).
* **input channels**: the first convolution (the stem) is rebuilt for the data's channel count.
  With pretrained weights and **1 channel** the three RGB filters of every output channel are
  **summed**, so a grey image gives exactly the activations the RGB model gives on that image
  copied into all three channels. Other counts tile the RGB filters over the channels and scale
  them by ``3 / channels``, which keeps the activation scale. Without pretrained weights the
  library's own initialisation of the RGB filters is tiled (or cut) the same way, unscaled.
  timm does this adaptation itself (``create_model(in_chans=...)``, which also sums RGB
  filters for one channel). Pretrained weights expect images normalised as in their training
  data (ImageNet statistics); distillab normalises each dataset with its own statistics.
* **small inputs**: most models accept small images because they end in adaptive pooling
  (torchvision ResNet/ResNeXt/Wide-ResNet, MobileNet, EfficientNet, ShuffleNet, MNASNet,
  RegNet, Swin: 8×8 digits work as they are). Models whose downsampling would shrink the map
  below one pixel, or which need one fixed size, get their input **bilinearly upsampled** to
  the smallest of ``PROBE_SIZES`` at which the model runs, by a forward pre-hook on the
  returned module, so module paths for feature hooks are unchanged (``model.input_size`` is
  that size, ``None`` when inputs are used as they are). Smallest square input each
  torchvision model accepts, and the size an 8×8 input is upsampled to: GoogLeNet 15 (16),
  SqueezeNet 1.1 17 and 1.0 21 (32), DenseNet 29 (32), VGG and ConvNeXt 32 (32), AlexNet 63
  (64), Inception-v3 75 (96), MaxViT 221 (224), ViT exactly 224 (224; larger inputs are
  rejected). The size is found once per model by forward passes on the ``meta`` device
  (shapes only, no compute). Upsampling costs compute, which the measured MACs include.

Pretrained weights (``pretrained: true``, or ``weights: <name>`` for torchvision) are loaded by
the libraries' own code (torchvision ``get_model(weights=...)``, timm
``create_model(pretrained=True)``), which downloads them once into its cache:
``torch.hub.get_dir()/checkpoints`` for torchvision (``$TORCH_HOME``, default
``~/.cache/torch/hub``) and the Hugging Face hub cache for timm (``$HF_HUB_CACHE``; timm
weights without a hub id use the torch cache). Without network and without the file in the
cache the build fails with one line naming the weights, the folder and the fixes. timm retries
a failed download several times; ``HF_HUB_OFFLINE=1`` makes it fail at once.

timm is optional: ``pip install -e ".[timm]"``.

Every user error is a :class:`~distillab.settings.ConfigError` whose one-line message starts with
``<option>=<value>:``, so a run reports it as ``student.<option>=<value>: ...``.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from distillab.settings import ConfigError, checked

log = logging.getLogger(__name__)

#: Input sizes tried, smallest first, when a model does not run at the data's own size.
PROBE_SIZES = (16, 32, 64, 96, 128, 160, 192, 224, 256, 299, 320, 384, 448, 512)
#: torchvision models whose auxiliary classifiers would change the training-mode output.
_AUX_MODELS = ("googlenet", "inception_v3")
#: Module paths of auxiliary classifiers, removed so the model returns plain logits.
_AUX_MODULES = ("AuxLogits", "aux1", "aux2")


# -- helpers shared by both libraries -----------------------------------------------------------
def _image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            f"name={name}: library models need image inputs (channels, height, width), got input_shape={list(shape)}"
        )
    return shape  # type: ignore[return-value]


def _unknown_name(name: str, library: str, known: list[str]) -> ConfigError:
    # names that extend the given one ("vit_tiny" -> "vit_tiny_patch16_224"), then look-alikes
    near = sorted((k for k in known if k.startswith(name)), key=len)[:5]
    near += [k for k in difflib.get_close_matches(name, known, n=5, cutoff=0.5) if k not in near][: 5 - len(near)]
    hint = f"did you mean {', '.join(near)}?" if near else f"e.g. {', '.join(known[:5])}"
    return ConfigError(f"name={name}: not a {library} model; {hint} ({len(known)} names in all)")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_download_error(error: BaseException) -> bool:
    """A network failure (DNS, refused, timeout, HTTP) raised by urllib, httpx or the HF hub."""
    seen: BaseException | None = error
    while seen is not None:
        package = type(seen).__module__.split(".")[0]
        if isinstance(seen, OSError) or package in ("urllib", "urllib3", "httpx", "requests", "huggingface_hub"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _UpsampleInput:
    """Forward pre-hook: bilinearly upsample images smaller than ``size`` (height, width)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        height, width = x.shape[-2:]
        if height >= self.size[0] and width >= self.size[1]:
            return args
        target = (max(height, self.size[0]), max(width, self.size[1]))
        return (F.interpolate(x, size=target, mode="bilinear", align_corners=False), *args[1:])


def _runs_at(model: nn.Module, shape: tuple[int, int, int]) -> BaseException | None:
    """``None`` if ``model`` accepts a batch of ``shape`` images, else the error it raised.

    The forward pass runs on the ``meta`` device (only shapes are computed); a model that keeps
    tensors outside its parameters and buffers is probed on the CPU instead.
    """
    was_training = model.training
    model.eval()
    try:
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        state = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
        try:
            with torch.no_grad():
                torch.func.functional_call(model, state, (torch.zeros(1, *shape, device="meta"),))
            return None
        except NotImplementedError:
            pass  # an operation without a meta kernel: probe on the real device
        except Exception as error:  # noqa: BLE001 - whatever the model raises means "does not fit"
            if not (isinstance(error, RuntimeError) and ("meta" in str(error) or "device" in str(error))):
                return error
        try:
            device = next(model.parameters()).device
            with torch.no_grad():
                model(torch.zeros(1, *shape, device=device))
            return None
        except Exception as error:  # noqa: BLE001 - whatever the model raises means "does not fit"
            return error
    finally:
        model.train(was_training)


def _fit_input_size(model: nn.Module, name: str, shape: tuple[int, int, int]) -> nn.Module:
    """Make ``model`` accept ``shape`` images, upsampling them if the model needs larger ones."""
    error = _runs_at(model, shape)
    model.input_size = None
    if error is None:
        return model
    channels, height, width = shape
    for size in PROBE_SIZES:
        target = (max(height, size), max(width, size))
        if target == (height, width):
            continue
        if _runs_at(model, (channels, *target)) is None:
            model.input_size = target
            model.register_forward_pre_hook(_UpsampleInput(target))
            log.info(
                "%s: inputs of %d×%d are upsampled to %d×%d, the smallest size it accepts", name, height, width, *target
            )
            return model
    raise ConfigError(
        f"name={name}: does not accept {channels}×{height}×{width} inputs, nor upsampled ones up to "
        f"{PROBE_SIZES[-1]}×{PROBE_SIZES[-1]} ({_one_line(error)})"
    )


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _adapt_first_conv(model: nn.Module, name: str, channels: int, pretrained: bool) -> None:
    """Rebuild the stem (the first 3-channel ``Conv2d``) for ``channels`` input channels."""
    found = next(
        ((path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None
    )
    if found is None:
        raise ConfigError(f"name={name}: has no 3-channel input convolution to adapt to {channels} channels")
    path, conv = found
    rgb = conv.weight.detach()
    if pretrained and channels == 1:
        weight = rgb.sum(dim=1, keepdim=True)
    else:
        weight = rgb.repeat(1, (channels + 2) // 3, 1, 1)[:, :channels]
        if pretrained:
            weight = weight * (3 / channels)
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach())
    _set_module(model, path, new)
    if getattr(model, "transform_input", False):  # Inception/GoogLeNet re-normalise 3 RGB channels
        model.transform_input = False


def _replace_classifier(model: nn.Module, name: str, old_classes: int, num_classes: int) -> None:
    """Swap the last layer with ``old_classes`` outputs for a new one with ``num_classes``."""
    heads = [
        (path, m)
        for path, m in model.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == old_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == old_classes and m.kernel_size == (1, 1))
    ]
    if not heads:
        raise ConfigError(f"name={name}: has no classifier layer with {old_classes} outputs to give {num_classes}")
    path, head = heads[-1]
    if isinstance(head, nn.Linear):
        new: nn.Module = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    else:
        new = nn.Conv2d(head.in_channels, num_classes, 1, bias=head.bias is not None)
    _set_module(model, path, new)


def _drop_aux_classifiers(model: nn.Module) -> None:
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in _AUX_MODULES:
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)


def _missing_weights(key: str, what: str, where: str, source: str, fix: str, error: BaseException) -> ConfigError:
    reason = _one_line(error)
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return ConfigError(
        f"{key}: cannot load the pretrained weights {what}: they are not in the cache {where} and downloading "
        f"them from {source} failed ({reason}); run once with network access, or {fix}, or set pretrained=false"
    )


# -- torchvision -----------------------------------------------------------------------------
def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models (``torchvision.models.list_models``)."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_weights(name: str, weights: str | None):
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    if weights is None:
        return enum.DEFAULT
    member = str(weights).rsplit(".", 1)[-1]  # "ResNet18_Weights.IMAGENET1K_V1" or "IMAGENET1K_V1"
    try:
        return enum[member]
    except KeyError:
        names = ", ".join(enum.__members__)
        raise ConfigError(f"weights={weights}: not a weight set of torchvision {name}; allowed: {names}") from None


@checked
def torchvision_model(
    input_shape: Sequence[int],
    num_classes: int,
    name: str,
    pretrained: bool,
    weights: str | None,
) -> nn.Module:
    """A torchvision classification model by ``name``, adapted to the data (see the module doc).

    ``pretrained=True`` loads the model's default weights; ``weights`` names another set of
    them (e.g. ``IMAGENET1K_V2``, see ``torchvision.models.get_model_weights(name)``) and
    implies ``pretrained``.
    """
    from torchvision.models import get_model

    channels, height, width = _image_shape(name, input_shape)
    known = torchvision_classifiers()
    if name not in known:
        raise _unknown_name(name, "torchvision classification", known)
    if weights is None and not pretrained:
        extra = {"aux_logits": False, "init_weights": True} if name in _AUX_MODELS else {}
        model = get_model(name, num_classes=num_classes, **extra)
    else:
        chosen = _torchvision_weights(name, weights)
        key = f"weights={weights}" if weights is not None else "pretrained=true"
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        filename = os.path.basename(urlparse(chosen.url).path)
        try:
            model = get_model(name, weights=chosen, progress=False)
        except Exception as error:
            if os.path.isfile(os.path.join(folder, filename)):
                raise ConfigError(
                    f"{key}: the cached weights {os.path.join(folder, filename)} could not be loaded "
                    f"({_one_line(error)}); delete the file to download it again"
                ) from None
            if _is_download_error(error):
                raise _missing_weights(
                    key,
                    f"{chosen} of torchvision {name}",
                    os.path.join(folder, filename),
                    chosen.url,
                    f"put {filename} in {folder}",
                    error,
                ) from None
            raise
        _drop_aux_classifiers(model)
        categories = len(chosen.meta["categories"])
        if num_classes != categories:
            _replace_classifier(model, name, categories, num_classes)
    if channels != 3:
        _adapt_first_conv(model, name, channels, pretrained=weights is not None or pretrained)
    return _fit_input_size(model, name, (channels, height, width))


# -- timm ------------------------------------------------------------------------------------
def _import_timm(name: str):
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f'name={name}: timm models need the optional timm package, which is not installed: pip install -e ".[timm]"'
        ) from None
    return timm


def _timm_cache(timm, name: str) -> tuple[str, str, str]:
    """(where, source, fix): where timm looks for ``name``'s default weights, and how to put them there."""
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id:
        from huggingface_hub import constants

        cache, folder = constants.HF_HUB_CACHE, "models--" + hub_id.replace("/", "--")
        fix = f"copy {folder} from a Hugging Face hub cache that has it (hf download {hub_id}) into {cache}"
        return os.path.join(cache, folder), f"https://huggingface.co/{hub_id}", fix
    url = getattr(cfg, "url", None) or ""
    folder, filename = os.path.join(torch.hub.get_dir(), "checkpoints"), os.path.basename(urlparse(url).path)
    return os.path.join(folder, filename), url, f"put {filename} in {folder}"


@checked
def timm_model(
    input_shape: Sequence[int],
    num_classes: int,
    name: str,
    pretrained: bool,
) -> nn.Module:
    """A timm model by ``name`` (``timm.list_models()``; a weight tag like ``resnet18.a1_in1k``
    picks pretrained weights), built by ``timm.create_model`` with ``num_classes`` and
    ``in_chans`` and adapted to small inputs (see the module doc)."""
    timm = _import_timm(name)
    channels, height, width = _image_shape(name, input_shape)
    if not timm.is_model(name):
        raise _unknown_name(name, "timm", timm.list_models())
    try:
        model = timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, in_chans=channels)
    except Exception as error:
        if not (pretrained and _is_download_error(error)):
            raise
        where, source, fix = _timm_cache(timm, name)
        raise _missing_weights("pretrained=true", f"of timm {name}", where, source, fix, error) from None
    return _fit_input_size(model, name, (channels, height, width))


__all__ = ["PROBE_SIZES", "timm_model", "torchvision_classifiers", "torchvision_model"]
