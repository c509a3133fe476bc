"""Networks: every registered model runs; the reference layouts match torchvision exactly."""

from __future__ import annotations

import pytest
import torch
import torchvision

from experiments.cost import measure_cost
from models import build_model, list_models

SMALL_OPTIONS = {"mobilenet_v1": {"width": 0.25}, "mobilenet_v2": {"width": 0.35}, "resnet18": {"width": 0.25}, "resnet50": {"width": 0.25}}


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize(("in_channels", "image_size", "num_classes"), [(3, 32, 10), (1, 28, 10), (3, 32, 100)])
def test_every_model_forward_backward(name, in_channels, image_size, num_classes):
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **SMALL_OPTIONS.get(name, {}))
    x = torch.randn(2, in_channels, image_size, image_size)
    y = model(x)
    assert y.shape == (2, num_classes)
    y.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_every_model_at_imagenet_size(name):
    model = build_model(name, num_classes=1000, image_size=224, **SMALL_OPTIONS.get(name, {})).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_stem_follows_input_size():
    small = build_model("resnet18", image_size=32)
    large = build_model("resnet18", image_size=224)
    assert small.stem[0].conv.stride == (1, 1) and small.stem[0].conv.kernel_size == (3, 3)
    assert large.stem[0].conv.stride == (2, 2) and large.stem[0].conv.kernel_size == (7, 7)
    assert build_model("mobilenet_v1", image_size=32).stem.conv.stride == (1, 1)
    assert build_model("mobilenet_v1", image_size=224).stem.conv.stride == (2, 2)


@pytest.mark.parametrize(
    ("name", "documented_params", "documented_gmacs"),
    [("resnet18", 11_689_512, 1.81), ("resnet50", 25_557_032, 4.09), ("mobilenet_v2", 3_504_872, 0.30)],
)
def test_matches_torchvision_exactly(name, documented_params, documented_gmacs):
    """Same parameter shapes and the same multiply-adds as torchvision's model, and its documented figures."""
    ours = build_model(name, num_classes=1000, image_size=224)
    reference = getattr(torchvision.models, name)()
    assert sorted(p.shape for p in ours.parameters()) == sorted(p.shape for p in reference.parameters())
    ours_cost = measure_cost(ours, (1, 3, 224, 224))
    assert ours_cost["params"] == documented_params
    assert ours_cost["macs"] == measure_cost(reference, (1, 3, 224, 224))["macs"]
    assert round(ours_cost["macs"] / 1e9, 2) == documented_gmacs  # torchvision's docs call these "GFLOPS"


def test_block_backbone_differs_only_in_blocks():
    """model=standard|separable|...: same stem and head, same stage output widths and strides."""
    names = ["standard", "depthwise", "pointwise", "separable", "inverted_residual", "bottleneck", "basic"]
    shapes = {}
    for name in names:
        model = build_model(name, image_size=32).eval()
        x = torch.randn(1, 3, 32, 32)
        feats = model.blocks(model.stem(x))
        shapes[name] = (tuple(feats.shape), model.head[-1].in_features, model.stem[0].conv.out_channels)
    assert len(set(shapes.values())) == 1, shapes


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet19'") as info:
        build_model("resnet19")
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mobilenet_v1", {"expansion": 6}, "has no option 'expansion'"),
        ("separable", {"expansion": 6}, "has no option 'expansion'"),
        ("resnet18", {"widht": 0.5}, r"has no option 'widht'; valid: image_size, width, stem, dropout, kernel_size"),
        ("separable", {"bogus": 1}, r"has no option 'bogus'; valid: image_size, width, .*, se_ratio, pointwise_impl$"),
        ("mobilenet_v1", {"wdth": 2}, r"has no option .wdth.; valid: image_size, .*, act, pointwise_impl$"),
        ("mobilenet_v1", {"width": 0.0}, "width=0.0 out of range"),
        ("mobilenet_v2", {"expansion": 30}, "expansion=30 out of range"),
        ("mobilenet_v1", {"block": "grouped"}, "unknown mobilenet_v1 block 'grouped'"),
        ("resnet50", {"image_size": 16, "stem": "large"}, "too small"),
        ("resnet18", {"image_size": 4}, "needs image_size >= 8"),
        ("separable", {"pointwise_impl": "cuda"}, "unknown pointwise_impl 'cuda'"),
    ],
)
def test_bad_model_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, **options)


@pytest.mark.parametrize(("name", "channels_last"), [("mobilenet_v2", False), ("mobilenet_v2", True), ("resnet18", True)])
def test_pointwise_impl_switch_keeps_outputs(name, channels_last):
    """convlab's pointwise_conv2d in place of nn.Conv2d: the same logits, and the same memory format
    through the network (resnet18's stride-2 1x1 shortcuts in channels_last included)."""
    torch.manual_seed(0)
    a = build_model(name, image_size=32, width=0.35).eval()
    # Fresh BatchNorm statistics and a N(0, 0.01) head give logits near 1e-8, which any tolerance
    # would pass: give every norm and the head values of order one.
    for module in a.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.5, 0.5)
        elif isinstance(module, torch.nn.Linear):
            module.weight.data.normal_(0, 1)
    b = build_model(name, image_size=32, width=0.35, pointwise_impl="scratch").eval()
    b.load_state_dict(a.state_dict())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    a, b = a.to(memory_format=memory_format), b.to(memory_format=memory_format)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=memory_format)
    with torch.no_grad():
        want, got = a(x), b(x)
    assert want.abs().max() > 0.1  # logits large enough for the tolerance to mean something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    formats = {}
    for model in (a, b):
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
                 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # fmt: skip
        with torch.no_grad():
            model(x)
        for hook in hooks:
            hook.remove()
        formats[model is b] = seen
    assert formats[True] == formats[False]
