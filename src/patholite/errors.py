"""The errors patholite raises for user mistakes.

Every user-facing mistake (a bad path, a malformed dataset, an impossible configuration) raises one of these,
early, with a message that says what was wrong and what to do. Anything else escaping is a bug.
"""

from __future__ import annotations


class PatholiteError(Exception):
    """Base class: a mistake the user can fix; the message says how."""


class ConfigError(PatholiteError):
    """A configuration value or combination that cannot work."""


class DatasetError(PatholiteError):
    """A dataset that is missing, malformed, or holds images we cannot read."""


class CheckpointError(PatholiteError):
    """A checkpoint or artifact that is missing or does not fit the model or dataset."""


class AcceleratorError(PatholiteError):
    """An accelerator the machine does not have, or a setting it cannot run."""


class SlideError(DatasetError):
    """A whole-slide image that cannot be opened or read, or that lacks what a step needs (mpp, tissue)."""


def user_message(err: BaseException) -> str:
    """The error's own message; a loader worker's error arrives wrapped in its traceback, so unwrap it."""
    text = str(err)
    # torch's ExceptionWrapper: the message is the worker's traceback, ending "<module>.<Error>: <message>"
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(f"{type(err).__name__}: ", 1)[-1]
    return text
