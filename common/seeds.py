"""Env seed numbering, in one place so that demonstrations never replay an evaluation episode.

    [0, EVAL_SEED_BASE)                      collect --seed 0: task i, episode j -> i * DEMO_SEEDS_PER_TASK + j
    [EVAL_SEED_BASE, EXTRA_DEMO_SEED_BASE)   eval --seed s: EVAL_SEED_BASE + s * EVAL_SEEDS_PER_BLOCK
                                             + task * EVAL_SEEDS_PER_TASK + episode
    [EXTRA_DEMO_SEED_BASE, 2**31)            collect --seed s >= 1, one block of MAX_TASKS * DEMO_SEEDS_PER_TASK each

A demonstration seed block and an evaluation seed block are different sizes (a collection can hold
10,000 episodes per task, an evaluation 1,000), hence the two names. Different --seed values never
share an episode. Evaluation task indices follow the policy's training order (rollout.evaluate.task_seed_order).
"""
from __future__ import annotations

EVAL_SEED_BASE = 1_000_000
DEMO_SEEDS_PER_TASK = 10_000  # demonstrations of one task in one collection
MAX_TASKS = 100  # tasks in one collection, and tasks of one env in an evaluation
EVAL_SEEDS_PER_TASK = 1_000  # evaluation episodes of one task in one --seed block
EVAL_SEEDS_PER_BLOCK = EVAL_SEEDS_PER_TASK * MAX_TASKS  # one eval --seed block
MAX_EVAL_SEEDS = 10_000  # eval --seed values
EXTRA_DEMO_SEED_BASE = EVAL_SEED_BASE + MAX_EVAL_SEEDS * EVAL_SEEDS_PER_BLOCK
MAX_DEMO_SEED = 1_000  # keeps env seeds below 2**31

assert DEMO_SEEDS_PER_TASK * MAX_TASKS <= EVAL_SEED_BASE  # --seed 0 demonstrations stay below the eval seeds
assert EXTRA_DEMO_SEED_BASE + MAX_DEMO_SEED * MAX_TASKS * DEMO_SEEDS_PER_TASK < 2**31


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def demo_seed(seed: int, task_index: int, episode: int) -> int:
    """The env seed of demonstration `episode` of task `task_index` in a collection with --seed `seed`."""
    if not _is_int(seed) or not 0 <= seed <= MAX_DEMO_SEED:
        raise ValueError(f"--seed: expected an integer in [0, {MAX_DEMO_SEED}], got {seed!r}")
    if not 0 <= episode < DEMO_SEEDS_PER_TASK:
        raise ValueError(f"--episodes-per-task: expected at most {DEMO_SEEDS_PER_TASK} (a task's seed block), "
                         f"got {episode + 1}")
    if not 0 <= task_index < MAX_TASKS:
        raise ValueError(f"--tasks: expected at most {MAX_TASKS} tasks in one collection, got {task_index + 1}")
    block = task_index * DEMO_SEEDS_PER_TASK + episode
    if seed == 0:
        return block
    return EXTRA_DEMO_SEED_BASE + (seed - 1) * MAX_TASKS * DEMO_SEEDS_PER_TASK + block


def check_eval_request(seed: int, episodes_per_task: int) -> None:
    """Raise ValueError naming the flag when an evaluation would leave its seed blocks."""
    if not _is_int(seed) or not 0 <= seed < MAX_EVAL_SEEDS:
        # above them live the demonstration seeds of collect --seed >= 1
        raise ValueError(f"--seed: expected an integer < {MAX_EVAL_SEEDS} (an evaluation seed block), got {seed!r}")
    if episodes_per_task > EVAL_SEEDS_PER_TASK:
        raise ValueError(f"--episodes-per-task: expected at most {EVAL_SEEDS_PER_TASK} (a task's seed block), "
                         f"got {episodes_per_task}")


def check_eval_task_count(tasks: int) -> None:
    """An env's tasks each need their own evaluation seed block: at most MAX_TASKS of them."""
    if tasks > MAX_TASKS:
        raise ValueError(f"env with {tasks} tasks: expected at most {MAX_TASKS} (one evaluation seed block per task)")


def eval_seed(seed: int, task_index: int, episode: int) -> int:
    """The env seed of evaluation `episode` of the task at `task_index` (in task_seed_order) for eval --seed `seed`."""
    return EVAL_SEED_BASE + seed * EVAL_SEEDS_PER_BLOCK + task_index * EVAL_SEEDS_PER_TASK + episode
