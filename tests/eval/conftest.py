"""The evaluation tests' shared fixtures: the task sets and tiny task models of fine-tuning, and the tiny
prepared corpus of the training tests."""

from tests.task_models import bert_base, sets, t5_base  # noqa: F401
from tests.train.conftest import corpus_dir  # noqa: F401
