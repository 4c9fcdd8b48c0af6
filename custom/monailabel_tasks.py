"""MONAI Label's bundle inference and training tasks, passing the bundle's refusals and other errors on to the client.

Why it exists: MONAI Label 0.8.5 turns every error of an inference into a bare ``500 Internal Server Error`` (its
endpoints catch nothing; the traceback goes to the server's console only), so 3D Slicer showed ``Status: 500;
Response: Internal Server Error`` for a study with NaN voxels, a missing map or sagittal slices, and for a corrupt
study file. A fine-tune runs in a process of its own, and the client gets the last 20 lines of its log (``GET
/train/``; the Slicer plugin logs the last one), which were the end of the traceback of MONAI's wrapper (``Failed to
instantiate component 'custom.data.datalist.check_labelled_studies'``), the refusal naming the labels far above; a
fine-tune requested with ``run_sync=true`` runs in the server itself, and its errors were bare 500s too. ``python -m
custom monailabel-app`` copies this file into the app (``lib/refusal_reporting.py``) and has the sample app's
``main.py`` import these tasks in place of MONAI Label's. It runs in the MONAI Label environment only (it imports
``monailabel`` and ``fastapi``), never in the project's.
"""

import asyncio
import logging
import re
import subprocess
import sys
from pathlib import Path

from fastapi import HTTPException
from filelock import FileLock, Timeout
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)
# Held by each fine-tune of a served bundle while it runs: an empty file beside the bundle folder, in the app's model/
# (<app>/model/.ctp_stroke.fine_tune.lock), which filelock's FileLock leaves in place on release so that every process
# locks the same file (deleting it is unsafe on POSIX: a process that opened it before the deletion could lock the
# deleted file while another locks a new one). Outside the bundle it never reaches a copy or an archive of the served
# bundle; MONAI Label reads only the folders named by --conf models in model/.
FINE_TUNE_LOCK = ".fine_tune.lock"


def fine_tune_lock(bundle_path) -> Path:
    """The lock file of the fine-tunes of the bundle at ``bundle_path``: ``.<name>`` + ``FINE_TUNE_LOCK`` beside it."""
    bundle_path = Path(bundle_path)
    return bundle_path.with_name(f".{bundle_path.name}{FINE_TUNE_LOCK}")


def causes(err: BaseException) -> list[BaseException]:
    """``err`` and its chain of causes, outermost first (MONAI wraps the error of a transform or a config component in
    a ``RuntimeError`` raised ``from`` it)."""
    chain = []
    while err is not None:
        chain.append(err)
        err = err.__cause__
    return chain


def refusal(err: BaseException) -> BaseException | None:
    """The project's refusal behind ``err``: the outermost error of its chain that ``custom.deploy.is_refusal`` accepts
    (a ValueError or OSError raised by a ``raise`` statement of the project's code), or None; a ValueError of a library
    is no refusal of the study. The project's code here is the served bundle's copy of ``custom/``, which MONAI Label
    imports from the bundle folder: its ``is_refusal`` recognises that copy. Before any of it is imported, none of it
    can have raised ``err``."""
    if "custom" not in sys.modules:
        return None
    from custom.deploy import is_refusal

    return next((cause for cause in causes(err) if is_refusal(cause)), None)


def failure(what: str, err: BaseException) -> str:
    """What a client is told of an error that is no refusal: ``what`` failed, and the innermost error of the chain (the
    original one, not MONAI's wrapper), type and message, so that a user can report it."""
    original = causes(err)[-1]
    return f"{what} failed: {type(original).__name__}: {original} (the traceback is in the server's log)"


# A line of torchrun's output: a rank's traceback is prefixed "[rank<N>]: " once the rank has joined the process group
# (torch.distributed's excepthook), unprefixed before, as is torchrun's own, whose error sums up the ranks' failures.
RANK_LINE = re.compile(r"(\[rank\d+\]: )?(.*)")
TORCHRUN_ERROR = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"


def first_error(lines) -> str | None:
    """The first error a rank printed in ``lines`` (torchrun's output), or None: the line that ends the first traceback,
    whose first line is the original error of a chain, since Python prints the cause first (the bundle's refusal, not
    MONAI's wrapper ``Failed to instantiate component``). Each rank's lines are followed apart, as torchrun interleaves
    them; a multi-line message gives its first line. torchrun's own error (``TORCHRUN_ERROR``) names no cause."""
    in_traceback = set()
    for line in lines:
        rank, text = RANK_LINE.fullmatch(line.rstrip("\n")).groups()
        if text.startswith("Traceback (most recent call last):"):
            in_traceback.add(rank)
        elif rank in in_traceback and text and not text[0].isspace():
            if not text.startswith(TORCHRUN_ERROR):
                return text
            in_traceback.discard(rank)
    return None


