"""Torch files on disk: reading a file someone else wrote without running anything in it, writing without ever
leaving a half-written file, and naming every key that does not fit a model.

A torch file is a pickle. `torch.load(weights_only=True)` only rebuilds tensors and plain containers (dict,
list, tuple, str, numbers, None): a file that needs any other Python object is refused before anything in it
runs. Every file a user passes (checkpoints, --resume, --weights) goes through `read_torch_file`.
"""

import os
import pickle
import zipfile

from detector.errors import InputError


class UnsafeFileError(InputError):
    """A file that cannot be read as tensors and plain containers; the message names the file and why."""


def read_torch_file(path: str, what: str) -> object:
    """The object saved in `path`, rebuilt from tensors and plain containers only.

    Args:
        path: the file.
        what: what the file is for, as the user knows it ("checkpoint", "--weights file"): used in messages.
    Raises UnsafeFileError with one message naming the file and the problem.
    """
    import torch  # here, so that importing this module stays cheap

    if not os.path.isfile(path):
        raise UnsafeFileError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses a global before calling it: nothing in the file has run
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsafeFileError(
            f"{what} {path} refused: it holds Python objects other than tensors and plain containers, which "
            f"would run code when unpickled ({reason}). Nothing in it was run. Only load files you trust with "
            "a tool you trust; this project writes its files with tensors and plain values only.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise UnsafeFileError(f"{what} {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "is it truncated or not a torch file?") from None


def write_torch_file(obj: object, path: str) -> None:
    """torch.save to a temporary file in the same folder, flushed and fsynced, then renamed over `path`.

    A crash or a full disk mid-write leaves the previous file intact: the rename is the only step that changes
    what `path` holds, and it is atomic on POSIX file systems.
    """
    import torch

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def key_mismatch(expected: dict, given: dict, may_lack: set | frozenset = frozenset(), limit: int = 10) -> str:
    """'' if `given` fits `expected` (names and shapes of two state dicts); else one line naming what differs.

    Args:
        expected: the model's state dict (or name -> tensor).
        given: the file's.
        may_lack: keys `given` may miss (layers the file does not have, e.g. new heads).
    """
    missing = sorted(k for k in expected if k not in given and k not in may_lack)
    unexpected = sorted(k for k in given if k not in expected)
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in given.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]

    def listing(keys: list[str]) -> str:
        return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")

    parts = [f"{name} [{listing(keys)}]" for name, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if keys]
    return "; ".join(parts)
