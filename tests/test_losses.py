"""Tests of custom.losses: the weighted cross-entropy + generalized Dice loss against plain-torch references."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.losses import GeneralizedDiceLoss

from custom.losses import WeightedCEGeneralizedDiceLoss, batch_class_weights

SPATIAL_SHAPES = {"2d": (7, 6), "3d": (5, 4, 3)}


def make_case(spatial_shape, num_classes=2, batch_size=2, seed=0):
    """Random logits (B, C, spatial) and labels (B, spatial) in which every sample holds every class."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch_size, num_classes, *spatial_shape), generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch_size, *spatial_shape), generator=generator)
    for sample_labels in labels:
        assert all((sample_labels == c).any() for c in range(num_classes))
    return logits, labels


def reference_boundary_map(labels, w0, sigma):
    """1 + w0 exp(-d^2 / 2 sigma^2), d = brute-force distance to the nearest pixel with another label."""
    maps = []
    for sample_labels in labels:
        coordinates = torch.stack(
            torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in sample_labels.shape], indexing="ij"), -1
        ).reshape(-1, sample_labels.dim())
        flat_labels = sample_labels.reshape(-1)
        pairwise = torch.cdist(coordinates, coordinates)
        pairwise[flat_labels[:, None] == flat_labels[None, :]] = math.inf
        distance = pairwise.min(dim=1).values
        maps.append((1 + w0 * torch.exp(-(distance**2) / (2 * sigma**2))).reshape(sample_labels.shape))
    return torch.stack(maps)


def reference_loss(logits, labels, mode, class_weights=None, max_weight=10.0, w0=0.0, sigma=5.0,
                   lambda_ce=1.0, lambda_gdl=1.0):
    """The documented loss written out in plain torch (softmax, square-weighted generalized Dice with background)."""
    num_classes = logits.shape[1]
    probabilities = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    onehot = torch.stack([(labels == c).to(logits.dtype) for c in range(num_classes)], dim=1)
    pixel_ce = -(onehot * probabilities.log()).sum(dim=1)

    if mode == "fixed":
        weights = torch.tensor(class_weights, dtype=logits.dtype)
    else:
        counts = torch.tensor([float((labels == c).sum()) for c in range(num_classes)], dtype=logits.dtype)
        weights = torch.clamp((labels.numel() - counts) / counts, 1 / max_weight, max_weight)
        weights[0] = 1.0
    pixel_weights = weights[labels]
    if w0 > 0:
        pixel_weights = pixel_weights * reference_boundary_map(labels, w0, sigma)
    weighted_ce = (pixel_weights * pixel_ce).sum() / pixel_weights.sum()

    spatial_axes = tuple(range(2, logits.dim()))
    dice_weights = 1 / onehot.sum(dim=spatial_axes) ** 2
    numerator = 2 * (dice_weights * (probabilities * onehot).sum(dim=spatial_axes)).sum(dim=1) + 1e-5
    denominator = (dice_weights * (probabilities + onehot).sum(dim=spatial_axes)).sum(dim=1) + 1e-5
    generalized_dice = (1 - numerator / denominator).mean()
    return lambda_ce * weighted_ce + lambda_gdl * generalized_dice


WEIGHTING_MODES = {
    "fixed": (
        {"ce_weight_mode": "fixed", "ce_class_weights": [0.5, 3.0]},
        {"mode": "fixed", "class_weights": [0.5, 3.0]},
    ),
    "batch": ({"ce_weight_mode": "batch", "ce_max_weight": 10.0}, {"mode": "batch", "max_weight": 10.0}),
    "batch_clipped": ({"ce_weight_mode": "batch", "ce_max_weight": 1.5}, {"mode": "batch", "max_weight": 1.5}),
    "batch_boundary": (
        {"ce_weight_mode": "batch", "boundary_weight": 4.0, "boundary_sigma": 1.5},
        {"mode": "batch", "w0": 4.0, "sigma": 1.5},
    ),
}


@pytest.mark.parametrize("dims", SPATIAL_SHAPES)
@pytest.mark.parametrize("weighting", WEIGHTING_MODES)
def test_matches_plain_torch_reference(dims, weighting):
    loss_kwargs, reference_kwargs = WEIGHTING_MODES[weighting]
    logits, labels = make_case(SPATIAL_SHAPES[dims])
    loss = WeightedCEGeneralizedDiceLoss(include_background=True, lambda_ce=1.0, lambda_gdl=0.7, **loss_kwargs)
    expected = reference_loss(logits, labels, lambda_ce=1.0, lambda_gdl=0.7, **reference_kwargs)
    torch.testing.assert_close(loss(logits, labels[:, None]), expected)


