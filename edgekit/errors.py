"""The two kinds of failure a user meets, and the exit codes the CLI maps them to."""

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TARGET_FAILED = 3
EXIT_INTERNAL = 4
"""An error in edgekit itself (a bug): the message names the log with the traceback. Never 1, which
means "a gate failed" to a release pipeline."""


class InputError(Exception):
    """Bad input or usage: a recipe, a data file, a model source, an option. The message names it. Exit 2."""


class TargetError(Exception):
    """A target could not be built or measured. Recorded in the report as ``failed``; the run goes on."""
