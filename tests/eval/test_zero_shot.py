"""Zero-shot classifier (prompt ensembling) and retrieval recall@k, against manual formulas and torchmetrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.retrieval import RetrievalHitRate

from mmssl.eval.zero_shot import retrieval_recall, zero_shot_accuracy, zero_shot_classifier


class ToyCLIP(torch.nn.Module):
    """encode_text = a learned embedding of the token ids' sum; enough to test the classifier arithmetic."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(1000, 8)

    def encode_text(self, tokens, normalize=False):
        x = self.table(tokens.sum(-1) % 1000)
        return F.normalize(x, dim=-1) if normalize else x


def toy_tokenizer(texts):
    return torch.tensor([[ord(c) for c in t.ljust(24)[:24]] for t in texts])


def test_classifier_is_the_renormalised_mean_of_normalised_template_embeddings():
    model = ToyCLIP()
    names, templates = ["red circle", "blue star", "green cross"], ["a {}", "a photo of a {}.", "a small {}"]
    weights = zero_shot_classifier(model, toy_tokenizer, names, templates)
    assert weights.shape == (3, 8)
    for c, name in enumerate(names):
        emb = F.normalize(model.encode_text(toy_tokenizer([t.format(name) for t in templates])), dim=-1)
        expected = F.normalize(emb.mean(0), dim=0)
        assert torch.allclose(weights[c], expected, atol=1e-6)


def test_zero_shot_accuracy_over_all_and_over_present_classes():
    classifier = torch.eye(4)  # class c = axis c
    images = torch.tensor([[1.0, 0, 0, 0], [0, 0.2, 0.9, 0], [0, 0.6, 0.5, 0], [0.1, 0, 0, 0.9]])
    labels = torch.tensor([0, 2, 2, 3])
    acc = zero_shot_accuracy(images, classifier, labels, ks=(1, 2))
    assert acc == {"top1": pytest.approx(0.75), "top2": pytest.approx(1.0)}
    # among classes {2, 3} only, the third image's best class is 2: all correct
    assert zero_shot_accuracy(images[1:], classifier, labels[1:], classes=[2, 3], ks=(1,)) == {"top1": 1.0}
    with pytest.raises(ValueError, match="not among the candidate classes"):
        zero_shot_accuracy(images, classifier, labels, classes=[2, 3])


def test_retrieval_recall_matches_torchmetrics():
    # Recall@k in CLIP retrieval (clip_benchmark, open_clip) is "any match among the top k": torchmetrics'
    # hit rate. torchmetrics' RetrievalRecall is the share of all matches retrieved, which differs when a
    # caption matches several pictures (positives below).
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(30, 16, generator=g), dim=-1)
    texts = F.normalize(images + 0.9 * torch.randn(30, 16, generator=g), dim=-1)
    positives = torch.eye(30, dtype=torch.bool)
    positives[3, 7] = positives[7, 3] = positives[11, 12] = True  # repeated captions match several pictures
    ours = retrieval_recall(images, texts, positives, ks=(1, 5, 10))
    sim = images @ texts.T
    for direction, scores, match in (
        ("image_to_text", sim, positives),
        ("text_to_image", sim.T, positives.T),
    ):
        queries = torch.arange(scores.shape[0])[:, None].expand_as(scores)
        for k in (1, 5, 10):
            ref = RetrievalHitRate(top_k=k)(scores.flatten(), match.flatten(), indexes=queries.flatten())
            assert ours[f"{direction}@{k}"] == pytest.approx(ref.item(), abs=1e-6), (direction, k)
    assert 0 < ours["image_to_text@1"] < ours["image_to_text@10"] <= 1
    assert retrieval_recall(images, images, ks=(1,))["image_to_text@1"] == 1.0
