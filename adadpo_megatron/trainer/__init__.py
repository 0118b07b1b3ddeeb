"""The trainer around the step: flags and config, optimizer, the loop, checkpoints, metrics.

Also what keeps a run safe: the checkpoint checksum manifest (``manifest``), resume-or-refuse
on an existing ``--save`` (``progress``), identity checks of data and checkpoints
(``identity``), Megatron-LM's exit conventions (``exits``) and child-process hygiene
(``hygiene``). ``adadpo_megatron.train`` (``adadpo-train``) is its entry point.
"""
