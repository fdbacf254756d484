"""The errors a user can fix (bad config, data, checkpoint or weights file): the command-line scripts print
their message, which names the file, key or value, and exit with status 2 instead of a stack trace."""

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
