"""Weighted k-nearest-neighbour evaluation of a frozen encoder (DINO's protocol).

    python eval_knn.py --model bootmae_base --checkpoint out/checkpoint-799.pth --data_path /data/imagenet
    torchrun --nproc_per_node 8 eval_knn.py ...                    (each process embeds its shard)

Every image of the train and val splits is embedded once (evaluation transform, no augmentation) and the
feature L2-normalised. Each val image's k nearest train images by cosine similarity vote for their class
with weight exp(similarity / T); the classes with the largest vote sums are the top-1 / top-5 predictions.

Features (``--pool``): ``avg`` (default) is the mean of the patch tokens of ``forward_features``, i.e. after
the encoder's final norm (a pretraining model has no ``fc_norm``); ``cls`` is the normed cls token.

``knn_accuracy`` is the reusable entry (``run_pretraining.py --knn_freq`` calls it); it is correct for any
world size: each rank embeds the items of its ``ShardSampler`` shard and the shards are all-gathered, so
every rank ends with all features in dataset order.
"""
import argparse
import contextlib
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import modeling_bootmae
import utils

# timm's registered names of the pretraining models are bootmae_<size>; the classifiers are
# bootmae_<size>_patch16_224 (patch14 for huge); the release's linear probe says base_patch16_224.
SIZES = tuple(modeling_bootmae.MODEL_SIZES)


def parse_model_size(name):
    """'bootmae_base', 'bootmae_base_patch16_224', 'base_patch16_224', 'vit_base_patch16' -> 'base'.
    Raises UsageError for anything else."""
    core = name
    for prefix in ("bootmae_", "vit_"):
        if core.startswith(prefix):
            core = core[len(prefix):]
    size = core.split("_")[0]
    rest = core[len(size):]
    if size not in SIZES or rest not in ("", "_patch16_224", "_patch14_224", "_patch16", "_patch14"):
        raise utils.UsageError(f"unknown --model {name}; choose one of "
                               + ", ".join(f"bootmae_{s}" for s in SIZES)
                               + " (or the classifier names bootmae_<size>_patch16_224, base_patch16_224, ...)")
    return size


# ---------------------------------------------------------------------------------------------------------
# sharding and gathering

