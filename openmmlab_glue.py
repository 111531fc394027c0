"""What connects the BootMAE backbone (``backbone_vit``) to OpenMMLab, shared by semantic_segmentation/ and
detection/:

  * ``layer_decay_param_groups`` / ``register_mmengine()``: the layer-decay optimizer-wrapper constructor for
    mmengine (``LayerDecayOptimWrapperConstructor``), with the one layer-id rule of
    ``modeling_vit.encoder_layer_id`` (the one fine-tuning uses);
  * ``load_openmmlab_checkpoint`` / ``openmmlab_safe_loading`` / ``openmmlab_safe_globals``: weights-only
    loading of OpenMMLab checkpoints;
  * ``openmmlab_main``: the ``train``/``test`` command line of both folders around mmengine's Runner.

Nothing here imports OpenMMLab at module level.
"""
import argparse
import contextlib
import os
import pickle
import sys

import torch

import checkpoints
import utils
from modeling_vit import encoder_layer_id


def layer_id_for(name, num_layers, backbone_prefix="backbone."):
    """The layer id of a parameter of a whole model: ``encoder_layer_id`` for the backbone's parameters
    (0: patch embedding, cls token, position table; b + 1: block b; num_layers + 1: the pyramid), and
    num_layers + 1 (lr scale 1) for everything outside the backbone (neck, heads)."""
    if not name.startswith(backbone_prefix):
        return num_layers + 1
    return encoder_layer_id(name[len(backbone_prefix):], num_layers)


def layer_decay_param_groups(model, lr, weight_decay, layer_decay, num_layers=None, backbone_prefix="backbone.",
                             skip_list=None):
    """Parameter groups of a whole detector/segmentor: the repository's split (``optim_factory.param_groups``:
    no weight decay on 1-D tensors, biases, cls token and position table) and BEiT's layer-wise lr decay,
    ``lr = lr * layer_decay ** (num_layers + 1 - layer_id)`` with ``layer_id_for``. Each group carries
    ``lr``, ``lr_scale``, ``layer_id``, ``weight_decay`` and ``param_names``."""
    import optim_factory
    backbone = model
    for part in backbone_prefix.strip(".").split("."):
        backbone = getattr(backbone, part, None) if part else backbone
    if num_layers is None:
        num_layers = getattr(backbone, "num_layers", None) or len(getattr(backbone, "blocks", ()))
        if not num_layers:
            raise ValueError(f"cannot tell the number of encoder blocks under '{backbone_prefix}'; "
                             f"set paramwise_cfg.num_layers")
    if skip_list is None:
        skip = getattr(backbone, "no_weight_decay", set)() if backbone is not None else set()
        skip_list = {backbone_prefix + k for k in skip}
    groups = optim_factory.param_groups(model, weight_decay, set(skip_list),
                                        layer_id_fn=lambda n: layer_id_for(n, num_layers, backbone_prefix),
                                        layer_decay=layer_decay, num_layers=num_layers)
    for group in groups:
        # every name of a group has the same id (groups are keyed by it)
        group.setdefault("layer_id", layer_id_for(group["param_names"][0], num_layers, backbone_prefix))
        group["lr"] = lr * group["lr_scale"]
    return groups


_REGISTERED = False


