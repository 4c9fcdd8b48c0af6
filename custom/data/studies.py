"""Read CT perfusion studies and check them against the data contract: numpy and nibabel only.

Why it exists: the ISLES 2018 converter (``custom.data.isles2018``), the dataset check (``custom.data.check``),
the bundle's load-time validation (``custom.transforms.ValidateStudy``) and the MONAI-free runner
(``custom/deploy.py``) must find a case's maps, read a file and refuse a bad study in one way, with one
message naming the file. MONAI's readers know neither the ISLES 2018 folder layout nor this project's data
contract. It imports no MONAI and from the project only ``custom.clinical`` (the channel order): the runner
imports it and is copied without the project (docs/deployment.md).
"""

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.clinical import MODALITIES, brain_mask, voxel_volume_ml

LABEL_NAMES = ("background", "lesion")
LABEL_MAP = "OT"
# Two maps share a grid when their affines agree within this tolerance (mm, relative).
AFFINE_ATOL_MM = 1e-3
AFFINE_RTOL = 1e-4
# Voxel sizes (mm) of CT grids: ISLES 2018 has 0.7-1.0 mm pixels and 5-12 mm slices, thin-slice CTP 0.5-1 mm, the
# phantom (32 pixels or more) up to 7.84 mm pixels. Outside this range the size is not in mm: a header whose unit is
# unknown (xyzt_units 0) is read as mm, so sizes written in meters (0.0009) read 1000 times too small, in microns
# 1000 times too large; the bounds lie a factor of 2 or more beyond such sizes of 0.2-22 mm misread.
VOXEL_MM_RANGE = (0.05, 30.0)
# H and W are padded to multiples of 16 for the U-Net's four stride-2 levels; a side of 16 or less reaches a
# 1 x 1 bottleneck, where instance normalisation fails. Larger sides are accepted whatever their size.
MIN_IN_PLANE_SIZE = 17

# `SMIR.Brain.XX.O.<MOD>.<id>` with MOD like CT, CT_CBF, MR_Tmax, OT, CT_4DPWI; optionally a NIfTI suffix.
SMIR_NAME = re.compile(
    r"^SMIR\.Brain\.[^.]+\.O\.(?:(?:CT|MR)_)?(?P<map>[A-Za-z0-9]+)\.\d+(?:\.nii|\.nii\.gz)?$", re.IGNORECASE
)
# Map name (lower case) -> canonical name. Others, such as the large 4D PWI source series, are never opened.
_KNOWN_MAPS = {name.lower(): name for name in (*MODALITIES, LABEL_MAP)}


