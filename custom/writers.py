"""Image writer that keeps the input's spatial shape and writes atomically, which MONAI's writers do not."""

from monai.data import NibabelWriter

from custom.atomic import write_atomically


class ShapePreservingNibabelWriter(NibabelWriter):
    """``NibabelWriter`` that drops only a singleton channel axis, never a singleton spatial one, and never
    leaves a half-written file.

    Why it exists: MONAI writers squeeze every trailing singleton dimension, so a lesion mask of a
    one-slice CTP slab (H, W, 1) would be written as (H, W) and no longer match its input. Here a
    single-channel array (1, H, W, D) is written as (H, W, D) for any D, including 1. And ``nib.save``
    writes in place: a crash or a full disk would leave a truncated mask under the final name; here the
    file goes through the project's one atomic write (``custom.atomic``).
    """

    def set_data_array(self, data_array, channel_dim=0, squeeze_end_dims=True, **kwargs):
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if squeeze_end_dims and self.data_obj.shape[-1] == 1:
            self.data_obj = self.data_obj[..., 0]

    def write(self, filename, verbose=False, **obj_kwargs):
        """``NibabelWriter.write`` to a temporary sibling of ``filename``, renamed into place when complete."""

        def write(temporary):
            super(ShapePreservingNibabelWriter, self).write(temporary, verbose=verbose, **obj_kwargs)

        write_atomically(filename, write)