@pytest.mark.parametrize("weighting", ["fixed", "batch_boundary"])
def test_three_classes_match_reference(weighting):
    logits, labels = make_case(SPATIAL_SHAPES["2d"], num_classes=3, seed=3)
    loss_kwargs, reference_kwargs = WEIGHTING_MODES[weighting]
    if weighting == "fixed":
        loss_kwargs = {**loss_kwargs, "ce_class_weights": [0.5, 3.0, 2.0]}
        reference_kwargs = {**reference_kwargs, "class_weights": [0.5, 3.0, 2.0]}
    loss = WeightedCEGeneralizedDiceLoss(**loss_kwargs)
    torch.testing.assert_close(loss(logits, labels[:, None]), reference_loss(logits, labels, **reference_kwargs))


def test_batch_class_weights_formula_and_clip():
    labels = torch.zeros(2, 1, 10, 10)
    labels[0, 0, :2, :2] = 1  # 4 lesion pixels of 200: (200 - 4) / 4 = 49
    onehot = torch.cat([1 - labels, labels], dim=1)
    torch.testing.assert_close(batch_class_weights(onehot, 100.0), torch.tensor([1.0, 49.0], dtype=torch.float64))
    torch.testing.assert_close(batch_class_weights(onehot, 10.0), torch.tensor([1.0, 10.0], dtype=torch.float64))
    empty = torch.cat([torch.ones_like(labels), torch.zeros_like(labels)], dim=1)
    torch.testing.assert_close(batch_class_weights(empty, 10.0), torch.tensor([1.0, 10.0], dtype=torch.float64))
    full = empty.flip(1)
    torch.testing.assert_close(batch_class_weights(full, 10.0), torch.tensor([1.0, 0.1], dtype=torch.float64))


@pytest.mark.parametrize("dims", SPATIAL_SHAPES)
def test_uniform_weights_equal_torch_cross_entropy(dims):
    logits, labels = make_case(SPATIAL_SHAPES[dims], seed=1)
    logits = logits.float()
    for class_weights in (None, [2.0, 2.0]):
        loss = WeightedCEGeneralizedDiceLoss(ce_weight_mode="fixed", ce_class_weights=class_weights, lambda_gdl=0)
        torch.testing.assert_close(loss(logits, labels[:, None]), F.cross_entropy(logits, labels))
    weighted = WeightedCEGeneralizedDiceLoss(ce_weight_mode="fixed", ce_class_weights=[0.3, 4.0], lambda_gdl=0)
    torch.testing.assert_close(
        weighted(logits, labels[:, None]), F.cross_entropy(logits, labels, weight=torch.tensor([0.3, 4.0]))
    )


