"""SiT losses (losses/sit.py) against float64 references written as plain loops here: values and gradients,
and under two gloo processes the DDP-averaged gradient equals the one-process gradient of the global batch (the
L1 too when the processes hold different numbers of masked pixels)."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdino.losses.sit import masked_l1, momentum_contrastive_loss, nt_xent_loss, uncertainty_weighted


def leaf(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def as64(t):
    return t.detach().double().requires_grad_(True)


def l1_loop(pred, target, mask):
    """Sum of |pred - target| over every channel of the masked pixels, over (masked pixels x channels)."""
    b, c, h, w = pred.shape
    total, count = pred.new_zeros(()), 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if mask is None or mask[i, 0, y, x]:
                    for ch in range(c):
                        total = total + (pred[i, ch, y, x] - target[i, ch, y, x]).abs()
                        count += 1
    return total / count


def cos(a, b):
    return (a * b).sum() / (a.norm() * b.norm())


def info_nce_loop(q, keys, positive, t, exclude=None):
    """-log(exp(cos(q_i, k_pos)/t) / sum_j exp(cos(q_i, k_j)/t)), j over the keys except `exclude`, mean over i."""
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        den = sum(torch.exp(cos(q[i], keys[j]) / t) for j in range(keys.shape[0]) if exclude is None or j != exclude[i])
        total = total - torch.log(torch.exp(cos(q[i], keys[positive[i]]) / t) / den)
    return total / q.shape[0]


@pytest.mark.parametrize("masked", [True, False])
def test_masked_l1_matches_a_loop_in_float64(masked):
    pred, target = leaf(2, 3, 6, 6, seed=1), torch.randn(2, 3, 6, 6)
    mask = torch.rand(2, 1, 6, 6) < 0.4 if masked else None
    loss = masked_l1(pred, target, mask)
    p64 = as64(pred)
    ref = l1_loop(p64, target.double(), mask)
    (g,) = torch.autograd.grad(loss, pred)
    (g_ref,) = torch.autograd.grad(ref, p64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-8)
    if masked:
        assert (g[~mask.expand_as(g)] == 0).all()  # unmasked pixels get no gradient
    assert masked_l1(pred, target, torch.zeros(2, 1, 6, 6, dtype=torch.bool)) == 0


def test_momentum_infonce_matches_a_loop_over_pairs():
    b, t = 5, 0.2
    q1, q2 = leaf(b, 8, seed=2), leaf(b, 8, seed=3)
    k1, k2 = torch.randn(b, 8), torch.randn(b, 8)
    loss = momentum_contrastive_loss(q1, q2, k1, k2, t)
    a1, a2 = as64(q1), as64(q2)
    idx = list(range(b))
    ref = (info_nce_loop(a1, k2.double(), idx, t) + info_nce_loop(a2, k1.double(), idx, t)) / 2
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (q1, q2)), torch.autograd.grad(ref, (a1, a2))):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_nt_xent_matches_a_loop_over_pairs():
    b, t = 4, 0.5
    z1, z2 = leaf(b, 6, seed=4), leaf(b, 6, seed=5)
    loss = nt_xent_loss(z1, z2, t)
    a1, a2 = as64(z1), as64(z2)
    reps = torch.cat((a1, a2))  # 2N rows; row a's positive is its other view, itself left out
    positive = [(a + b) % (2 * b) for a in range(2 * b)]
    ref = info_nce_loop(reps, reps, positive, t, exclude=list(range(2 * b)))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(ref, (a1, a2))):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # perfectly aligned views far apart from the others: the loss is near its floor
    e = torch.eye(b, 6) * 10
    assert nt_xent_loss(e, e, 0.05) < 1e-3


def test_uncertainty_weighting_follows_the_formula():
    losses = [torch.tensor(0.8), torch.tensor(2.0)]
    s = torch.tensor([1.0, -0.5], requires_grad=True)
    total = uncertainty_weighted(losses, s, [0.5, 1.0])
    want = 0.5 * math.exp(-1.0) * 0.8 + 0.5 + math.exp(0.5) * 2.0 - 0.25
    assert total.item() == pytest.approx(want, rel=1e-6)
    (g,) = torch.autograd.grad(total, s)
    torch.testing.assert_close(g, torch.tensor([-0.5 * math.exp(-1.0) * 0.8 + 0.5, -math.exp(0.5) * 2.0 + 0.5]))


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from fastdino.losses.sit import masked_l1, momentum_contrastive_loss, nt_xent_loss

    def inputs():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(6, 8, generator=g) for _ in range(4)]  # q1, q2, k1, k2: a global batch of 6

    def losses(q1, q2, k1, k2):
        return {"momentum": momentum_contrastive_loss(q1, q2, k1, k2, 0.2), "online": nt_xent_loss(q1, q2, 0.5)}

    def l1_inputs():
        g = torch.Generator().manual_seed(1)
        pred, target = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
        mask = torch.zeros(6, 1, 4, 4, dtype=torch.bool)
        mask[:3, :, :1] = True  # rank 0 holds 12 masked pixels, rank 1 holds 36
        mask[3:, :, :3] = True
        return pred, target, mask

    def worker(rank, world, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        b = 6 // world
        local = [x[rank * b:(rank + 1) * b].clone().requires_grad_(i < 2) for i, x in enumerate(inputs())]
        result = {}
        for name, loss in losses(*local).items():
            grads = torch.autograd.grad(loss, local[:2])
            result[name] = (loss.detach(), [g / world for g in grads])  # what DDP's gradient average gives
        pred, target, mask = (x[rank * b:(rank + 1) * b].clone() for x in l1_inputs())
        pred.requires_grad_(True)
        loss = masked_l1(pred, target, mask, across_processes=True)
        result["l1"] = (loss.detach(), [torch.autograd.grad(loss, pred)[0] / world])
        torch.save(result, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        out = sys.argv[1]
        mp.spawn(worker, args=(2, f"file://{out}/store", out), nprocs=2)
        full = [x.clone().requires_grad_(i < 2) for i, x in enumerate(inputs())]
        ref = {name: (loss.detach(), torch.autograd.grad(loss, full[:2])) for name, loss in losses(*full).items()}
        pred, target, mask = l1_inputs()
        pred.requires_grad_(True)
        loss = masked_l1(pred, target, mask)
        ref["l1"] = (loss.detach(), torch.autograd.grad(loss, pred))
        torch.save(ref, f"{out}/single.pt")
""")


def test_global_batch_under_two_gloo_processes_matches_one_process(tmp_path):
    script = tmp_path / "ddp_losses.py"
    script.write_text(DDP_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's fastdino, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = torch.load(tmp_path / "single.pt")
    for name in ("momentum", "online", "l1"):
        loss, grads = single[name]
        torch.testing.assert_close((ranks[0][name][0] + ranks[1][name][0]) / 2, loss)  # mean of the local means
        for i in range(len(grads)):
            ddp_grad = torch.cat([ranks[r][name][1][i] for r in range(2)])
            torch.testing.assert_close(ddp_grad, grads[i], rtol=1e-5, atol=1e-7, msg=f"{name} input {i}")
