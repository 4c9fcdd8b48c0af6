"""``python -m custom perfusion maps | bench | accuracy``: maps from a 4D series, speed, accuracy on the phantom.

Why it exists: the command-line entry points of the perfusion analysis; the analysis itself lives in
custom/perfusion/maps.py. Every file is written through custom/atomic.py.
"""

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from custom.atomic import write_atomically, write_text_atomically
from custom.clinical import TMAX_THRESHOLD_S  # the DEFUSE 3 hypoperfusion threshold, for the volume agreement
from custom.clinical import voxel_volume_ml
from custom.data.datalist import refuse_earlier_file
from custom.data.studies import affines_match, read_nifti
from custom.perfusion.deconvolution import OSCILLATION_LIMIT, TIKHONOV_LAMBDA
from custom.perfusion.maps import MAP_NAMES, SMOOTHING_MM, compute_perfusion_maps
from custom.perfusion.series import load_series


def analyse_series(
    series,
    dt: float | None = None,
    aif_mask=None,
    method: str = "osvd",
    oscillation_limit: float = OSCILLATION_LIMIT,
    tikhonov_lambda: float = TIKHONOV_LAMBDA,
    smoothing_mm: float = SMOOTHING_MM,
    motion_correction: bool = False,
    device: str = "cpu",
):
    """Load a 4D CTP NIfTI (time step from the header or ``dt``), optionally motion-correct it, compute its
    maps; returns (LoadedSeries, PerfusionResult). ``aif_mask``: a 3D NIfTI on the series' grid."""
    loaded = load_series(series, dt)
    hu = loaded.hu
    mask = None
    if aif_mask is not None:
        mask_image, mask = read_nifti(aif_mask)
        if (
            mask.shape[:3] != hu.shape[:3]
            or any(n != 1 for n in mask.shape[3:])  # a 3D mask, possibly stored with trailing axes of length 1
            or not affines_match(mask_image.affine, loaded.image.affine)
        ):
            raise ValueError(
                f"AIF mask '{aif_mask}' (shape {mask.shape}) is not a 3D mask on the grid of the series '{series}' "
                f"(shape {hu.shape[:3]})"
            )
        mask = mask.reshape(hu.shape[:3])
    result = compute_perfusion_maps(
        hu,
        loaded.frame_s,
        aif_mask=mask,
        method=method,
        oscillation_limit=oscillation_limit,
        tikhonov_lambda=tikhonov_lambda,
        smoothing_mm=smoothing_mm,
        spacing_mm=loaded.spacing_mm,
        device=device,
        name=str(series),
        motion_correction=motion_correction,  # after frames 0 and 1 are checked: they make the reference
    )
    return loaded, result


def save_map(volume: np.ndarray, reference: nib.Nifti1Image, path: Path):
    """A float32 3D map on the reference's spatial grid (affine, qform/sform), written atomically."""
    image = nib.Nifti1Image(volume.astype(np.float32), reference.affine)
    image.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]) or 1)
    image.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    image.header.set_zooms(reference.header.get_zooms()[:3])
    image.header.set_xyzt_units("mm", "sec")
    write_atomically(path, lambda temporary: nib.save(image, temporary))


