"""Fold ensemble and flip test-time augmentation as one scriptable network, plus its uncertainty channel.

Why it exists: MONAI has no module that averages the probabilities of several networks (its ``mean_ensemble``
transforms average dictionary items after inference, which neither TorchScript nor the MONAI-free runner can
carry). ``ProbabilityEnsemble`` wraps the member networks and the flips inside the network itself: its output is
``log`` of the mean softmax probability, which are valid logits, so inference.json's ``Activationsd(softmax)``
recovers the mean probability and nothing downstream changes; ``ckpt_export`` scripts it into one ``model.ts``
that ``custom/deploy.py`` runs unchanged.

Config ids of ``configs/inference.json`` (docs/deployment.md, "Fold ensemble, test-time flips, uncertainty"):
``ensemble_ckpt_paths`` (null: the single ``ckpt_path``), ``tta_flips`` (false), ``write_uncertainty`` (false).
"""

import copy
import re
from pathlib import Path
from typing import List

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom.atomic import write_atomically
from custom.data.datalist import refuse_earlier_file
from custom.handlers import checkpoint_errors_named, load_network_checkpoint
from custom.training_record import INPUT_SETTINGS, check_record, embed_record, embedded_record, read_record
from custom.wording import counted

# tta_flips = true: every combination of mirroring the slice's two axes (nnU-Net's 2D mirroring), after the
# unflipped pass. Axes count from the first spatial axis of a slice (0 = H, 1 = W of a (B, C, H, W) batch).
ALL_SLICE_FLIPS = ((0,), (1,), (0, 1))
# The smallest positive float32: the mean probability is floored there before the log, so a class whose every
# prediction underflowed to 0 gets a large negative logit instead of -inf.
PROBABILITY_FLOOR = float(torch.finfo(torch.float32).tiny)
_MEMBER_KEY = re.compile(r"^members\.(\d+)\.")


class ProbabilityEnsemble(torch.nn.Module):
    """Mean softmax probability of ``members`` x ``flips``, returned as logits (its log); TorchScript-scriptable.

    Args:
        members: networks mapping (B, C_in, H, W) to (B, K, H, W) logits, all with the same K.
        flips: spatial axes to mirror, one tuple per extra pass, counted from the first spatial axis (0 = H,
            1 = W); the unflipped pass always runs first. Each pass flips the input, runs the member and flips
            its probabilities back.
        uncertainty: append one channel holding the population standard deviation (divided by N, not N - 1)
            over the N = members x (1 + flips) passes of the probability of the last class (the lesion).

    Returns (B, K, H, W) logits ``log(max(mean_n softmax_n, PROBABILITY_FLOOR))``, or (B, K + 1, H, W) with
    the uncertainty channel last. With one member, no flips and no uncertainty the member's own logits are
    returned unchanged, so the wrapper is then exactly the plain network.
    """

    flips: List[List[int]]  # typing.List: TorchScript reads this annotation

    def __init__(self, members, flips=(), uncertainty: bool = False) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("ProbabilityEnsemble needs at least one member network")
        self.members = torch.nn.ModuleList(members)
        # As tensor dims of a (B, C, H, W) batch, the unflipped pass first (an empty list: no flip).
        passes: list[list[int]] = [[]]
        for axes in flips:
            dims = sorted({int(a) + 2 for a in axes})
            if not dims or any(d not in (2, 3) for d in dims):
                raise ValueError(f"flip axes must be 0 (H) and/or 1 (W) of a slice, got {tuple(axes)!r}")
            if dims in passes:
                raise ValueError(f"flip {tuple(axes)!r} is listed twice or is the unflipped pass")
            passes.append(dims)
        self.flips = passes
        self.uncertainty = bool(uncertainty)
        self.floor = PROBABILITY_FLOOR  # an attribute: TorchScript does not read module globals
        self.plain = len(members) == 1 and len(passes) == 1 and not self.uncertainty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain:
            out = x
            for member in self.members:
                out = member(x)
            return out
        probabilities: list[torch.Tensor] = []
        for member in self.members:
            for dims in self.flips:
                if len(dims) == 0:
                    probabilities.append(torch.softmax(member(x).float(), dim=1))
                else:
                    flipped = torch.softmax(member(torch.flip(x, dims)).float(), dim=1)
                    probabilities.append(torch.flip(flipped, dims))
        stacked = torch.stack(probabilities, dim=0)  # (N, B, K, H, W)
        logits = torch.log(stacked.mean(dim=0).clamp_min(self.floor))
        if self.uncertainty:
            spread = stacked[:, :, -1:].std(dim=0, unbiased=False)  # (B, 1, H, W)
            return torch.cat([logits, spread], dim=1)
        return logits


