"""Megatron-Core glue: flags, model building, forward step, FP8, checkpoints.

Importing this package is cheap: megatron-core is imported by the submodules that need it.
"""

import argparse


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: add the plugin's preference-loss flags.

    Takes Megatron-LM's parser and returns it with ``--preference-loss``, ``--dpo-beta``,
    ``--adadpo-*`` and the reference flags added (see ``arguments.add_args``).
    """
    from adadpo_megatron.megatron.arguments import add_args as _add_args

    return _add_args(parser)


__all__ = ["add_args"]
