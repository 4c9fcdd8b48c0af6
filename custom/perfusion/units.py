"""Indicator-dilution constants shared by the phantom's 4D series and the analysis, so both use one model.

Why it exists: the phantom (custom/data/phantom.py) must not import torch, and the conversion from the
deconvolved residue to ISLES units must be the same in the generator and in the analysis.
"""

BRAIN_DENSITY_G_PER_ML = 1.04
# Haematocrit correction (1 - Hct large vessels) / (1 - Hct capillaries) = (1 - 0.45) / (1 - 0.25).
HEMATOCRIT_FACTOR = 0.55 / 0.75
# Tissue concentration per unit arterial concentration for CBF = 1 ml/100 g/min: C = FLOW_TO_RATE x CBF x (AIF * R).
# CBF [ml/100 g/min] = max(k) [1/s] / FLOW_TO_RATE, CBV [ml/100 g] = 100 kH / rho x area(C) / area(AIF).
FLOW_TO_RATE = BRAIN_DENSITY_G_PER_ML / HEMATOCRIT_FACTOR / 6000.0
VOLUME_FACTOR = 100.0 * HEMATOCRIT_FACTOR / BRAIN_DENSITY_G_PER_ML
