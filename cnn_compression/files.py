"""Files written whole or not at all: atomic writes, JSON, and a run's config and history."""

import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile

from cnn_compression.cli import UserError



TEMPORARY_PREFIX = ".tmp-"  # of write_atomically's files; a kill mid-write leaves them for remove_temporaries
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomically(path, write):
    """Call `write(temporary_path)`, then rename the result onto `path`: readers see the old file or
    the whole new one, never a partial write."""
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    try:  # a path the user gave that cannot be written is bad input, not a crash
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=suffix)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes owner-only files
        try:
            os.replace(temporary, path)
        except OSError as error:
            raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def check_output_path(path, what, folder=False):
    """Refuse, before any work is done, an output path that cannot be written: a folder where a
    file goes (or a file where a folder goes), or a path under a file."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} exists and is not a folder")
    if not folder and os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"{what} {path} lies under {ancestor}, which is a file")


def write_json(path, payload):
    def write(temporary):
        with open(temporary, "w") as handle:
            json.dump(payload, handle, indent=2, default=_json_default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

    write_atomically(path, write)


def write_text(path, text):
    def write(temporary):
        with open(temporary, "w") as handle:
            handle.write(text)

    write_atomically(path, write)


def write_bytes(path, content):
    """Write `content` (bytes, e.g. a .tflite flatbuffer) to `path` atomically."""
    def write(temporary):
        with open(temporary, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())

    write_atomically(path, write)


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars (an array's .item() fails beyond one element)
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path, what="file"):
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"no {what} at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None


def read_history(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as handle:
            history = json.load(handle)
        return history if isinstance(history, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def remove_temporaries(folder):
    """Delete the temporary files of writes a kill interrupted (see `write_atomically`)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TEMPORARY_PREFIX):
                os.remove(os.path.join(folder, name))


def versions():
    import keras
    import numpy
    import tensorflow

    from cnn_compression import cpu, onednn

    return {"python": platform.python_version(), "tensorflow": tensorflow.__version__,
            "keras": keras.__version__, "numpy": numpy.__version__, "onednn": onednn.enabled(),
            "cpu": cpu.model_name()}


def fingerprint_file(path):
    """A digest of a file's contents: a moved or copied input is still the same input."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_arrays(*arrays):
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(memoryview(array).cast("B") if array.flags.c_contiguous else array.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# One run per output folder

LOCK_NAME = ".lock"


class FolderLock:
    """An exclusive OS lock (flock) on `folder/.lock`, held for a run's lifetime.

    The kernel releases it when the process dies, SIGKILL included, so it never sticks; a second
    run into the folder fails at once with a UserError naming the holder's PID. The file is
    removed on release; the inode check after locking closes the race with a releasing holder.
    """

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.handle = None

    def acquire(self):
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise UserError(f"{self.folder} is in use by another run (PID {holder}); wait for it to end "
                                "or choose another folder") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # the holder released and removed it between our open and lock: try again
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self):
        if self.handle is not None:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.handle.close()  # closing drops the flock
            self.handle = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def create_output_folder(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {folder}: {error.strerror}") from None


_HELD_LOCKS = []


def lock_folder(folder):
    """Create `folder` if needed and hold its FolderLock (released at exit)."""
    import atexit

    create_output_folder(folder)
    lock = FolderLock(folder).acquire()
    atexit.register(lock.release)
    _HELD_LOCKS.append(lock)
    return lock


def release_folder_locks():
    """Release every folder lock this process holds: a script's `main` run inside a longer-lived
    process (the tests) ends its run without the process ending."""
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().release()


REPLACED_FOLDER = ".replaced"


def set_aside(folder):
    """--overwrite: move the old run in `folder` into `folder/.replaced/`.

    `discard_replaced` deletes it once the new run has written its first epoch, so a replacement
    that dies before that leaves the old run recoverable. If `.replaced` exists already, what lies
    beside it is such a replacement (it never finished an epoch): that is what gets removed.
    """
    aside = os.path.join(folder, REPLACED_FOLDER)
    keep_aside = os.path.isdir(aside)
    if not keep_aside:
        os.makedirs(aside)
    for name in os.listdir(folder):
        if name in (REPLACED_FOLDER, LOCK_NAME):
            continue
        path = os.path.join(folder, name)
        if not keep_aside:
            os.replace(path, os.path.join(aside, name))
        elif os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def discard_replaced(folder):
    shutil.rmtree(os.path.join(folder, REPLACED_FOLDER), ignore_errors=True)


