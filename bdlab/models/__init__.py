"""Victim models: backbones plus the wrapper that owns normalisation."""

from bdlab.models.classifier import Classifier, build_classifier
from bdlab.models.lenet import LeNet
from bdlab.models.resnet import PreActResNet18, ResNet18, ResNet34
from bdlab.models.torchvision_model import torchvision_model
from bdlab.models.vgg import VGG16BN, VGG19BN

__all__ = ["VGG16BN", "VGG19BN", "Classifier", "LeNet", "PreActResNet18", "ResNet18", "ResNet34",
           "build_classifier", "torchvision_model"]
