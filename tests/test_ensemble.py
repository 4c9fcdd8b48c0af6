"""Fold ensemble, flip test-time augmentation and the uncertainty map (custom.ensemble), in the bundle and exported."""

import copy
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, bundle_workflow
from monai.bundle import ConfigParser, ckpt_export
from monai.data import MetaTensor
from monai.networks.nets import UNet

from custom.__main__ import main
from custom.deploy import deploy
from custom.ensemble import (
    ALL_SLICE_FLIPS,
    ProbabilityEnsemble,
    SplitUncertaintyd,
    flip_axes,
    inference_network,
    write_ensemble_checkpoint,
)
from custom.training_record import INPUT_SETTINGS, embedded_record


def _tiny_unet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return UNet(2, 5, 2, (4, 8, 16), (2, 2), num_res_units=1, norm="instance").eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(3, 5, 32, 48, generator=torch.Generator().manual_seed(0))


def _probabilities(network, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(network(x)[:, :2], dim=1)


@pytest.mark.parametrize("flips", [(), ALL_SLICE_FLIPS])
def test_ensemble_of_identical_models_equals_one_model(batch, flips):
    network = _tiny_unet(0)
    ensemble = ProbabilityEnsemble([network, copy.deepcopy(network), copy.deepcopy(network)], flips)
    single = ProbabilityEnsemble([network], flips)
    for candidate in (ensemble, torch.jit.script(ensemble)):
        torch.testing.assert_close(_probabilities(candidate, batch), _probabilities(single, batch), atol=1e-6, rtol=0)
    if not flips:
        torch.testing.assert_close(_probabilities(ensemble, batch), _probabilities(network, batch), atol=1e-6, rtol=0)


def test_one_member_without_flips_is_exactly_the_plain_network(batch):
    network = _tiny_unet(0)
    wrapped = ProbabilityEnsemble([network])
    with torch.no_grad():
        assert torch.equal(wrapped(batch), network(batch))
        assert torch.equal(torch.jit.script(wrapped)(batch), network(batch))
    assert inference_network(network) is network


def test_output_is_the_log_of_the_mean_probability_and_the_std_over_passes(batch):
    members = [_tiny_unet(0), _tiny_unet(1)]
    ensemble = ProbabilityEnsemble(members, [(1,), (0, 1)], uncertainty=True)
    with torch.no_grad():
        expected = []
        for member in members:
            for dims in ([], [3], [2, 3]):
                flipped = batch.flip(dims) if dims else batch
                probabilities = torch.softmax(member(flipped), dim=1)
                expected.append(probabilities.flip(dims) if dims else probabilities)
        stacked = torch.stack(expected)
        output = ensemble(batch)
        scripted = torch.jit.script(ensemble)(batch)
    assert output.shape == (3, 3, 32, 48)
    torch.testing.assert_close(output[:, :2].exp(), stacked.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.softmax(output[:, :2], 1), stacked.mean(0), atol=1e-6, rtol=1e-5)
    spread = torch.from_numpy(stacked[:, :, 1:].numpy().std(axis=0))  # numpy's std divides by N
    torch.testing.assert_close(output[:, 2:], spread, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scripted, output, atol=1e-6, rtol=1e-5)


def test_flips_of_a_mirror_symmetric_network_change_nothing(batch):
    """A 1 x 1 convolution commutes with mirroring: flip TTA must give its probabilities back, with zero spread."""
    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(5, 2, kernel_size=1)
    with_flips = ProbabilityEnsemble([pointwise], ALL_SLICE_FLIPS, uncertainty=True)
    with torch.no_grad():
        output = with_flips(batch)
        torch.testing.assert_close(torch.softmax(output[:, :2], 1), torch.softmax(pointwise(batch), 1))
    assert output[:, 2].abs().max() < 1e-6


def test_a_flip_is_undone_on_the_output():
    """A network that copies the input's first channel to the lesion logit: each pass, flipped back, lines up."""

    class Copy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(x[:, :1]), 10 * x[:, :1]], dim=1)

    x = torch.zeros(1, 1, 4, 6)
    x[0, 0, 0, 0] = 1.0  # one corner voxel is lesion; a flip not undone would move it
    output = ProbabilityEnsemble([Copy()], ALL_SLICE_FLIPS)(x)
    assert torch.argmax(output, 1)[0].nonzero().tolist() == [[0, 0]]


@pytest.mark.parametrize(
    "value, expected",
    [(False, ()), (None, ()), (True, ALL_SLICE_FLIPS), ([[1]], ((1,),)), ([[0, 1], [0]], ((0, 1), (0,)))],
)
def test_tta_flips_values(value, expected):
    assert flip_axes(value) == expected


