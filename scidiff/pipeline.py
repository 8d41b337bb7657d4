"""Deprecated: ``scidiff.pipeline`` moved to scidiff.tasks.generate, scidiff.tasks.train and
scidiff.tasks.evaluate. This module re-exports the old names for one release."""
import warnings

from .data import read_h5ad, transform_like, write_h5ad
from .cli.common import parse_conditions
from .tasks.evaluate import evaluate_files
from .tasks.generate import (MANIFEST, MERGED_FILE, expression_note, generate, generate_sharded, generate_to_file,
                             merge_generated, read_generated, shard_name)
from .tasks.train import train

warnings.warn('scidiff.pipeline is deprecated and will be removed in the next release; import from '
              'scidiff.tasks.generate, scidiff.tasks.train and scidiff.tasks.evaluate',
              DeprecationWarning, stacklevel=2)