def affines_match(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two voxel-to-world affines describe the same grid within ``AFFINE_ATOL_MM`` / ``AFFINE_RTOL``."""
    return bool(np.allclose(a, b, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM))


def _named(path, name: str | None) -> str:
    return f"'{path}'" if name is None else name


def load_nifti(path, name: str | None = None) -> nib.Nifti1Image:
    """The NIfTI image at ``path`` (header read, voxels not yet), or a ValueError naming the file as ``name``
    (default: the quoted path), also for voxels stored as records (RGB or other vector types: several values per
    voxel, which numpy refused to convert to numbers with a message of its own types)."""
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types for corrupt or truncated files
        raise ValueError(f"{_named(path, name)}: cannot read as NIfTI ({err})") from err
    stored = image.get_data_dtype()
    if stored.names:
        raise ValueError(
            f"{_named(path, name)}: its voxels are stored as {len(stored.names)}-value records ({stored.names}, "
            "e.g. an RGB screenshot of a map), not one number each: export the map itself as a scalar image"
        )
    return image


def read_voxels(path, read: Callable[[], np.ndarray], name: str | None = None) -> np.ndarray:
    """``read()``, the voxels of the file ``path``, or a ValueError naming the file as ``name`` (default: the
    quoted path): a truncated or corrupt file often fails only when its voxels are read, after its header was."""
    try:
        return read()
    except Exception as err:  # nibabel, gzip and zlib raise many types for truncated data
        raise ValueError(f"{_named(path, name)}: cannot read the voxels ({err})") from err


def require_voxel_size_in_mm(path, image: nib.Nifti1Image, name: str | None = None) -> None:
    """Refuse, naming the file as ``name`` (default: the quoted path), a NIfTI whose voxel size nibabel's affine does
    not give in mm: a header whose spatial unit (xyzt_units) is meters or microns, or that stores a voxel size of 0
    (pixdim[1:4]) where its affine is read from it (no sform), or whose voxel size, read as mm, lies outside
    ``VOXEL_MM_RANGE`` (a unit of unknown, xyzt_units 0, which nibabel and NIfTI readers take as mm, over sizes written
    in meters: 0.0009 x 0.0009 x 0.005 gave volumes 10^9 times too small).

    Why it exists: lesion volumes (mL) and ``min_lesion_ml`` take the voxel volume from the affine, in mm. nibabel
    ignores the unit (a study stored in meters gave an empty mask, 0.0 mL: every lesion under ``min_lesion_ml``) and
    replaces a stored 0 by 1 mm with only a log line (a phantom study of 6 mm slices stored with slice thickness 0
    gave 11.0 mL for 66.0). The header is read again, unfixed, to see what the file stores."""
    if not isinstance(image, nib.Nifti1Image):
        return
    unit = image.header.get_xyzt_units()[0]
    if unit in ("meter", "micron"):
        raise ValueError(
            f"{_named(path, name)}: its header gives the voxel size in {unit}s (xyzt_units), which nibabel reads as "
            "mm: the lesion volumes would be wrong; store the image in mm (affine and pixdim in mm, xyzt_units mm)"
        )
    if image.header["sform_code"] <= 0:  # else the sform gives the affine: pixdim is not read
        with nib.openers.ImageOpener(path) as stored:
            pixdim = type(image.header).from_fileobj(stored, check=False)["pixdim"][1:4]
        if not np.all(pixdim != 0):
            raise ValueError(
                f"{_named(path, name)}: its header stores the voxel size {np.round(pixdim.astype(float), 4).tolist()} "
                "(pixdim[1:4]) and no sform, so a size of 0 would be read as 1 mm and the lesion volumes would be "
                "wrong: set the voxel size in its header"
            )
    sizes = np.linalg.norm(np.asarray(image.affine, dtype=float)[:3, :3], axis=0)
    low, high = VOXEL_MM_RANGE
    if np.all(np.isfinite(sizes) & (sizes > 0)) and not np.all((sizes >= low) & (sizes <= high)):
        # sizes of 0 or not finite: voxel_size_problems names them
        raise ValueError(
            f"{_named(path, name)}: its voxel size {np.round(sizes, 6).tolist()} (its affine, read as mm; xyzt_units "
            f"'{unit}') is outside the {low:g}-{high:g} mm of CT voxels: a header of unit unknown written in meters "
            "(0.0009 for 0.9 mm) or microns is read as mm, and the lesion volumes would be off by 10^3 or more; "
            "store the image in mm (affine and pixdim in mm, xyzt_units mm)"
        )


def read_nifti(path, name: str | None = None) -> tuple[nib.Nifti1Image, np.ndarray]:
    """(image, voxel array) of the NIfTI file ``path``, the voxels as stored with the NIfTI scaling applied and
    nibabel's affine (as the bundle's ``custom.readers.HeaderPreservingNibabelReader`` reads them); a ValueError
    naming the file as ``name`` if it cannot be read or its voxel size is not read in mm
    (``require_voxel_size_in_mm``)."""
    image = load_nifti(path, name)
    require_voxel_size_in_mm(path, image, name)
    return image, read_voxels(path, lambda: np.asanyarray(image.dataobj), name)


def voxel_digest(data: np.ndarray) -> str:
    """SHA-256 (hex) over an array's shape and voxels: the identity of a study by its content, whatever its file is
    named. The converter refuses a study converted twice by it (``custom.data.isles2018``); training records the
    digests of the images it trained on and evaluation refuses a checkpoint trained on an image it would score
    (``custom.training_record``), across conversions."""
    digest = hashlib.sha256(repr(data.shape).encode())
    digest.update(np.ascontiguousarray(data))  # no copy of a contiguous array (the maps of one study: ~10 MB)
    return digest.hexdigest()


def require_finite(path, data: np.ndarray) -> None:
    """Refuse NaN and Inf, naming the file ``path``: they silently corrupt brain statistics and volumes."""
    bad = np.count_nonzero(~np.isfinite(data))
    if bad:
        raise ValueError(f"'{path}': {bad} NaN or Inf values")


def image_problems(name: str, data: np.ndarray, affine: np.ndarray | None = None) -> list[str]:
    """Problems of an image array as read from its file (H, W, D, 5): wrong shape, H or W too small, NaN/Inf per
    channel, an all-zero perfusion map (no brain: a mask would be a confident wrong answer), perfusion maps non-zero
    at every voxel (no background: the brain, hence the normalisation, the mask and the clinical volumes, would be
    the whole volume; seen with an int16 file whose scaling turns 0 into -0.005), and with its ``affine`` a grid
    without a voxel volume (``voxel_size_problems``) or slices that are not axial (``slice_axis_problems``). The
    rules of ``python -m custom check``, the bundle's ``ValidateStudy`` and the runner; ``name`` names the file."""
    if data.ndim != 4 or data.shape[-1] != len(MODALITIES):
        return [
            f"{name}: expected a 4D image with {len(MODALITIES)} channels ({', '.join(MODALITIES)}) "
            f"on the 4th axis, found shape {tuple(data.shape)}"
        ]
    problems = [] if affine is None else voxel_size_problems(name, affine) or slice_axis_problems(name, affine)
    if min(data.shape[:2]) < MIN_IN_PLANE_SIZE:
        problems.append(
            f"{name}: in-plane size {data.shape[0]} x {data.shape[1]} is below the network's minimum "
            f"{MIN_IN_PLANE_SIZE} x {MIN_IN_PLANE_SIZE}"
        )
    for channel, modality in enumerate(MODALITIES):
        values = data[..., channel]
        bad = np.count_nonzero(~np.isfinite(values))
        if bad:
            problems.append(f"{name}: {bad} NaN or Inf values in the {modality} channel")
        if channel > 0 and not np.any(values):
            problems.append(f"{name}: the {modality} channel is all zero (empty brain)")
    if brain_mask(data).all():
        problems.append(
            f"{name}: no voxel is zero in every perfusion map, so the whole volume would be taken as brain: the maps "
            "must be zero outside the brain (mask them; an integer file needs a scaling that keeps 0 at 0, scl_inter 0)"
        )
    return problems


