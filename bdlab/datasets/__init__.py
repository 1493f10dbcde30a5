"""Datasets: every loader yields uint8 ``(N, C, H, W)`` images and int64 labels in memory."""

from bdlab.datasets.base import DatasetSplits, ImageDataset, ImageSet
from bdlab.datasets.cifar import CIFAR10, CIFAR100
from bdlab.datasets.gtsrb import GTSRB
from bdlab.datasets.image_folder import ImageFolder
from bdlab.datasets.mnist import MNIST, FashionMNIST
from bdlab.datasets.svhn import SVHN
from bdlab.datasets.synthetic import Synthetic
from bdlab.datasets.tensors import TensorFile

__all__ = ["CIFAR10", "CIFAR100", "GTSRB", "MNIST", "SVHN", "DatasetSplits", "FashionMNIST",
           "ImageDataset", "ImageFolder", "ImageSet", "Synthetic", "TensorFile"]
