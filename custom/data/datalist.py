"""Read a converted dataset folder (``dataset.json``) into the lists the bundle configs consume.

MONAI's ``load_decathlon_datalist`` knows neither folds nor the ``testing`` entries of this
project's data contract, and it reports a missing folder only as a missing file; these helpers
select a cross-validation fold and name the folder or key at fault.
"""

import json
from pathlib import Path

ROLES = ("train", "validate")


def load_dataset_json(dataset_dir, required_keys: tuple[str, ...] = ()) -> dict:
    """The parsed ``dataset.json`` of ``dataset_dir``; clear errors for a missing folder, file or required key."""
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_dir '{folder}' does not exist (convert data with `python -m custom prepare`)")
    path = folder / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing: '{folder}' is not a converted dataset folder")
    with open(path) as f:
        try:
            dataset = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"'{path}' is not valid JSON: {err}") from err
    for key in required_keys:
        if key not in dataset:
            raise KeyError(f"'{path}' has no '{key}' key")
    return dataset


def _absolute(folder: Path, entry: dict, keys) -> dict:
    return {k: str(folder / v) if k in keys else v for k, v in entry.items()}


def fold_datalist(dataset_dir, fold: int, role: str) -> list[dict]:
    """Training entries for one role of a cross-validation split, with absolute paths.

    ``role="train"`` gives every case whose ``fold`` differs from ``fold``; ``role="validate"`` the
    cases of ``fold``. ``fold=-1`` trains on all cases and validates on all of them (a fit check, not
    a held-out score).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got '{role}'")
    folder = Path(dataset_dir)
    dataset = load_dataset_json(folder)
    training = dataset.get("training")
    if not training:
        raise ValueError(f"'{folder / 'dataset.json'}' has no 'training' entries")
    folds = sorted({e.get("fold") for e in training}, key=str)
    if fold != -1 and fold not in folds:
        raise ValueError(f"fold {fold} not found in '{folder / 'dataset.json'}' (folds present: {folds})")
    if fold == -1:
        selected = training
    elif role == "train":
        selected = [e for e in training if e["fold"] != fold]
    else:
        selected = [e for e in training if e["fold"] == fold]
    if not selected:
        raise ValueError(f"no '{role}' cases for fold {fold} in '{folder / 'dataset.json'}'")
    return [_absolute(folder, e, ("image", "label")) for e in selected]


def inference_datalist(dataset_dir) -> list[str]:
    """Image files to segment: the dataset's ``testing`` list, or every training image when it has none."""
    folder = Path(dataset_dir)
    dataset = load_dataset_json(folder)
    entries = dataset.get("testing") or dataset.get("training") or []
    if not entries:
        raise ValueError(f"'{folder / 'dataset.json'}' lists no 'testing' or 'training' images")
    return [str(folder / (e["image"] if isinstance(e, dict) else e)) for e in entries]
