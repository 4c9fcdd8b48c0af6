"""MONAI Label's bundle inference and training tasks, passing the bundle's refusals on to the client.

Why it exists: MONAI Label 0.8.5 turns every error of an inference into a bare ``500 Internal Server Error`` (its
endpoints catch nothing; the traceback goes to the server's console only), so 3D Slicer showed ``Status: 500;
Response: Internal Server Error`` for a study with NaN voxels, a missing map or sagittal slices. A fine-tune runs in
a process of its own, and the client gets the last 20 lines of its log (``GET /train/``; the Slicer plugin logs the
last one), which were the end of the traceback of MONAI's wrapper (``Failed to instantiate component
'custom.data.datalist.check_labelled_studies'``), the refusal naming the labels far above. ``python -m custom
monailabel-app`` copies this file into the app (``lib/refusal_reporting.py``) and has the sample app's ``main.py``
import these tasks in place of MONAI Label's. It runs in the MONAI Label environment only (it imports ``monailabel``
and ``fastapi``), never in the project's.
"""

import logging

from fastapi import HTTPException
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)


def refusal(err: BaseException) -> ValueError | None:
    """The bundle's refusal behind ``err``: the outermost ``ValueError`` of its chain of causes (MONAI wraps the error
    of a config component in a ``RuntimeError``), or None."""
    while err is not None and not isinstance(err, ValueError):
        err = err.__cause__
    return err


class RefusalReportingInferTask(BundleInferTask):
    """``BundleInferTask`` that answers a request the bundle refuses (``custom.transforms.ValidateStudyd``) with HTTP
    422 and the refusal, which FastAPI sends as ``{"detail": ...}``, and logs the refusal (the server's log and
    ``logs/app.log``). Other errors stay MONAI Label's bare 500."""

    def __call__(self, request, *args, **kwargs):
        try:
            return super().__call__(request, *args, **kwargs)
        except Exception as err:
            refused = refusal(err)
            if refused is None:
                raise
            logger.warning(f"the bundle refused the inference of {request.get('image')}: {refused}")
            raise HTTPException(status_code=422, detail=str(refused)) from err


class RefusalReportingTrainTask(BundleTrainTask):
    """``BundleTrainTask`` whose refusal by the bundle (``custom.data.datalist.check_labelled_studies``) ends the
    training log with its message: the whole traceback is logged, then the refusal is raised again alone, so that its
    short traceback ends the log. Other errors are raised as they are."""

    def __call__(self, request, datastore):
        try:
            return super().__call__(request, datastore)
        except Exception as err:
            refused = refusal(err)
            if refused is None:
                raise
            logger.exception("the bundle refused the fine-tune")
            raise ValueError(str(refused)) from None
