"""Linear probes on cached features for the CIFAR-10 benchmarks (cifar10_ablation.py, cifar10_learning_check.py):
the minibatch training loop of a probe head and its test top-1."""
import torch
import torch.nn.functional as F


def train_head(head, optimizer, train_x, train_y, epochs, batch_size, generator, drop_last=False,
               before_step=None, after_step=None):
    """Trains ``head`` with cross-entropy on features ``train_x`` [n, d] and labels ``train_y`` [n]: every epoch a
    fresh permutation from ``generator`` cut into minibatches of ``batch_size`` (a last, shorter one kept unless
    ``drop_last``). ``before_step(epoch + step / steps)`` and ``after_step()``, when given, run before and after
    each optimizer step (the lr schedule)."""
    n = len(train_y)
    steps = n // batch_size if drop_last else -(-n // batch_size)
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for step in range(steps):
            if before_step is not None:
                before_step(epoch + step / steps)
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()


@torch.no_grad()
def top1(head, x, y):
    """Top-1 (%) of ``head`` in eval mode on features ``x`` [n, d] with labels ``y`` [n]."""
    head.eval()
    return 100.0 * (head(x).argmax(dim=1) == y).float().mean().item()
