"""What the best model does on the test set: predictions, per-class accuracy, confusion matrix,
the images it gets wrong, and GradCAM maps of where it looked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from trainable.data import ImageSet, eval_transform, make_loader
from trainable.device import Runtime
from trainable.loop import predict


@dataclass(frozen=True)
class TestEvaluation:
    accuracy: float
    loss: float
    predicted: np.ndarray  # (N,) class index
    confidence: np.ndarray  # (N,) softmax probability of the predicted class
    per_class_accuracy: np.ndarray  # (classes,)
    confusion: np.ndarray  # (classes, classes): row = true class, column = predicted


def evaluate_test(model: nn.Module, test: ImageSet, num_classes: int, runtime: Runtime,
                  batch_size: int) -> TestEvaluation:
    loader = make_loader(test, eval_transform(), batch_size, num_workers=0, shuffle=False)
    logits, labels = predict(model, loader, runtime)
    probabilities = F.softmax(logits, dim=1)
    confidence, predicted = probabilities.max(1)
    labels_np, predicted_np = labels.numpy(), predicted.numpy()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels_np, predicted_np), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return TestEvaluation(
        accuracy=float((predicted_np == labels_np).mean()),
        loss=float(F.cross_entropy(logits, labels).item()),
        predicted=predicted_np, confidence=confidence.numpy(),
        per_class_accuracy=per_class, confusion=confusion,
    )


def misclassified(evaluation: TestEvaluation, labels: np.ndarray, count: int) -> np.ndarray:
    """Positions in the test set of up to `count` wrong predictions, the most confident first
    (the model's most telling mistakes)."""
    wrong = np.flatnonzero(evaluation.predicted != labels)
    order = np.argsort(-evaluation.confidence[wrong], kind="stable")
    return wrong[order[:count]]


def gradcam_maps(model: nn.Module, images: np.ndarray, targets: np.ndarray,
                 runtime: Runtime) -> np.ndarray:
    """GradCAM (grad-cam's) on `model.layer4` for class `targets[i]` of image `images[i]`
    (uint8, N x 32 x 32 x 3): maps N x 32 x 32 in [0, 1], upsampled to the image."""
    transform = eval_transform()
    batch = torch.stack([transform(image=img)["image"] for img in images]).to(runtime.device)
    # GradCAM leaves the model in eval mode with gradients on; the caller's copy is its own.
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(int(t)) for t in targets])