def maps(
    series: str,
    out: str,
    dt: float | None = None,
    aif_mask: str | None = None,
    method: str = "osvd",
    oscillation_limit: float = OSCILLATION_LIMIT,
    tikhonov_lambda: float = TIKHONOV_LAMBDA,
    smoothing_mm: float = SMOOTHING_MM,
    motion_correction: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
):
    """Compute CBF (ml/100 g/min), CBV (ml/100 g), MTT (s), Tmax (s), TTP (s) from the 4D CTP NIfTI SERIES.

    Writes OUT/{CBF,CBV,MTT,Tmax,TTP}.nii.gz on the series' grid and OUT/perfusion.json (time step,
    baseline frames, AIF and VOF voxels and curves, partial-volume scale). Options: --dt SECONDS when the
    header has no time step; --aif_mask NIFTI to give the AIF voxels; --method osvd|tikhonov;
    --motion_correction (rigid, ITK); --device cuda; --overwrite to replace existing outputs.
    """
    out = Path(out)
    targets = [out / f"{name}.nii.gz" for name in MAP_NAMES] + [out / "perfusion.json"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; pass --overwrite to replace them")
    loaded, result = analyse_series(
        series, dt, aif_mask, method, oscillation_limit, tikhonov_lambda, smoothing_mm, motion_correction, device
    )
    for name in MAP_NAMES:
        save_map(result.maps[name], loaded.image, out / f"{name}.nii.gz")
    report = {"series": str(series), "method": method, **result.report()}
    write_text_atomically(out / "perfusion.json", json.dumps(report, indent=2) + "\n")
    aif = result.aif
    print(
        f"'{series}': {loaded.hu.shape[3]} frames of {loaded.frame_s:g} s, {result.baseline_frames} baseline; "
        f"AIF peak {aif.peak_hu:.0f} HU at {aif.time_to_peak_s:.1f} s from voxels {aif.voxels[:3].tolist()}...; "
        f"partial-volume scale {result.partial_volume_scale:.2f}; wrote {out}"
    )
    return str(out)


def benchmark_series(size: int = 256, slices: int = 8, frames: int = 50, seed: int = 0):
    """A phantom 4D series of ``slices`` x ``size`` x ``size`` and ``frames`` frames of 1 s (int16 HU) and its
    spacing; the patient is the first of the seed's cohort, its slab cut to ``slices``."""
    from custom.data import phantom

    slab = next(phantom.iter_cohort(seed, 1, 0))
    centre = dataclasses.replace(slab.patient.centre, frames=frames, frame_s=1.0)
    slab = dataclasses.replace(slab, patient=dataclasses.replace(slab.patient, centre=centre), slices=slices)
    model = phantom.slab_model(slab, size)
    series = phantom.render_pwi(slab, size, phantom.pwi_generator(seed, slab), model)
    return series.series, tuple(float(v) for v in np.abs(np.diag(model.affine))[:3])


def benchmark(
    size: int = 256, slices: int = 8, frames: int = 50, repeats: int = 3, device: str = "cpu", threads: int = 2
) -> dict:
    """Seconds from a 4D series in memory (size x size x slices, ``frames`` frames) to the five maps.

    The series is a phantom (generation not timed); each repeat runs the whole analysis (mask, baseline,
    AIF/VOF, smoothing, oSVD); reports the median and minimum, the torch threads and the load average
    (the machine may be shared) and the process CPU seconds. The function to hook into a project-wide
    benchmark.
    """
    hu, spacing = benchmark_series(size, slices, frames)
    callers_threads = torch.get_num_threads()  # restored afterwards: the process's other work keeps its threads
    torch.set_num_threads(threads)
    try:
        compute_perfusion_maps(hu, 1.0, spacing_mm=spacing, device=device)  # warm-up (allocations, kernels)
        seconds, cpu_seconds = [], []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            compute_perfusion_maps(hu, 1.0, spacing_mm=spacing, device=device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
        result = {
            "shape": list(hu.shape),
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3),
            "median_cpu_s": round(statistics.median(cpu_seconds), 3),  # summed over threads
            "repeats": repeats,
            "load_average_1min": round(os.getloadavg()[0], 2),
            "cpu_count": os.cpu_count(),
        }
    finally:
        torch.set_num_threads(callers_threads)
    print(json.dumps(result))
    return result


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r, or None where it is undefined (fewer than 3 pairs, a constant side)."""
    return float(np.corrcoef(a, b)[0, 1]) if a.size > 2 and a.std() > 0 and b.std() > 0 else None


def _rounded(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded, None where it is undefined: the summary is JSON, which has no NaN (Python wrote ``NaN``,
    which strict JSON readers refuse)."""
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def _agreement(computed: np.ndarray, truth: np.ndarray) -> dict:
    """Bias (mean computed - truth), relative bias, Pearson r and voxel count of paired values."""
    bias = float(np.mean(computed - truth)) if computed.size else None
    mean_truth = float(np.mean(truth)) if truth.size else None
    return {
        "bias": _rounded(bias),
        "relative_bias": _rounded(bias / mean_truth) if bias is not None and mean_truth else None,
        "r": _rounded(_pearson(computed, truth)),
        "voxels": int(computed.size),
    }


def accuracy(
    cases: int = 8, size: int = 256, seed: int = 0, method: str = "osvd", out: str | None = None,
    overwrite: bool = False, end_after_aif_peak: int | None = None,
) -> dict:  # fmt: skip
    """Computed maps against the phantom's truth for the first ``cases`` training cases of the seed's cohort.

    The cases are exactly those of ``python -m custom phantom --seed SEED --size SIZE --pwi`` (rendered in
    memory). Per tissue class (grey, white, deep grey matter; voxels free of large and cortical vessels)
    and inside the lesion (OT): bias, relative bias and Pearson r of CBF, CBV, MTT, Tmax pooled over
    cases; the fraction of AIF voxels inside an artery and of VOF voxels inside the sinus; the volume
    and Dice of Tmax > 6 s within the brain tissue; per case the AIF's level at its last frame (fraction of its
    peak) and the median computed / true CBF of the brain tissue. Prints a Markdown table; ``out`` also writes JSON
    (an existing ``out`` is refused before any case is rendered, unless ``overwrite``).

    ``end_after_aif_peak`` K measures truncated series: each series is cut K frames after its true arterial peak,
    and a case the analysis refuses is listed with the refusal under ``per_case`` instead of stopping the command.
    """
    from custom.data import phantom

    if out is not None:
        refuse_earlier_file(out, overwrite)

    classes = {"grey matter": (phantom.GREY,), "white matter": (phantom.WHITE,), "deep grey": (phantom.DEEP_GREY,)}
    pooled = {name: {m: ([], []) for m in ("CBF", "CBV", "MTT", "Tmax")} for name in (*classes, "lesion")}
    aif_in_artery, vof_in_sinus, tmax_rows, per_case = [], [], [], []
    slabs = [s for s in phantom.iter_cohort(seed, cases, 0)]
    for slab in slabs:
        model = phantom.slab_model(slab, size)
        series = phantom.render_pwi(slab, size, phantom.pwi_generator(seed, slab), model)
        spacing = tuple(float(v) for v in np.abs(np.diag(model.affine))[:3])
        hu = series.series
        if end_after_aif_peak is not None:
            peak = int(np.argmax(series.bolus.arterial(np.arange(hu.shape[-1]) * series.frame_s)))
            hu = hu[..., : peak + end_after_aif_peak + 1]
        try:
            result = compute_perfusion_maps(hu, series.frame_s, spacing_mm=spacing, method=method, name=slab.case)
        except ValueError as refusal:
            if end_after_aif_peak is None:
                raise
            per_case.append({"case": slab.case, "frames": hu.shape[-1], "refused": str(refusal)})
            continue
        aif_in_artery.append(float(np.mean([series.arteries[tuple(v)] > 0 for v in result.aif.voxels])))
        if result.vof is not None:
            vof_in_sinus.append(float(np.mean([series.sinus[tuple(v)] > 0 for v in result.vof.voxels])))
        clean = result.brain & (series.arteries == 0) & (series.sinus == 0) & ~model.vessels
        lesion = phantom.lesion_mask(slab.patient, model.tissue, model.severity, model.x, model.y, model.z)
        regions = {name: clean & np.isin(model.tissue, codes) for name, codes in classes.items()}
        regions["lesion"] = clean & lesion & np.isin(model.tissue, phantom.BRAIN_TISSUES)
        for name, region in regions.items():
            for m, (computed, truth) in pooled[name].items():
                computed.append(result.maps[m][region])
                truth.append(series.truth[m][region])
        tissue = clean & np.isin(model.tissue, phantom.BRAIN_TISSUES)
        per_case.append(
            {
                "case": slab.case,
                "frames": hu.shape[-1],
                "aif_end_fraction": round(float(result.aif.curve[-1] / result.aif.peak_hu), 3),
                "tissue_cbf_ratio": round(
                    float(np.median(result.maps["CBF"][tissue]) / np.median(series.truth["CBF"][tissue])), 3
                ),
            }
        )
        true_tmax, found_tmax = tissue & (series.truth["Tmax"] > TMAX_THRESHOLD_S), tissue & (
            result.maps["Tmax"] > TMAX_THRESHOLD_S
        )
        voxel_ml = voxel_volume_ml(model.affine)
        overlap = 2 * np.count_nonzero(true_tmax & found_tmax)
        total = np.count_nonzero(true_tmax) + np.count_nonzero(found_tmax)
        tmax_rows.append(
            {
                "case": slab.case,
                "true_ml": round(np.count_nonzero(true_tmax) * voxel_ml, 2),
                "computed_ml": round(np.count_nonzero(found_tmax) * voxel_ml, 2),
                "dice": round(overlap / total, 3) if total else 1.0,
            }
        )
    table = {
        name: {m: _agreement(np.concatenate([[], *c]), np.concatenate([[], *t])) for m, (c, t) in per_map.items()}
        for name, per_map in pooled.items()  # [] first: with end_after_aif_peak every case may be refused
    }
    true_ml = np.array([r["true_ml"] for r in tmax_rows])
    computed_ml = np.array([r["computed_ml"] for r in tmax_rows])
    summary = {
        "cases": len(slabs),
        "size": size,
        "seed": seed,
        "method": method,
        "maps": table,
        "aif_voxels_in_artery": round(float(np.mean(aif_in_artery)), 3) if aif_in_artery else None,
        "vof_voxels_in_sinus": round(float(np.mean(vof_in_sinus)), 3) if vof_in_sinus else None,
        "tmax6": {
            "cases": tmax_rows,
            "volume_r": _rounded(_pearson(computed_ml, true_ml)),
            "mean_volume_difference_ml": _rounded(np.mean(computed_ml - true_ml), 2) if tmax_rows else None,
            "mean_dice": _rounded(np.mean([r["dice"] for r in tmax_rows])) if tmax_rows else None,
        },
        "per_case": per_case,
    }
    lines = ["| region | map | bias | relative bias | r | voxels |", "|---|---|---|---|---|---|"]
    for name, per_map in table.items():
        for m, a in per_map.items():
            lines.append(f"| {name} | {m} | {a['bias']} | {a['relative_bias']} | {a['r']} | {a['voxels']} |")
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in summary.items() if k != "maps"}))
    if out is not None:
        write_text_atomically(out, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
