"""User-facing errors.

Everything that a user can fix (bad paths, corrupt files, unsupported models, full disks) is raised as a
``StreamqError`` whose message is one line naming the file and the fix. The CLI prints it without a traceback.
"""

from __future__ import annotations


class StreamqError(Exception):
    """An error caused by the input or the environment, with a message that says what to do."""
