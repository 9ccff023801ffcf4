"""Data: IDX / MNIST sources (offline chain), CIFAR-10 readers, sequence layouts, splits, batches."""
from qs4d_np.data.cifar import CIFARSplit, cifar_sequences, load_cifar10
from qs4d_np.data.idx import IDXFormatError, read_idx, write_idx
from qs4d_np.data.loader import BatchIterator
from qs4d_np.data.mnist import MNISTSplit, load_mnist, load_mnist_splits, mnist_sequences
from qs4d_np.data.sequence import SequenceDataset, seeded_permutation
from qs4d_np.data.split import stratified_split, train_val_split
from qs4d_np.data.tasks import TASKS, Task, load_task

__all__ = ["TASKS", "BatchIterator", "CIFARSplit", "IDXFormatError", "MNISTSplit", "SequenceDataset", "Task",
           "cifar_sequences", "load_cifar10", "load_mnist", "load_mnist_splits", "load_task", "mnist_sequences",
           "read_idx", "seeded_permutation", "stratified_split", "train_val_split", "write_idx"]
