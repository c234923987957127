"""The ground floor: what every layer shares and nothing of ours is imported into.

    common.atomic            durable writes (temp file, fsync, rename, fsync the directory) and directory swaps
    common.seeds             env seed numbering: demonstration seeds and evaluation seeds, disjoint by construction
    common.action_interface  the action every env of ours takes: names, bounds, validation, per env

The data path runs one way, envs < datasets < policy < rollout < run_policy.py, and each of them may
import from here; this package imports none of them (tests/test_layering.py checks both).
"""
