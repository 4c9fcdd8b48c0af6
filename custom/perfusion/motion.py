"""Optional rigid motion correction of a 4D CT perfusion series with ITK's v4 registration framework.

Why it exists: patients move during the 40-60 s acquisition, which corrupts the voxel curves; MONAI has
no classical rigid registration, so each frame is registered to the pre-contrast reference with ITK
(versor rigid 3D transform, mean squares on HU, regular-step gradient descent), not a hand-written optimiser.
"""

import numpy as np

# the reference is the mean of the first frames (before contrast), taken after an outlying frame 0 or 1 is replaced
# (compute_perfusion_maps calls correct_motion after that check)
REFERENCE_FRAMES = 2
METRIC_SAMPLING = 0.2  # fraction of voxels the metric samples per iteration
ITERATIONS = 100


def _itk_image(volume: np.ndarray, spacing_mm):
    """An ITK float image of an (x, y, z) array (ITK arrays are z, y, x)."""
    import itk

    image = itk.image_from_array(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing_mm])
    return image


def register_frame(fixed, moving):
    """The rigid (versor) 3D transform mapping ``fixed`` points into ``moving`` (ITK images), by ITK v4 registration."""
    import itk

    image_type = itk.Image[itk.F, 3]
    transform = itk.VersorRigid3DTransform[itk.D].New()
    initializer = itk.CenteredTransformInitializer[itk.VersorRigid3DTransform[itk.D], image_type, image_type].New(
        Transform=transform, FixedImage=fixed, MovingImage=moving
    )
    initializer.GeometryOn()
    initializer.InitializeTransform()
    metric = itk.MeanSquaresImageToImageMetricv4[image_type, image_type].New()
    # central differences instead of the default recursive-Gaussian gradient images, which need 4 or more
    # slices: ISLES 2018 slabs of 2 or 3 slices failed with an ITK error
    metric.SetUseFixedImageGradientFilter(False)
    metric.SetUseMovingImageGradientFilter(False)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New(
        LearningRate=1.0, MinimumStepLength=1e-3, NumberOfIterations=ITERATIONS, RelaxationFactor=0.5
    )
    scales = itk.RegistrationParameterScalesFromPhysicalShift[metric.__class__].New(Metric=metric)
    optimizer.SetScalesEstimator(scales)
    registration = itk.ImageRegistrationMethodv4[image_type, image_type].New(
        FixedImage=fixed, MovingImage=moving, Metric=metric, Optimizer=optimizer, InitialTransform=transform
    )
    registration.SetNumberOfLevels(1)
    registration.SetShrinkFactorsPerLevel([1])
    registration.SetSmoothingSigmasPerLevel([0])
    registration.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
    registration.SetMetricSamplingPercentage(METRIC_SAMPLING)
    registration.MetricSamplingReinitializeSeed(0)
    registration.InPlaceOn()
    registration.Update()
    return registration.GetModifiableTransform()


def correct_motion(hu: np.ndarray, spacing_mm) -> np.ndarray:
    """Every frame of ``hu`` (H, W, D, T) rigidly registered to the mean of the first REFERENCE_FRAMES and
    resampled (linear) onto the reference grid; voxels moved in from outside take the frame's minimum."""
    import itk

    fixed = _itk_image(hu[..., :REFERENCE_FRAMES].mean(axis=-1), spacing_mm)
    corrected = np.empty_like(hu, dtype=np.float32)
    for frame in range(hu.shape[-1]):
        moving = _itk_image(hu[..., frame], spacing_mm)
        transform = register_frame(fixed, moving)
        resampled = itk.resample_image_filter(
            moving,
            transform=transform,
            use_reference_image=True,
            reference_image=fixed,
            default_pixel_value=float(hu[..., frame].min()),
        )
        corrected[..., frame] = itk.array_from_image(resampled).transpose(2, 1, 0)
    return corrected
