"""The error of `specd train-draft`'s bad input, apart from both the CLI module and the training
code so neither imports the other to raise or catch it."""

from __future__ import annotations


class TrainDraftError(Exception):
    """Bad input: the message names the problem and what to do (exit code 2)."""
