"""Training data for ``autoep train``: sources, formats, a token cache on disk, packing, batches, evaluation.

Nothing here imports ``datasets`` until a source needs it (``pip install autoep[data]``).
"""

from autoep.data.batches import Batch, DataBatches
from autoep.data.builtin import builtin_corpus
from autoep.data.evaluation import evaluate
from autoep.data.pipeline import DataOptions, PreparedData, prepare_data

__all__ = ["Batch", "DataBatches", "DataOptions", "PreparedData", "builtin_corpus", "evaluate", "prepare_data"]
