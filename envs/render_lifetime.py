"""Freeing MuJoCo renderers before interpreter teardown.

mujoco's EGL backend registers `eglTerminate` with atexit when it makes its first GL context; a
renderer freed after that (by a finaliser during teardown) raises a traceback. So every env's renderer
is freed when the env is collected, and at exit by a hook registered after mujoco's (atexit runs hooks
last-in first-out), i.e. before the display is terminated.
"""
from __future__ import annotations

import atexit
import itertools
import weakref
from typing import Any, Callable

_LIVE: dict[int, weakref.finalize] = {}  # renderers not yet freed, by key
_KEYS = itertools.count()
_HOOKED = False


def own_renderer(owner: Any, renderer: Any) -> Callable[[], None]:
    """Tie `renderer` (or None) to `owner`'s lifetime; returns the release function for owner.close()."""
    global _HOOKED
    key = next(_KEYS)
    release = weakref.finalize(owner, _close, renderer, key)
    release.atexit = False  # our own hook below runs it, in the right order
    if renderer is not None:
        _LIVE[key] = release
        if not _HOOKED:  # the first renderer exists, so mujoco's hook is registered: ours runs before it
            atexit.register(_release_all)
            _HOOKED = True
    return release


def _close(renderer: Any, key: int) -> None:
    _LIVE.pop(key, None)
    if renderer is not None:
        renderer.close()


def _release_all() -> None:
    for release in list(_LIVE.values()):
        release()
