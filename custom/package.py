"""A self-contained bundle archive: the bundle folder plus a copy of the ``custom`` package inside it.

The bundle's configs import ``custom`` (transforms, writers, handlers, datalists). MONAI Label and a
model-zoo checkout do not install this project, but both put the bundle root on ``sys.path``
(``python -m monai.bundle run`` before running the workflow, MONAI Label while parsing the configs), so
a ``custom/`` folder inside the bundle root makes the archive run on its own, provided the configs
reach ``custom`` through ``_target_`` and not through their ``imports`` list (which MONAI evaluates
before it extends ``sys.path``). MONAI has no packaging command that adds such code, hence this module.
"""

import logging
import zipfile
from pathlib import Path

import torch

from custom.atomic import write_atomically
from custom.data.datalist import refuse_earlier_file
from custom.training_record import BEST_MODEL, EXPORTS, TRAINING_RECORD

logger = logging.getLogger(__name__)

# What a bundle archive carries (MONAI bundle specification plus the LICENSE the model zoo requires).
BUNDLE_FOLDERS = ("configs", "docs")
BUNDLE_FILES = ("LICENSE",)
# weights; model.pt is required, the exports and model.pt's training record (its input settings) optional
MODEL_FILES = (BEST_MODEL, *EXPORTS, TRAINING_RECORD)
REQUIRED = ("configs/metadata.json", "configs/inference.json", "LICENSE")
# MONAI Label 0.8.5's multi-GPU fine-tune writes it into the bundle it serves (``monailabel/tasks/train/bundle.py``):
# train.json with that fine-tune's overrides, the server's absolute study paths among them. A run output of the server,
# not a config of the bundle: an archive of a served copy (custom.monailabel_app) leaves it out, saying so.
MONAILABEL_RUN_CONFIG = "configs/monailabel_train.json"
SKIPPED_NAMES = ("__pycache__",)
SKIPPED_SUFFIXES = (".pyc", ".pyo")


def _files_under(folder: Path):
    """Files below ``folder``, sorted, without caches, compiled files or hidden entries."""
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(p in SKIPPED_NAMES or p.startswith(".") for p in parts) or path.suffix in SKIPPED_SUFFIXES:
            continue
        if path.is_file():
            yield path


def stale_exports(models: Path) -> list[str]:
    """The exports in ``models`` (``model.ts``, ``model.onnx``) that do not hold the weights of ``models/model.pt``.

    Why it exists: training into ``bundle/models`` replaces ``model.pt`` but not the files exported from the earlier
    weights, and an archive carrying both segmented one case as 1007.5 mL through its ``inference.json`` and 36.5 mL
    through the runner on its ``model.ts``. A TorchScript export must hold exactly ``model.pt``'s tensors; an ONNX
    export those of its initializers that keep a ``model.pt`` name (the exporter renames the rest).
    """
    weights = torch.load(models / "model.pt", map_location="cpu", weights_only=True)

    def holds_the_weights(tensors: dict) -> bool:
        return bool(tensors) and all(torch.equal(tensor, weights[key]) for key, tensor in tensors.items())

    stale = []
    if (models / "model.ts").is_file():
        tensors = torch.jit.load(models / "model.ts", map_location="cpu").state_dict()
        if tensors.keys() != weights.keys() or not holds_the_weights(tensors):
            stale.append("model.ts")
    if (models / "model.onnx").is_file():
        try:
            import onnx
        except ImportError as err:
            raise ImportError(f"checking '{models / 'model.onnx'}' against model.pt needs the onnx extra") from err
        initializers = onnx.load(models / "model.onnx").graph.initializer
        named = [i for i in initializers if i.name in weights]
        if not holds_the_weights({i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in named}):
            stale.append("model.onnx")
    return stale


def bundle_members(bundle_root="bundle", include_models=True) -> list[tuple[Path, str]]:
    """(source file, path inside the bundle root) of every file a bundle archive carries.

    Run outputs (``eval/``, training checkpoints other than ``models/model.*``) are left out, and so is MONAI Label's
    ``MONAILABEL_RUN_CONFIG`` of a served copy, with a warning naming it; the ``custom`` package this module belongs to
    goes to ``custom/``. An export that is not of ``model.pt``'s weights (``stale_exports``) is refused.
    """
    root = Path(bundle_root)
    missing = [name for name in REQUIRED if not (root / name).is_file()]
    if include_models and not (root / "models" / MODEL_FILES[0]).is_file():
        missing.append(f"models/{MODEL_FILES[0]}")
    if missing:
        raise FileNotFoundError(f"bundle root '{root}' lacks {', '.join(missing)}")
    stale = stale_exports(root / "models") if include_models else []
    if stale:
        exports = ", ".join(f"models/{name}" for name in stale)
        raise ValueError(
            f"bundle root '{root}': {exports} not exported from the weights of models/model.pt (exported before "
            "model.pt was replaced?): export again from model.pt (docs/deployment.md), or remove it"
        )
    members = [(root / name, name) for name in BUNDLE_FILES]
    for folder in BUNDLE_FOLDERS:
        members += [(p, p.relative_to(root).as_posix()) for p in _files_under(root / folder)]
    if (root / MONAILABEL_RUN_CONFIG).is_file():
        members.remove((root / MONAILABEL_RUN_CONFIG, MONAILABEL_RUN_CONFIG))
        logger.warning(f"leaving '{root / MONAILABEL_RUN_CONFIG}' out of the archive: MONAI Label's config of the "
                       "served copy's last multi-GPU fine-tune (the server's study paths), not one of the bundle's")
    if include_models:
        members += [(root / "models" / n, f"models/{n}") for n in MODEL_FILES if (root / "models" / n).is_file()]
    package = Path(__file__).resolve().parent
    members += [(p, f"custom/{p.relative_to(package).as_posix()}") for p in _files_under(package)]
    return members


def package_bundle(out: str, bundle_root: str = "bundle", include_models=True, overwrite=False):
    """Write the bundle at ``bundle_root`` with a copy of ``custom/`` inside it to the zip ``out``; returns ``out``.

    As the MONAI bundle specification asks, the archive holds one folder named after it
    (``ctp_stroke.zip`` -> ``ctp_stroke/configs/...``, ``ctp_stroke/custom/...``), so unzipping gives a
    bundle root that ``python -m monai.bundle run --bundle_root ctp_stroke ...`` and MONAI Label load
    without this project installed. ``include_models=False`` leaves the weights out (configs and code
    only; not a complete bundle). The zip is written atomically (``custom.atomic``); an existing one is refused unless
    ``overwrite``.
    """
    out = Path(str(out))
    if out.suffix != ".zip":
        raise ValueError(f"output '{out}' must end in .zip")
    refuse_earlier_file(out, overwrite, option="OUT")
    members = bundle_members(bundle_root, include_models)

    def write(temporary):
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for source, name in members:
                archive.write(source, f"{out.stem}/{name}")

    write_atomically(out, write)
    return str(out)
