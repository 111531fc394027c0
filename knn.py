"""Weighted k-nearest-neighbour evaluation of a frozen encoder (DINO's protocol), used by eval_knn.py and by
run_pretraining.py --knn_freq (``KnnMonitor``).

Every image of the train and val splits is embedded once (evaluation transform, no augmentation) and the
feature L2-normalised. Each val image's k nearest train images by cosine similarity vote for their class
with weight exp(similarity / T); the classes with the largest vote sums are the top-1 / top-5 predictions.

Features (``pool``): ``avg`` is the mean of the patch tokens of ``forward_features``, i.e. after the encoder's
final norm (a pretraining model has no ``fc_norm``); ``cls`` is the normed cls token.

``knn_accuracy`` is correct for any world size: each rank embeds the items of its ``utils.ShardSampler``
shard and the shards are all-gathered, so every rank ends with all features in dataset order.
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import utils


# ---------------------------------------------------------------------------------------------------------
# gathering shards

def gather_shards(local, num_items):
    """Rows of ``local`` (this rank's ``ShardSampler`` shard, in order) -> all ``num_items`` rows in dataset
    order, on every rank. Shards are padded to equal length for ``all_gather``; item i sits at row i // world
    of rank i % world, so stacking [world, rows] and reading it row-major by (row, rank) restores the order."""
    world = utils.get_world_size()
    if world == 1:
        return local[:num_items]
    rows = math.ceil(num_items / world)
    padded = local.new_zeros((rows,) + tuple(local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:num_items]


def _check_sharded(loader):
    if utils.get_world_size() > 1 and not isinstance(loader.sampler, utils.ShardSampler):
        raise ValueError("with several processes the kNN loaders must use utils.ShardSampler (every item on "
                         "one rank, in order); build them with knn.build_loader")


def build_loader(dataset, batch_size, num_workers=0, pin_memory=False):
    """An in-order loader over this rank's shard of ``dataset`` (what ``knn_accuracy`` expects)."""
    return torch.utils.data.DataLoader(dataset, sampler=utils.ShardSampler(dataset), batch_size=batch_size,
                                       num_workers=num_workers, pin_memory=pin_memory, drop_last=False)


# ---------------------------------------------------------------------------------------------------------
# features and the classifier

def pooled_features(model, images, pool="avg"):
    """Encoder features [B, D] of ``model.forward_features`` (tokens after the final norm): mean of the patch
    tokens (``avg``) or the cls token (``cls``)."""
    tokens = model.forward_features(images)
    return tokens[:, 1:].mean(dim=1) if pool == "avg" else tokens[:, 0]


@torch.no_grad()
def extract_features(model, loader, device, pool="avg", amp_dtype=None):
    """(L2-normalised float32 features [n, D], labels [n]) of the whole dataset, in dataset order, on every
    rank. ``model`` must be in eval mode (``knn_accuracy`` sees to it)."""
    _check_sharded(loader)
    feats, labels = [], []
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with autocast:
            f = pooled_features(model, images, pool)
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(torch.as_tensor(targets).to(device))
    dim = getattr(model, "embed_dim", None)
    local_f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    local_l = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    n = len(loader.dataset)
    return gather_shards(local_f, n), gather_shards(local_l.long(), n)


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07,
                 num_classes=None, chunk_size=None):
    """DINO's weighted kNN on L2-normalised features. Returns (top-1 %, top-5 %).

    For each test row: the k train rows of highest cosine similarity s each add exp(s / T) to their class;
    predictions are the classes by decreasing vote sum. Top-5 counts min(5, k, classes) predictions (a class
    outside the k neighbours has no vote, so ranking it would be arbitrary). Test rows are processed in
    chunks so the similarity block stays near 2**28 elements (1 GiB in float32).
    """
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if n_train == 0 or n_test == 0:
        raise ValueError(f"kNN needs train and test features (got {n_train} and {n_test})")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, n_train)
    top = min(5, k, num_classes)
    chunk = chunk_size or max(1, min(1024, 2 ** 28 // n_train))
    correct1 = correct5 = 0
    for start in range(0, n_test, chunk):
        feats = test_features[start:start + chunk]
        targets = test_labels[start:start + chunk]
        sims, idx = (feats @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(feats.shape[0], num_classes, device=feats.device, dtype=sims.dtype)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        preds = votes.topk(top, dim=1).indices
        hits = preds.eq(targets[:, None])
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    return 100.0 * correct1 / n_test, 100.0 * correct5 / n_test


def knn_accuracy(model, train_loader, val_loader, device, k=20, T=0.07, pool="avg", amp_dtype=None):
    """Weighted kNN top-1/top-5 (%) of ``model``'s frozen features: train_loader gives the memory bank,
    val_loader the queries; both yield (images, labels) and, with several processes, use ``ShardSampler``
    (``build_loader``). Collective: every rank must call it. Restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        train_f, train_l = extract_features(model, train_loader, device, pool, amp_dtype)
        val_f, val_l = extract_features(model, val_loader, device, pool, amp_dtype)
    finally:
        model.train(was_training)
    top1, top5 = knn_classify(train_f, train_l, val_f, val_l, k, T)
    return {"top1": top1, "top5": top5, "k": k, "temperature": T, "n_train": train_f.shape[0],
            "n_val": val_f.shape[0]}


# ---------------------------------------------------------------------------------------------------------
# monitoring during pretraining (run_pretraining.py --knn_freq)

def add_knn_args(parser):
    """The --knn_* flags of run_pretraining.py."""
    g = parser.add_argument_group("kNN monitoring")
    g.add_argument("--knn_freq", default=0, type=int,
                   help="weighted kNN accuracy after every N epochs and after the last (0 = off); it evaluates "
                        "the momentum encoder (the target network, as DINO and BEiT evaluate the teacher), or the "
                        "online encoder with --no_model_ema")
    g.add_argument("--knn_data_set", default="image_folder",
                   choices=["image_folder", "cifar10", "cifar100", "npz", "demo"])
    g.add_argument("--knn_data_path", default=None,
                   help="labelled data with train/ and val/ (image_folder), CIFAR or npz files; a class-balanced "
                        "subset of ImageNet keeps each evaluation short")
    g.add_argument("--knn_k", default=20, type=int, help="neighbours that vote")
    g.add_argument("--knn_temperature", default=0.07, type=float, help="vote weight exp(cosine / T)")
    g.add_argument("--knn_pool", default="avg", choices=["avg", "cls"],
                   help="avg: mean of the normed patch tokens; cls: the normed cls token")
    g.add_argument("--knn_batch_size", default=None, type=int,
                   help="images per process and pass (default --batch_size)")
    g.add_argument("--knn_crop_pct", default=None, type=float,
                   help="centre-crop fraction of the evaluation transform, as eval_knn.py's --crop_pct (default "
                        "224/256 below 384 px; 1 = the whole image)")
    return parser


class KnnMonitor:
    """Builds the kNN loaders once (bad flags stop the run before training) and evaluates after the epochs
    that --knn_freq selects. ``from_args`` returns None when --knn_freq is 0."""

    def __init__(self, args, device, amp_dtype, train_loader, val_loader):
        self.args, self.device, self.amp_dtype = args, device, amp_dtype
        self.train_loader, self.val_loader = train_loader, val_loader

    @classmethod
    def from_args(cls, args, device, amp_dtype=None):
        if args.knn_freq < 0 or args.knn_k < 1 or args.knn_temperature <= 0:
            raise utils.UsageError("--knn_freq must be >= 0, --knn_k >= 1 and --knn_temperature positive")
        crop_pct = args.knn_crop_pct
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise utils.UsageError(f"--knn_crop_pct {crop_pct} is not a fraction; give a value in (0, 1] or leave it "
                                   f"out for 224/256")
        if args.knn_freq == 0:
            return None
        from datasets import EvalDataConfig, build_dataset
        data_args = EvalDataConfig(
            data_set=args.knn_data_set, data_path=args.knn_data_path, input_size=args.input_size,
            imagenet_default_mean_and_std=args.imagenet_default_mean_and_std, demo_size=args.demo_size,
            crop_pct=crop_pct)
        try:
            train_set, _ = build_dataset(True, data_args)
            val_set, _ = build_dataset(False, data_args)
        except utils.UsageError as e:
            # the data set's messages name --data_set/--data_path; here they are the --knn_ flags
            raise utils.UsageError(f"--knn_data_set {args.knn_data_set} --knn_data_path {args.knn_data_path}: "
                                   f"{utils.one_line_error(e)}") from e
        batch = args.knn_batch_size or args.batch_size
        pin = device.type == "cuda"
        utils.print0(f"kNN monitoring every {args.knn_freq} epochs: {len(train_set)} train / {len(val_set)} val "
                     f"images, k={args.knn_k}, T={args.knn_temperature}, pool={args.knn_pool}")
        return cls(args, device, amp_dtype, build_loader(train_set, batch, args.num_workers, pin),
                   build_loader(val_set, batch, args.num_workers, pin))

    def __call__(self, epoch, model, momentum_encoder=None, log_writer=None):
        """{'knn_top1', 'knn_top5'} after a selected epoch, else {}. Collective: call it on every rank."""
        a = self.args
        if (epoch + 1) % a.knn_freq != 0 and epoch + 1 != a.epochs:
            return {}
        encoder = momentum_encoder.module if momentum_encoder is not None else model
        which = "momentum encoder" if momentum_encoder is not None else "online encoder"
        res = knn_accuracy(encoder, self.train_loader, self.val_loader, self.device, a.knn_k, a.knn_temperature,
                           a.knn_pool, self.amp_dtype)
        utils.print0(f"epoch {epoch} kNN ({which}, k={a.knn_k}, T={a.knn_temperature}): top-1 {res['top1']:.2f} %, "
                     f"top-5 {res['top5']:.2f} %")
        if log_writer is not None:
            log_writer.add_scalar("knn/top1", res["top1"], epoch)
            log_writer.add_scalar("knn/top5", res["top5"], epoch)
        return {"knn_top1": res["top1"], "knn_top5": res["top5"]}
