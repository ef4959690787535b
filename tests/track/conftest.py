"""The tracking tests' shared fixtures: the tiny corpus, base checkpoint and instruction records of the
training tests."""

from tests.train.conftest import base, corpus_dir, synth_dir  # noqa: F401
