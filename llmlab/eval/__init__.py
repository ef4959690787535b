"""Evaluation: perplexity, bits per byte, multiple choice, generation with exact match, F1, checkers
and unit tests, on built-in tasks or lm-evaluation-harness task files, for local models or servers.

    from llmlab.eval import LocalLM, evaluate_task, load_tasks
"""

from llmlab.eval.evaluate import TaskResult, evaluate_task
from llmlab.eval.lm import EvalError, LocalLM, ServerLM
from llmlab.eval.tasks import Task, load_task_file, load_tasks

__all__ = ["EvalError", "LocalLM", "ServerLM", "Task", "TaskResult", "evaluate_task", "load_task_file", "load_tasks"]
