"""Atomic file and folder writes: a kill mid-write never leaves a broken file under the final name."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import BaichuanTuneError, WriteError


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path`, and for a folder everything in it, the permissions a plain open() or mkdir() gives under
    the umask (0644 / 0755 under the usual 022). mkstemp and mkdtemp make owner-only files and folders, and
    so do writers built on them (safetensors' save_file writes weights 0600)."""
    path = Path(path)
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        apply_umask(Path(tmp))  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    If the block raises (or the process dies), `final` keeps its previous content and the partial folder
    is a hidden `.tmp` sibling that the next save removes.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    apply_umask(tmp)  # what the block wrote with owner-only permissions (weights, through safetensors)
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- failed writes


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when `exc` is a failed write in one of the forms it takes, else None.

    The OS raises OSError with an errno; safetensors raises SafetensorError("... (os error 28)"); torch.save
    raises RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), which does
    not say why: a file cut short, as a full disk leaves it.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return _errno_text(exc.errno)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        code = re.search(r"os error (\d+)", text)
        return _errno_text(int(code.group(1))) if code else None
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        first = text.strip().splitlines()[0][:160]
        return f"the file was cut short ({first}), as a full disk does"
    return None


def _errno_text(code: int) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the disk" if code == errno.ENOSPC else "disk quota exceeded"
    return os.strerror(code).lower()


@contextmanager
def clear_write_errors(target, what: str, advice: str = ""):
    """Turn a failed write inside the block into one WriteError line naming `target` and saying what to do;
    any other error passes through as it is."""
    try:
        yield
    except BaichuanTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - write_failure picks the write failures out
        reason = write_failure(exc)
        if reason is None:
            raise
        raise WriteError(f"{target}: could not write {what}: {reason}" + (f"; {advice}" if advice else "")) from exc