def voxel_size_problems(name: str, affine: np.ndarray) -> list[str]:
    """A problem where ``affine`` gives the voxels no volume (a voxel axis of length 0, or axes in one plane) or is
    not finite.

    Why it exists: lesion volumes (mL), ``min_lesion_ml`` and the clinical columns come from the affine's voxel
    volume. A header whose sform holds a zero matrix (sform_code > 0, srow left unset) was segmented, its lesions all
    under ``min_lesion_ml`` (0 mL), and the run then failed writing the mask (a singular affine), stopping the cases
    after it."""
    affine = np.asarray(affine, dtype=float)
    if np.isfinite(affine).all() and voxel_volume_ml(affine) > 0:
        return []
    return [
        f"{name}: its affine gives the voxels no volume (voxel axes of length 0 or in one plane, or not finite), so "
        f"lesion volumes cannot be measured (voxel axes {np.round(affine[:3, :3], 4).tolist()}): set the voxel size "
        "and orientation in its header (sform/qform)"
    ]


def slice_axis_problems(name: str, affine: np.ndarray) -> list[str]:
    """A problem where the third voxel axis of ``affine`` is not the one nearest the head-foot direction.

    Why it exists: the network segments the 2D slices of the third axis, which it learnt as axial slices. A stack
    stored with its axes permuted (sagittal or coronal slices along the third axis) is read without complaint and
    segmented into a confident wrong mask. Gantry-tilted and oblique axial stacks, and an affine without orientation
    (the identity), pass."""
    linear = np.asarray(affine, dtype=float)[:3, :3]
    lengths = np.linalg.norm(linear, axis=0)
    if not np.all(lengths > 0):
        return []  # no orientation to check
    head_foot = np.abs(linear[2]) / lengths  # how far each voxel axis runs along the world's head-foot axis
    if head_foot[2] >= head_foot.max():
        return []
    runs = ("left-right", "front-back", "head-foot")[int(np.abs(linear[:, 2]).argmax())]
    return [
        f"{name}: its third voxel axis runs {runs} (its affine), and voxel axis {int(head_foot.argmax()) + 1} runs "
        "head-foot: the network segments the slices of the third axis, which must be axial; reorient the image and "
        "its label so that the third axis runs head-foot (e.g. nibabel.as_closest_canonical)"
    ]


