"""The notebooks' side of a swarm: `rl-swarm` runs as a child, its table is redrawn in place in the cell, and
interrupting the cell stops it as Ctrl-C does in a terminal.

The child runs in a session of its own, so a kernel interrupt reaches it once, forwarded from here, and never
twice (a second SIGINT would kill it at once); its whole process group is swept when it ends, so no worker
outlives the cell. The table is drawn from the shared folder alone, as `rl-swarm status` draws it: the same
code shows the swarm on the runtime that runs it and on any other that mounts the folder (monitor.ipynb).
"""

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping

import psutil
from rich.console import Console
from rich.text import Text

from configs_env import SwarmConfig, SwarmError
from swarm_supervisor.dashboard import render
from swarm_supervisor.hangup import session_of_its_own
from swarm_supervisor.machines import read_events
from swarm_supervisor.status import folder_reader
from swarm_supervisor.supervisor import EXIT_INTERRUPTED, SHUTDOWN_GRACE_S
from swarm_supervisor.table import STOP_GRACE_S
from workers.shared_folder import storage
from workers.shared_folder.mount import folder_present

REFRESH_S = 2.0                          # a redraw reads the folder: on Drive, every second would be too often
STOP_WAIT_S = SHUTDOWN_GRACE_S + 30.0    # the supervisor gives its workers SHUTDOWN_GRACE_S to save and leave
TABLE_STOP_WAIT_S = STOP_GRACE_S + 30.0  # sapo-table gives its swarms STOP_GRACE_S: killed sooner, they would not save
SWEEP_WAIT_S = 5.0                       # multiprocessing's helpers leave once their parent has
FRAME_WIDTH = 150                        # columns of a frame: a Colab cell shows about this many
# the commands run_swarm follows; sapo-table runs several swarms, each `up` writing to a log of its own: it has
# no one folder to draw a table from, and prints its swarms' progress and its table as lines
CHILD_COMMANDS = ("up", "worker", "join", "sapo-table")


