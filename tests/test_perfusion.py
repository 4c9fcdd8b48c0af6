"""Perfusion analysis from raw 4D CTP: deconvolution of analytic curves, AIF/VOF on the phantom, maps against
the phantom's truth, the converter's --maps-from-4d, and refusal of bad series."""

import dataclasses
import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from custom.data import phantom
from custom.perfusion.deconvolution import deconvolve
from custom.perfusion.maps import compute_perfusion_maps
from custom.perfusion.units import FLOW_TO_RATE, VOLUME_FACTOR

FINE_S = 0.01


def analytic_curves(frame_s, frames, cbf, mtt, delay, noise_hu, voxels, seed=0):
    """AIF (gamma variate, 400 HU peak, arrival 5 s) and ``voxels`` noisy tissue curves
    C = FLOW_TO_RATE CBF (AIF * exp(-t / MTT))(t - delay), integrated on a 0.01 s grid, sampled every frame_s."""
    fine = np.arange(0.0, frames * frame_s, FINE_S)
    x = np.clip(fine - 5.0, 0, None) / 4.5
    aif_fine = np.where(fine > 5.0, 400.0 * x**3 * np.exp(3 * (1 - x)), 0.0)
    residue = np.where(fine >= delay, np.exp(-(fine - delay) / mtt), 0.0)
    tissue_fine = FLOW_TO_RATE * cbf * np.convolve(aif_fine, residue)[: fine.size] * FINE_S
    step = int(round(frame_s / FINE_S))
    aif, tissue = aif_fine[::step][:frames], tissue_fine[::step][:frames]
    rng = np.random.default_rng(seed)
    curves = tissue[None, :] + noise_hu * rng.standard_normal((voxels, frames))
    return torch.tensor(aif, dtype=torch.float32), torch.tensor(curves, dtype=torch.float32)


# Tolerances on the median over 200 voxels, by noise (HU per frame; the tissue peaks at 5-10 HU): CBV (area
# ratio) within 5 %; CBF within 35 / 45 / 55 % and MTT within 60 / 80 / 110 % (oSVD underestimates CBF, more
# for short transit times, long frames and noise); Tmax late by 0 to 2 frames + 1 s (the discretised,
# truncated residue peaks late), never early.
CBF_TOLERANCE = {0.0: 0.35, 0.5: 0.45, 2.0: 0.55}
MTT_TOLERANCE = {0.0: 0.6, 0.5: 0.8, 2.0: 1.1}


