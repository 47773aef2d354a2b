"""`sis m --ui`: a terminal view of the manager, redrawn whenever states change: the state counts, every job
that is not finished (state, id, vis name) and the latest log lines, instead of a scrolling log."""
import collections
import logging
import shutil
import sys

CLEAR = "\x1b[H\x1b[2J"
LOG_LINES = 8


class _RecentLines(logging.Handler):
    def __init__(self, keep):
        super().__init__()
        self.lines = collections.deque(maxlen=keep)
        self.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s: %(message)s"))

    def emit(self, record):
        self.lines.append(self.format(record).splitlines()[0])


class TerminalDisplay:
    """Takes over the log output (the last LOG_LINES lines are shown) and draws the manager's state on `stream`."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.log = _RecentLines(LOG_LINES)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(self.log)

    def draw(self, manager):
        from sisyphus.manager import STATE_ORDER

        width, height = shutil.get_terminal_size((120, 40))
        lines = [f"Sisyphus manager: {manager.summary()}", ""]
        pending = sorted(((state, job) for job, state in dict(manager.states).items() if state != "finished"),
                         key=lambda item: (STATE_ORDER.index(item[0]), item[1]))
        room = max(3, height - LOG_LINES - 6)
        for state, job in pending[:room]:
            name = f"  ({job.get_vis_name()})" if job.get_vis_name() else ""
            lines.append(f"{state:>26}  {job.job_id()}{name}")
        if len(pending) > room:
            lines.append(f"{'':>26}  ... {len(pending) - room} more")
        lines += ["", "Log:"] + [f"  {line}" for line in self.log.lines]
        self.stream.write(CLEAR + "\n".join(line[:width] for line in lines) + "\n")
        self.stream.flush()