def label_problems(name: str, data: np.ndarray, image_name: str | None = None, image_shape=None) -> list[str]:
    """Problems of a label array (H, W, D): not 3D, a shape other than its image's (H, W, D), values other
    than 0 and 1 (0.5 included). Shared by the converter, the check and ``ValidateStudy``."""
    if data.ndim != 3:
        return [f"{name}: expected a 3D label, found shape {tuple(data.shape)}"]
    problems = []
    if image_shape is not None and tuple(data.shape) != tuple(image_shape)[:3]:
        problems.append(f"{name}: shape {tuple(data.shape)} differs from {image_name} {tuple(image_shape)[:3]}")
    values = np.unique(data)
    stray = values[~np.isin(values, (0, 1))]
    if stray.size:
        problems.append(f"{name}: label values must be 0 or 1, found {stray.tolist()}")
    return problems


@dataclass(frozen=True)
class CaseFiles:
    """One case folder's map files, found by name only (nothing loaded yet)."""

    name: str
    folder: Path
    maps: dict[str, Path]  # modality name (CT, CBF, CBV, MTT, Tmax) -> NIfTI file
    label: Path | None  # the OT file; None for unlabelled cases


def folder_entries(folder: Path) -> list[Path]:
    """The sorted entries of ``folder``, or a ValueError naming it: a case folder the user may not list (another
    user's, mode 700) is that input's problem, reported with the others, not an OSError that stops every case."""
    try:
        return sorted(Path(folder).iterdir())
    except OSError as err:
        raise ValueError(f"'{folder}': cannot list the folder ({err})") from err


def nifti_in(folder: Path) -> Path:
    """The one .nii/.nii.gz file of an ISLES ``SMIR.Brain...`` folder; an error naming the folder otherwise.

    Hidden files (names starting with ``.``) are not counted: macOS writes an AppleDouble ``._<name>.nii`` beside
    every file copied to a non-Apple disk, which would make every map folder hold two NIfTI files.
    """
    files = [
        p for p in folder_entries(folder)
        if p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii", ".nii.gz"))
    ]
    if len(files) != 1:
        raise ValueError(f"'{folder}' should hold exactly one .nii/.nii.gz file, found {len(files)}")
    return files[0]


