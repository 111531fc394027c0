"""Weighted k-nearest-neighbour evaluation of a frozen encoder (DINO's protocol).

    python eval_knn.py --model bootmae_base --checkpoint out/checkpoint-799.pth --data_path /data/imagenet
    torchrun --nproc_per_node 8 eval_knn.py ...                    (each process embeds its shard)

Every image of the train and val splits is embedded once (evaluation transform, no augmentation) and the
feature L2-normalised. Each val image's k nearest train images by cosine similarity vote for their class
with weight exp(similarity / T); the classes with the largest vote sums are the top-1 / top-5 predictions.

Features (``--pool``): ``avg`` (default) is the mean of the patch tokens of ``forward_features``, i.e. after
the encoder's final norm (a pretraining model has no ``fc_norm``); ``cls`` is the normed cls token.

The evaluation itself is ``knn.py`` (``run_pretraining.py --knn_freq`` uses it too); with several processes
each rank embeds its shard and the shards are all-gathered, so every rank ends with all features in order.
"""
import argparse
import json
import os

import torch

import checkpoints
import knn
import pretrained
import utils


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
    p.add_argument("--device", default=utils.default_device())
    p.add_argument("--output_dir", default="", help="if set, the result is appended to output_dir/log.txt")
    p.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                   help="set by torch.distributed.launch; LOCAL_RANK from the environment is what is used")
    return p


def main(args):
    size = pretrained.parse_model_size(args.model)
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
    model = pretrained.build_encoder(size, args.input_size, args.patch_size)
    checkpoints.load_pretrained_encoder(model, args.checkpoint, args.model_key, new=("norm.",))
    model.to(device)
    pin = device.type == "cuda"
    train_loader = knn.build_loader(train_set, args.batch_size, args.num_workers, pin)
    val_loader = knn.build_loader(val_set, args.batch_size, args.num_workers, pin)
    utils.print0(f"kNN: {len(train_set)} train / {len(val_set)} val images, k={args.k}, T={args.temperature}, "
                 f"pool={args.pool}, {utils.get_world_size()} process(es)")
    result = knn.knn_accuracy(model, train_loader, val_loader, device, args.k, args.temperature, args.pool, amp_dtype)
    utils.print0(f"kNN top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %")
    utils.print0("result: " + json.dumps(result))
    if args.output_dir:   # append_log creates the folder
        checkpoints.append_log(args.output_dir, {"knn_top1": result["top1"], "knn_top5": result["top5"],
                                                 "checkpoint": args.checkpoint, "model_key": args.model_key,
                                                 "k": args.k, "temperature": args.temperature, "pool": args.pool})
    return result


def cli():
    utils.run_cli("BootMAE kNN evaluation", get_args_parser, main)


if __name__ == "__main__":
    cli()