def flip_axes(tta_flips) -> tuple[tuple[int, ...], ...]:
    """The extra passes of config id ``tta_flips``: false/null (none), true (``ALL_SLICE_FLIPS``) or a list of
    axis lists such as ``[[1]]`` (left-right only); an error naming the config id otherwise."""
    if tta_flips is None or tta_flips is False:
        return ()
    if tta_flips is True:
        return ALL_SLICE_FLIPS
    if isinstance(tta_flips, (list, tuple)) and all(
        isinstance(axes, (list, tuple)) and axes and all(a in (0, 1) and not isinstance(a, bool) for a in axes)
        for axes in tta_flips
    ):
        return tuple(tuple(int(a) for a in axes) for axes in tta_flips)
    raise ValueError(
        f"config id 'tta_flips' must be false, true (all of {[list(a) for a in ALL_SLICE_FLIPS]}) or a list of "
        f"slice axis lists such as [[1]] (0 = H, 1 = W), got {tta_flips!r}"
    )


def _member_count(state: dict, path) -> int:
    indices = {int(m.group(1)) for key in state if (m := _MEMBER_KEY.match(key))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(
            f"checkpoint '{path}' is no ensemble checkpoint (keys 'members.0.*', 'members.1.*', ...): "
            "write one with python -m custom ensemble-checkpoint, or give ensemble_ckpt_paths a list of checkpoints"
        )
    return len(indices)


def _refuse_a_repeated_member(member: torch.nn.Module, path, members: list, paths) -> None:
    """Refuse ``member`` (loaded from ``path``) when it holds the weights of one of the ``members`` loaded before it
    from ``paths``, naming both files.

    Why: one fold's checkpoint listed twice (or a copy of it) was averaged in twice without a word, so the "ensemble"
    leaned on that model, and its uncertainty map showed agreement that no second model gave (all 0 for two copies)."""
    weights = member.state_dict()
    for earlier, other in zip(paths, members):
        if all(torch.equal(tensor, weights[key]) for key, tensor in other.state_dict().items()):
            raise ValueError(
                f"ensemble members '{earlier}' and '{path}' hold the same weights (one checkpoint listed twice, or a "
                "copy of it): the ensemble would count that model twice and its uncertainty would show agreement no "
                "second model gave; list each model's checkpoint once"
            )


def inference_network(
    network_def: torch.nn.Module, ensemble_ckpt_paths=None, tta_flips=False, uncertainty: bool = False,
    input_settings=None,
) -> torch.nn.Module:
    """The network inference.json runs (config id ``inference_network``).

    Args:
        network_def: the architecture (inference.json's ``network_def``).
        ensemble_ckpt_paths: null: ``network_def`` itself, whose weights the ``NamedCheckpointLoader`` handler
            loads from ``ckpt_path`` (as without an ensemble). A list of checkpoint files (e.g. the folds'
            ``model.pt``): one copy of ``network_def`` per file, loaded here with ``weights_only=True`` and
            errors naming the file. A string: one ensemble checkpoint written by ``python -m custom
            ensemble-checkpoint`` (what ``ckpt_export`` needs as ``--ckpt_file``), checked against the input settings
            of its members' records, which it carries (``custom.training_record.embed_record``).
        tta_flips: see ``flip_axes``.
        uncertainty: config id ``write_uncertainty``: add the uncertainty channel (``ProbabilityEnsemble``).
            Refused with a single model and no flips: one prediction has no spread.
        input_settings: config id ``input_settings``: a member whose training record names other input settings
            is refused (``custom.training_record``), and so is an ensemble checkpoint carrying such a record.

    Returns ``network_def`` unchanged when there is neither an ensemble nor flips nor uncertainty, else a
    ``ProbabilityEnsemble`` (in eval mode).
    """
    flips = flip_axes(tta_flips)
    if isinstance(ensemble_ckpt_paths, (str, Path)):
        path = Path(ensemble_ckpt_paths)
        with checkpoint_errors_named(path, ["ensemble"]):
            state = torch.load(path, map_location="cpu", weights_only=True)
        count = _member_count(state, path) if isinstance(state, dict) else _member_count({}, path)
        embedded = embedded_record(state)  # the members' common record, which write_ensemble_checkpoint embeds
        if input_settings is not None and embedded is not None:
            check_record(path, input_settings, embedded=embedded)
        network = ProbabilityEnsemble([copy.deepcopy(network_def) for _ in range(count)], flips, uncertainty)
        with checkpoint_errors_named(path, ["ensemble"]):
            network.load_state_dict(state, strict=True)
        return network.eval()
    if ensemble_ckpt_paths is not None:
        if not isinstance(ensemble_ckpt_paths, (list, tuple)) or not ensemble_ckpt_paths:
            raise ValueError(
                "config id 'ensemble_ckpt_paths' must be null, a non-empty list of checkpoint files or one "
                f"ensemble checkpoint file, got {ensemble_ckpt_paths!r}"
            )
        members = []
        for path in ensemble_ckpt_paths:
            member = copy.deepcopy(network_def)
            load_network_checkpoint(path, member, input_settings=input_settings)
            _refuse_a_repeated_member(member, path, members, ensemble_ckpt_paths)
            members.append(member)
    else:
        members = [network_def]
    if uncertainty and len(members) * (1 + len(flips)) < 2:
        raise ValueError(
            "config id 'write_uncertainty' needs more than one prediction to measure their spread: set "
            "'ensemble_ckpt_paths' to two or more checkpoints and/or 'tta_flips' to true"
        )
    if len(members) == 1 and not flips and not uncertainty:
        return members[0]
    return ProbabilityEnsemble(members, flips, uncertainty).eval()


def write_ensemble_checkpoint(
    *checkpoints: str, out: str, config_file: str | None = None, overwrite: bool = False, **input_settings
) -> str:
    """Write one ensemble checkpoint (the state dict of a ``ProbabilityEnsemble`` of the given checkpoints).

    Args:
        checkpoints: two or more checkpoint files of inference.json's ``network_def`` (e.g. each fold's
            ``model.pt``); each is loaded with ``weights_only=True`` and strictly, errors naming the file.
        out: the file to write (atomically); pass it to ``ckpt_export`` as ``--ckpt_file`` and as
            ``--ensemble_ckpt_paths`` (docs/deployment.md).
        config_file: the inference config whose ``network_def`` the checkpoints fit (default: the bundle's); a
            checkpoint whose training record names other ``input_settings`` than this config's (its id
            ``input_settings``, else its ids of ``INPUT_SETTINGS``: ``_input_settings``) is refused, naming it.
        overwrite: replace an existing ``out`` (refused otherwise: ``--out bundle/models/model.pt`` replaced the
            trained weights without a word).
        input_settings: overrides of the config's ``INPUT_SETTINGS`` (``--contralateral_channels difference``), as
            ``monai.bundle run`` takes them: the refusal of a member names the override to pass in brackets, which
            this command did not take (its members' settings had to be written into a ``--config_file``).

    The file carries the input settings of the members' training records (``custom.training_record.embed_record``;
    none where no member has a record), by which inference and ``ckpt_export`` refuse it with other settings, as they
    refuse each member. Flips are not weights: ``tta_flips`` is chosen when the ensemble is built. Returns ``out``.
    """
    from monai.bundle import ConfigParser

    if len(checkpoints) < 2:
        raise ValueError(f"an ensemble checkpoint needs two or more checkpoints, got {len(checkpoints)}")
    unknown = sorted(set(input_settings) - set(INPUT_SETTINGS))
    if unknown:
        raise ValueError(f"ensemble-checkpoint takes no option {', '.join('--' + key for key in unknown)}: its "
                         f"overrides are the input settings {', '.join('--' + key for key in INPUT_SETTINGS)}")
    refuse_earlier_file(out, overwrite)
    parser = ConfigParser()
    config_file = config_file or str(Path(__file__).resolve().parent.parent / "bundle" / "configs" / "inference.json")
    parser.read_config(str(config_file))
    for key, value in input_settings.items():
        parser[key] = value
    # a member whose training record names other input settings than the config's is refused, as inference refuses it
    settings = _input_settings(parser, config_file)
    network = inference_network(parser.get_parsed_content("network_def"), [str(c) for c in checkpoints],
                                input_settings=settings)  # fmt: skip
    state = network.state_dict()
    if any(read_record(checkpoint) is not None for checkpoint in checkpoints):
        embed_record(state, {key: settings[key] for key in INPUT_SETTINGS})  # each recorded member has these
    write_atomically(out, lambda temporary: torch.save(state, temporary))
    print(f"ensemble checkpoint of {len(checkpoints)} members")  # python -m custom prints the returned path after it
    return str(out)


def _input_settings(parser, config_file) -> dict:
    """The input settings of the inference config ``config_file`` read into ``parser`` (its overrides applied): its id
    ``input_settings``, else (a config of the user's own without it) its ids of ``INPUT_SETTINGS``.

    Why: ``write_ensemble_checkpoint`` compares its members' training records with them and embeds them; a config
    without ``input_settings`` gave None, so its members were neither checked nor their settings embedded. A config
    with neither is refused, naming it and the ids it lacks."""
    if "input_settings" in parser:
        return parser.get_parsed_content("input_settings")
    missing = [key for key in INPUT_SETTINGS if key not in parser]
    if missing:
        raise ValueError(
            f"config file '{config_file}' has no id 'input_settings', nor {', '.join(repr(key) for key in missing)}: "
            "the members' training records cannot be compared with its input settings; add them to it, or pass "
            f"{' '.join(f'--{key} <value>' for key in missing)} with the values the members were trained with"
        )
    return {key: parser.get_parsed_content(key) for key in INPUT_SETTINGS}


class SplitUncertaintyd(MapTransform):
    """Move the uncertainty channel of ``ProbabilityEnsemble(uncertainty=True)`` from ``keys`` to ``uncertainty_key``.

    Items are channel-first (decollated) predictions. An item with ``num_classes`` channels passes unchanged
    (no uncertainty was asked for); one with ``num_classes + 1`` keeps its first ``num_classes`` channels and
    its last channel becomes ``uncertainty_key`` (a (1, H, W, D) MetaTensor with the prediction's metadata, so
    ``Invertd`` and ``SaveImaged`` treat it like the prediction); any other count is an error.
    """

    def __init__(
        self, keys: KeysCollection, uncertainty_key: str = "uncertainty", num_classes: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.uncertainty_key = uncertainty_key
        self.num_classes = int(num_classes)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            channels = d[key].shape[0]
            if channels == self.num_classes + 1:
                d[self.uncertainty_key] = d[key][self.num_classes :]
                d[key] = d[key][: self.num_classes]
            elif channels != self.num_classes:
                raise ValueError(
                    f"'{key}' has {counted(channels, 'channel')}; expected "
                    f"{counted(self.num_classes, 'class', 'classes')}, plus one with write_uncertainty"
                )
        return d
