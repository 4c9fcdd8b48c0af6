"""Raw 4D CT perfusion to CBF, CBV, MTT, Tmax and TTP maps (AIF/VOF selection, SVD deconvolution)."""
