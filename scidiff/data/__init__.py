"""Data layer: AnnData/h5ad in, normalised and gene-selected cells, batches as dicts."""
from .dataset import CellData, InMemoryLoader, setup_anndata, transform_like
from .io import read_h5ad, write_h5ad
from .preprocess import detect_input, log_normalize, select_genes
from .spec import DataSpec
from .stream_setup import StreamedCells, setup_streaming, stream_like
from .streaming import MatrixReader, StreamingLoader

__all__ = ["CellData", "DataSpec", "InMemoryLoader", "detect_input", "log_normalize", "read_h5ad",
           "select_genes", "setup_anndata", "transform_like", "write_h5ad",
           "MatrixReader", "StreamedCells", "StreamingLoader", "setup_streaming", "stream_like"]
