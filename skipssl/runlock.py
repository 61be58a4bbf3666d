"""One writer per run folder: an exclusive ``flock`` on ``{output_dir}/.writer.lock``, held by rank 0 for the
whole run. The kernel releases it when the process ends however it ends (SIGKILL included), so a requeued or
restarted job takes it again; a second run started on the same folder meanwhile is refused, naming the holder."""

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = '.writer.lock'
log = logging.getLogger(__name__)


class RunFolderError(RuntimeError):
    """The run folder cannot be written, or another run is writing it."""


def _holder() -> str:
    job = os.environ.get('SLURM_JOB_ID')
    return (
        f'pid {os.getpid()} on {socket.gethostname()}'
        + (f', SLURM job {job}' if job else '')
        + f', since {time.strftime("%Y-%m-%d %H:%M:%S")}'
    )


class RunLock:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: Optional[int] = None

    def acquire(self) -> 'RunLock':
        path = self.folder / LOCK_NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exn:
            raise RunFolderError(
                f'experiment.output_dir: cannot write to {self.folder}: {exn.strerror or exn}'
            ) from exn
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            raise RunFolderError(
                f'experiment.output_dir: {self.folder} is in use by another run ({holder}); '
                'wait for it to end or use another folder'
            ) from None
        except OSError as exn:
            if exn.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning(
                '%s: the file system does not support flock (%s); a second run on this folder would not be refused',
                path,
                exn.strerror,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder() + '\n').encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_free(folder: Path) -> None:
    """Raise RunFolderError if another run holds ``folder`` (a submission-time check; takes and drops the lock).
    A folder that does not exist yet is free and is not created."""
    if Path(folder).is_dir():
        RunLock(folder).acquire().release()
