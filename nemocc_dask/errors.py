"""The two kinds of failure a run can end with, and what the command line makes of them.

``StartError``: the run could not start. Raised only before the first request is sent and before
the output folder is touched; the message says what is wrong and how to fix it (exit status 2).
``RunError``: the run started and then stopped (a broken endpoint, counts that do not add up);
what was answered is kept and rerunning the same command resumes (exit status 1).
``Preempted``: the run was asked to stop (SIGTERM: a SLURM time limit, preemption, ``scancel``) and
stopped cleanly: answers in flight were journaled; requeue or rerun to resume (exit status 75).
"""

from __future__ import annotations


class StartError(Exception):
    """The run could not start; nothing was sent and the output folder is unchanged."""


class ConfigError(StartError, ValueError):
    """A setting, task, prompt file or column name is wrong; the message names it."""


class RunError(RuntimeError):
    """The run started but could not finish; the message says why and what a rerun does."""


class Preempted(RunError):
    """The run stopped on SIGTERM after journaling what was in flight; a rerun resumes."""

    exit_status = 75  # EX_TEMPFAIL; SLURM requeues it with RequeueExit=75


class Interrupted(Preempted):
    """The run stopped on Ctrl-C (SIGINT) after journaling what was in flight."""

    exit_status = 130  # 128 + SIGINT, what shells report for Ctrl-C