@pytest.mark.parametrize("value", ["yes", [[2]], [1], [[]], [[True]]])
def test_bad_tta_flips_name_the_config_id(value):
    with pytest.raises(ValueError, match="config id 'tta_flips'"):
        flip_axes(value)


def test_uncertainty_of_a_single_prediction_is_refused():
    with pytest.raises(ValueError, match="config id 'write_uncertainty'.*'ensemble_ckpt_paths'.*'tta_flips'"):
        inference_network(_tiny_unet(0), None, False, uncertainty=True)
    assert isinstance(inference_network(_tiny_unet(0), None, True, uncertainty=True), ProbabilityEnsemble)


def test_bad_member_checkpoints_are_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_tiny_unet(0).state_dict(), good)
    other = tmp_path / "four_channels.pt"
    torch.save(UNet(2, 4, 2, (4, 8, 16), (2, 2), num_res_units=1).state_dict(), other)
    with pytest.raises(ValueError, match=f"checkpoint '{other}' does not fit model"):
        inference_network(_tiny_unet(0), [str(good), str(other)])
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        inference_network(_tiny_unet(0), [str(good), str(tmp_path / "absent.pt")])
    with pytest.raises(ValueError, match=f"'{good}' is no ensemble checkpoint"):
        inference_network(_tiny_unet(0), str(good))
    with pytest.raises(ValueError, match="config id 'ensemble_ckpt_paths'"):
        inference_network(_tiny_unet(0), [])


def test_members_holding_the_same_weights_are_refused_naming_both(tmp_path):
    first, copied, other = tmp_path / "fold0.pt", tmp_path / "fold0_copy.pt", tmp_path / "fold1.pt"
    torch.save(_tiny_unet(0).state_dict(), first)
    torch.save(_tiny_unet(0).state_dict(), copied)
    torch.save(_tiny_unet(1).state_dict(), other)
    for repeated in (first, copied):
        with pytest.raises(ValueError, match=f"members '{first}' and '{repeated}' hold the same weights"):
            inference_network(_tiny_unet(0), [str(first), str(other), str(repeated)], True, uncertainty=True)
    assert len(inference_network(_tiny_unet(0), [str(first), str(other)]).members) == 2


def test_ensemble_checkpoint_of_one_checkpoint_twice_is_refused_and_not_written(member_checkpoints, tmp_path):
    (first, _), _ = member_checkpoints
    with pytest.raises(ValueError, match=f"members '{first}' and '{first}' hold the same weights"):
        write_ensemble_checkpoint(first, first, out=str(tmp_path / "ensemble.pt"))
    assert not (tmp_path / "ensemble.pt").exists()


def _recorded_members(folder: Path, trained_with: tuple, key: str = "contralateral_channels") -> list[Path]:
    """One model.pt of inference.json's network_def for each value of input setting ``key`` in ``trained_with``
    (seeded random weights; 10 channels for either contralateral mode), each in its own folder beside a training
    record of that value and the other settings' defaults."""
    members = []
    for fold, value in enumerate(trained_with):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "inference.json"))
        parser[key] = value
        torch.manual_seed(fold)
        (folder / f"fold{fold}").mkdir(parents=True)
        members.append(folder / f"fold{fold}" / "model.pt")
        torch.save(parser.get_parsed_content("network_def", lazy=False).state_dict(), members[-1])
        record = {setting: parser[setting] for setting in INPUT_SETTINGS}
        (folder / f"fold{fold}" / "training_inputs.json").write_text(json.dumps(record))
    return members


def test_ensemble_checkpoint_refuses_members_trained_with_other_input_settings(tmp_path, capsys):
    """Weights trained with contralateral_channels 'difference' have the 10 channels of 'mirror': an ensemble built with
    a 'mirror' config took them without a word (inference refuses such a member by its record). The refusal's
    bracketed override, pasted onto the command line, works: the command did not take it (no such option)."""
    config = json.loads((CONFIGS / "inference.json").read_text())
    config_file = tmp_path / "mirror.json"
    config_file.write_text(json.dumps({**config, "contralateral_channels": "mirror"}))
    members = _recorded_members(tmp_path, ("mirror", "difference"))
    with pytest.raises(ValueError, match=rf"checkpoint '{members[1]}' was trained with other settings(.|\n)*"
                                         r"contralateral_channels: trained with 'difference', this run 'mirror'"):
        write_ensemble_checkpoint(*members, out=str(tmp_path / "ensemble.pt"), config_file=str(config_file))
    assert not (tmp_path / "ensemble.pt").exists()


