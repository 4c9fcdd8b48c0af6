"""NIfTI reader for the bundle's ``LoadImaged``: MONAI's ``NibabelReader`` without its header "correction"."""

import nibabel as nib
from monai.data import NibabelReader
from monai.utils import ensure_tuple


class HeaderPreservingNibabelReader(NibabelReader):
    """``NibabelReader`` that keeps the affine nibabel gives (``img.affine``: the sform when ``sform_code > 0``,
    else the qform, as the NIfTI standard reads a header).

    Why it exists: ``NibabelReader.read`` passes every image through MONAI's
    ``correct_nifti_header_if_necessary``, which compares the header's ``pixdim`` with the column norms of the
    affine. For a 4D file, such as this project's (H, W, D, 5) studies, it compares ``pixdim[1:5]`` with the
    norms of ``affine[:4, :4]``, whose 4th column is the translation, so any non-zero origin looks like a
    mismatch; ``rectify_header_sform_qform`` then replaces the sform by the qform (or rewrites the zooms). A file
    whose qform differs from its sform (a qform at the origin, or an identity qform under a scanner sform) was
    then segmented on the qform's grid: its mask was written with an affine other than the input's, and the
    lesion volumes used the wrong voxel size, while the MONAI-free runner (``custom/deploy.py``), the converter
    and the dataset check read the same file with nibabel's affine. A 3D label whose sform spacing differs from
    its ``pixdim`` was changed the same way. MONAI has no option to skip the correction, hence this class.

    Everything else is ``NibabelReader``'s: the voxels, dtype, channel handling, ``as_closest_canonical``,
    ``nib.load`` keyword arguments and the meta keys (``affine``, ``original_affine``, ``spatial_shape``,
    ``pixdim`` as stored in the header). Used as ``"reader"`` of the ``LoadImaged`` in train.json (images and
    labels, hence evaluation) and inference.json.
    """

    def read(self, data, **kwargs):
        """``NibabelReader.read`` without ``correct_nifti_header_if_necessary``: the ``nib.load`` image(s)."""
        filenames = ensure_tuple(data)
        self.filenames = filenames
        kwargs_ = {**self.kwargs, **kwargs}
        images = [nib.load(name, **kwargs_) for name in filenames]
        return images if len(filenames) > 1 else images[0]
