"""Tasks, prompts, data sources and loaders."""

from .encoding import EncodedSplit, answer_token_ids, fit_loaders, make_loader
from .sources import TaskSplits, load_task_splits
from .tasks import TASKS, Example, TaskSpec, get_task

__all__ = [
    "TASKS", "EncodedSplit", "Example", "TaskSpec", "TaskSplits", "answer_token_ids", "get_task",
    "load_task_splits", "make_loader", "fit_loaders",
]
