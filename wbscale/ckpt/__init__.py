"""Checkpoints: the on-disk format and everything that reads, writes or converts it.

- :mod:`.format`: layout, :class:`~.format.CheckpointInfo`, finding, verifying, inspecting;
- :mod:`.writer`: the atomic writer (a Lightning callback);
- :mod:`.rng`: RNG capture and restore;
- :mod:`.elastic`: resume at another world size / ZeRO stage (universal checkpoints);
- :mod:`.consolidate`: any checkpoint -> one export folder;
- :mod:`.load`: load a checkpoint or export folder for inference; import published ones.

Every tool that loads a checkpoint imports from here, never from :mod:`wbscale.train`.
"""
