"""Weighted k-NN against a float64 brute-force restatement of the official eval_knn vote."""

import torch

from fastdino.eval.knn import knn_top1


def brute_force(train_f, train_l, test_f, test_l, k, t):
    correct = 0
    for f, label in zip(test_f.double(), test_l):
        sims = train_f.double() @ f
        idx = sims.argsort(descending=True)[:k]
        votes = {}
        for i in idx.tolist():
            votes[int(train_l[i])] = votes.get(int(train_l[i]), 0.0) + float(torch.exp(sims[i] / t))
        correct += max(votes, key=votes.get) == int(label)
    return 100.0 * correct / len(test_l)


def test_knn_matches_brute_force():
    torch.manual_seed(0)
    train_f = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    train_l = torch.randint(0, 5, (300,))
    test_f = torch.nn.functional.normalize(train_f[:60] + 0.5 * torch.randn(60, 16), dim=1)
    test_l = torch.where(torch.arange(60) % 3 == 0, torch.randint(0, 5, (60,)), train_l[:60])
    for k, t in [(20, 0.07), (1, 0.07), (5, 1.0)]:
        assert knn_top1(train_f, train_l, test_f, test_l, k, t, chunk=7) == brute_force(
            train_f, train_l, test_f, test_l, k, t)


def test_knn_separable_clusters_is_perfect_and_k_capped():
    centers = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    train_f = centers.repeat_interleave(4, 0)
    labels = torch.arange(3).repeat_interleave(4)
    assert knn_top1(train_f, labels, centers, torch.arange(3), k=50) == 100.0