def in_server() -> bool:
    """Whether this runs in the server's request handler, on its event loop: a fine-tune requested with
    ``run_sync=true``, whose error becomes the HTTP answer. MONAI Label runs other fine-tunes in a process of their own
    (``monailabel.interfaces.utils.app``), whose log is the client's answer."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def http_error(what: str, err: BaseException) -> HTTPException:
    """The HTTP answer to ``err``, logged here (the server's output and ``logs/app.log``): 422 and the project's refusal
    alone, or 500 naming ``what`` and the original error (``failure``), the traceback logged. FastAPI sends the text
    as the JSON body ``{"detail": ...}``."""
    refused = refusal(err)
    if refused is not None:
        logger.warning(f"the bundle refused {what}: {refused}")
        return HTTPException(status_code=422, detail=str(refused))
    logger.error(failure(what, err), exc_info=err)
    return HTTPException(status_code=500, detail=failure(what, err))


class RefusalReportingInferTask(BundleInferTask):
    """``BundleInferTask`` that answers a request the bundle refuses (``custom.transforms.ValidateStudyd``) with HTTP
    422 and the refusal, and any other error (a corrupt study file, a failure in a transform or the network) with HTTP
    500 naming the study and the original error; both are logged (``http_error``)."""

    def __call__(self, request, *args, **kwargs):
        try:
            return super().__call__(request, *args, **kwargs)
        except Exception as err:
            raise http_error(f"the inference of {request.get('image')}", err) from err


class RefusalReportingTrainTask(BundleTrainTask):
    """``BundleTrainTask`` whose refusal by the bundle (``custom.data.datalist.check_labelled_studies``) ends the
    training log with its message: the whole traceback is logged, then the refusal is raised again alone, so that its
    short traceback ends the log. Other errors are raised as they are. A fine-tune requested with ``run_sync=true``
    runs in the server, and is answered as an inference is (``http_error``). Multi-GPU fine-tunes run torchrun of this
    environment, and fail when it fails (``run_multi_gpu``). One fine-tune of a bundle runs at a time
    (``one_at_a_time``)."""

    def __call__(self, request, datastore):
        lock = self.one_at_a_time(request)
        try:
            return self.fine_tune(request, datastore)
        finally:
            lock.release()

    def one_at_a_time(self, request) -> FileLock:
        """Take the lock of the bundle's fine-tunes (``fine_tune_lock``), or refuse the fine-tune: HTTP 429 in the
        server (``run_sync=true``), else a RuntimeError, the last line of its log.

        Why: MONAI Label 0.8.5 answers 429 to a second fine-tune only where it was not asked to queue it: ``POST
        /train/<model>?run_sync=true&enqueue=true`` and ``POST /train/?run_sync=true`` ran in the server beside the
        background fine-tune, both writing the served ``models/model.pt`` and ``latest_checkpoint_epoch=N.pt`` of the
        same names (seen here: the second replaced ``model.pt``, then failed removing a checkpoint the first had
        removed, HTTP 500, while the first trained on). filelock's lock is the kernel's
        ``flock``, released when the process holding it ends, also when ``DELETE /train/`` kills it."""
        lock = FileLock(fine_tune_lock(self.bundle_path), blocking=False)
        try:
            lock.acquire()
        except Timeout:
            busy = (f"another fine-tune of {request.get('model')} is running, which writes the same "
                    f"'{Path(self.bundle_path) / 'models' / 'model.pt'}': wait until it ends (GET /train/ gives its "
                    "status) or stop it (DELETE /train/), then ask again")  # fmt: skip
            logger.warning(busy)
            if in_server():
                raise HTTPException(status_code=429, detail=busy) from None
            raise RuntimeError(busy) from None
        return lock

    def fine_tune(self, request, datastore):
        """MONAI Label's fine-tune of the bundle's ``configs/train.json`` as it is on disk, its refusal or error
        reported as the class says.

        Why the config is read again: MONAI Label 0.8.5 reads it once, when the task is made, and each fine-tune
        changes that copy (the ``CheckpointLoader`` it inserts into ``train#handlers``, and on the multi-GPU path every
        override, which it writes to ``configs/monailabel_train.json``). A fine-tune of its own process starts from a
        new task; fine-tunes requested with ``run_sync=true`` share the server's: one asking for another
        ``model_filename`` started from the first one's, and a multi-GPU one with ``val_split`` -1 (no validation)
        validated on the studies of an earlier one's validation, which it also trained on (seen here)."""
        self.bundle_config = self._load_bundle_config(self.bundle_path, self.bundle_config_path)
        try:
            return super().__call__(request, datastore)
        except Exception as err:
            if in_server():
                raise http_error(f"the fine-tune of {request.get('model')}", err) from err
            refused = refusal(err)
            if refused is None:
                raise
            logger.exception("the bundle refused the fine-tune")
            raise refused.with_traceback(None) from None

    def run_multi_gpu(self, request, cmd, env):
        """Run MONAI Label's command line ``cmd`` (``torchrun`` and its arguments) with this environment's Python, and
        fail the fine-tune if it fails, in one line naming the cause: the first error a rank printed (``first_error``;
        the bundle's refusal, for one), else torchrun's exit status.

        Why: MONAI Label 0.8.5 runs ``torchrun`` from ``PATH``, which the documented start line (the environment's
        ``python -m monailabel.main``, not activated) does not hold (``FileNotFoundError: 'torchrun'``), or which may be
        another environment's; and it ignores torchrun's exit status, so a refused or failed multi-GPU fine-tune ended
        DONE. The ranks' output, their errors included, goes to this log as it comes (torchrun's stdout and stderr in
        one stream, as MONAI Label logs a fine-tune's process). A fine-tune of its own process then exits with status 1
        and the line (``SystemExit``): MONAI Label marks its task ERROR by that status (``utils/async_tasks/utils.py``),
        and no traceback of this process follows the ranks' (a RuntimeError's ended the log with ``torchrun exited
        with status 1``, the refusal far above). In the server (``run_sync=true``) it is a RuntimeError, answered HTTP
        500 (``http_error``)."""
        command = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
        logger.info(f"running {command}")
        output = []
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        with subprocess.Popen(command, env=env, **pipe) as torchrun:
            for line in torchrun.stdout:
                print(line, end="", flush=True)
                output.append(line)
        if torchrun.returncode != 0:
            error, status = first_error(output), f"torchrun exited with status {torchrun.returncode}"
            failed = f"the multi-GPU fine-tune failed: {f'{error} ({status})' if error else status}; each rank's " \
                     "output is above in the log"
            if in_server():
                raise RuntimeError(failed)
            raise SystemExit(failed)