@pytest.mark.parametrize("key, value", [("contralateral_channels", "difference"), ("spacing_mm", 0.9)])
def test_the_refusals_override_pasted_onto_the_command_line_builds_the_ensemble_carrying_it(
    tmp_path, capsys, key, value
):
    """Members trained with an input setting are refused with the default config, naming the override; the command
    takes it (it did not: no such option), and the ensemble file carries the setting, by which inference refuses it
    without (``spacing_mm`` keeps the 5 channels, so nothing else would)."""
    members = _recorded_members(tmp_path, (value, value), key)
    command = ["ensemble-checkpoint", *map(str, members), "--out", str(tmp_path / "ensemble.pt")]
    with pytest.raises(SystemExit) as refused:
        main(command)
    advice = re.search(rf"\((--{key} \S+)\)", str(refused.value)).group(1)
    assert advice == f"--{key} {value}" and not (tmp_path / "ensemble.pt").exists()
    main([*command, *advice.split()])
    assert "ensemble checkpoint of 2 members" in capsys.readouterr().out
    carried = embedded_record(torch.load(tmp_path / "ensemble.pt", weights_only=True))
    assert carried == {**{setting: None for setting in ("contralateral_channels", "spacing_mm")}, "adjacent_slices": 0,
                       key: value}  # fmt: skip


def test_ensemble_checkpoint_of_a_config_without_input_settings_takes_its_ids_of_them(tmp_path):
    """A ``--config_file`` of the user's own without the id ``input_settings`` gave no settings: members trained with
    'difference' joined a 'mirror' ensemble without a word, and the file carried no record. Its top-level ids of the
    input settings are compared and embedded instead."""
    config = {key: value for key, value in json.loads((CONFIGS / "inference.json").read_text()).items()
              if key != "input_settings"}  # fmt: skip
    config_file, mirror = tmp_path / "mirror.json", {**config, "contralateral_channels": "mirror"}
    config_file.write_text(json.dumps(mirror))
    members = _recorded_members(tmp_path / "mixed", ("mirror", "difference"))
    with pytest.raises(ValueError, match=rf"checkpoint '{members[1]}' was trained with other settings(.|\n)*"
                                         r"contralateral_channels: trained with 'difference', this run 'mirror'"):
        write_ensemble_checkpoint(*members, out=str(tmp_path / "ensemble.pt"), config_file=str(config_file))
    assert not (tmp_path / "ensemble.pt").exists()
    members = _recorded_members(tmp_path / "mirror", ("mirror", "mirror"))
    write_ensemble_checkpoint(*members, out=str(tmp_path / "ensemble.pt"), config_file=str(config_file))
    state = torch.load(tmp_path / "ensemble.pt", map_location="cpu", weights_only=True)
    assert embedded_record(state) == {key: mirror[key] for key in INPUT_SETTINGS}


def test_ensemble_checkpoint_of_a_config_without_any_input_settings_is_refused_naming_it(tmp_path):
    """With neither ``input_settings`` nor its ids the members could not be checked: refused, naming the config file
    and each missing id, before anything is written; the ids passed as options are taken."""
    from custom.deploy import RUNNER_INPUT_SETTINGS  # inference.json's defaults

    network = {**json.loads((CONFIGS / "inference.json").read_text())["network_def"], "in_channels": 10}
    config_file = tmp_path / "network_only.json"
    config_file.write_text(json.dumps({"network_def": network}))
    members = _recorded_members(tmp_path, ("mirror", "mirror"))
    with pytest.raises(ValueError) as refused:
        write_ensemble_checkpoint(*members, out=str(tmp_path / "ensemble.pt"), config_file=str(config_file))
    message = str(refused.value)
    assert message.startswith(f"config file '{config_file}' has no id 'input_settings', nor ")
    assert all(f"'{key}'" in message and f"--{key} <value>" in message for key in INPUT_SETTINGS)
    assert not (tmp_path / "ensemble.pt").exists()
    mirror = {**RUNNER_INPUT_SETTINGS, "contralateral_channels": "mirror"}
    write_ensemble_checkpoint(*members, out=str(tmp_path / "ensemble.pt"), config_file=str(config_file), **mirror)
    assert embedded_record(torch.load(tmp_path / "ensemble.pt", map_location="cpu", weights_only=True)) == mirror


def test_an_ensemble_checkpoint_is_refused_with_other_input_settings_than_its_members(tmp_path):
    """The ensemble file sat where its members' records are not, and inference took it with any settings of the same
    channel count: members trained with 'difference' were run on 'mirror' channels without a word."""
    members = _recorded_members(tmp_path, ("difference", "difference"))
    ensemble, config_file = tmp_path / "ensemble.pt", tmp_path / "difference.json"
    config_file.write_text(json.dumps({**json.loads((CONFIGS / "inference.json").read_text()),
                                       "contralateral_channels": "difference"}))  # fmt: skip
    write_ensemble_checkpoint(*members, out=str(ensemble), config_file=str(config_file))
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["contralateral_channels"] = "mirror"
    network_def = parser.get_parsed_content("network_def", lazy=False)
    settings = {"contralateral_channels": "mirror", "adjacent_slices": 0}
    refusal = (rf"checkpoint '{ensemble}' was trained with other settings than this run's \(recorded in the checkpoint "
               r"itself(.|\n)*contralateral_channels: trained with 'difference', this run 'mirror' "
               r"\(--contralateral_channels difference\)")
    with pytest.raises(ValueError, match=refusal):
        inference_network(network_def, str(ensemble), input_settings=settings)
    trained_with = {**settings, "contralateral_channels": "difference"}
    loaded = inference_network(network_def, str(ensemble), input_settings=trained_with)
    assert len(loaded.members) == 2


