from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from trainable.model import BasicBlock, build_model

SUMMARY = Path(__file__).parent / "fixtures" / "era_s11_summary.txt"  # from the seed README


def summary_rows(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """(layer type, output shape, parameters) per call of each leaf module and block, in the
    order the calls finish, as torchsummary lists them."""
    rows, hooks = [], []

    def record(module, _inputs, output):
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, BasicBlock):
            params = 0  # torchsummary counts a block's parameters on its layers only
        name = "Block" if isinstance(module, BasicBlock) else type(module).__name__
        rows.append((name, (-1, *output.shape[1:]), params))

    for module in model.modules():
        # torchsummary skips containers: the empty Sequential of an identity shortcut too.
        if isinstance(module, nn.Sequential) or module is model:
            continue
        if isinstance(module, BasicBlock) or not list(module.children()):
            hooks.append(module.register_forward_hook(record))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return rows


def seed_rows() -> list[tuple[str, tuple[int, ...], int]]:
    pattern = re.compile(r"^\s*(\w+)-\d+\s+\[([-\d, ]+)\]\s+([\d,]+)$")
    rows = []
    for line in SUMMARY.read_text().splitlines():
        match = pattern.match(line)
        if match:
            shape = tuple(int(v) for v in match[2].split(","))
            rows.append((match[1], shape, int(match[3].replace(",", ""))))
    return rows


def test_era_model_matches_the_seed_summary_row_by_row():
    expected = seed_rows()
    assert len(expected) == 68
    actual = summary_rows(build_model("resnet18_era"))
    for i, (want, got) in enumerate(zip(expected, actual, strict=True), start=1):
        assert got == want, f"row {i}: expected {want}, got {got}"


@pytest.mark.parametrize("name", ["resnet18", "resnet18_era"])
def test_parameter_count_logits_and_gradcam_layer(name):
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert isinstance(model.layer4[-1], BasicBlock)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_standard_resnet18_stages_are_at_32_16_8_4_pixels():
    model = build_model("resnet18")
    sizes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:])))
    model(torch.zeros(1, 3, 32, 32))
    assert sizes == {"layer1": (64, 32, 32), "layer2": (128, 16, 16),
                     "layer3": (256, 8, 8), "layer4": (512, 4, 4)}
    assert isinstance(model.head, nn.Linear)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        build_model("resnet50")
