"""The errors a user can fix (bad config, data, checkpoint or weights file): the command-line scripts print
their message, which names the file, key or value, and exit with status 2 instead of a stack trace."""

import re

from data.errors import DataError
from model.detector import ModelConfigError
from model.loss import LossInputError
from model.priors import PriorConfigError
from model.vgg import WeightsDownloadError, WeightsError
from utils.checkpoint import CheckpointError
from utils.config import ConfigError
from utils.engine import NonFiniteLossError
from utils.matching import TargetError
from utils.output_dir import OutputDirError
from utils.postprocess import PostprocessError
from utils.voc_eval import EvaluationInputError
from utils.voc_results import ResultsFormatError

USER_ERRORS: tuple[type[Exception], ...] = (
    CheckpointError,
    ConfigError,
    DataError,
    EvaluationInputError,
    LossInputError,
    ModelConfigError,
    NonFiniteLossError,
    OutputDirError,
    PostprocessError,
    PriorConfigError,
    ResultsFormatError,
    TargetError,
    WeightsDownloadError,
    WeightsError,
)

# torch re-raises a DataLoader worker's exception in the main process with this line and the worker's whole
# traceback before the message.
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"
_LAST_LINE = re.compile(r"^[\w.]+: (.+)$")


def user_message(error: BaseException) -> str:
    """The message to print for a user error: for one raised in a DataLoader worker (a missing or broken
    image found while training), the worker's own one-line message instead of torch's 20 lines around it."""
    text = str(error)
    if _WORKER_TRACEBACK in text:
        last = _LAST_LINE.match(text.rstrip().splitlines()[-1])
        if last:
            return last.group(1)
    return text