class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, rank + 2 world, ... in order: every item on exactly one rank, no padding
    (unlike DistributedSampler, whose duplicated items would count twice in an accuracy)."""

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_items = len(dataset)
        self.world = utils.get_world_size() if num_replicas is None else num_replicas
        self.rank = utils.get_rank() if rank is None else rank

    def __iter__(self):
        return iter(range(self.rank, self.num_items, self.world))

    def __len__(self):
        return len(range(self.rank, self.num_items, self.world))


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
    if utils.get_world_size() > 1 and not isinstance(loader.sampler, ShardSampler):
        raise ValueError("with several processes the kNN loaders must use eval_knn.ShardSampler (every item on "
                         "one rank, in order); build them with eval_knn.build_loader")


def build_loader(dataset, batch_size, num_workers=0, pin_memory=False):
    """An in-order loader over this rank's shard of ``dataset`` (what ``knn_accuracy`` expects)."""
    return torch.utils.data.DataLoader(dataset, sampler=ShardSampler(dataset), batch_size=batch_size,
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
    g.add_argument("--knn_data_set", default="image_folder", choices=["image_folder", "cifar10", "cifar100", "npz", "demo"])
    g.add_argument("--knn_data_path", default=None,
                   help="labelled data with train/ and val/ (image_folder), CIFAR or npz files; a class-balanced "
                        "subset of ImageNet keeps each evaluation short")
    g.add_argument("--knn_k", default=20, type=int, help="neighbours that vote")
    g.add_argument("--knn_temperature", default=0.07, type=float, help="vote weight exp(cosine / T)")
    g.add_argument("--knn_pool", default="avg", choices=["avg", "cls"],
                   help="avg: mean of the normed patch tokens; cls: the normed cls token")
    g.add_argument("--knn_batch_size", default=None, type=int, help="images per process and pass (default --batch_size)")
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
        crop_pct = getattr(args, "knn_crop_pct", None)
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise utils.UsageError(f"--knn_crop_pct {crop_pct} is not a fraction; give a value in (0, 1] or leave it "
                                   f"out for 224/256")
        if args.knn_freq == 0:
            return None
        from datasets import build_dataset
        data_args = argparse.Namespace(
            data_set=args.knn_data_set, data_path=args.knn_data_path, input_size=args.input_size,
            imagenet_default_mean_and_std=getattr(args, "imagenet_default_mean_and_std", False),
            demo_size=getattr(args, "demo_size", 256), crop_pct=getattr(args, "knn_crop_pct", None))
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


# ---------------------------------------------------------------------------------------------------------
# command line

def get_args_parser():
    p = argparse.ArgumentParser("BootMAE kNN evaluation", add_help=False)
    p.add_argument("--model", default="bootmae_base", help="bootmae_tiny | _small | _base | _large | _huge")
    p.add_argument("--checkpoint", default="", help="pretraining (or fine-tuning) checkpoint, ours or the release's")
    p.add_argument("--model_key", default="model_ema|model|module",
                   help="checkpoint entries to try in order ('|'-separated); the default takes the momentum "
                        "encoder (the target network) when the checkpoint has one")
    p.add_argument("--pool", "--knn_pool", dest="pool", default="avg", choices=["avg", "cls"],
                   help="avg: mean of the normed patch tokens; cls: the normed cls token")
    p.add_argument("--k", default=20, type=int, help="neighbours that vote")
    p.add_argument("--temperature", default=0.07, type=float, help="vote weight exp(cosine / T)")
    p.add_argument("--data_set", default="image_folder", choices=["image_folder", "cifar10", "cifar100", "npz", "demo"])
    p.add_argument("--data_path", default=None, help="folder with train/ and val/ (image_folder), CIFAR or npz files")
    p.add_argument("--demo_size", default=256, type=int, help="items per split of --data_set demo")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--patch_size", default=None, type=int, help="patch side (default: the model's)")
    p.add_argument("--crop_pct", default=None, type=float, help="centre-crop fraction (default 224/256)")
    p.add_argument("--imagenet_default_mean_and_std", action="store_true",
                   help="normalise with ImageNet's mean/std instead of the release's 0.5/0.5")
    p.add_argument("--batch_size", default=128, type=int, help="images per process and forward pass")
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast for the encoder (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output_dir", default="", help="if set, the result is appended to output_dir/log.txt")
    p.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                   help="set by torch.distributed.launch; LOCAL_RANK from the environment is what is used")
    return p


def build_encoder(size, input_size, patch_size=None):
    """The plain encoder (``VisionTransformer``: blocks and final norm, no decoders, no head)."""
    cfg = dict(modeling_bootmae.MODEL_SIZES[size])
    if patch_size:
        cfg["patch_size"] = patch_size
    if input_size % cfg["patch_size"]:
        raise utils.UsageError(f"--input_size {input_size} is not divisible by the patch size {cfg['patch_size']}; "
                               f"use a multiple of it")
    return modeling_bootmae.VisionTransformer(img_size=input_size, **cfg)


def load_encoder_checked(model, path, model_key):
    """Loads the encoder and refuses a checkpoint that leaves encoder tensors uninitialised (except the
    final norm, whose absence is only reported: a fine-tuned mean-pooling model has none)."""
    _, missing, _ = utils.load_pretrained_encoder(model, path, model_key)
    essential = [k for k in missing if not k.startswith("norm.")]
    if essential:
        raise utils.UsageError(f"{path} lacks {len(essential)} encoder tensors of this model (e.g. {essential[0]}); "
                               f"pass the --model of the checkpoint's size")
    if missing:
        utils.print0(f"warning: {path} has no final norm ('norm.*'); features use an identity-initialised LayerNorm")


def main(args):
    size = parse_model_size(args.model)
    if not args.checkpoint:
        raise utils.UsageError("--checkpoint is required: the pretraining checkpoint whose encoder to evaluate")
    if not os.path.isfile(args.checkpoint):
        raise utils.UsageError(f"--checkpoint {args.checkpoint} does not exist; give the path of a checkpoint-*.pth")
    if args.k < 1 or args.temperature <= 0 or args.batch_size < 1:
        raise utils.UsageError("--k and --batch_size must be at least 1 and --temperature positive")
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    args.amp, amp_dtype = utils.resolve_amp(args.amp, device)

    from datasets import build_dataset
    train_set, _ = build_dataset(True, args)
    val_set, _ = build_dataset(False, args)
    model = build_encoder(size, args.input_size, args.patch_size)
    load_encoder_checked(model, args.checkpoint, args.model_key)
    model.to(device)
    pin = device.type == "cuda"
    train_loader = build_loader(train_set, args.batch_size, args.num_workers, pin)
    val_loader = build_loader(val_set, args.batch_size, args.num_workers, pin)
    utils.print0(f"kNN: {len(train_set)} train / {len(val_set)} val images, k={args.k}, T={args.temperature}, "
                 f"pool={args.pool}, {utils.get_world_size()} process(es)")
    result = knn_accuracy(model, train_loader, val_loader, device, args.k, args.temperature, args.pool, amp_dtype)
    utils.print0(f"kNN top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %")
    utils.print0("result: " + json.dumps(result))
    if args.output_dir:
        if utils.is_main_process():
            os.makedirs(args.output_dir, exist_ok=True)
        utils.append_log(args.output_dir, {"knn_top1": result["top1"], "knn_top5": result["top5"],
                                           "checkpoint": args.checkpoint, "model_key": args.model_key,
                                           "k": args.k, "temperature": args.temperature, "pool": args.pool})
    return result


def cli():
    utils.run_cli("BootMAE kNN evaluation", get_args_parser, main, ())


if __name__ == "__main__":
    cli()
