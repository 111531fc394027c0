"""Target encoders (``--target_encoder``): they give BootMAE's feature targets and decide when they change.

  ema        BootMAE: a momentum encoder (EMA of the whole model) updated after every optimisation step
  fixed      a frozen encoder loaded from a checkpoint (ours, the release's or MAE's; paper Table 9)
  k_epoch    MAE-K: a frozen copy of the online encoder, refreshed at the start of every K-th epoch
  epoch_ema  EMA-MAE: target = (1 - tau) * target + tau * online after every epoch
  mae_new    MAE-new: L_fast + lambda * L_slow, fast = the epoch_ema target, slow = the k_epoch target

All give the patch tokens of the target's last block, before its final norm (the release's target).
"""
import torch
from timm.utils import ModelEmaV3

from modeling_bootmae import VisionTransformer


def copy_encoder(model):
    """A frozen plain ``VisionTransformer`` with ``model``'s encoder architecture and weights, in eval mode."""
    net = VisionTransformer(**model.encoder_config())
    net.load_state_dict(model.encoder_state_dict())
    return net.to(next(model.parameters()).device).eval().requires_grad_(False)


class TargetEncoder:
    """Feature targets of one strategy. ``features(images, ids)`` gives [(weight, targets), ...];
    ``begin_epoch``/``end_epoch`` are called around every epoch whose loss uses features, ``after_step``
    after every optimisation step; ``state_dict`` is what a checkpoint needs to resume exactly."""
    kind = None

    def begin_epoch(self, epoch, online):
        pass

    def end_epoch(self, epoch, online):
        pass

    def after_step(self, online, momentum):
        pass

    def features(self, images, ids=None):
        raise NotImplementedError

    def state_dict(self):
        raise NotImplementedError

    def load_state_dict(self, state):
        raise NotImplementedError

    def compile(self):
        pass


class EmaTarget(TargetEncoder):
    """BootMAE's momentum encoder: an EMA of the whole model (timm ``ModelEmaV3``, kept under the release's
    checkpoint key ``model_ema``), updated after every optimisation step with the scheduled momentum."""
    kind = "ema"

    def __init__(self, ema):
        self.ema = ema
        self.target_fn = None   # the compiled feature function under --compile

    @property
    def module(self):
        return self.ema.module

    def after_step(self, online, momentum):
        self.ema.decay = momentum
        self.ema.update(online)

    def features(self, images, ids=None):
        fn = self.target_fn or self.ema.module.target_features
        return [(1.0, fn(images) if ids is None else fn(images, ids))]

    def compile(self):
        self.target_fn = torch.compile(self.ema.module.target_features)

    def state_dict(self):
        return {"model_ema": self.ema.module.state_dict()}

    def load_state_dict(self, state):
        self.ema.module.load_state_dict(state["model_ema"])


class _FrozenEncoderTarget(TargetEncoder):
    """One frozen plain encoder; ``ready`` is False until it first holds weights."""

    def __init__(self, net, ready):
        self.net, self.ready = net, ready
        self.target_fn = None

    def features(self, images, ids=None):
        if not self.ready:
            raise RuntimeError(f"the {self.kind} target encoder is used before it was initialised")
        fn = self.target_fn or self.net.target_features
        return [(1.0, fn(images) if ids is None else fn(images, ids))]

    def compile(self):
        self.target_fn = torch.compile(self.net.target_features)

    def _refresh(self, online):
        # in place, so compiled graphs keep reading the same tensors
        with torch.no_grad():
            self.net.load_state_dict(online.encoder_state_dict())
        self.ready = True

    def state_dict(self):
        return {"target": self.net.state_dict() if self.ready else None}

    def load_state_dict(self, state):
        if state.get("target") is None:
            self.ready = False
        else:
            self.net.load_state_dict(state["target"])
            self.ready = True


