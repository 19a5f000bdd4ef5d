"""consumerd: a Pub/Sub consumer daemon that runs each message as a task in a worker process."""

from .errors import PayloadError, Reject, Retry
from .message import Message
from .registry import task

__version__ = "0.1.0"
__all__ = ["Message", "PayloadError", "Reject", "Retry", "task", "__version__"]
