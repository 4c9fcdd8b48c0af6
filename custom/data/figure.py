"""One-slice figure of a converted CTP case: CT, CBF, CBV, MTT, Tmax and the lesion outlined on CT.

Exists to show, in the docs and to anyone checking a conversion, what the model sees. matplotlib is an
optional dependency (the ``figures`` extra), imported only here and only when a figure is drawn.
"""

from pathlib import Path

import nibabel as nib
import numpy as np

from custom.atomic import write_atomically
from custom.clinical import MODALITIES, voxel_volume_ml
from custom.data.datalist import load_dataset_json

# Panel title and colour-bar label per channel; CBF and CBV keep each centre's own scale.
PANELS = {
    "CT": ("CT (brain window)", "HU"),
    "CBF": ("CBF", "ml/100 g/min x centre scale"),
    "CBV": ("CBV", "ml/100 g x centre scale"),
    "MTT": ("MTT", "s"),
    "Tmax": ("Tmax", "s"),
}
BRAIN_WINDOW_HU = (0.0, 80.0)  # level 40, width 80


def _lesion_ml(dataset_dir: Path, entry: dict) -> float:
    """Lesion volume of a training entry in mL."""
    label = nib.load(dataset_dir / entry["label"])
    return float(np.count_nonzero(np.asanyarray(label.dataobj))) * voxel_volume_ml(label.affine)


def _radiological(slice_ras: np.ndarray) -> np.ndarray:
    """A RAS (i, j) slice as displayed by radiologists: anterior at the top, the patient's right on the left."""
    return slice_ras[::-1, ::-1].T


def phantom_figure(dataset_dir: str, out: str, case: str | None = None, slice_index=None):
    """Write a PNG of one training case of DATASET_DIR (layout in docs/data.md) to OUT; returns OUT.

    Six panels: CT in a brain window, CBF, CBV, MTT and Tmax with colour bars and units, and the label
    outlined over CT. ``case`` defaults to the case with the largest lesion, ``slice_index`` (0-based, along
    the volume's superior axis) to the slice with the most lesion.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dataset_dir = Path(dataset_dir)
    meta = load_dataset_json(dataset_dir, required_keys=("training", "modality"))
    if not meta["training"]:
        raise ValueError(f"'{dataset_dir / 'dataset.json'}': the 'training' list is empty, there is no case to show")
    channel = {name: int(index) for index, name in meta["modality"].items()}
    missing = [name for name in MODALITIES if name not in channel]
    if missing:
        raise ValueError(f"'{dataset_dir / 'dataset.json'}': 'modality' lacks {', '.join(missing)}")
    entries = {entry["case"]: entry for entry in meta["training"]}
    if case is None:
        volumes = {name: _lesion_ml(dataset_dir, entry) for name, entry in entries.items()}
        case = max(volumes, key=volumes.get)
    elif case not in entries:
        raise ValueError(f"case '{case}' is not in the training list of '{dataset_dir / 'dataset.json'}'")
    entry = entries[case]

    image = nib.as_closest_canonical(nib.load(dataset_dir / entry["image"]))
    label_image = nib.as_closest_canonical(nib.load(dataset_dir / entry["label"]))
    volume = image.get_fdata(dtype=np.float32)
    label = np.asanyarray(label_image.dataobj) > 0
    if volume.ndim != 4 or volume.shape[:3] != label.shape:
        raise ValueError(f"'{entry['image']}' {volume.shape} and '{entry['label']}' {label.shape} do not match")
    if slice_index is None:
        slice_index = int(np.argmax(label.sum(axis=(0, 1))))
    elif not 0 <= slice_index < label.shape[2]:
        raise ValueError(f"slice_index {slice_index} is outside 0..{label.shape[2] - 1} of case '{case}'")
    voxel_ml = voxel_volume_ml(image.affine)

    figure = Figure(figsize=(15, 9), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3).ravel()
    brain = (volume[..., slice_index, [channel[name] for name in MODALITIES[1:]]] != 0).any(axis=-1)
    ct = _radiological(volume[..., slice_index, channel["CT"]])
    for ax, name in zip(axes, MODALITIES):
        values = volume[..., slice_index, channel[name]]
        if name == "CT":
            shown = ax.imshow(ct, cmap="gray", vmin=BRAIN_WINDOW_HU[0], vmax=BRAIN_WINDOW_HU[1])
        else:
            top = float(np.percentile(values[brain], 99)) if brain.any() else 1.0
            shown = ax.imshow(_radiological(values), cmap="jet", vmin=0.0, vmax=max(top, 1e-6))
        title, unit = PANELS[name]
        ax.set_title(title)
        figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).set_label(unit)
    outline = axes[5]
    shown = outline.imshow(ct, cmap="gray", vmin=BRAIN_WINDOW_HU[0], vmax=BRAIN_WINDOW_HU[1])
    figure.colorbar(shown, ax=outline, fraction=0.046, pad=0.02).set_label("HU")
    if label[..., slice_index].any():
        outline.contour(_radiological(label[..., slice_index]).astype(float), levels=[0.5], colors="red")
    outline.set_title("Lesion label (red) on CT")
    for ax in axes:
        ax.set_axis_off()
    figure.suptitle(
        f"{case} (patient {entry.get('patient', '?')}): slice {slice_index + 1} of {label.shape[2]}, "
        f"lesion {label[..., slice_index].sum() * voxel_ml:.1f} mL in this slice, {label.sum() * voxel_ml:.1f} mL "
        "in the volume; patient's right on the left"
    )
    return write_atomically(out, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