def find_case_maps(case_dir) -> CaseFiles:
    """Locate CT, CBF, CBV, MTT, Tmax and (if present) OT in one ISLES 2018 case folder by their SMIR names.

    Entries may be folders ``SMIR.Brain.XX.O.<MOD>.<id>/`` holding one NIfTI, or NIfTI files named that way.
    Perfusion maps may be spelled ``CT_<map>`` or ``MR_<map>``; the 4D PWI series and unrelated entries are
    skipped without being opened. A missing or duplicated map is an error naming the folder and the map.
    """
    case_dir = Path(case_dir)
    found: dict[str, list[Path]] = {}
    for entry in folder_entries(case_dir):
        match = SMIR_NAME.match(entry.name)
        map_name = _KNOWN_MAPS.get(match["map"].lower()) if match else None
        if map_name is None:
            continue
        if entry.is_dir():
            found.setdefault(map_name, []).append(nifti_in(entry))
        elif entry.name.endswith((".nii", ".nii.gz")):
            found.setdefault(map_name, []).append(entry)
    for map_name, paths in found.items():
        if len(paths) > 1:
            raise ValueError(f"'{case_dir}': {map_name} found more than once: {', '.join(map(str, paths))}")
    missing = [m for m in MODALITIES if m not in found]
    if missing:
        raise ValueError(
            f"'{case_dir}': missing {', '.join(missing)} (found: {', '.join(sorted(found)) or 'no SMIR maps'}); "
            "expected one ISLES 2018 case folder (case_N/SMIR.Brain.XX.O.<MOD>.<id>)"
        )
    label = found.get(LABEL_MAP, [None])[0]
    return CaseFiles(case_dir.name, case_dir, {m: found[m][0] for m in MODALITIES}, label)


def load_map(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A map as float32 (NIfTI scaling applied), trailing singleton axes squeezed; 3D, finite and on a grid whose
    voxels have a volume (``voxel_size_problems``, ``require_voxel_size_in_mm``) or an error."""
    image = load_nifti(path)
    require_voxel_size_in_mm(path, image)
    data = read_voxels(path, lambda: image.get_fdata(dtype=np.float32))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"'{path}': expected a 3D map, found shape {data.shape}")
    require_finite(path, data)
    problems = voxel_size_problems(f"'{path}'", image.affine)
    if problems:
        raise ValueError(problems[0])
    return image, data


def require_same_grid(path: Path, image: nib.Nifti1Image, data: np.ndarray, reference_path: Path, reference_image,
                      reference_data, reference: str = "the CT's"):
    """Refuse an image that does not lie on a reference image's grid (shape and affine; by default the CT's, for
    a case's maps): nothing is resampled. ``reference`` names the reference in the message."""
    if data.shape != reference_data.shape:
        raise ValueError(
            f"'{path}': shape {data.shape} differs from {reference} {reference_data.shape} ('{reference_path}')"
        )
    if not affines_match(image.affine, reference_image.affine):
        raise ValueError(
            f"'{path}': affine differs from {reference} ('{reference_path}'; another orientation or grid); nothing is "
            f"resampled.\n{Path(path).name}:\n{np.array2string(image.affine, precision=4)}\n"
            f"{Path(reference_path).name}:\n{np.array2string(reference_image.affine, precision=4)}"
        )


def load_case(case: CaseFiles, with_label: bool) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray | None]:
    """The CT image (grid reference), the (H, W, D, 5) float32 stack CT, CBF, CBV, MTT, Tmax and the uint8 label.

    Every map must lie on the CT's grid; label values must be 0 or 1. The label is None unless
    ``with_label`` and the case has an OT map.
    """
    ct_path = case.maps["CT"]
    ct_image, ct_data = load_map(ct_path)
    channels = [ct_data]
    for modality in MODALITIES[1:]:
        path = case.maps[modality]
        image, data = load_map(path)
        require_same_grid(path, image, data, ct_path, ct_image, ct_data)
        channels.append(data)
    label = load_label(case, ct_path, ct_image, ct_data) if with_label else None
    return ct_image, np.stack(channels, axis=-1), label


def load_label(case: CaseFiles, ct_path: Path, ct_image, ct_data) -> np.ndarray | None:
    """The case's uint8 OT label on the CT grid (values 0 or 1), or None if the case has none."""
    if case.label is None:
        return None
    image, data = load_map(case.label)
    require_same_grid(case.label, image, data, ct_path, ct_image, ct_data)
    problems = label_problems(f"'{case.label}'", data)
    if problems:
        raise ValueError("; ".join(problems))
    return data.astype(np.uint8)
