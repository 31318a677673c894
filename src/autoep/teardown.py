"""End a process that ran gloo collectives without torch's exit-time abort.

Why this exists: a gloo worker thread drops its last reference to a finished
collective *after* the caller's ``wait()`` has returned. When the Python
objects of that collective's tensors are already gone, the drop needs the GIL.
If the main thread has begun interpreter finalization by then, CPython (before
3.14) ends the worker with ``pthread_exit`` inside a C++ destructor and the
process aborts: "terminate called without an active exception", SIGABRT, after
all its work is done (pytorch/pytorch#179291). Core dumps of such aborts show
``~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject`` -> ``take_gil`` ->
``PyThread_exit_thread`` while the main thread sits in ``Py_FinalizeEx``.
``destroy_process_group`` does not prevent it: gloo has no shutdown, and its
threads live as long as any Python object still holds the group.

So a process autoep owns (a rank of ``autoep train``, a worker of
:func:`autoep.launch.run_local`) is *armed* once its group is destroyed on a
success path: at exit, after the other exit handlers, it flushes its output and
open files and leaves with ``os._exit``, skipping finalization and with it the race. The exit
status is the process's own: 0 for a worker that returned, the CLI's code for
``autoep`` (:func:`exit_with`).

A script autoep does not own (transformers' Trainer, TRL, accelerate under
torchrun) opts in by ending with :func:`shutdown`, where it would otherwise call
``destroy_process_group``.

The exit handler is registered when autoep is imported, so it runs after the
handlers of everything imported later (torch, transformers, datasets,
tempfile's cleanups: atexit runs handlers last-in, first-out); of the few
registered before it, logging's flush is done here.
"""

from __future__ import annotations

import atexit
import gc
import io
import logging
import os
import sys
from typing import NoReturn

_armed_code: int | None = None


def end_process_group(exit_code: int = 0) -> None:
    """Destroy the default process group (and its subgroups), then arm the plain exit with ``exit_code``.

    Only for processes autoep started or runs to the end: the caller must have
    nothing left to do but return and let the interpreter exit.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _arm(exit_code)


def shutdown(exit_code: int = 0) -> NoReturn:
    """End this script's distributed run: destroy the process group and exit with ``exit_code``.

    Call it last, in place of ``dist.destroy_process_group()``: ``SystemExit``
    unwinds the script (``finally`` blocks run), the exit handlers run, and the
    process then leaves without interpreter finalization, so a gloo worker
    thread finishing its last release cannot abort it (see the module doc).
    """
    end_process_group(exit_code)
    raise SystemExit(exit_code)


def exit_with(code: int) -> int:
    """The end of a command: an armed process will leave with ``code``; returns ``code`` for ``sys.exit``."""
    if _armed_code is not None:
        _arm(code)
    return code


def _arm(code: int) -> None:
    global _armed_code
    _armed_code = code


@atexit.register
def _exit_if_armed() -> None:
    """Leave without interpreter finalization once this process's group is gone (see the module doc)."""
    if _armed_code is None:
        return
    logging.shutdown()
    _flush_open_files()
    os._exit(_armed_code)


def _flush_open_files() -> None:
    """Flush every open Python file object, as finalization would have when freeing them: with ``os._exit``
    a script's unclosed log or results file would otherwise lose what it buffered."""
    # type(obj), not isinstance: the latter reads obj.__class__, which some objects answer with a warning
    # (torch.distributed.reduce_op prints a FutureWarning); nothing here may fail or print.
    for obj in [*gc.get_objects(), sys.stdout, sys.stderr]:
        try:
            if issubclass(type(obj), io.IOBase) and not obj.closed and obj.writable():
                obj.flush()
        except Exception:  # a broken pipe, a detached buffer, an odd type: nothing more can be written there
            pass