def test_split_uncertainty():
    split = SplitUncertaintyd(keys="pred")
    pred = MetaTensor(torch.rand(3, 4, 4, 2), meta={"filename_or_obj": "case.nii.gz"})
    out = split({"pred": pred})
    assert out["pred"].shape == (2, 4, 4, 2) and out["uncertainty"].shape == (1, 4, 4, 2)
    assert torch.equal(out["uncertainty"], pred[2:]) and out["uncertainty"].meta["filename_or_obj"] == "case.nii.gz"
    assert set(split({"pred": pred[:2]})) == {"pred"}
    with pytest.raises(ValueError, match="'pred' has 4 channels"):
        split({"pred": torch.rand(4, 4, 4, 2)})


@pytest.fixture(scope="module")
def member_checkpoints(tmp_path_factory):
    """Two checkpoints of inference.json's network_def (seeded random weights) and their ensemble checkpoint."""
    folder = tmp_path_factory.mktemp("members")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(parser.get_parsed_content("network_def", lazy=False).state_dict(), folder / f"fold{seed}.pt")
        paths.append(folder / f"fold{seed}.pt")
    ensemble = write_ensemble_checkpoint(*paths, out=str(folder / "ensemble.pt"))
    return paths, Path(ensemble)


def _bundle_masks(dataset, out, **override) -> dict[str, np.ndarray]:
    workflow = bundle_workflow(
        ["inference.json"], "infer", dataset_dir=str(dataset), output_dir=str(out), num_workers=0, **override
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return {p.name: np.asanyarray(nib.load(p).dataobj) for p in sorted(out.glob("*.nii.gz"))}


@pytest.mark.integration
def test_bundle_ensemble_equals_single_model_and_exports_to_the_runner(
    member_checkpoints, tiny_phantom_dataset, tmp_path
):
    (first, second), ensemble_file = member_checkpoints
    single = _bundle_masks(tiny_phantom_dataset, tmp_path / "single", ckpt_path=str(first))
    listed = _bundle_masks(tiny_phantom_dataset, tmp_path / "listed", ensemble_ckpt_paths=[str(first)])
    assert listed.keys() == single.keys() and all(np.array_equal(listed[k], single[k]) for k in single)

    override = {"ensemble_ckpt_paths": [str(first), str(second)], "tta_flips": True}
    masks = _bundle_masks(tiny_phantom_dataset, tmp_path / "ensemble", write_uncertainty=True, **override)
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    images = [tiny_phantom_dataset / e["image"] for e in dataset["testing"]]
    for image in images:
        case = image.name.split(".nii")[0]
        uncertainty = nib.load(tmp_path / "ensemble" / f"{case}_uncertainty.nii.gz")
        assert uncertainty.get_data_dtype() == np.float32 and uncertainty.shape == nib.load(image).shape[:3]
        np.testing.assert_allclose(uncertainty.affine, nib.load(image).affine, atol=1e-6)
        values = np.asanyarray(uncertainty.dataobj)
        assert values.min() >= 0 and values.max() <= 0.5 and values.max() > 0
    assert not any(name.endswith("_uncertainty.nii.gz") for name in single)

    # One model.ts: the ensemble checkpoint, exported by ckpt_export, run by the MONAI-free runner unchanged.
    torchscript = tmp_path / "ensemble.ts"
    ckpt_export(
        net_id="inference_network", filepath=str(torchscript), ckpt_file=str(ensemble_file),
        meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"),
        bundle_root=str(BUNDLE), ensemble_ckpt_paths=str(ensemble_file), tta_flips=True,
    )  # fmt: skip
    deploy(*images, model=torchscript, out=tmp_path / "deployed")
    for image in images:
        name = image.name.split(".nii")[0] + "_seg.nii.gz"
        np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "deployed" / name).dataobj), masks[name])
    lesion = np.concatenate([m.ravel() for k, m in masks.items() if k.endswith("_seg.nii.gz")])
    assert 0 < lesion.mean() < 1, "random weights should give masks with both classes, or the comparison is vacuous"