@pytest.mark.parametrize("w_type", ["square", "simple", "uniform"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("gdl_batch", [True, False])
def test_dice_part_is_monai_generalized_dice(w_type, include_background, gdl_batch):
    logits, labels = make_case(SPATIAL_SHAPES["3d"], seed=2)
    labels[1] = 0  # one sample without lesion exercises MONAI's handling of empty classes
    loss = WeightedCEGeneralizedDiceLoss(
        lambda_ce=0, gdl_w_type=w_type, include_background=include_background, gdl_batch=gdl_batch
    )
    monai_loss = GeneralizedDiceLoss(
        include_background=include_background, to_onehot_y=True, softmax=True, w_type=w_type, batch=gdl_batch
    )
    torch.testing.assert_close(loss(logits, labels[:, None]), monai_loss(logits, labels[:, None]))


@pytest.mark.parametrize("weighting", WEIGHTING_MODES)
@pytest.mark.parametrize("lesion", [0, 1], ids=["all_background", "all_lesion"])
@pytest.mark.parametrize("include_background", [True, False])
def test_single_class_batches_give_finite_loss_and_gradients(weighting, lesion, include_background):
    loss_kwargs, _ = WEIGHTING_MODES[weighting]
    loss = WeightedCEGeneralizedDiceLoss(include_background=include_background, **loss_kwargs)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    value = loss(logits, torch.full((2, 1, 8, 8), float(lesion)))
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_one_sgd_step_reduces_the_loss():
    torch.manual_seed(0)
    network = torch.nn.Conv2d(3, 2, kernel_size=3, padding=1)
    image = torch.randn(4, 3, 16, 16)
    target = (image[:, :1] > 1.0).float()
    loss = WeightedCEGeneralizedDiceLoss(boundary_weight=2.0)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    before = loss(network(image), target)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss(network(image), target)
    assert after < before


@pytest.mark.parametrize("weighting", WEIGHTING_MODES)
def test_one_hot_target_equals_index_target(weighting):
    loss_kwargs, _ = WEIGHTING_MODES[weighting]
    logits, labels = make_case(SPATIAL_SHAPES["2d"], seed=4)
    onehot = F.one_hot(labels, 2).movedim(-1, 1).double()
    index_loss = WeightedCEGeneralizedDiceLoss(to_onehot_y=True, **loss_kwargs)
    onehot_loss = WeightedCEGeneralizedDiceLoss(to_onehot_y=False, **loss_kwargs)
    torch.testing.assert_close(onehot_loss(logits, onehot), index_loss(logits, labels[:, None]))


def test_meta_tensors_are_handled_as_plain_tensors():
    logits, labels = make_case(SPATIAL_SHAPES["2d"], seed=5)
    loss = WeightedCEGeneralizedDiceLoss(boundary_weight=3.0)
    value = loss(MetaTensor(logits), MetaTensor(labels[:, None].float(), affine=torch.eye(4)))
    assert type(value) is torch.Tensor
    torch.testing.assert_close(value, loss(logits, labels[:, None]))


def test_built_from_bundle_config():
    config = json.loads(
        '{"loss": {"_target_": "custom.losses.WeightedCEGeneralizedDiceLoss", "lambda_gdl": 0.5,'
        ' "ce_weight_mode": "batch", "ce_max_weight": 20, "boundary_weight": 2, "gdl_w_type": "simple"}}'
    )
    parser = ConfigParser(config)
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, WeightedCEGeneralizedDiceLoss)
    assert (loss.lambda_gdl, loss.ce_max_weight, loss.boundary_weight) == (0.5, 20.0, 2.0)
    assert loss.generalized_dice.w_type == "simple"

    parser = ConfigParser(config)
    parser["loss#ce_weight_mode"] = "fixed"
    parser["loss#ce_class_weights"] = [1, 5]
    fixed = parser.get_parsed_content("loss")
    assert fixed.ce_weight_mode == "fixed" and fixed.ce_class_weights == (1.0, 5.0)
    logits, labels = make_case(SPATIAL_SHAPES["2d"])
    assert torch.isfinite(fixed(logits, labels[:, None]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ce_weight_mode": "median"}, "ce_weight_mode"),
        ({"lambda_ce": -1.0}, "lambda_ce"),
        ({"lambda_gdl": -0.5}, "lambda_gdl"),
        ({"lambda_ce": 0, "lambda_gdl": 0}, "both 0"),
        ({"ce_class_weights": [1.0, 2.0]}, "ce_class_weights"),
        ({"ce_weight_mode": "fixed", "ce_class_weights": [1.0]}, "ce_class_weights"),
        ({"ce_weight_mode": "fixed", "ce_class_weights": [1.0, 0.0]}, "ce_class_weights"),
        ({"ce_max_weight": 0.5}, "ce_max_weight"),
        ({"boundary_weight": -1.0}, "boundary_weight"),
        ({"boundary_sigma": 0.0}, "boundary_sigma"),
        ({"gdl_w_type": "cubic"}, "gdl_w_type"),
        ({"ce_max_weight": "abc"}, "ce_max_weight must be a number, got 'abc'"),
        ({"lambda_ce": "1"}, "lambda_ce must be a number"),
        ({"boundary_sigma": None}, "boundary_sigma must be a number"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightedCEGeneralizedDiceLoss(**kwargs)


@pytest.mark.parametrize("option", ["to_onehot_y", "softmax", "include_background", "gdl_batch"])
def test_a_switch_given_as_text_is_refused_naming_it(option):
    """`--loss#include_background false` reaches the loss as the string 'false' (Fire), which is truthy: the
    generalized Dice kept the background without a word."""
    parser = ConfigParser()
    parser.read_config(Path(__file__).parents[1] / "bundle" / "configs" / "train.json")
    parser[f"loss#{option}"] = "false"
    with pytest.raises(RuntimeError, match="Failed to instantiate") as failure:  # MONAI's, raised from ours
        parser.get_parsed_content("loss")
    assert isinstance(failure.value.__cause__, ValueError)
    assert f"{option} must be True or False (a bool: --loss#{option} False" in str(failure.value.__cause__)


def test_invalid_inputs_raise():
    logits, labels = make_case(SPATIAL_SHAPES["2d"])
    wrong_count = WeightedCEGeneralizedDiceLoss(ce_weight_mode="fixed", ce_class_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="ce_class_weights has 3 weights"):
        wrong_count(logits, labels[:, None])
    loss = WeightedCEGeneralizedDiceLoss()
    with pytest.raises(ValueError, match="outside"):
        loss(logits, 2 * labels[:, None])
    half = labels[:, None].float()
    half[0, 0, 0, 0] = 0.5
    with pytest.raises(ValueError, match=r"non-integer labels \(e.g. 0.5\)"):
        loss(logits, half)
    with pytest.raises(ValueError, match="to_onehot_y=True"):
        loss(logits, labels)
    with pytest.raises(ValueError, match="C >= 2"):
        loss(logits[:, :1], labels[:, None])
    with pytest.raises(ValueError, match="to_onehot_y=False"):
        WeightedCEGeneralizedDiceLoss(to_onehot_y=False)(logits, labels[:, None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    logits, labels = make_case(SPATIAL_SHAPES["3d"])
    loss = WeightedCEGeneralizedDiceLoss(boundary_weight=3.0)
    on_cuda = loss(logits.cuda(), labels[:, None].cuda())
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), loss(logits, labels[:, None]))
