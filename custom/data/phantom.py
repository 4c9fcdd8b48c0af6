"""Synthetic CT perfusion phantom written in the ISLES 2018 folder layout.

The ISLES 2018 data cannot be downloaded here, so every demo, test and benchmark runs on this phantom and
converts it with the real ISLES 2018 converter. Each patient is a parametric head (scalp, skull, CSF,
cortical grey matter with sulci, white matter, deep grey nuclei, ventricles) with literature perfusion
values, an arterial-territory hypoperfusion (core and penumbra) and a follow-up lesion that grows from the
core into the penumbra. Geometry lives in millimetres in a patient frame, so the two slabs of one patient
share anatomy and lesion and every matrix size shows the same head. Centres differ in map units, noise,
smoothing and spacing. The model and its literature values: docs/phantom.md.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, signal

from custom.atomic import write_folder_atomically
from custom.perfusion.units import FLOW_TO_RATE

# Tissue codes of the anatomical model.
AIR, SCALP, BONE, CSF, GREY, WHITE, DEEP_GREY, VENTRICLE = range(8)
BRAIN_TISSUES = (GREY, WHITE, DEEP_GREY)
# Hounsfield units per tissue code (bone gets a patient-specific density on top).
TISSUE_HU = np.array([-1000.0, 30.0, 1000.0, 6.0, 38.0, 28.0, 35.0, 4.0])
# Healthy Tmax per tissue code in seconds (bolus arrival relative to the arterial input).
TISSUE_TMAX_S = np.array([0.0, 0.0, 0.0, 0.0, 0.8, 1.4, 0.8, 0.0])

IMAGE_MAPS = ("CT", "CT_CBF", "CT_CBV", "CT_MTT", "CT_Tmax")
LABEL_MAP = "OT"
PWI_MAP = "CT_4DPWI"  # the raw 4D perfusion series, written only on request (it is large)
REFERENCE_SIZE = 256  # ISLES 2018 in-plane matrix; a smaller size keeps the field of view with coarser pixels
FIRST_FILE_ID = 345560  # ISLES-like SMIR series numbers, counted up per written file

# Relative CBF at which tissue counts as ischemic core, and the severity S giving it (rCBF = 1 - 0.9 S^1.5).
CORE_RCBF = 0.3
CORE_SEVERITY = ((1.0 - CORE_RCBF) / 0.9) ** (1 / 1.5)
# Slab sizes (slices) drawn for one-slab and two-slab patients; ISLES 2018 volumes hold 2 to ~22 slices.
SLAB_SLICES = (2, 4, 6, 8, 8, 8, 10, 12, 16)
SPLIT_SLAB_SLICES = (2, 4, 4, 6, 8)
TWO_SLAB_PROBABILITY = 0.3
MTT_CAP_S = 20.0  # perfusion software caps MTT where CBF vanishes
LOWEST_SLICE_Z_MM = -30.0  # slabs stay above the skull base, which the model lacks
# Patient-frame box (mm) holding every brain the model draws, covered by the smooth random fields.
FIELD_ORIGIN_MM = np.array([-80.0, -95.0, -35.0])
FIELD_EXTENT_MM = np.array([160.0, 190.0, 110.0])
# The 4D series: blood HU before contrast, radii (mm) of the large vessels drawn in it only, the MTT grid
# (s) of the tabulated tissue curves and the fine time step (s) of the convolution.
BLOOD_HU = 40.0
ACA_RADIUS_MM = 1.5
MCA_RADIUS_MM = 2.0
SINUS_RADIUS_MM = 4.5
PWI_MTT_TABLE_S = np.geomspace(0.3, 40.0, 128)
FINE_STEP_S = 0.05


@dataclass(frozen=True)
class Centre:
    """Acquisition and post-processing of one centre: why the same patient looks different across sites."""

    name: str
    pixel_mm: float  # in-plane spacing at REFERENCE_SIZE
    slice_mm: float  # slice thickness and spacing
    cbf_scale: float  # stored CBF = cbf_scale x CBF in ml/100 g/min
    cbv_scale: float  # stored CBV = cbv_scale x CBV in ml/100 g
    map_noise: float  # relative standard deviation of the CBF and CBV noise
    tmax_noise_s: float  # standard deviation of the Tmax noise
    smoothing_mm: float  # Gaussian sigma of the in-plane post-processing filter of the maps
    ct_noise_hu: float
    ct_padding_hu: int  # CT value outside the reconstruction circle
    frame_s: float  # time step of the 4D perfusion series
    frames: int  # frames of the 4D perfusion series (scan length = frames x frame_s)
    pwi_noise_hu: float  # standard deviation of the per-frame noise of the 4D series at REFERENCE_SIZE


CENTRES = (
    Centre("centre_1", 0.90, 5.0, 1.0, 1.0, 0.08, 0.4, 1.0, 3.0, -1024, 1.0, 45, 4.0),
    Centre("centre_2", 0.80, 4.0, 1.35, 1.2, 0.12, 0.6, 0.7, 5.0, -3024, 1.5, 34, 6.0),
    Centre("centre_3", 0.98, 6.0, 0.6, 0.7, 0.10, 0.5, 1.5, 4.0, -1024, 2.0, 30, 5.0),
    Centre("centre_4", 0.86, 5.0, 10.0, 10.0, 0.15, 0.8, 1.2, 6.0, -2048, 1.0, 50, 3.0),  # per 1000 g, not 100 g
)


@dataclass(frozen=True)
class NoiseField:
    """Smooth unit-variance Gaussian random field on the patient-frame box, sampled anywhere in mm.

    Fields live in the patient frame (not on a case grid) so both slabs of a patient see the same values.
    """

    values: np.ndarray
    step_mm: float

    def sample(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Values at patient-frame points (mm), linearly interpolated; arrays of one shape in, same shape out."""
        coords = [(c - origin) / self.step_mm for c, origin in zip((x, y, z), FIELD_ORIGIN_MM)]
        return ndimage.map_coordinates(self.values, coords, order=1, mode="nearest")


