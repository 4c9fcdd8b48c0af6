"""Extra input channels: slice context (``AdjacentSlices``) and the config keys that add channels to the network
input, ``contralateral_channels`` and ``adjacent_slices``, in training, validation and inference alike."""

import pytest
import torch
from monai.data import MetaTensor

from custom.transforms import AdjacentSlices, AdjacentSlicesd


def _numbered_volume(channels: int = 2, size: int = 4, slices: int = 5) -> torch.Tensor:
    """(C, H, W, D) whose every voxel holds 10 x channel + slice, so each value names where it came from."""
    values = 10.0 * torch.arange(channels)[:, None] + torch.arange(slices)[None, :]
    return values[:, None, None, :].expand(channels, size, size, slices).clone()


@pytest.mark.parametrize("neighbours", [1, 2])
def test_adjacent_slices_stack_the_neighbours_and_repeat_the_slab_ends(neighbours):
    volume = _numbered_volume()
    out = AdjacentSlices(neighbours)(volume)
    assert out.shape == (2 * (2 * neighbours + 1), 4, 4, 5) and out.dtype == torch.float32
    for block, offset in enumerate(range(-neighbours, neighbours + 1)):
        for channel in range(2):
            expected = [10.0 * channel + min(max(k + offset, 0), 4) for k in range(5)]
            assert out[2 * block + channel, 0, 0].tolist() == expected
    assert torch.equal(out[2 * neighbours: 2 * neighbours + 2], volume)  # the middle block is the input


def test_adjacent_slices_of_a_one_slice_slab_repeat_it():
    volume = torch.rand(5, 8, 8, 1)
    assert torch.equal(AdjacentSlices(1)(volume), volume.repeat(3, 1, 1, 1))


def test_adjacent_slices_keep_the_metadata_and_the_other_keys():
    image = MetaTensor(_numbered_volume(), meta={"filename_or_obj": "case_1.nii.gz"})
    out = AdjacentSlicesd("image", neighbours=1)({"image": image, "label": 7})
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "case_1.nii.gz"
    assert out["image"].shape[0] == 6 and out["label"] == 7


@pytest.mark.parametrize("neighbours", [0, -1, 1.5, True, "1"])
def test_adjacent_slices_refuse_a_bad_count(neighbours):
    with pytest.raises(ValueError, match="neighbours"):
        AdjacentSlices(neighbours)


def test_adjacent_slices_refuse_a_2d_image():
    with pytest.raises(ValueError, match=r"\(C, H, W, D\)"):
        AdjacentSlices(1)(torch.zeros(5, 8, 8))


@pytest.mark.parametrize(
    "contralateral, adjacent, channels",
    [(None, 0, 5), ("difference", 0, 10), ("mirror", 0, 10), (None, 1, 15), ("difference", 1, 30)],
)
def test_channel_keys_feed_training_validation_and_inference(tiny_phantom_dataset, contralateral, adjacent, channels):
    """``contralateral_channels`` and ``adjacent_slices`` of train.json and inference.json: the network takes
    5 x (2 with hemisphere channels) x (2n + 1 with n adjacent slices) channels, validation and inference feed it
    as many, and both transforms sit before the first random transform, so CacheDataset runs them once per case
    (a nested ``Compose`` is ``Randomizable`` and would end the cached part there); the slice context comes
    last, so it also stacks the neighbours' hemisphere channels."""
    from conftest import CONFIGS
    from monai.bundle import ConfigParser
    from monai.transforms import RandomizableTrait, Transform

    from custom.symmetry import ContralateralChannelsd

    keys = {"device": "cpu", "contralateral_channels": contralateral, "adjacent_slices": adjacent}
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    for key, value in {**keys, "dataset_dir": str(tiny_phantom_dataset)}.items():
        parser[key] = value
    item = parser.get_parsed_content("validate#preprocessing")(parser.get_parsed_content("validate#datalist")[0])
    assert item["image"].shape[0] == channels
    logits = parser.get_parsed_content("network")(item["image"][None, ..., 0])
    assert logits.shape[:2] == (1, 2)
    training = parser.get_parsed_content("train#preprocessing")
    first_random = training.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
    )
    symmetry = [i for i, t in enumerate(training.transforms) if isinstance(t, ContralateralChannelsd)]
    context = [i for i, t in enumerate(training.transforms) if isinstance(t, AdjacentSlicesd)]
    assert len(symmetry) == (contralateral is not None) and len(context) == (adjacent > 0)
    if symmetry:
        assert symmetry[0] < first_random and training.transforms[symmetry[0]].contralateral.mode == contralateral
    if context:
        assert max(symmetry, default=-1) < context[0] < first_random
        assert training.transforms[context[0]].adjacent.neighbours == adjacent

    inference = ConfigParser()
    inference.read_config(str(CONFIGS / "inference.json"))
    for key, value in keys.items():
        inference[key] = value
    image = parser.get_parsed_content("validate#datalist")[0]["image"]
    inferred = inference.get_parsed_content("preprocessing")({"image": image})["image"]
    assert inferred.shape[0] == channels and torch.allclose(inferred, item["image"])
    assert inference.get_parsed_content("network_def")(inferred[None, ..., 0]).shape[:2] == (1, 2)


def test_deploy_runner_refuses_a_model_with_slice_context(tmp_path):
    """The MONAI-free runner feeds 5 channels; a model trained with ``adjacent_slices`` is refused when loaded."""
    from conftest import inference_network

    from custom.deploy import load_model

    path = tmp_path / "context.ts"
    torch.jit.script(inference_network(in_channels=15).eval()).save(str(path))
    with pytest.raises(ValueError, match=r"context\.ts' does not take a \(1, 5, 32, 32\) input") as refused:
        load_model(path)
    # one line, as the command line prints its refusal, ending with the complaint of the layer, not a traceback
    assert "\n" not in str(refused.value) and "adjacent_slices" in str(refused.value)
    assert str(refused.value).endswith("to have 15 channels, but got 5 channels instead")