@pytest.mark.parametrize("frame_s", [1.0, 2.0])
@pytest.mark.parametrize("noise_hu", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("delay", [0.0, 6.0])
@pytest.mark.parametrize("cbf, mtt", [(50.0, 4.0), (20.0, 8.0)])
def test_osvd_recovers_cbf_mtt_tmax_of_analytic_curves(frame_s, noise_hu, delay, cbf, mtt):
    frames = int(60 / frame_s)
    aif, curves = analytic_curves(frame_s, frames, cbf, mtt, delay, noise_hu, voxels=200)
    residue = deconvolve(curves, aif, frame_s)
    found_cbf = residue.max(dim=1).values / FLOW_TO_RATE
    index = residue.argmax(dim=1).float()
    found_tmax = torch.where(index >= frames, index - 2 * frames, index) * frame_s
    found_cbv = VOLUME_FACTOR * curves.sum(1) / aif.sum()
    found_mtt = 60 * found_cbv / found_cbf
    assert float(found_cbv.median()) == pytest.approx(cbf * mtt / 60, rel=0.05)
    assert float(found_cbf.median()) == pytest.approx(cbf, rel=CBF_TOLERANCE[noise_hu])
    assert float(found_mtt.median()) == pytest.approx(mtt, rel=MTT_TOLERANCE[noise_hu])
    assert 0.0 <= float(found_tmax.median()) - delay <= 2 * frame_s + 1.0


def test_tikhonov_option_and_unknown_method():
    aif, curves = analytic_curves(1.0, 50, 40.0, 5.0, 2.0, 0.5, voxels=50)
    residue = deconvolve(curves, aif, 1.0, method="tikhonov")
    assert float((residue.max(dim=1).values / FLOW_TO_RATE).median()) == pytest.approx(40.0, rel=0.35)
    with pytest.raises(ValueError, match="unknown deconvolution method 'svd'"):
        deconvolve(curves, aif, 1.0, method="svd")


@pytest.fixture(scope="module")
def phantom_case():
    """A 64 x 64 phantom case with a stroke (8 slices, centre_4: 50 frames of 1 s) and its computed maps."""
    slab = next(s for s in phantom.iter_cohort(0, 8, 0) if s.slices >= 8 and s.patient.stroke.present)
    model = phantom.slab_model(slab, 64)
    series = phantom.render_pwi(slab, 64, phantom.pwi_generator(0, slab), model)
    spacing = tuple(np.abs(np.diag(model.affine))[:3])
    return model, series, compute_perfusion_maps(series.series, series.frame_s, spacing_mm=spacing)


def test_aif_is_found_in_an_artery_and_vof_in_the_sinus(phantom_case):
    _, series, result = phantom_case
    in_artery = [series.arteries[tuple(v)] > 0 for v in result.aif.voxels]
    assert np.mean(in_artery) >= 0.75
    assert result.vof is not None and np.mean([series.sinus[tuple(v)] > 0 for v in result.vof.voxels]) >= 0.75
    assert result.partial_volume_scale >= 1.0
    assert result.report()["aif"]["voxels"] == result.aif.voxels.tolist()


# Phantom tolerances (64 x 64): median CBF within 50 % of the truth per tissue (oSVD underestimates grey
# matter), CBV within 25 %, Tmax within 2.5 s (late); voxelwise Tmax correlates with the truth (r > 0.7)
# and the Tmax > 6 s volume is within 50 %.
def test_phantom_maps_agree_with_truth(phantom_case):
    model, series, result = phantom_case
    clean = result.brain & (series.arteries == 0) & (series.sinus == 0) & ~model.vessels
    for code in (phantom.GREY, phantom.WHITE):
        region = clean & (model.tissue == code) & (series.truth["Tmax"] < 3)
        for name, rel in (("CBF", 0.5), ("CBV", 0.25)):
            assert np.median(result.maps[name][region]) == pytest.approx(np.median(series.truth[name][region]), rel=rel)
        assert abs(np.median(result.maps["Tmax"][region]) - np.median(series.truth["Tmax"][region])) < 2.5
    tissue = clean & np.isin(model.tissue, phantom.BRAIN_TISSUES)
    assert np.corrcoef(result.maps["Tmax"][tissue], series.truth["Tmax"][tissue])[0, 1] > 0.7
    true_volume = np.count_nonzero(series.truth["Tmax"][tissue] > 6)
    assert true_volume > 50
    assert np.count_nonzero(result.maps["Tmax"][tissue] > 6) == pytest.approx(true_volume, rel=0.5)
    assert np.all(result.maps["CBF"][~result.brain] == 0)


def test_an_aif_that_is_not_an_artery_is_refused(phantom_case):
    """An AIF on tissue (a misplaced --aif_mask, no artery in the slab) gave CBF and Tmax without a word; the
    VOF scaling even kept CBV plausible."""
    model, series, result = phantom_case
    tissue = np.argwhere((model.tissue == phantom.WHITE) & (series.arteries == 0) & result.brain)[:8]
    mask = np.zeros(model.tissue.shape, bool)
    mask[tuple(tissue.T)] = True
    with pytest.raises(ValueError, match=r"'case_x': the --aif_mask voxels .* times the mean brain enhancement"):
        compute_perfusion_maps(series.series, series.frame_s, aif_mask=mask, name="case_x")
    artery = np.zeros(model.tissue.shape, bool)
    artery[tuple(result.aif.voxels.T)] = True
    compute_perfusion_maps(series.series, series.frame_s, aif_mask=artery)  # the automatic AIF's voxels pass
    without_arteries = series.series.astype(np.float32)
    without_arteries[(series.arteries > 0) | (series.sinus > 0)] = without_arteries[tuple(tissue[0])]
    with pytest.raises(ValueError, match=r"'case_x': no artery found"):
        compute_perfusion_maps(without_arteries, series.frame_s, name="case_x")


def test_a_series_without_a_bolus_is_refused(phantom_case):
    """A failed injection: no contrast, 5 HU noise and a global bump of 2 HU (drift, beam hardening) passed the flat
    check (> 1 HU) and the AIF check (the 8 largest noise peaks, 11 HU, are > 4 times the 2 HU brain peak), and the
    maps came out with a median brain CBF of 30 (the true series': 20) and no note. The true series passes."""
    _, series, result = phantom_case
    frames = series.series.shape[-1]
    bump = 2.0 * np.exp(-0.5 * ((np.arange(frames) - frames / 3) / 3.0) ** 2)
    noise = np.random.default_rng(2).normal(0.0, 5.0, series.series.shape)
    no_bolus = (np.repeat(series.series[..., :1], frames, axis=-1) + noise + bump).astype(np.float32)
    with pytest.raises(ValueError, match=r"'case_x': the AIF .* times the voxel noise .* no contrast bolus"):
        compute_perfusion_maps(no_bolus, series.frame_s, name="case_x")
    assert result.maps["CBF"].any()


def test_a_truncated_bolus_is_warned_of(phantom_case, caplog):
    """Notes reached perfusion.json only (the maps command printed none, prepare --maps-from-4d dropped them), and a
    series cut before the bolus had passed gave biased CBF, CBV and MTT without any."""
    _, series, result = phantom_case
    assert result.notes == []  # the complete series: no note
    cut = series.series[..., :18]  # the series ends while the bolus is in the brain
    truncated = compute_perfusion_maps(cut, series.frame_s, name="case_x")
    assert any(note.startswith("truncated bolus") for note in truncated.notes)
    assert [record.getMessage() for record in caplog.records] == [f"'case_x': {note}" for note in truncated.notes]
    assert all(record.levelname == "WARNING" for record in caplog.records)


@pytest.mark.parametrize("after_peak", [0, 1, 2, 3])
def test_a_series_ending_before_the_arterial_bolus_has_passed_is_refused(phantom_case, after_peak):
    """Cut at the AIF's peak (frame 12 of the 50) the series gave a median brain CBF of 365 (the whole series': 20)
    and was refused; cut 1, 2 or 3 frames later, with the AIF still at 92, 71 and 52 % of its peak, it gave 62.6, 20.8
    and 16.9 (CBV 2.22, 1.00, 1.20 against 2.29) with only the truncated-bolus warning. Cut 4 frames later (AIF at
    35 %) it is analysed, with that warning."""
    _, series, result = phantom_case
    peak = int(np.argmax(result.aif.curve))
    cut = series.series[..., : peak + after_peak + 1]
    with pytest.raises(ValueError, match=rf"'case_x': the AIF .* peaks in frame {peak} .* still at \d+% of its peak in "
                       rf"the last frame \({peak + after_peak}\).* acquired until the AIF has fallen below 50%"):
        compute_perfusion_maps(cut, series.frame_s, name="case_x")
    later = compute_perfusion_maps(series.series[..., : peak + 5], series.frame_s)
    assert later.aif.curve[-1] < 0.5 * later.aif.peak_hu
    assert any(note.startswith("truncated bolus") for note in later.notes)


OUTLYING_FRAMES = {  # frames shifted -> frames copied over them, by offset (HU over the brain)
    **{f"frame 0 {offset:+g}": ((0,), (1,), offset) for offset in (-20.0, 20.0)},
    **{f"frame 1 {offset:+g}": ((1,), (2,), offset) for offset in (-20.0, 20.0)},
    **{f"frames 0 and 1 {offset:+g}": ((0, 1), (2, 2), offset) for offset in (-20.0, 20.0, 40.0)},  # +40: a warm-up
    **{f"frame 3 {offset:+g}": ((3,), (4,), offset) for offset in (-20.0, 20.0)},
    # the margin frame between the baseline (frames 0-7) and the bolus arrival (frame 9)
    **{f"frame 8 {offset:+g}": ((8,), (7,), offset) for offset in (-20.0, 20.0)},
}


@pytest.mark.parametrize("damage", OUTLYING_FRAMES)
def test_an_outlying_baseline_frame_is_replaced_with_a_note(phantom_case, damage):
    """Baseline frames 20 HU off over the brain (a mask, higher-dose or corrupt frame, or one still settling): -20 HU on
    frame 0 doubled the phantom's CBV or more without a note (the baseline took it), +20 HU had the series refused as
    flat. Frame 0 was then compared with frame 1 only: a corrupt frame 1 (-20) replaced the good frame 0 (median brain
    CBF 79.7 instead of 19.8, with a note blaming frame 0), frames 0 and 1 both off passed (-20: CBF 78.8; +20: refused
    as flat), and so did frame 3 (-20: CBF 25.3). Frame 3 at +20 HU was taken for the bolus arrival, and the margin
    frame just before the arrival (frame 8 here) was not checked. Each is now replaced by the nearest frame within 0.5
    HU of the median of frames 0-4 (frames 3 and 8: of the frames before the arrival) with a note, and the maps are
    those of the series as acquired (within 10 %: on this 64-pixel case the replacement alone moves the median CBF by
    6 %)."""
    frames, sources, offset = OUTLYING_FRAMES[damage]
    _, series, result = phantom_case
    shifted = series.series.astype(np.float32)
    for frame in frames:
        shifted[..., frame][result.brain] += offset
    given = shifted.copy()
    found = compute_perfusion_maps(shifted, series.frame_s, name="case_x")
    for name in ("CBF", "CBV"):
        assert np.median(found.maps[name][found.brain]) == pytest.approx(np.median(result.maps[name][result.brain]),
                                                                         rel=0.1)  # fmt: skip
    among = "frames 0-4" if frames[0] < 2 else f"frames 0-{result.baseline_frames}"
    notes = [note for note in found.notes if " replaced by frame " in note]
    assert len(notes) == len(frames), notes
    for note, frame, source in zip(notes, frames, sources):
        assert re.fullmatch(
            rf"frame {frame} replaced by frame {source}: its mean brain HU is {re.escape(f'{offset:+.1f}')} HU from "
            rf"the median of {among} \(\d+\.\d HU; a mask, higher-dose or corrupt frame, or one still settling\), "
            r"which would have shifted the baseline", note), note  # fmt: skip
    np.testing.assert_array_equal(shifted, given)  # the caller's series is left as it was


ONE_OUTLYING_FRAME = {  # frame -> (region, offset HU)
    "frame 3 +20 over the brain": (3, "brain", 20.0),
    "frame 8 +20 over the brain": (8, "brain", 20.0),  # the frame just before the arrival
    "frame 3 +200 in the arteries": (3, "arteries", 200.0),  # a flash in the vessels alone: the brain's level stays
}


@pytest.mark.parametrize("damage", ONE_OUTLYING_FRAME)
def test_one_outlying_frame_is_not_taken_for_the_bolus_arrival(phantom_case, damage):
    """The arrival was the first frame where the large vessels passed 10 % of their peak enhancement: frame 3 at +20 HU
    over the brain passed it alone, was taken for the arrival and ended the baseline at frame 2 (the median brain CBF
    0.66-27.6 times the series' on the 8 cases of the accuracy table, docs/perfusion.md). The vessels are now measured
    above the brain's level of each frame (an offset of the whole frame cancels, even in the frame just before the
    arrival) and must stay above 10 % for 2 frames (a flash in the vessels alone does not persist): the arrival is
    that of the series as acquired."""
    frame, region, offset = ONE_OUTLYING_FRAME[damage]
    _, series, result = phantom_case
    shifted = series.series.astype(np.float32)
    shifted[..., frame][result.brain if region == "brain" else series.arteries > 0] += offset
    assert compute_perfusion_maps(shifted, series.frame_s).baseline_frames == result.baseline_frames == 8


def test_an_outlying_frame_just_before_a_weak_bolus_is_not_taken_for_its_arrival():
    """On a weak bolus (this 2-slice case_1: its large vessels rise by about 30 HU) frame 5, just before the arrival, at
    +20 HU over the brain was taken for the arrival, and the series refused as having no artery; with the vessels'
    curve measured above the brain's level but chosen, and their peak taken, on that curve, tissue voxels 20 HU up in
    frame 5 were chosen as vessels and the arrival still moved. The vessels are now chosen above each frame's brain
    level, and the 10 % are of their peak as stored."""
    slab = next(s for s in phantom.iter_cohort(0, 1, 0) if s.case == "case_1")
    series = phantom.render_pwi(slab, 64, phantom.pwi_generator(0, slab)).series.astype(np.float32)
    whole = compute_perfusion_maps(series, slab.patient.centre.frame_s)
    assert whole.baseline_frames == 5
    series[..., 5][whole.brain] += 20.0
    found = compute_perfusion_maps(series, slab.patient.centre.frame_s)
    assert found.baseline_frames == 5 and any(note.startswith("frame 5 replaced by frame 4") for note in found.notes)
    cbf = np.median(whole.maps["CBF"][whole.brain])
    assert np.median(found.maps["CBF"][found.brain]) == pytest.approx(cbf, rel=0.1)


WARM_UP = {  # frames 0-4 (the window of frames 0 and 1's check) mostly off: offset HU by frame
    "frames 0-2 +40": {0: 40.0, 1: 40.0, 2: 40.0},
    "frames 0-2 -40": {0: -40.0, 1: -40.0, 2: -40.0},
    "frames 0-2 +40 +30 +20": {0: 40.0, 1: 30.0, 2: 20.0},  # settling: the median of frames 0-4 is frame 2's
}


@pytest.mark.parametrize("damage", WARM_UP)
def test_three_outlying_frames_among_the_first_five_are_replaced_from_the_frames_before_the_arrival(
    phantom_case, damage
):
    """Three of frames 0-4 off over the brain: their median is off, frames 0 and 1 pass their check (or are replaced by
    frame 2, itself off), and the series was refused as flat when they were up (the enhancement was measured over frame
    0). The flat check now measures it over the median of the frames before the arrival, and those frames (0-8 here)
    against their median replace all three by frame 3."""
    model, series, result = phantom_case
    shifted = series.series.astype(np.float32)
    for frame, offset in WARM_UP[damage].items():
        shifted[..., frame][result.brain] += offset
    spacing = tuple(np.abs(np.diag(model.affine))[:3])  # the fixture's
    found = compute_perfusion_maps(shifted, series.frame_s, spacing_mm=spacing, name="case_x")
    assert found.baseline_frames == result.baseline_frames
    replaced = [note.split(":")[0] for note in found.notes if " replaced by frame " in note]
    assert replaced[-3:] == [f"frame {frame} replaced by frame 3" for frame in (0, 1, 2)], replaced
    for name in ("CBF", "CBV"):
        assert np.median(found.maps[name][found.brain]) == pytest.approx(np.median(result.maps[name][result.brain]),
                                                                         rel=0.02)  # fmt: skip


def test_a_baseline_without_a_level_shared_by_most_of_its_frames_is_refused(phantom_case):
    """Frames 0-4 at -40 HU over the brain (frames 5-8 and the margin frame 9 as acquired): the median of frames 0-9 was
    theirs, frames 5-9 were replaced by frame 4 and the median brain CBF was 347 for 19.8, with notes blaming the good
    frames. Two thirds of the frames before the bolus share no level: the series is refused, naming both groups."""
    _, series, result = phantom_case
    shifted = series.series.astype(np.float32)
    shifted[..., :5][result.brain] -= 40.0
    expected = ("'case_x': the baseline level cannot be estimated: of frames 0-9 (before the bolus), frames "
                "[0, 1, 2, 3, 4] lie within 0.5 HU of their median mean brain HU (-12.2 HU) and frames [5, 6, 7, 8, 9] "
                "do not")
    with pytest.raises(ValueError, match=re.escape(expected)):
        compute_perfusion_maps(shifted, series.frame_s, name="case_x")


def test_a_baseline_mostly_off_is_refused_rather_than_taken():
    """case_5 (4 slices at 64, 30 frames) has 4 baseline frames and its margin frame before the arrival: frames 0-2 at
    -40 HU were the median, the good frames 3 and 4 were replaced by them, and the median brain CBF was 121 for 15.3
    with only a truncated-bolus note. More than a third of the frames before the arrival off: refused."""
    slab = next(s for s in phantom.iter_cohort(0, 8, 0) if s.case == "case_5")
    series = phantom.render_pwi(slab, 64, phantom.pwi_generator(0, slab)).series.astype(np.float32)
    brain = compute_perfusion_maps(series, slab.patient.centre.frame_s).brain
    series[..., :3][brain] -= 40.0
    with pytest.raises(ValueError, match=re.escape("'case_x': the baseline level cannot be estimated: of frames 0-4 "
                                                   "(before the bolus), frames [0, 1, 2] lie within 0.5 HU")):
        compute_perfusion_maps(series, slab.patient.centre.frame_s, name="case_x")


@pytest.mark.parametrize("frame", [0, 3])
def test_a_frame_off_in_one_slice_is_replaced_with_a_note(phantom_case, frame):
    """Slice 3 of 8 at +2 HU in one baseline frame (a partial acquisition glitch) moves the mean brain HU by 0.25 HU,
    within the tolerance of 0.5: it passed without a note and slice 3's median CBV was 2.071 for 2.256 (-8 %). Each
    slice's mean brain HU is now checked too: the frame is replaced, the note names the slice."""
    model, series, result = phantom_case
    shifted = series.series.astype(np.float32)
    shifted[..., 3, frame][result.brain[..., 3]] += 2.0
    spacing = tuple(np.abs(np.diag(model.affine))[:3])
    found = compute_perfusion_maps(shifted, series.frame_s, spacing_mm=spacing, name="case_x")
    among = "frames 0-4" if frame < 2 else f"frames 0-{result.baseline_frames}"
    notes = [note for note in found.notes if " replaced by frame " in note]
    assert len(notes) == 1 and re.fullmatch(
        rf"frame {frame} replaced by frame {frame + 1}: its mean HU over the brain of slice 3 is \+2\.0 HU from that "
        rf"slice's median over {among} \(\d+\.\d HU; a partial acquisition glitch\), which would have shifted the "
        "baseline", notes[0]), notes  # fmt: skip
    slice_cbv = [np.median(r.maps["CBV"][..., 3][r.brain[..., 3]]) for r in (found, result)]
    assert slice_cbv[0] == pytest.approx(slice_cbv[1], rel=0.02)


def test_noisy_slices_are_not_taken_for_partial_glitches(phantom_case):
    """Voxel noise of 10 HU leaves a slice's mean brain HU (about 1000 voxels) some 0.3 HU from frame to frame: against
    0.5 HU alone, frames as acquired were replaced. The tolerance of a slice is also 5 times its measured noise."""
    from custom.perfusion.maps import replace_outlying_frames

    _, series, result = phantom_case
    noisy = series.series + np.random.default_rng(0).normal(0.0, 10.0, series.series.shape).astype(np.float32)
    notes = []
    replace_outlying_frames(noisy, result.brain, 9, 9, {}, notes, "case_x")
    assert notes == []


CORRUPT_FIRST_FRAME = {  # frame -> (region, offset HU, the frame copied over it)
    "frame 0 -100 over the brain": (0, "brain", -100.0, 1),
    "frame 1 +1024 everywhere": (1, "everywhere", 1024.0, 2),  # a frame stored without the rescale intercept
}


@pytest.mark.parametrize("damage", CORRUPT_FIRST_FRAME)
def test_a_corrupt_first_frame_makes_neither_the_brain_mask_nor_the_motion_reference(
    tmp_path, phantom_case, monkeypatch, damage
):
    """The brain mask (and, with --motion_correction, the registration's reference) was the mean of frames 0 and 1 as
    loaded, before an outlying frame among them was replaced: frame 0 at -100 HU over the brain left a mask of 50-189
    voxels (15773-44812 on the series as acquired) and CBF 2.5-4 times the series' with notes blaming frame 1, a frame
    stored without the rescale intercept (+1024 HU) had the series refused as 'no brain found'. Frames 0 and 1 are now
    checked first (inside the brain of frames 0-4's voxelwise median), then registered and masked."""
    from custom.perfusion import motion
    from custom.perfusion.commands import analyse_series

    frame, region, offset, source = CORRUPT_FIRST_FRAME[damage]
    _, series, result = phantom_case
    damaged = series.series.astype(np.float32)
    damaged[..., frame][result.brain if region == "brain" else slice(None)] += offset
    found = compute_perfusion_maps(damaged, series.frame_s, name="case_x")
    assert (found.brain == result.brain).mean() > 0.999
    for name in ("CBF", "CBV"):
        assert np.median(found.maps[name][found.brain]) == pytest.approx(np.median(result.maps[name][result.brain]),
                                                                         rel=0.1)  # fmt: skip
    assert [note.split(":")[0] for note in found.notes if " replaced by frame " in note] == [
        f"frame {frame} replaced by frame {source}"]
    references = []
    monkeypatch.setattr(motion, "correct_motion", lambda hu, spacing: references.append(hu[..., :2].copy()) or hu)
    analyse_series(write_series(tmp_path / "series.nii.gz", damaged), motion_correction=True)
    np.testing.assert_array_equal(references[0][..., frame], damaged[..., source])


def test_a_series_without_outlying_frames_is_analysed_unchanged(phantom_case):
    """No frame of the phantom's series is replaced: its baseline frames lie within 0.1 HU of their median."""
    assert not [note for note in phantom_case[2].notes if " replaced by frame " in note]


def write_series(path, array, frame_s=1.0, unit="sec"):
    image = nib.Nifti1Image(array, np.diag([2.0, 2.0, 5.0, 1.0]))
    if array.ndim == 4:
        image.header.set_zooms((2.0, 2.0, 5.0, frame_s))
    image.header.set_xyzt_units("mm", unit)
    nib.save(image, path)
    return path


@pytest.fixture(scope="module")
def good_series(phantom_case):
    return phantom_case[1].series


def test_bad_series_are_refused_by_name(tmp_path, good_series):
    from custom.perfusion.series import load_series

    three_d = write_series(tmp_path / "ct.nii.gz", good_series[..., 0])
    with pytest.raises(ValueError, match=r"ct\.nii\.gz'.*expected a 4D perfusion series"):
        load_series(three_d)
    short = write_series(tmp_path / "short.nii.gz", good_series[..., :6])
    with pytest.raises(ValueError, match=r"short\.nii\.gz'.*6 frames; at least 10"):
        load_series(short)
    no_step = write_series(tmp_path / "nostep.nii.gz", good_series, frame_s=0.0, unit="unknown")
    with pytest.raises(ValueError, match=r"nostep\.nii\.gz'.*no time step.*--dt"):
        load_series(no_step)
    assert load_series(no_step, frame_s=1.5).frame_s == 1.5
    milliseconds = write_series(tmp_path / "ms.nii.gz", good_series, frame_s=1000.0, unit="msec")
    assert load_series(milliseconds).frame_s == pytest.approx(1.0)
    flat = write_series(tmp_path / "flat.nii.gz", np.repeat(good_series[..., :1], 20, axis=-1))
    with pytest.raises(ValueError, match=r"flat\.nii\.gz'.*flat series"):
        from custom.perfusion.commands import analyse_series

        analyse_series(flat)


@pytest.mark.parametrize("frame, value", [(0, 0.0), (3, 0.0), (10, -1024.0)])
def test_a_blank_frame_is_refused_by_name(tmp_path, good_series, frame, value):
    """A dropped frame stored as 0 HU or as padding (-1024) gave maps without a word: CBF x 10 (0 HU just after the
    baseline) to x 80 (-1024) in the phantom, CBV x 4 (0 HU in the first frame)."""
    from custom.perfusion.commands import analyse_series

    blank = good_series.astype(np.float32)
    blank[..., frame] = value
    series = write_series(tmp_path / "blank.nii.gz", blank)
    with pytest.raises(ValueError, match=rf"blank\.nii\.gz'.*frame\(s\) \[{frame}\].*one value at every voxel"):
        analyse_series(series)


@pytest.mark.parametrize("step, unit", [(1000.0, "sec"), (1.0, "msec")])
def test_time_step_in_the_wrong_unit_is_refused_by_name(tmp_path, good_series, step, unit):
    """pixdim[4] in ms labelled seconds (or the reverse) scaled CBF and Tmax by 1000 without a word."""
    from custom.perfusion.series import load_series

    series = write_series(tmp_path / "unit.nii.gz", good_series, frame_s=step, unit=unit)
    with pytest.raises(ValueError, match=r"unit\.nii\.gz'.*time step.*time unit.*--dt"):
        load_series(series)
    assert load_series(series, frame_s=1.0).frame_s == 1.0
    with pytest.raises(ValueError, match=r"unit\.nii\.gz'.*--dt 1000 is outside.*seconds"):
        load_series(series, frame_s=1000.0)


def test_series_not_in_hu_is_refused_by_name(tmp_path, good_series):
    """Stored values without the rescale intercept (-1024): the brain mask took the air around the head, and the
    maps were of it. A series cropped inside the skull (no air, no bone) is still analysed."""
    from custom.perfusion.commands import analyse_series

    raw = (good_series.astype(np.int32) + 1024).clip(0).astype(np.uint16)
    series = write_series(tmp_path / "raw.nii.gz", raw)
    with pytest.raises(ValueError, match=r"raw\.nii\.gz'.*above 150 HU \(bone\).*rescale intercept"):
        analyse_series(series)
    cropped = write_series(tmp_path / "cropped.nii.gz", good_series[20:44, 20:44])
    assert analyse_series(cropped)[1].maps["CBF"].any()  # no air, no bone: analysed, not refused


def test_maps_command_writes_maps_and_report(tmp_path, good_series):
    from custom.perfusion.commands import maps

    series = write_series(tmp_path / "series.nii.gz", good_series)
    out = maps(series, tmp_path / "maps")
    for name in ("CBF", "CBV", "MTT", "Tmax", "TTP"):
        image = nib.load(f"{out}/{name}.nii.gz")
        assert image.shape == good_series.shape[:3]
        np.testing.assert_allclose(image.affine, nib.load(series).affine)
    report = json.loads((tmp_path / "maps" / "perfusion.json").read_text())
    assert report["frame_s"] == 1.0 and len(report["aif"]["voxels"]) > 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        maps(series, tmp_path / "maps")
    mask = np.zeros(good_series.shape[:3], np.uint8)
    mask[tuple(np.array(report["aif"]["voxels"]).T)] = 1
    nib.save(nib.Nifti1Image(mask, nib.load(series).affine), tmp_path / "aif.nii.gz")
    maps(series, tmp_path / "maps", aif_mask=tmp_path / "aif.nii.gz", overwrite=True)
    given = json.loads((tmp_path / "maps" / "perfusion.json").read_text())
    assert given["aif"]["curve_hu"] == pytest.approx(report["aif"]["curve_hu"], abs=0.2)


def test_an_aif_mask_with_a_fourth_axis_is_refused_by_name(tmp_path, phantom_case, good_series):
    """A 4D --aif_mask on the series' spatial grid died in numpy's reshape ("cannot reshape array of size 65536
    into shape (64,64,8)") without naming the file; a 3D mask stored with a trailing axis of 1 is still read."""
    from custom.perfusion.commands import analyse_series

    series = write_series(tmp_path / "series.nii.gz", good_series)
    two = np.zeros(good_series.shape[:3] + (2,), np.uint8)
    nib.save(nib.Nifti1Image(two, nib.load(series).affine), tmp_path / "aif4d.nii.gz")
    with pytest.raises(ValueError, match=r"AIF mask '.*aif4d\.nii\.gz' \(shape \(.*, 2\)\) is not a 3D mask"):
        analyse_series(series, aif_mask=tmp_path / "aif4d.nii.gz")
    one = np.zeros(good_series.shape[:3] + (1,), np.uint8)
    one[tuple(phantom_case[2].aif.voxels.T)] = 1
    nib.save(nib.Nifti1Image(one, nib.load(series).affine), tmp_path / "aif.nii.gz")
    assert analyse_series(series, aif_mask=tmp_path / "aif.nii.gz")[1].maps["CBF"].any()


def test_converter_with_maps_from_4d_passes_the_check(tmp_path):
    from custom.data.check import check_dataset
    from custom.data.isles2018 import prepare_isles2018

    raw = phantom.write_phantom(tmp_path / "raw", cases=4, test_cases=1, seed=2, size=48, pwi=True)
    dst = prepare_isles2018(
        raw / "TRAINING", tmp_path / "dataset", patients=raw / "patients.csv", folds=2, testing=raw / "TESTING",
        maps_from_4d=True,
    )
    assert check_dataset(dst) == []
    dataset = json.loads((dst / "dataset.json").read_text())
    image = nib.load(dst / dataset["training"][0]["image"]).get_fdata()
    vendor = nib.load(next((raw / "TRAINING" / "case_1").glob("*CT_CBF*/*.nii"))).get_fdata()
    assert image.shape[-1] == 5 and not np.allclose(image[..., 1], vendor)  # CBF computed, not copied
    with pytest.raises(ValueError, match=r"case_1'.*missing 4DPWI"):
        without = phantom.write_phantom(tmp_path / "no4d", cases=2, test_cases=0, seed=2, size=32)
        prepare_isles2018(without / "TRAINING", tmp_path / "other", folds=2, maps_from_4d=True)


@pytest.mark.slow
@pytest.mark.parametrize("slices", [8, 2])  # ISLES 2018 has 2-slice slabs; ITK's default gradient filter needs 4
def test_motion_correction_realigns_shifted_frames(slices):
    from scipy import ndimage

    from custom.perfusion.motion import correct_motion

    slab = next(s for s in phantom.iter_cohort(0, 8, 0) if s.slices >= 8 and s.patient.stroke.present)
    slab = dataclasses.replace(slab, slices=slices)
    model = phantom.slab_model(slab, 64)
    series = phantom.render_pwi(slab, 64, phantom.pwi_generator(0, slab), model)
    frames = series.series[..., :4].astype(np.float32)
    moved = frames.copy()
    for t in (2, 3):
        moved[..., t] = ndimage.shift(frames[..., t], (1.5, -1.0, 0.0), order=1, mode="nearest")
    corrected = correct_motion(moved, tuple(np.abs(np.diag(model.affine))[:3]))
    inside = (frames[..., 0] > 0) & (frames[..., 0] < 100)
    for t in (2, 3):
        before = np.abs(moved[..., t] - frames[..., t])[inside].mean()
        after = np.abs(corrected[..., t] - frames[..., t])[inside].mean()
        assert after < before / 4


@pytest.mark.parametrize("unit", ["hz", "ppm", "rads"])
def test_a_time_unit_that_is_not_a_time_is_refused_by_name(tmp_path, good_series, unit):
    """A header whose time unit is a frequency, ppm or rad/s was told "no time step in the header": it has one, in a
    unit that is not a time. --dt still analyses it."""
    from custom.perfusion.series import load_series

    series = write_series(tmp_path / "hz.nii.gz", good_series, frame_s=1.0, unit=unit)
    with pytest.raises(ValueError, match=rf"hz\.nii\.gz'.*time unit .* is '{unit}', which is not a time.*--dt"):
        load_series(series)
    assert load_series(series, frame_s=1.0).frame_s == 1.0


@pytest.mark.parametrize("unit", ["meter", "micron", "unknown"])
def test_a_series_whose_voxel_size_is_not_read_in_mm_is_refused(tmp_path, good_series, unit):
    """nibabel ignores the spatial unit of a header: a series stored in meters was smoothed with a kernel of
    smoothing_mm / 0.002 pixels and its maps written on a grid 1000 times too small, without a word. The converted
    maps and studies were refused already (custom.data.studies.require_voxel_size_in_mm), the 4D series was not.
    With unit unknown (read as mm), sizes in meters (0.002 x 0.002 x 0.005) passed as well."""
    from custom.perfusion.series import load_series

    series = write_series(tmp_path / "series.nii.gz", good_series)
    image = nib.load(series)
    if unit == "unknown":
        image = nib.Nifti1Image(np.asanyarray(image.dataobj), np.diag([0.001, 0.001, 0.001, 1.0]) @ image.affine,
                                image.header)  # fmt: skip
        image.header.set_xyzt_units(0, "sec")
        problem = r"voxel size \[0\.002, 0\.002, 0\.005\] .*xyzt_units 'unknown'.*outside the 0\.05-30 mm"
    else:
        image.header.set_xyzt_units(unit, "sec")
        problem = f"voxel size in {unit}s"
    nib.save(image, series)
    with pytest.raises(ValueError, match=rf"series\.nii\.gz'.*{problem}"):
        load_series(series)


def test_time_on_the_third_axis_is_refused_by_name(tmp_path, good_series):
    """A series stored (x, y, time, slices) was read as 30 slices of 12 frames and gave maps (this case_12 at 64 x 64:
    median brain CBF 269 and CBV 9.3, read the right way 17.5 and 2.2) with only the truncated-bolus and no-VOF
    warnings. The phantom's series, a 2-slice slab and a one-slice series are not refused."""
    from custom.perfusion.series import load_series

    slab = next(s for s in phantom.iter_cohort(0, 12, 0) if s.case == "case_12")
    case_12 = phantom.render_pwi(slab, 64, phantom.pwi_generator(0, slab)).series  # 12 slices, 30 frames
    transposed = write_series(tmp_path / "xytz.nii.gz", np.ascontiguousarray(np.swapaxes(case_12, 2, 3)))
    with pytest.raises(ValueError, match=r"xytz\.nii\.gz'.*frames \(4th axis, 12\).*likely \(x, y, time, slices\)"):
        load_series(transposed)
    for name, series in (("case_12", case_12), ("slab", good_series), ("two", good_series[:, :, 3:5]),
                         ("one", good_series[:, :, 3:4])):  # fmt: skip
        assert load_series(write_series(tmp_path / f"{name}.nii.gz", series)).hu.shape == series.shape


def thin_slice_series_with_motion(size=64, slices=64, slice_mm=1.0, motion_mm=1.0, motion_deg=1.0):
    """A whole-brain phantom series of thin slices (``slices`` of ``slice_mm``, ``size`` pixels) and the same series
    with its head moved in every frame (rigid: a translation of about ``motion_mm`` and a rotation of about
    ``motion_deg`` about the volume's centre, each drawn per frame), both (H, W, D, T) float32."""
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    slab = next(s for s in phantom.iter_cohort(0, 8, 0) if s.slices >= 8 and s.patient.stroke.present)
    centre = dataclasses.replace(slab.patient.centre, slice_mm=slice_mm)
    slab = dataclasses.replace(slab, slices=slices, first_z_mm=slab.first_z_mm - 20,
                               patient=dataclasses.replace(slab.patient, centre=centre))  # fmt: skip
    still = phantom.render_pwi(slab, size, phantom.pwi_generator(0, slab)).series.astype(np.float32)
    spacing = np.array([centre.pixel_mm * phantom.REFERENCE_SIZE / size] * 2 + [slice_mm])
    middle = (np.array(still.shape[:3]) - 1) / 2
    rng = np.random.default_rng(0)
    moved = np.empty_like(still)
    for t in range(still.shape[3]):
        rotation = Rotation.from_euler("xyz", motion_deg * rng.standard_normal(3) / np.sqrt(3), degrees=True)
        matrix = np.diag(1 / spacing) @ rotation.as_matrix() @ np.diag(spacing)  # in voxels
        shift = motion_mm * rng.standard_normal(3) / np.sqrt(3) / spacing
        moved[..., t] = ndimage.affine_transform(still[..., t], matrix, middle - matrix @ middle - shift, order=1,
                                                 mode="nearest")  # fmt: skip
    return still, moved


def test_thin_slices_of_a_moving_head_are_not_taken_for_swapped_axes(tmp_path):
    """Whole-brain CTP writes slices of 0.5-1 mm, closer than a restless head moves between frames: 64 phantom slices
    of 1 mm moved about 1 mm and 1 degree in every frame differ by 40.9 HU between neighbouring frames and 13.3 HU
    between neighbouring slices, and were refused as stored (x, y, time, slices), before --motion_correction could
    run. The frames of one head spread less about their median than the slices spanning it (29.0 and 108.5 HU), so
    the series passes; the same series (without motion) stored (x, y, time, slices) is still refused."""
    from custom.perfusion.series import load_series

    still, moved = thin_slice_series_with_motion()
    path = write_series(tmp_path / "moved.nii.gz", moved)
    assert load_series(path).hu.shape == moved.shape
    swapped = write_series(tmp_path / "xytz.nii.gz", np.ascontiguousarray(np.swapaxes(still, 2, 3)))
    with pytest.raises(ValueError, match=r"xytz\.nii\.gz'.*frames \(4th axis, 64\).*likely \(x, y, time, slices\)"):
        load_series(swapped)


def test_accuracy_of_cut_series_lists_each_refusal():
    """``perfusion accuracy --end_after_aif_peak K`` measures series cut K frames after the arterial peak: a case the
    analysis refuses is listed with its refusal instead of stopping the command; the whole series is analysed."""
    from custom.perfusion.commands import accuracy

    cut = accuracy(cases=1, size=64, end_after_aif_peak=0)
    assert [set(case) for case in cut["per_case"]] == [{"case", "frames", "refused"}]
    assert "still at 100% of its peak in the last frame" in cut["per_case"][0]["refused"]
    assert cut["maps"]["white matter"]["CBF"]["voxels"] == 0
    whole = accuracy(cases=1, size=64)
    assert whole["per_case"][0]["aif_end_fraction"] < 0.5 and whole["maps"]["white matter"]["CBF"]["voxels"] > 0