def register_mmengine():
    """Registers ``LayerDecayOptimWrapperConstructor`` in mmengine's root registry (which mmsegmentation's
    and mmdetection's registries fall back to). Imports mmengine only when called."""
    global _REGISTERED
    if _REGISTERED:
        return
    from mmengine.optim import DefaultOptimWrapperConstructor
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
        """mmengine constructor with layer-wise lr decay (``layer_decay_param_groups``). ``paramwise_cfg``:
        ``layer_decay_rate`` (required) and ``num_layers`` (default: the backbone's block count), the
        release's names. The optimizer's ``lr``/``weight_decay`` are the base values."""

        def add_params(self, params, module, prefix="", **kwargs):
            cfg = self.paramwise_cfg
            if "layer_decay_rate" not in cfg:
                raise ValueError("LayerDecayOptimWrapperConstructor needs paramwise_cfg.layer_decay_rate")
            groups = layer_decay_param_groups(module, self.base_lr, self.base_wd or 0.0,
                                              cfg["layer_decay_rate"], cfg.get("num_layers"))
            for group in groups:
                # the names stay out of the optimizer (torch treats a 'param_names' entry as its own)
                group.pop("param_names")
            params.extend(groups)

    OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="LayerDecayOptimWrapperConstructor",
                                               module=LayerDecayOptimWrapperConstructor, force=True)
    _REGISTERED = True


# ----------------------------------------------------------------------------------------- checkpoint loading

def openmmlab_safe_globals():
    """The non-tensor types that OpenMMLab checkpoints hold and nothing else: numpy arrays, dtypes and
    scalars (in ``meta`` and the message hub), and mmengine's ``HistoryBuffer`` (the logged scalars of a
    runner's message hub) when mmengine is installed. PyTorch >= 2.6 loads ``weights_only`` by default and
    refuses them; allowing exactly these keeps loading free of arbitrary pickled code."""
    import numpy as np
    allowed = [np.ndarray, np.dtype]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError):
            mod = __import__(mod_name, fromlist=["_reconstruct", "scalar"])
            allowed += [mod._reconstruct, mod.scalar]
            break
    # dtype classes (numpy >= 1.25 pickles a dtype by its class, e.g. numpy.dtypes.Float64DType)
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "str_", "bytes_", "object_"):
        allowed.append(type(np.dtype(getattr(np, name))))
    with contextlib.suppress(ImportError):
        from mmengine.logging.history_buffer import HistoryBuffer
        allowed.append(HistoryBuffer)
        # a HistoryBuffer pickles its statistics functions as getattr(HistoryBuffer, 'mean') (pickle protocol
        # 2 names a class's function that way); a getattr that answers only those names stands in for the
        # builtin, which would reach anything
        allowed.append((_history_buffer_getattr, "builtins.getattr"))
    return allowed


def _history_buffer_getattr(obj, name):
    from mmengine.logging.history_buffer import HistoryBuffer
    methods = set(HistoryBuffer._statistics_methods) | {"min", "max", "current", "mean"}
    if (obj is HistoryBuffer or isinstance(obj, HistoryBuffer)) and isinstance(name, str) and name in methods:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) is not "
                                 f"allowed in a checkpoint (only HistoryBuffer's statistics methods are)")


@contextlib.contextmanager
def openmmlab_safe_loading():
    """``torch.load(weights_only=True)``, which is PyTorch's default and the one mmengine's loaders use,
    accepts ``openmmlab_safe_globals()`` inside this block; safe loading stays on."""
    with torch.serialization.safe_globals(openmmlab_safe_globals()):
        yield


def load_openmmlab_checkpoint(path):
    """``checkpoints.load_checkpoint`` (weights-only, ``argparse.Namespace`` allowed) that also reads OpenMMLab's
    own checkpoints (see ``openmmlab_safe_globals``). Any other object in the file is an error that names
    it, instead of a hint to switch safe loading off."""
    with openmmlab_safe_loading():
        try:
            return checkpoints.load_checkpoint(path)
        except utils.UsageError as e:
            unsafe = []
            with contextlib.suppress(Exception):  # the listing is a hint only; the error below stands
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                       for g in openmmlab_safe_globals()}
            unsafe = [u for u in unsafe if u not in allowed and u != "argparse.Namespace"]
            if unsafe:
                raise utils.UsageError(f"{path} holds objects that weights-only loading does not allow: "
                                       f"{', '.join(unsafe)}; re-save its tensors, e.g. with "
                                       f"python backbone_vit.py convert") from e
            raise



