"""Helpers several test files share: a run's log.txt records, and an environment without launcher variables."""
import json
import os

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def read_log(folder):
    """The JSON records of ``folder``/log.txt, one per epoch."""
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line) for line in f]


def clean_env(drop=(), **extra):
    """The caller's environment without launcher variables (nor ``drop``), so that a test run inside a SLURM job
    or a torchrun does not make an entry point think it is one rank of a distributed job; ``extra`` added."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS + tuple(drop) and not k.startswith("SLURM_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env