def noise_field(rng: np.random.Generator, sigma_mm: float) -> NoiseField:
    """A NoiseField with Gaussian correlation of ``sigma_mm``, sampled on a grid of sigma / 2."""
    step = sigma_mm / 2.0
    shape = tuple(int(n) for n in np.ceil(FIELD_EXTENT_MM / step) + 1)
    # float64 from here: float32 values sent exp and friends through numpy's per-CPU SIMD loops (docs/phantom.md)
    noise = rng.standard_normal(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(noise, sigma=2.0, mode="wrap", output=np.float64)
    return NoiseField(smooth / smooth.std(), step)


@dataclass(frozen=True)
class Anatomy:
    """Head geometry of one patient in the patient frame (x right, y anterior, z superior; mm)."""

    half_width: float  # brain semi-axis left-right at its widest section
    half_length: float  # brain semi-axis anterior-posterior
    height_up: float  # brain extent above the widest section
    height_down: float  # brain extent below it (the model stops above the skull base)
    frontal_narrowing: float  # the frontal lobes are narrower than the parietal ones
    outline: np.ndarray  # (harmonic order, amplitude, phase) rows that make the outline irregular
    atrophy: float  # 0..1: widens sulci, subarachnoid space and ventricles
    cortex_mm: float
    csf_gap_mm: float  # subarachnoid space between brain and skull
    skull_mm: float
    scalp_mm: float
    sulcus_count: int
    sulcus_depths_mm: np.ndarray
    sulcus_wiggle: np.ndarray  # (harmonic order, amplitude, z frequency, phase) rows of the sulcal phase
    sylvian_z_mm: float
    ventricle_z_mm: float  # height of the lateral ventricles' widest section
    ventricle_half_height_mm: float
    angle_rad: float  # in-plane head rotation
    centre_mm: tuple  # in-plane head position in the scanner
    table_mm: float  # scanner z of the patient frame's origin


@dataclass(frozen=True)
class Physiology:
    """Healthy perfusion of one patient: literature values with between-patient variation."""

    cbf_grey: float  # ml/100 g/min
    cbf_white: float
    cbv_grey: float  # ml/100 g
    cbv_white: float
    cbv_vessel: float  # partial-volume CBV of cortical vessels
    bone_hu: float


@dataclass(frozen=True)
class Stroke:
    """The patient's hypoperfused arterial territory and the follow-up lesion grown from it."""

    present: bool
    side: int  # +1 right hemisphere, -1 left
    apex_mm: tuple  # deep end of the wedge, beside the lateral ventricle
    direction_rad: float  # wedge axis, pointing laterally
    half_angle_rad: float
    z_mm: float  # height of the territory's widest section
    half_height_mm: float
    peak_severity: float  # S at the territory's centre; S >= CORE_SEVERITY is core
    peak_depth: float  # 0 deep .. 1 cortical: where along the wedge the severity peaks
    collaterals: float  # 0 poor .. 1 good: raises penumbral CBV and limits growth
    growth_threshold: float  # S above which penumbra becomes lesion
    lacunes: np.ndarray  # (x, y, z, radius) rows of small lesions invisible on perfusion


@dataclass(frozen=True)
class Patient:
    """Everything that two slabs of one patient share."""

    name: str
    centre: Centre
    anatomy: Anatomy
    physiology: Physiology
    stroke: Stroke
    fields: dict  # name -> NoiseField


@dataclass(frozen=True)
class Slab:
    """One case folder: consecutive slices through one patient's head."""

    case: str
    split: str  # TRAINING or TESTING
    patient: Patient
    slices: int
    first_z_mm: float  # patient-frame z of the first slice


def smoothstep(x):
    """0 below 0, 1 above 1, a smooth cubic ramp between: soft edges that stay continuous in 3D."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def dome(z, centre, half_height):
    """sqrt(1 - ((z - centre) / half_height)^2), 0 outside: how an ellipsoid's section scales with height."""
    return np.sqrt(np.clip(1.0 - ((z - centre) / half_height) ** 2, 0.0, None))


def wrap_angle(angle):
    """Angle in [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def inside_ellipse(x, y, centre, half_axes, angle=0.0):
    """Points inside an ellipse whose first half-axis is turned ``angle`` from the x axis."""
    dx, dy = x - centre[0], y - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / np.maximum(half_axes[0], 1e-6)) ** 2 + (v / np.maximum(half_axes[1], 1e-6)) ** 2 < 1.0


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random head within adult ranges: brain 120-140 mm wide, 156-180 mm long, cortex 2.5-3.5 mm."""
    atrophy = rng.beta(2.0, 3.0)
    half_width = rng.uniform(60.0, 70.0)
    half_length = rng.uniform(78.0, 90.0)
    sulcus_count = int(round(2 * np.pi * np.sqrt((half_width**2 + half_length**2) / 2) / rng.uniform(13.0, 17.0)))
    orders = np.arange(3, 7)
    outline = np.column_stack([orders, rng.uniform(0.005, 0.02, orders.size), rng.uniform(0, 2 * np.pi, orders.size)])
    wiggle_orders = np.arange(1, 5)
    wiggle = np.column_stack(
        [
            wiggle_orders,
            rng.uniform(0.1, 0.35, wiggle_orders.size),
            rng.uniform(-0.04, 0.04, wiggle_orders.size),
            rng.uniform(0, 2 * np.pi, wiggle_orders.size),
        ]
    )
    return Anatomy(
        half_width=half_width,
        half_length=half_length,
        height_up=rng.uniform(62.0, 72.0),
        height_down=rng.uniform(45.0, 55.0),
        frontal_narrowing=rng.uniform(0.03, 0.08),
        outline=outline,
        atrophy=atrophy,
        cortex_mm=rng.uniform(2.5, 3.5),
        csf_gap_mm=1.0 + 2.5 * atrophy,
        skull_mm=rng.uniform(5.0, 8.0),
        scalp_mm=rng.uniform(4.0, 6.0),
        sulcus_count=sulcus_count,
        sulcus_depths_mm=rng.uniform(8.0, 18.0, sulcus_count),
        sulcus_wiggle=wiggle,
        sylvian_z_mm=rng.uniform(-8.0, 2.0),
        ventricle_z_mm=rng.uniform(8.0, 14.0),
        ventricle_half_height_mm=rng.uniform(14.0, 20.0),
        angle_rad=np.deg2rad(rng.uniform(-12.0, 12.0)),
        centre_mm=(rng.uniform(-8.0, 8.0), rng.uniform(-10.0, 10.0)),
        table_mm=rng.uniform(-60.0, 60.0),
    )


def draw_physiology(rng: np.random.Generator) -> Physiology:
    """Healthy values: CBF 50-60 (grey) and 20-25 (white) ml/100 g/min, CBV 3-4 and 1.8-2.2 ml/100 g."""
    return Physiology(
        cbf_grey=rng.uniform(50.0, 60.0),
        cbf_white=rng.uniform(20.0, 25.0),
        cbv_grey=rng.uniform(3.0, 4.0),
        cbv_white=rng.uniform(1.8, 2.2),
        cbv_vessel=rng.uniform(8.0, 14.0),
        bone_hu=rng.uniform(900.0, 1300.0),
    )


def expected_growth(collaterals: float) -> float:
    """How far below the core severity the follow-up lesion reaches on average: further with poor collaterals.
    Each patient's own growth scatters about it by N(0, 0.03), which no map shows."""
    return 0.1 + 0.35 * (1.0 - collaterals)


def draw_stroke(rng: np.random.Generator, anatomy: Anatomy) -> Stroke:
    """A middle cerebral artery wedge in one hemisphere; about one patient in ten has no territorial stroke."""
    side = 1 if rng.random() < 0.5 else -1
    scale = anatomy.half_width / 65.0
    apex = (side * rng.uniform(12.0, 18.0) * scale, rng.uniform(-8.0, 8.0))
    tilt = rng.uniform(-0.7, 0.7)  # towards the anterior (superior division) or posterior (inferior division)
    collaterals = rng.beta(2.0, 2.0)
    growth = expected_growth(collaterals) + rng.normal(0.0, 0.03)
    lacune_count = rng.binomial(2, 0.15)
    lacunes = np.column_stack(
        [
            rng.choice([-1, 1], lacune_count) * rng.uniform(8.0, 30.0, lacune_count) * scale,
            rng.uniform(-30.0, 25.0, lacune_count),
            rng.uniform(-10.0, 30.0, lacune_count),
            rng.uniform(2.5, 6.0, lacune_count),
        ]
    )
    return Stroke(
        present=bool(rng.random() < 0.9),
        side=side,
        apex_mm=apex,
        direction_rad=tilt if side > 0 else np.pi - tilt,
        half_angle_rad=np.deg2rad(rng.uniform(22.0, 50.0)),
        z_mm=rng.uniform(-5.0, 25.0),
        half_height_mm=rng.uniform(22.0, 42.0),
        peak_severity=rng.uniform(0.55, 1.05),
        peak_depth=rng.uniform(0.2, 0.8),
        collaterals=collaterals,
        growth_threshold=CORE_SEVERITY - growth,
        lacunes=lacunes.reshape(-1, 4),
    )


def draw_patient(seed: int, index: int, centre: Centre) -> Patient:
    """Patient ``index`` of the cohort, from its own generator so patients do not depend on one another."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))
    anatomy = draw_anatomy(rng)
    fields = {
        "edge": noise_field(rng, 8.0),  # territory outline
        "severity": noise_field(rng, 6.0),  # patchy core inside the territory
        "lesion": noise_field(rng, 3.0),  # irregular lesion boundary
        "tissue": noise_field(rng, 4.0),  # healthy perfusion heterogeneity
        "vessel": noise_field(rng, 2.5),  # cortical vessels in the sulci
    }
    return Patient(f"P{index + 1:03d}", centre, anatomy, draw_physiology(rng), draw_stroke(rng, anatomy), fields)


def brain_depth(anatomy: Anatomy, x, y, z):
    """Depth below the brain surface (mm, negative outside) along the in-plane ray from the head centre."""
    section = np.where(z >= 0, dome(z, 0.0, anatomy.height_up), dome(z, 0.0, anatomy.height_down))
    theta = np.arctan2(y, x)
    outline = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in anatomy.outline)
    half_width = anatomy.half_width * (1.0 - anatomy.frontal_narrowing * y / anatomy.half_length)
    rho = np.hypot(x / half_width, y / anatomy.half_length)
    radius = np.hypot(x, y)
    radius_per_rho = np.divide(radius, rho, out=np.full_like(radius, anatomy.half_width), where=rho > 1e-6)
    return (section * outline - rho) * radius_per_rho


def cortical_folds(anatomy: Anatomy, x, y, z, depth):
    """Sulcal, Sylvian and interhemispheric CSF inside the brain, and the cortex lining them.

    Sulci are clefts running inwards from the surface; they bend, and their positions drift with height as
    sulci do from slice to slice.
    """
    theta = np.arctan2(y, x)
    surface_radius = np.hypot(x, y) + depth
    n = anatomy.sulcus_count
    phase = n * theta / (2 * np.pi) + sum(a * np.sin(k * theta + f * z + p) for k, a, f, p in anatomy.sulcus_wiggle)
    phase += 0.35 * np.sin(depth / 5.0 + 3.0 * theta + z / 10.0)  # sulci bend on their way in
    nearest = np.rint(phase)
    offset = np.abs(phase - nearest) * 2 * np.pi * surface_radius / n
    index = nearest.astype(int) % n
    sulcus_depth = anatomy.sulcus_depths_mm[index] * (0.75 + 0.25 * np.sin(z / 12.0 + index))
    sulcus_half_width = 0.5 + 0.8 * anatomy.atrophy
    cleft = (offset < sulcus_half_width) & (depth < sulcus_depth)
    lining = (offset < sulcus_half_width + anatomy.cortex_mm) & (depth < sulcus_depth + anatomy.cortex_mm)

    radius = np.hypot(x, y)
    sylvian_depth = 24.0 * dome(z, anatomy.sylvian_z_mm, 14.0)
    for lateral in (0.25, np.pi - 0.25):  # the fissures open laterally, tilted slightly forwards
        offset = np.abs(wrap_angle(theta - lateral)) * radius
        cleft |= (offset < 1.0 + anatomy.atrophy) & (depth < sylvian_depth)
        lining |= (offset < 1.0 + anatomy.atrophy + anatomy.cortex_mm) & (depth < sylvian_depth + anatomy.cortex_mm)

    above_callosum = z > anatomy.ventricle_z_mm + anatomy.ventricle_half_height_mm
    fissure_zone = above_callosum | (y > 0.35 * anatomy.half_length) | (y < -0.45 * anatomy.half_length)
    fissure_half_width = 0.6 + 0.8 * anatomy.atrophy
    cleft |= fissure_zone & (np.abs(x) < fissure_half_width)
    lining |= fissure_zone & (np.abs(x) < fissure_half_width + anatomy.cortex_mm)
    return cleft, lining


def deep_structures(anatomy: Anatomy, x, y, z):
    """Masks of the deep grey nuclei (caudate, lentiform, thalamus) and the ventricles, both hemispheres."""
    scale = anatomy.half_width / 65.0
    zv, hv = anatomy.ventricle_z_mm, anatomy.ventricle_half_height_mm
    frontal_horn = (3.0 + 4.0 * anatomy.atrophy) * dome(z, zv - 4.0, hv)  # half-widths
    atrium = (3.5 + 5.0 * anatomy.atrophy) * dome(z, zv + 2.0, hv)
    lateral_ventricles = np.zeros(x.shape, bool)
    nuclei = np.zeros(x.shape, bool)
    for side in (1, -1):  # frontal horns and atria diverge from the septum: the "butterfly" of axial CT
        horn_centre = (side * (1.5 + frontal_horn), 12.0 * scale)
        lateral_ventricles |= inside_ellipse(x, y, horn_centre, (frontal_horn, 15.0), -side * 0.35)
        lateral_ventricles |= inside_ellipse(x, y, (side * (3.0 + atrium), -14.0 * scale), (atrium, 17.0), side * 0.4)
        lentiform = dome(z, -1.0, 11.0)
        nuclei |= inside_ellipse(x, y, (side * 22.0 * scale, 2.0), (5.5 * lentiform, 12.0 * lentiform), side * 0.25)
        caudate = dome(z, 8.0, 10.0)
        nuclei |= inside_ellipse(
            x, y, (side * (5.0 + 2.0 * frontal_horn), 14.0 * scale), (3.5 * caudate, 7.0 * caudate), -side * 0.35
        )
        thalamus = dome(z, -2.0, 10.0)
        nuclei |= inside_ellipse(x, y, (side * 9.0, -12.0), (6.5 * thalamus, 10.0 * thalamus), side * 0.2)
    lateral_ventricles &= np.abs(x) > 1.0  # septum pellucidum
    third = dome(z, zv - hv - 2.0, 9.0)
    third_ventricle = (np.abs(x) < (1.0 + 1.5 * anatomy.atrophy) * (third > 0)) & (np.abs(y + 6.0) < 10.0 * third)
    return nuclei, lateral_ventricles | third_ventricle


def tissue_map(patient: Patient, x, y, z):
    """Tissue codes of the head at patient-frame points, the brain depth (mm) and the cortical vessel mask."""
    anatomy = patient.anatomy
    depth = brain_depth(anatomy, x, y, z)
    tissue = np.full(x.shape, AIR, np.uint8)
    skull_inner = -anatomy.csf_gap_mm
    skull_outer = skull_inner - anatomy.skull_mm
    tissue[depth > skull_outer - anatomy.scalp_mm] = SCALP
    tissue[depth > skull_outer] = BONE
    tissue[depth > skull_inner] = CSF
    brain = depth > 0
    cleft, lining = cortical_folds(anatomy, x, y, z, depth)
    nuclei, ventricles = deep_structures(anatomy, x, y, z)
    tissue[brain] = WHITE
    tissue[brain & ((depth < anatomy.cortex_mm) | lining)] = GREY
    tissue[brain & cleft] = CSF
    tissue[brain & nuclei] = DEEP_GREY
    tissue[brain & ventricles] = VENTRICLE
    vessels = (tissue == CSF) & (patient.fields["vessel"].sample(x, y, z) > 1.2)
    return tissue, depth, vessels


def severity_map(patient: Patient, x, y, z, depth):
    """Hypoperfusion severity S (0 healthy; >= CORE_SEVERITY core) of the patient's arterial territory.

    The territory is a wedge from beside the lateral ventricle out to the cortex with an irregular outline;
    S peaks at a patient-specific depth along the wedge and is patchy inside.
    """
    stroke = patient.stroke
    if not stroke.present:
        return np.zeros(x.shape)
    dx, dy = x - stroke.apex_mm[0], y - stroke.apex_mm[1]
    distance = np.hypot(dx, dy)
    angle = np.abs(wrap_angle(np.arctan2(dy, dx) - stroke.direction_rad))
    edge = patient.fields["edge"].sample(x, y, z)
    half_angle = stroke.half_angle_rad * (1.0 + 0.25 * edge) * dome(z, stroke.z_mm, stroke.half_height_mm)
    across = 1.0 - np.divide(angle, half_angle, out=np.full_like(angle, np.inf), where=half_angle > 0)
    inner = 3.0 + 3.0 * edge  # the wedge starts a few mm lateral of its apex
    along = np.clip((distance - inner) / np.maximum(distance - inner + depth, 1e-6), 0.0, 1.0)
    profile = np.clip(1.0 - 1.5 * (along - stroke.peak_depth) ** 2, 0.0, 1.0) * smoothstep(along / 0.1)
    patches = np.exp(0.2 * patient.fields["severity"].sample(x, y, z))
    inside = (depth > 0) & (distance > inner)
    return stroke.peak_severity * smoothstep(across / 0.3) * profile * patches * inside


def physiological_maps(patient: Patient, tissue, vessels, severity, x, y, z):
    """Noise-free CBF (ml/100 g/min), CBV (ml/100 g) and Tmax (s) from tissue and hypoperfusion severity.

    Penumbra (Tmax > 6 s) keeps or raises CBV (autoregulation, more with good collaterals); the core loses
    CBF below CORE_RCBF of its healthy value and CBV drops.
    """
    physiology, stroke = patient.physiology, patient.stroke
    cbf_table = np.array([0, 0, 0, 0.5, physiology.cbf_grey, physiology.cbf_white, 0.9 * physiology.cbf_grey, 0.3])
    cbv_table = np.array([0, 0, 0, 0.05, physiology.cbv_grey, physiology.cbv_white, 0.9 * physiology.cbv_grey, 0.03])
    heterogeneity = np.exp(0.06 * patient.fields["tissue"].sample(x, y, z))
    cbf = cbf_table[tissue] * heterogeneity
    cbv = cbv_table[tissue] * heterogeneity
    cbf[vessels] = 1.5 * physiology.cbf_grey
    cbv[vessels] = physiology.cbv_vessel
    perfused = np.isin(tissue, BRAIN_TISSUES) | vessels
    tmax = np.where(perfused, TISSUE_TMAX_S[tissue], 0.0)

    relative_cbf = 1.0 - 0.9 * np.clip(severity, 0.0, 1.0) ** 1.5
    autoregulation = 1.0 + 0.4 * stroke.collaterals * np.sin(np.pi * np.clip(severity / CORE_SEVERITY, 0.0, 1.0))
    collapse = 1.0 - 0.6 * smoothstep((severity - 0.7) / 0.4)
    cbf *= relative_cbf
    cbv *= autoregulation * collapse
    tmax += np.where(perfused, 14.0 * severity**1.2, 0.0)
    return cbf, cbv, tmax


def lesion_mask(patient: Patient, tissue, severity, x, y, z):
    """The follow-up (DWI) lesion: core, growth into penumbra above the patient's threshold, lacunes.

    Growth reaches further with poor collaterals (visible as unraised penumbral CBV) and more severe
    hypoperfusion (longer Tmax); a smooth random term makes the boundary irregular.
    """
    stroke = patient.stroke
    intracranial = (tissue >= CSF) & (tissue != VENTRICLE)
    irregular = severity + 0.1 * patient.fields["lesion"].sample(x, y, z) * (severity > 0.2)
    lesion = intracranial & ((irregular > stroke.growth_threshold) | (severity >= CORE_SEVERITY))
    for cx, cy, cz, radius in stroke.lacunes:
        lesion |= intracranial & ((x - cx) ** 2 + (y - cy) ** 2 + ((z - cz) / 1.5) ** 2 < radius**2)
    return lesion


def observable_lesion_mask(patient: Patient, tissue, severity, threshold_shift: float = 0.0):
    """``lesion_mask`` as far as noise-free perfusion maps and the collaterals can tell it: the core and the
    growth to the patient's expected threshold (moved by ``threshold_shift``), without what no map shows (the
    patient's scatter about that threshold, the irregular boundary term, lacunes). Scored against the label, it
    estimates the phantom's Dice ceiling (``custom.data.ceiling``)."""
    intracranial = (tissue >= CSF) & (tissue != VENTRICLE)
    threshold = CORE_SEVERITY - expected_growth(patient.stroke.collaterals) + threshold_shift
    return intracranial & ((severity > threshold) | (severity >= CORE_SEVERITY))


def ct_hounsfield(patient: Patient, tissue, severity):
    """Noise-free CT in HU; the core is at most 3 HU darker (early ischemic hypodensity)."""
    hu = TISSUE_HU[tissue]
    hu[tissue == BONE] = patient.physiology.bone_hu
    brain = np.isin(tissue, BRAIN_TISSUES)
    hu[brain] -= 3.0 * smoothstep((severity[brain] - CORE_SEVERITY + 0.1) / 0.2)
    return hu


def correlated_noise(rng: np.random.Generator, shape, sigma_px: float):
    """Unit-variance white noise blurred in-plane over ``sigma_px``: map noise is spatially correlated."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), (sigma_px, sigma_px, 0.0))
    return noise / noise.std()


def acquire(patient: Patient, rng: np.random.Generator, pixel_mm: float, tissue, cbf, cbv, tmax, hu):
    """Apply the centre's post-processing and units: smoothing, noise, per-case AIF scaling, CBF/CBV units.

    Returns CT (int16 HU) and CBF, CBV, MTT, Tmax (float32), the maps zero outside the intracranial space.
    MTT = 60 CBV / CBF in seconds from the noisy maps, as perfusion software derives it, capped at MTT_CAP_S.
    """
    centre = patient.centre
    shape = tissue.shape
    smoothing = (centre.smoothing_mm / pixel_mm,) * 2 + (0.0,)
    noise_px = 1.0 / pixel_mm
    aif_gain = rng.uniform(0.85, 1.15)  # the arterial input's partial volume scales CBF and CBV alike
    cbf = ndimage.gaussian_filter(cbf, smoothing) * aif_gain
    cbv = ndimage.gaussian_filter(cbv, smoothing) * aif_gain
    cbf = np.clip(cbf * (1.0 + centre.map_noise * correlated_noise(rng, shape, noise_px)), 0.0, None)
    cbv = np.clip(cbv * (1.0 + centre.map_noise * correlated_noise(rng, shape, noise_px)), 0.0, None)
    tissue_fraction = ndimage.gaussian_filter(np.isin(tissue, BRAIN_TISSUES).astype(float), smoothing)
    mtt = np.divide(60.0 * cbv, cbf, out=np.full(shape, MTT_CAP_S), where=cbf > 60.0 * cbv / MTT_CAP_S)
    mtt[tissue_fraction < 0.5] = 0.0  # software reports no transit time in CSF
    tmax = ndimage.gaussian_filter(tmax, smoothing)
    tmax = np.clip(tmax + centre.tmax_noise_s * correlated_noise(rng, shape, noise_px), 0.0, None)
    outside = tissue < CSF
    maps = [cbf * centre.cbf_scale, cbv * centre.cbv_scale, mtt, tmax]
    for values in maps:
        values[outside] = 0.0

    hu = ndimage.gaussian_filter(hu, (0.6, 0.6, 0.0)) + centre.ct_noise_hu * correlated_noise(rng, shape, 0.7)
    hu[_beyond_field_of_view(shape[0])] = centre.ct_padding_hu
    ct = np.clip(np.rint(hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
    return ct, *(m.astype(np.float32) for m in maps)


def slab_grid(slab: Slab, size: int):
    """The slab's voxel-to-scanner affine (ITK/DICOM-like axes: x to the left, y to the back) and the
    patient-frame coordinates (mm) of its voxel centres, each of shape (size, size, slices)."""
    anatomy, centre = slab.patient.anatomy, slab.patient.centre
    pixel = centre.pixel_mm * REFERENCE_SIZE / size
    half = pixel * (size - 1) / 2
    affine = np.diag([-pixel, -pixel, centre.slice_mm, 1.0])
    affine[:3, 3] = (half, half, slab.first_z_mm + anatomy.table_mm)
    i, j, k = np.meshgrid(np.arange(size), np.arange(size), np.arange(slab.slices), indexing="ij")
    scanner_x = half - pixel * i - anatomy.centre_mm[0]
    scanner_y = half - pixel * j - anatomy.centre_mm[1]
    cos, sin = np.cos(anatomy.angle_rad), np.sin(anatomy.angle_rad)
    x = cos * scanner_x + sin * scanner_y
    y = -sin * scanner_x + cos * scanner_y
    z = slab.first_z_mm + centre.slice_mm * k.astype(float)
    return affine, x, y, z


@dataclass(frozen=True)
class SlabModel:
    """Noise-free geometry and physiology of one slab, shared by its maps and its 4D perfusion series."""

    affine: np.ndarray
    x: np.ndarray  # patient-frame coordinates (mm) of the voxel centres, (size, size, slices)
    y: np.ndarray
    z: np.ndarray
    pixel_mm: float
    tissue: np.ndarray  # tissue codes
    vessels: np.ndarray  # cortical vessels in the sulci
    severity: np.ndarray
    cbf: np.ndarray  # ml/100 g/min
    cbv: np.ndarray  # ml/100 g
    tmax: np.ndarray  # s
    hu: np.ndarray  # noise-free CT


def slab_model(slab: Slab, size: int) -> SlabModel:
    """Draw the slab's anatomy and noise-free perfusion on its voxel grid."""
    affine, x, y, z = slab_grid(slab, size)
    patient = slab.patient
    tissue, depth, vessels = tissue_map(patient, x, y, z)
    severity = severity_map(patient, x, y, z, depth)
    cbf, cbv, tmax = physiological_maps(patient, tissue, vessels, severity, x, y, z)
    hu = ct_hounsfield(patient, tissue, severity)
    pixel = patient.centre.pixel_mm * REFERENCE_SIZE / size
    return SlabModel(affine, x, y, z, pixel, tissue, vessels, severity, cbf, cbv, tmax, hu)


def render_slab(slab: Slab, size: int, rng: np.random.Generator, model: SlabModel | None = None):
    """The slab's affine and its arrays by ISLES map name: CT, CT_CBF, CT_CBV, CT_MTT, CT_Tmax, OT."""
    m = slab_model(slab, size) if model is None else model
    patient = slab.patient
    arrays = dict(zip(IMAGE_MAPS, acquire(patient, rng, m.pixel_mm, m.tissue, m.cbf, m.cbv, m.tmax, m.hu)))
    arrays[LABEL_MAP] = lesion_mask(patient, m.tissue, m.severity, m.x, m.y, m.z).astype(np.uint8)
    return m.affine, arrays


@dataclass(frozen=True)
class Bolus:
    """The contrast bolus of one acquisition, in HU of whole arterial blood.

    First pass: a gamma variate A x^alpha exp(alpha (1 - x)), x = (t - arrival) / (alpha beta), peaking at A;
    recirculation: a wider gamma variate (2 beta) of relative height ``recirculation`` some seconds later.
    The venous outflow (sagittal sinus) is the arterial curve delayed and dispersed by an exponential
    transit; it keeps the arterial area (indicator conservation), so it measures the AIF's partial volume.
    """

    arrival_s: float
    peak_hu: float
    alpha: float
    beta_s: float
    recirculation: float
    recirculation_delay_s: float  # after the first-pass peak
    venous_delay_s: float
    venous_transit_s: float

    def arterial(self, t: np.ndarray) -> np.ndarray:
        """Arterial enhancement (HU) at times ``t`` (s)."""
        peak_s = self.alpha * self.beta_s
        first = gamma_variate(t - self.arrival_s, self.alpha, self.beta_s)
        second = gamma_variate(t - self.arrival_s - peak_s - self.recirculation_delay_s, self.alpha, 2 * self.beta_s)
        return self.peak_hu * (first + self.recirculation * second)

    def venous(self, t: np.ndarray, step_s: float) -> np.ndarray:
        """Venous enhancement (HU) on the regular grid ``t`` of spacing ``step_s`` starting at 0."""
        transit = np.exp(-t / self.venous_transit_s) * step_s / self.venous_transit_s
        arterial = self.arterial(t - self.venous_delay_s)
        return np.convolve(arterial, transit)[: t.size]


def gamma_variate(t: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """x^alpha exp(alpha (1 - x)) with x = t / (alpha beta) for t > 0, else 0: peak 1 at t = alpha beta."""
    x = np.clip(t, 0.0, None) / (alpha * beta)
    return np.where(t > 0, x**alpha * np.exp(alpha * (1.0 - x)), 0.0)


def draw_bolus(rng: np.random.Generator) -> Bolus:
    """Arrival 4-9 s into the scan, arterial peak 300-450 HU, time to peak 2.5-6.4 s after arrival."""
    return Bolus(
        arrival_s=rng.uniform(4.0, 9.0),
        peak_hu=rng.uniform(300.0, 450.0),
        alpha=rng.uniform(2.5, 4.0),
        beta_s=rng.uniform(1.0, 1.6),
        recirculation=rng.uniform(0.12, 0.2),
        recirculation_delay_s=rng.uniform(6.0, 9.0),
        venous_delay_s=rng.uniform(3.0, 5.0),
        venous_transit_s=rng.uniform(2.0, 3.5),
    )


def disk_fraction(dx, dy, radius_mm: float, pixel_mm: float):
    """Approximate partial-volume fraction of a vessel of ``radius_mm`` centred ``(dx, dy)`` mm away."""
    edge = np.clip(0.5 + (radius_mm - np.hypot(dx, dy)) / pixel_mm, 0.0, 1.0)
    return edge * min(1.0, np.pi * radius_mm**2 / pixel_mm**2)


def large_vessels(anatomy: Anatomy, x, y, z, pixel_mm: float):
    """Partial-volume fractions of the arteries (both anterior cerebral arteries in the interhemispheric
    fissure, both middle cerebral arteries in the open Sylvian fissures) and of the superior sagittal sinus."""
    section = np.where(z >= 0, dome(z, 0.0, anatomy.height_up), dome(z, 0.0, anatomy.height_down))
    arteries = np.zeros(x.shape)
    for side in (1, -1):
        arteries = np.maximum(
            arteries, disk_fraction(x - side * 1.6, y - 0.45 * anatomy.half_length * section, ACA_RADIUS_MM, pixel_mm)
        )
    sylvian = dome(z, anatomy.sylvian_z_mm, 14.0)
    for lateral in (0.25, np.pi - 0.25):
        radius = anatomy.half_width * section - 10.0
        fraction = disk_fraction(x - radius * np.cos(lateral), y - radius * np.sin(lateral), MCA_RADIUS_MM, pixel_mm)
        arteries = np.maximum(arteries, fraction * (sylvian > 0.5))
    outline_back = 1.0 + sum(a * np.cos(-k * np.pi / 2 + p) for k, a, p in anatomy.outline)
    sinus_y = -anatomy.half_length * section * outline_back - anatomy.csf_gap_mm - 1.0
    sinus = disk_fraction(x, y - sinus_y, SINUS_RADIUS_MM, pixel_mm) * (section > 0.3)
    return arteries, np.minimum(sinus, 1.0 - arteries)


@dataclass(frozen=True)
class PerfusionSeries:
    """A slab's 4D CT perfusion series with the truth it was made from."""

    series: np.ndarray  # (size, size, slices, frames) int16 HU
    frame_s: float
    bolus: Bolus
    arteries: np.ndarray  # partial-volume fraction of the arteries carrying the AIF
    sinus: np.ndarray  # partial-volume fraction of the superior sagittal sinus
    tissue: np.ndarray  # tissue codes
    truth: dict  # noise-free CBF (ml/100 g/min), CBV (ml/100 g), MTT (s), Tmax (s); 0 where not perfused


def convolution_table(bolus: Bolus, last_s: float) -> np.ndarray:
    """(AIF * R)(t) with R(t) = exp(-t / MTT) for the MTTs of PWI_MTT_TABLE_S (rows), t on the fine grid."""
    fine = np.arange(0.0, last_s + 2 * FINE_STEP_S, FINE_STEP_S)
    kernels = np.exp(-fine[None, :] / PWI_MTT_TABLE_S[:, None]) * FINE_STEP_S
    return signal.fftconvolve(bolus.arterial(fine)[None, :], kernels, axes=1)[:, : fine.size]


def tissue_enhancement(table: np.ndarray, times: np.ndarray, cbf, cbv, tmax) -> np.ndarray:
    """C(t) = FLOW_TO_RATE CBF (AIF * R)(t - Tmax) with R(t) = exp(-t / MTT), MTT = 60 CBV / CBF; (..., frames).

    (AIF * R) is tabulated once (``convolution_table``) and interpolated per voxel, so the cost is one
    table lookup per voxel and frame. With this R the residue's maximum sits at the delay (Tmax truth)
    and area(C) / area(AIF) gives CBV.
    """
    mtt = np.divide(60.0 * cbv, cbf, out=np.ones_like(cbf), where=cbf > 0)
    row = np.interp(np.log(mtt), np.log(PWI_MTT_TABLE_S), np.arange(PWI_MTT_TABLE_S.size))
    column = (times[None, :] - tmax.reshape(-1, 1)) / FINE_STEP_S
    rows = np.broadcast_to(row.reshape(-1, 1), column.shape)
    curves = ndimage.map_coordinates(table, [rows.ravel(), column.ravel()], order=1, mode="constant", cval=0.0)
    return (FLOW_TO_RATE * cbf.reshape(-1, 1) * curves.reshape(column.shape)).reshape(*cbf.shape, times.size)


def render_pwi(slab: Slab, size: int, rng: np.random.Generator, model: SlabModel | None = None) -> PerfusionSeries:
    """The slab's 4D perfusion series (HU) on its CT grid, consistent with its noise-free maps.

    Baseline HU per tissue (the noise-free CT), plus the tissue curves of every intracranial voxel, the AIF
    in the arteries, the venous outflow in the sinus (by partial-volume fraction), plus the centre's white
    noise per frame (the centre's level at 256 x 256, lower for larger pixels); the centre sets the frame rate
    and scan length.
    """
    m = slab_model(slab, size) if model is None else model
    centre = slab.patient.centre
    bolus = draw_bolus(rng)
    times = np.arange(centre.frames) * centre.frame_s
    arteries, sinus = large_vessels(slab.patient.anatomy, m.x, m.y, m.z, m.pixel_mm)
    perfused = (m.tissue >= CSF) & (m.cbf > 0)
    cbf, cbv, tmax = (np.where(perfused, v, 0.0) for v in (m.cbf, m.cbv, m.tmax))
    blood = arteries + sinus
    baseline = ndimage.gaussian_filter(m.hu, (0.6, 0.6, 0.0)) * (1.0 - blood) + BLOOD_HU * blood
    fine = np.arange(0.0, times[-1] + FINE_STEP_S, FINE_STEP_S)
    venous = np.interp(times, fine, bolus.venous(fine, FINE_STEP_S))
    table = convolution_table(bolus, times[-1])
    noise_hu = centre.pwi_noise_hu * size / REFERENCE_SIZE  # larger pixels average more photons
    series = np.empty((*m.tissue.shape, times.size), np.int16)
    for k in range(m.tissue.shape[2]):  # slice by slice keeps the per-frame arrays small
        hu = baseline[..., k, None] + (1.0 - blood[..., k, None]) * tissue_enhancement(
            table, times, cbf[..., k], cbv[..., k], tmax[..., k]
        )
        hu += arteries[..., k, None] * bolus.arterial(times) + sinus[..., k, None] * venous
        hu += noise_hu * rng.standard_normal(hu.shape)
        series[..., k, :] = np.clip(np.rint(hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max)
    beyond_fov = _beyond_field_of_view(size)
    series[beyond_fov] = centre.ct_padding_hu
    mtt = np.divide(60.0 * cbv, cbf, out=np.zeros_like(cbf), where=perfused)
    truth = {"CBF": cbf, "CBV": cbv, "MTT": mtt, "Tmax": tmax}
    return PerfusionSeries(series, centre.frame_s, bolus, arteries, sinus, m.tissue, truth)


def pwi_generator(seed: int, slab: Slab) -> np.random.Generator:
    """The random generator of a case's 4D series, separate from its maps' so the maps do not depend on it."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, int(slab.case.split("_")[1]))))


def _beyond_field_of_view(size: int) -> np.ndarray:
    """In-plane mask of the pixels outside the reconstruction circle."""
    i, j = np.ogrid[:size, :size]
    return (i - (size - 1) / 2) ** 2 + (j - (size - 1) / 2) ** 2 > (size / 2) ** 2


def place_slabs(patient: Patient, slice_counts: list, rng: np.random.Generator) -> list:
    """First-slice heights of consecutive slabs, centred near the stroke (CTP coverage is aimed at it)."""
    anatomy, stroke = patient.anatomy, patient.stroke
    thickness = patient.centre.slice_mm
    extent = thickness * (sum(slice_counts) - 1)
    aim = stroke.z_mm + rng.uniform(-0.4, 0.4) * stroke.half_height_mm if stroke.present else rng.uniform(-5, 30)
    highest_first = anatomy.height_up - 6.0 - extent
    first = float(np.clip(aim - extent / 2, LOWEST_SLICE_Z_MM, max(highest_first, LOWEST_SLICE_Z_MM)))
    starts = first + thickness * np.cumsum([0, *slice_counts[:-1]])
    return [float(s) for s in starts]


def iter_cohort(seed: int, cases: int, test_cases: int):
    """Yield the cohort's slabs, training then testing: patients with one or two slabs, centres balanced.

    A generator, so only the current patient's random fields are held in memory.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    patient_index, case_number = 0, 1
    for split, count in (("TRAINING", cases), ("TESTING", test_cases)):
        remaining = count
        while remaining > 0:
            if patient_index % len(CENTRES) == 0:
                centre_order = rng.permutation(len(CENTRES))
            centre = CENTRES[centre_order[patient_index % len(CENTRES)]]
            two_slabs = remaining >= 2 and rng.random() < TWO_SLAB_PROBABILITY
            counts = list(rng.choice(SPLIT_SLAB_SLICES, 2)) if two_slabs else [int(rng.choice(SLAB_SLICES))]
            patient = draw_patient(seed, patient_index, centre)
            starts = place_slabs(patient, counts, rng)
            for slices, first_z in zip(counts, starts):
                yield Slab(f"case_{case_number}", split, patient, int(slices), first_z)
                case_number += 1
            remaining -= len(counts)
            patient_index += 1


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, frame_s: float | None = None):
    """NIfTI with qform and sform set to the scanner affine and mm / s units; a 4D array gets ``frame_s``
    as its time step (pixdim[4]). Compressed when ``path`` ends in .gz."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    if array.ndim == 4:
        image.header.set_zooms((*image.header.get_zooms()[:3], frame_s))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


def write_case(
    split_dir: Path, slab: Slab, affine: np.ndarray, arrays: dict, first_id: int, pwi: PerfusionSeries | None = None
) -> int:
    """Write one case folder in the ISLES 2018 layout (with the gzipped 4D series if ``pwi``); returns the
    next free series id."""
    names = IMAGE_MAPS + ((LABEL_MAP,) if slab.split == "TRAINING" else ()) + ((PWI_MAP,) if pwi else ())
    for offset, name in enumerate(names):
        series = f"SMIR.Brain.XX.O.{name}.{first_id + offset}"
        folder = split_dir / slab.case / series
        folder.mkdir(parents=True)
        if name == PWI_MAP:
            save_nifti(pwi.series, affine, folder / f"{series}.nii.gz", frame_s=pwi.frame_s)
        else:
            save_nifti(arrays[name], affine, folder / f"{series}.nii")
    return first_id + len(names)


def write_phantom(
    out: str,
    cases: int = 24,
    test_cases: int = 4,
    seed: int = 0,
    size: int = 256,
    overwrite: bool = False,
    pwi: bool = False,
):
    """Write a synthetic CTP cohort in the ISLES 2018 layout to OUT and return OUT.

    OUT/TRAINING/case_K (CT, CT_CBF, CT_CBV, CT_MTT, CT_Tmax, OT) for K = 1..cases, OUT/TESTING/case_K
    (no OT) after them, and OUT/patients.csv (case, patient, centre, split, slices). ``size`` is the
    in-plane matrix (256 as in ISLES; smaller keeps the field of view with coarser pixels). ``pwi`` also
    writes each case's raw 4D perfusion series (CT_4DPWI, int16 HU, gzipped; docs/phantom.md); the maps
    are the same with or without it. The same seed gives byte-identical files. OUT is written to a temporary
    sibling and renamed at the end (``custom.atomic.write_folder_atomically``); an existing non-empty OUT is
    replaced only with ``overwrite``, and only once the new one is complete.
    """
    out = Path(out)
    if cases < 1 or test_cases < 0:
        raise ValueError(f"need cases >= 1 and test_cases >= 0, got cases={cases}, test_cases={test_cases}")
    if size < 32:
        raise ValueError(f"size {size} is too small to draw a head; use 32 or more (256 as in ISLES 2018)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"'{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"'{out}' is not empty; pass --overwrite to replace it")

    def write_cohort(work: Path) -> None:
        rows, file_id = [], FIRST_FILE_ID
        for slab in iter_cohort(seed, cases, test_cases):
            case_number = int(slab.case.split("_")[1])
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, case_number)))
            model = slab_model(slab, size)
            affine, arrays = render_slab(slab, size, rng, model)
            series = None
            if pwi:
                series = render_pwi(slab, size, pwi_generator(seed, slab), model)
            file_id = write_case(work / slab.split, slab, affine, arrays, file_id, series)
            rows.append((slab.case, slab.patient.name, slab.patient.centre.name, slab.split, slab.slices))
            # progress, as prepare prints it: a 24-case cohort takes half a minute, minutes with pwi
            print(f"[{len(rows)}/{cases + test_cases}] {slab.case}: {size}x{size}x{slab.slices}, {slab.split}",
                  flush=True)  # fmt: skip
        with open(work / "patients.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("case", "patient", "centre", "split", "slices"))
            writer.writerows(rows)

    # An existing OUT here is empty (checked above) or to be overwritten.
    return write_folder_atomically(out, write_cohort, overwrite=overwrite or out.is_dir())
