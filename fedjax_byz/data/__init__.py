"""Client data: sources, partitioners and the padded ``ClientData`` block."""

from fedjax_byz.data.client_data import ClientData
from fedjax_byz.data.partition import PARTITIONERS, partition
from fedjax_byz.data.sources import DATASETS, Dataset, load

__all__ = ["DATASETS", "PARTITIONERS", "ClientData", "Dataset", "load", "partition"]