class CellStop(Exception):
    """Ends a notebook cell with its one line: IPython shows `_render_traceback_` instead of a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


class Frame:
    """A rich renderable as a notebook shows it: HTML with its colours, and plain text for logs and tests."""

    def __init__(self, renderable: object, width: int = FRAME_WIDTH):
        console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True, color_system="truecolor")
        console.print(renderable)
        self.text = console.export_text(clear=False)
        self.html = console.export_html(inline_styles=True, code_format="<pre style=\"font-family:monospace;"
                                        "line-height:1.25;white-space:pre\">{code}</pre>")

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        return {"text/plain": self.text, "text/html": self.html}


class LiveCell:
    """One output area of the cell, replaced at each draw (IPython's display ids); outside IPython, nothing."""

    def __init__(self) -> None:
        self._handle = None
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            self._display = None
            return
        self._display = display if get_ipython() is not None else None

    @property
    def live(self) -> bool:
        return self._display is not None

    def show(self, frame: Frame) -> None:
        if self._display is None:
            return
        if self._handle is None:
            self._handle = self._display(frame, display_id=True)
        else:
            self._handle.update(frame)


class FolderTable:
    """The dashboard's frame of one experiment, read from its folder; None until the swarm has begun."""

    def __init__(self, cfg: SwarmConfig):
        self.cfg = cfg
        self.reader = None
        self.view = None            # the SwarmView of the newest frame

    def frame(self) -> Frame | None:
        if self.reader is None:
            try:
                # looked for every redraw until it is there: not a listing of every experiment each time
                self.reader = folder_reader(self.cfg, name_others=False)
            except SwarmError:          # no experiment folder yet: the warm-up or the checks still run
                return None
        in_bucket = storage.mounted(self.reader.folder.state_dir) is not None     # SWARM_URL: no mount to drop
        if not in_bucket and not folder_present(self.reader.folder.root):
            return Frame(Text(f"rl-swarm: the shared folder {self.reader.folder.root} is not there (a dropped Drive "
                              "mount?): the workers go on and keep their records; the table is back with it",
                              style="yellow"))
        self.view = self.reader.view(events=read_events(self.reader.folder))
        return Frame(render(self.view))


def merged_env(settings: Mapping[str, object]) -> dict[str, str]:
    """This process's environment with the cell's settings; an empty setting leaves the variable alone."""
    env = {**os.environ, **{k: str(v) for k, v in settings.items() if v not in ("", None)}}
    # ipykernel sets these for its own children, and rich then draws live bars into our pipe, frame after frame
    for name in ("FORCE_COLOR", "CLICOLOR_FORCE"):
        env.pop(name, None)
    # into a pipe, Python buffers a child's prints by the block: a table's lines would reach the cell at its end
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rl_swarm(*args: str, **settings: object) -> int:
    """Run `rl-swarm ARGS` and print its output in the cell (a report, a plot): no table, no interrupt handling."""
    proc = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", *args], env=merged_env(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="")
    return proc.wait()


def run_swarm(command: str = "up", *args: str, **settings: object) -> int:
    """`rl-swarm up` (or `worker`) with its live table in the cell and its summary at the end; `sapo-table` (with
    its ARGS) with its lines as they come.

    Interrupting the cell stops the swarm cleanly (files written, checkpoints saved, resumable); a second
    interrupt kills it at once. A swarm that failed ends the cell with one line.
    """
    if command not in CHILD_COMMANDS:
        raise CellStop(f"rl-swarm: run_swarm runs {', '.join(CHILD_COMMANDS)}, not {command!r}: use rl_swarm() for "
                       "the others")
    env = merged_env(settings)
    table, argv = None, [sys.executable, "-m", "swarm_supervisor", command, *args]
    if command != "sapo-table":
        argv.append("--no-dashboard")
        try:
            table = FolderTable(SwarmConfig.from_env(env, role="join" if command != "up" else "up"))
        except SwarmError:
            pass                        # the child says what is wrong, in one line, and exits 2
    table_run = command == "sapo-table"
    code = Child(argv, env, TABLE_STOP_WAIT_S if table_run else STOP_WAIT_S).follow(table, LiveCell())
    if code not in (0, EXIT_INTERRUPTED):
        logs = "tables/logs/ in the shared folder" if table_run else "logs/ in the experiment folder"
        raise CellStop(f"rl-swarm: `rl-swarm {command}` exited with code {code}: see the lines above and {logs}")
    return code


class Child:
    """`rl-swarm` in a session of its own, its output printed as it comes, its table redrawn meanwhile."""

    def __init__(self, argv: list[str], env: dict[str, str], stop_wait_s: float = STOP_WAIT_S):
        self.stop_wait_s = stop_wait_s       # after a stop button, how long the child has to stop before it is killed
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     **session_of_its_own())
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name="rl-swarm output", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)            # end of output: the child has closed its stdout

    def follow(self, table: FolderTable | None, cell: LiveCell) -> int:
        try:
            try:
                return self._pump(table, cell, deadline=None)
            except KeyboardInterrupt:
                return self._stop(table, cell)
        finally:
            left = sweep_group(self.proc.pid)
            if left:
                print(f"rl-swarm: {left} process(es) of the swarm outlived it and were killed")
            if table is not None and (frame := table.frame()) is not None:
                cell.show(frame)         # the final state, with the summary printed below it

    def _stop(self, table: FolderTable | None, cell: LiveCell) -> int:
        print("rl-swarm: interrupted: stopping the swarm as Ctrl-C does (workers finish their files and save "
              "checkpoints; interrupt again to kill it at once)", flush=True)
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self._pump(table, cell, deadline=time.monotonic() + self.stop_wait_s)
        except KeyboardInterrupt:
            print("rl-swarm: interrupted again: killing the swarm (it resumes from its last checkpoint)")
            return self._kill()
        if code is None:
            print(f"rl-swarm: the swarm did not stop within {self.stop_wait_s:.0f}s: killed (it resumes from its last "
                  "checkpoint)")
            return self._kill()
        return code

    def _kill(self) -> int:
        """Kill the whole swarm after an interrupt: stopped on request all the same, resumable from its checkpoint."""
        kill_group(self.proc.pid)
        self.proc.wait(timeout=10)
        return EXIT_INTERRUPTED

    def _pump(self, table: FolderTable | None, cell: LiveCell, deadline: float | None) -> int | None:
        """Print the child's lines and redraw the table until it exits (its code), or until `deadline` (None)."""
        last_draw = float("-inf")
        for line in self._lines(deadline):
            if line:
                print(line, end="", flush=True)
            if table is not None and time.monotonic() - last_draw >= REFRESH_S:
                frame = table.frame()
                if frame is not None:
                    cell.show(frame)
                last_draw = time.monotonic()
        if deadline is not None and time.monotonic() >= deadline and self.proc.poll() is None:
            return None
        return self.proc.wait(timeout=10)     # its output has ended: it is exiting

    def _lines(self, deadline: float | None) -> Iterator[str]:
        """The child's lines as they come, and "" at least every REFRESH_S, until its output ends or `deadline`."""
        while deadline is None or time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=REFRESH_S / 2)
            except queue.Empty:
                yield ""
                continue
            if line is None:
                self.lines.put(None)     # a second _pump, after an interrupt, ends at once too
                return
            yield line


def group_members(pgid: int) -> list[psutil.Process]:
    """The live processes of a process group (zombies are dead already: only their parent's wait is missing)."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass                            # every member has exited already


def sweep_group(pgid: int, wait_s: float = SWEEP_WAIT_S) -> int:
    """Kill what is left of the child's process group after `wait_s`; how many were left."""
    deadline = time.monotonic() + wait_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = len(group_members(pgid))
    if left:
        kill_group(pgid)
    return left


def show_status(watch_minutes: float = 0, **settings: object) -> None:
    """The dashboard's table of an experiment from the folder alone; redrawn while it runs, up to `watch_minutes`."""
    env = merged_env(settings)
    try:
        table = FolderTable(SwarmConfig.from_env(env))
    except SwarmError as error:
        raise CellStop(f"rl-swarm: error: {error}") from None
    cell = LiveCell()
    deadline = time.monotonic() + watch_minutes * 60
    try:
        while True:
            frame = table.frame()
            if frame is None:
                raise CellStop(f"rl-swarm: no experiment at {table.cfg.experiment_dir}: check DRIVE_FOLDER and "
                               "EXPERIMENT_NAME")
            if cell.live:
                cell.show(frame)
            else:
                print(frame.text)
            if time.monotonic() >= deadline or (table.view is not None and table.view.phase != "running"):
                return
            time.sleep(REFRESH_S * 2.5)
    except KeyboardInterrupt:
        print("rl-swarm: stopped watching (the swarm itself goes on)")
