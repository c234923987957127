"""Shared by the tabletop tests: envs made here are closed after the test."""

import pytest

from envs.tabletop import TabletopEnv


@pytest.fixture
def make_env():
    created = []

    def _make(task: str = "lift", **kwargs):
        kwargs.setdefault("render", False)
        env = TabletopEnv(task, **kwargs)
        created.append(env)
        return env

    yield _make
    for env in created:
        env.close()
