"""The evaluation tests' shared fixtures: the task sets and tiny task models of fine-tuning."""

from tests.task_models import bert_base, sets, t5_base  # noqa: F401
