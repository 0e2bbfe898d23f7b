"""The one exception a user can cause.

Every error that a user's input can trigger (bad config, missing file, corrupt shard, budget too
small, wrong adapter) is raised as `OdysseyError` with a message that names the cause and the fix.
`odyssey.cli` prints it as one line and exits with status 2; nothing else is caught there, so a
bug still shows its traceback.
"""


class OdysseyError(Exception):
    """A user-caused error: `str(e)` is one line naming the cause and the fix."""

    exit_status = 2


class StopRequested(Exception):
    """Raised inside the trainer when a stop was requested (guard or user); carries the reason."""

    def __init__(self, reason: str, source: str = "user"):
        super().__init__(reason)
        self.reason = reason
        self.source = source  # "user" (monitor, control.json), "guard" or "signal"
