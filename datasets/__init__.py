"""The data layer (above envs/, below policy/): RLDS writing, and reading in stages.

    rlds_writer.py, collect.py   dm_env episodes -> an RLDS dataset on disk
    source.py                    resolve a dataset path, open its TFDS builder, verify its shards
    standardize.py               standardisation entries: which step keys are camera, instruction, action
    rlds_dataset.py              RLDSDataset: an opened, validated dataset as a stream of episodes
    statistics.py                action statistics and the scan cache
    sequences.py                 episodes -> episode/window sequences
    augment.py                   random_crop (data.crop_pad, tf.data) and random_shift (data.random_shift, torch)
    torch_batches.py             tf.data -> torch batches
    training_inputs.py           one call from a config to TrainingInputs

Nothing is imported here: `import datasets` stays free of TensorFlow (tf_setup.py configures it).
"""