def _openmmlab_parser(mode):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=f"{mode} with OpenMMLab's runner (BootMAE backbone)")
    parser.add_argument("config")
    if mode == "test":
        parser.add_argument("checkpoint", help="a checkpoint of this model (mmengine's, or converted)")
        parser.add_argument("--tta", action="store_true", help="test-time augmentation (the config's tta_pipeline)")
        parser.add_argument("--out", help="seg: folder for the predicted maps; det: a .pkl of the raw results")
    else:
        parser.add_argument("--pretrained", help="pretraining checkpoint (ours or the release's) or converted "
                                                 "backbone weights; overrides model.backbone.pretrained")
        parser.add_argument("--model-key", "--model_key", dest="model_key",
                            help="entry of a pretraining checkpoint: model (online encoder) or model_ema")
        parser.add_argument("--resume", action="store_true",
                            help="continue from the newest checkpoint in the work dir")
        parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 with a dynamic loss scale)")
    parser.add_argument("--work-dir", "--work_dir", dest="work_dir", help="logs and checkpoints")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                        help="override config entries, e.g. train_dataloader.batch_size=4")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="none: one process; pytorch: torchrun / torch.distributed.launch; slurm: srun")
    # torch.distributed.launch passes --local-rank / --local_rank; torchrun sets LOCAL_RANK
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=0)
    return parser


def openmmlab_main(mode, argv=None):
    """``train``/``test`` entry of semantic_segmentation/ and detection/: reads the config (whose
    ``custom_imports`` registers the backbone), applies the command line and runs mmengine's Runner. OpenMMLab's
    checkpoints are read weights-only with ``openmmlab_safe_globals`` allowed."""
    try:
        from mmengine.config import Config
        from mmengine.runner import Runner
    except ImportError as e:
        print(f"error: OpenMMLab is not installed ({e}); run bash setup_openmmlab.sh", file=sys.stderr)
        return 2
    args = _openmmlab_parser(mode).parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.launcher != "none" and not torch.cuda.is_available():
        # mmengine's launchers give every process a CUDA device and wrap the model with device_ids
        print(f"error: --launcher {args.launcher} needs GPUs (mmengine gives each process a CUDA device); "
              f"on CPU run one process (--launcher none)", file=sys.stderr)
        return 2
    if not os.path.isfile(args.config):
        print(f"error: config {args.config} does not exist", file=sys.stderr)
        return 2
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = os.path.join("work_dirs", os.path.splitext(os.path.basename(args.config))[0])
    if mode == "train":
        if args.pretrained:
            if not os.path.isfile(args.pretrained):
                print(f"error: checkpoint {args.pretrained} does not exist", file=sys.stderr)
                return 2
            cfg.model.backbone.pretrained = args.pretrained
            if cfg.model.get("pretrained") is not None:
                cfg.model.pretrained = None  # mmseg's EncoderDecoder refuses both
        if args.model_key:
            cfg.model.backbone.model_key = args.model_key
        if args.amp:
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
        if args.resume:
            cfg.resume = True
    else:
        if not os.path.isfile(args.checkpoint):
            print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
            return 2
        cfg.load_from = args.checkpoint
        if args.tta or cfg.get("test_time_aug", False):
            if "tta_model" not in cfg or "tta_pipeline" not in cfg:
                print("error: the config has no tta_model / tta_pipeline", file=sys.stderr)
                return 2
            cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
            cfg.tta_model.module = cfg.model
            cfg.model = cfg.tta_model
        if args.out:
            if cfg.get("default_scope") == "mmdet":
                cfg.test_evaluator = [cfg.test_evaluator, dict(type="DumpDetResults", out_file_path=args.out)]
            else:
                cfg.test_evaluator["output_dir"] = args.out
    with openmmlab_safe_loading():
        runner = Runner.from_cfg(cfg)
        if mode == "train":
            runner.train()
        else:
            runner.test()
    return 0

