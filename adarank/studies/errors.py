"""The one error of the studies: bad inputs (a missing folder, no runs, runs of several tasks, ...).

The command lines print it as one line on stderr and exit with code 2.
"""


class StudyError(Exception):
    """A problem with a study's inputs, reported in one line."""