class FixedTarget(_FrozenEncoderTarget):
    """A frozen encoder loaded once (``--target_checkpoint``); it never changes."""
    kind = "fixed"

    def __init__(self, net):
        super().__init__(net, ready=True)


class KEpochTarget(_FrozenEncoderTarget):
    """MAE-K: a frozen copy of the online encoder, taken when the feature loss is first used and then at
    the start of every epoch that is a multiple of K (so it changes only at multiples of K epochs)."""
    kind = "k_epoch"

    def __init__(self, online, k):
        super().__init__(copy_encoder(online), ready=False)
        self.k = k

    def begin_epoch(self, epoch, online):
        if not self.ready or epoch % self.k == 0:
            self._refresh(online)


class EpochEmaTarget(_FrozenEncoderTarget):
    """EMA-MAE: a copy of the online encoder when the feature loss is first used (epoch 0, or the first
    epoch after a pixel-only warm-up of WSE epochs, so that the target has learnt to see pixels), then after
    every epoch that used it: target = (1 - tau) * target + tau * online, parameter by parameter."""
    kind = "epoch_ema"

    def __init__(self, online, tau):
        super().__init__(copy_encoder(online), ready=False)
        self.tau = tau

    def begin_epoch(self, epoch, online):
        if not self.ready:
            self._refresh(online)

    @torch.no_grad()
    def end_epoch(self, epoch, online):
        own = self.net.state_dict()
        for key, value in online.encoder_state_dict().items():
            own[key].mul_(1.0 - self.tau).add_(value.detach(), alpha=self.tau)


class MaeNewTarget(TargetEncoder):
    """MAE-new: L = L_fast + lambda * L_slow, fast = an ``EpochEmaTarget``, slow = a ``KEpochTarget``; one
    feature prediction is compared with both."""
    kind = "mae_new"

    def __init__(self, online, k, tau, slow_weight):
        self.fast, self.slow = EpochEmaTarget(online, tau), KEpochTarget(online, k)
        self.slow_weight = slow_weight

    def begin_epoch(self, epoch, online):
        self.fast.begin_epoch(epoch, online)
        self.slow.begin_epoch(epoch, online)

    def end_epoch(self, epoch, online):
        self.fast.end_epoch(epoch, online)
        self.slow.end_epoch(epoch, online)

    def features(self, images, ids=None):
        (_, fast), = self.fast.features(images, ids)
        (_, slow), = self.slow.features(images, ids)
        return [(1.0, fast), (self.slow_weight, slow)]

    def compile(self):
        self.fast.compile()
        self.slow.compile()

    def state_dict(self):
        return {"fast": self.fast.state_dict()["target"], "slow": self.slow.state_dict()["target"]}

    def load_state_dict(self, state):
        self.fast.load_state_dict({"target": state.get("fast")})
        self.slow.load_state_dict({"target": state.get("slow")})


TARGET_ENCODERS = ("ema", "fixed", "k_epoch", "epoch_ema", "mae_new")


def build_target_encoder(args, model, fixed_encoder=None):
    """The ``TargetEncoder`` of ``args.target_encoder`` for the (unwrapped) online ``model``; None when the
    run has no feature loss (``--feature_weight 0``, MAE) or no momentum encoder (``--no_model_ema``).
    ``fixed_encoder`` is the loaded network of ``fixed``."""
    kind = args.target_encoder
    if args.feature_weight == 0:
        return None
    if kind == "ema":
        return EmaTarget(ModelEmaV3(model, decay=args.model_ema_decay)) if args.model_ema else None
    if kind == "fixed":
        return FixedTarget(fixed_encoder)
    if kind == "k_epoch":
        return KEpochTarget(model, args.target_k)
    if kind == "epoch_ema":
        return EpochEmaTarget(model, args.target_tau)
    if kind == "mae_new":
        return MaeNewTarget(model, args.target_k, args.target_tau, args.slow_weight)
    raise ValueError(f"unknown target encoder {kind!r}; choose one of {', '.join(TARGET_ENCODERS)}")
