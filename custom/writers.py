"""Image writer that keeps the input's spatial shape, which MONAI's writers do not for one-slice volumes."""

from monai.data import NibabelWriter


class ShapePreservingNibabelWriter(NibabelWriter):
    """``NibabelWriter`` that drops only a singleton channel axis, never a singleton spatial one.

    Why it exists: MONAI writers squeeze every trailing singleton dimension, so a lesion mask of a
    one-slice CTP slab (H, W, 1) would be written as (H, W) and no longer match its input. Here a
    single-channel array (1, H, W, D) is written as (H, W, D) for any D, including 1.
    """

    def set_data_array(self, data_array, channel_dim=0, squeeze_end_dims=True, **kwargs):
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if squeeze_end_dims and self.data_obj.shape[-1] == 1:
            self.data_obj = self.data_obj[..., 0]
