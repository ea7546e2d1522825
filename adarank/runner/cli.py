"""Entry point: `python -m adarank.run [+experiment=NAME] [overrides]` (Hydra 1.3).

User mistakes (a typo in a key, a wrong type, a bad value, a missing file) end in one line on stderr
naming the field or file, before any model weights load. Tracebacks are for bugs.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import re
import sys

import hydra
import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import Config, register

CONF_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "conf"))
EXIT_USAGE = 2
MAX_CHECKED_COMBINATIONS = 256  # a multirun checks every job up to this many
EXIT_DIVERGED = 3
#: What a user mistake raises: composition, type and value checks, missing files.
USER_ERRORS = (HydraException, OmegaConfBaseException, ValueError, OSError, KeyError, yaml.YAMLError)

register()


def one_line(e: BaseException) -> str:
    """A readable single line from an exception and its cause (Hydra's messages span lines)."""
    parts: list[str] = []
    for x in (e, e.__cause__):
        if x is None:
            continue
        own: list[str] = []  # per exception, so the cause's lines never join an options list
        for line in str(x).split("Config search path")[0].splitlines():
            line = line.strip()
            if not line or line.endswith("_schema") or line.startswith(
                ("Set the environment variable", "full_key", "object_type", "reference_type")
            ):
                continue
            if own and own[-1].endswith(":"):
                own[-1] += " " + line  # "Available options in 'method': adalora ..." on one line
            elif own and own[-1].startswith("Available options"):
                own[-1] += ", " + line
            else:
                own.append(line)
        parts += own
    text = "; ".join(dict.fromkeys(parts)) or type(e).__name__
    return re.sub(r"\s+", " ", text)


def to_config(dcfg: DictConfig) -> Config:
    """The typed config; dataclass __post_init__ validation runs here."""
    obj = OmegaConf.to_object(dcfg)
    if not isinstance(obj, Config):  # pragma: no cover - the schema is always the root
        raise ValueError("config: the root config is not adarank's schema")
    return obj


def _variants(overrides: list[str]) -> list[list[str]] | None:
    """One override list per sweep value (others at their first value), so every value gets validated."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    by_key: dict[str, list[str]] = {}  # a later override of a key replaces it in place, as in Hydra's sweeper
    for o in parsed:
        key = o.get_key_element()
        if key.lstrip("+~").startswith("hydra") and key.lstrip("+~") != "hydra.searchpath":
            continue  # Hydra's own settings, except where configs are found (a user's conf/method/ files)
        if o.is_sweep_override():
            try:
                vals = list(o.sweep_string_iterator())
            except Exception:
                return None  # glob() and friends: Hydra resolves them itself
            by_key[key] = [f"{key}={v}" for v in vals]
        else:
            by_key[key] = [o.input_line]
    choices = list(by_key.values())
    if math.prod(len(c) for c in choices) <= MAX_CHECKED_COMBINATIONS:
        return [list(c) for c in itertools.product(*choices)]  # every job of the sweep
    # a huge sweep: every value at least once, the other keys at their first value
    first = [c[0] for c in choices]
    out = [first]
    for i, c in enumerate(choices):
        for v in c[1:]:
            out.append(first[:i] + [v] + first[i + 1 :])
    return out


def _sweeper_params(overrides: list[str]) -> list[str]:
    """The `hydra.sweeper.params` of the composed config (an experiment's sweep) as overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hcfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.select(hcfg, "hydra.sweeper.params") or {}
    return [f"{k}={v}" for k, v in params.items()]


def prevalidate(argv: list[str]) -> str | None:
    """Compose and type-check the config for these command-line overrides; None when fine.

    A multirun checks every job of the sweep (the command line's and the experiment's
    `hydra.sweeper.params`; up to MAX_CHECKED_COMBINATIONS jobs, beyond that every value once), so a bad
    value or combination fails here rather than in the middle of the sweep.
    """
    from hydra import compose, initialize_config_dir

    flags = [a for a in argv if a.startswith("-")]
    if any(f not in ("-m", "--multirun") for f in flags):
        return None  # --help, --cfg, --info ...: Hydra's own business
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        variants = _variants(overrides)
        if variants is None:
            return None
        if flags:  # the command line's values win over the experiment's, as in Hydra's basic sweeper
            variants = _variants(_sweeper_params(variants[0]) + overrides)
            if variants is None:
                return None
        for ov in variants:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = to_config(compose(config_name="config", overrides=ov))
            preflight(cfg)
        check_output_dir(overrides, variants[0], multirun=bool(flags))
    except USER_ERRORS as e:  # composition and validation failures; anything else is a bug
        return one_line(e)
    return None


def check_output_dir(overrides: list[str], first_job: list[str], multirun: bool) -> None:
    """The run's output dir (a multirun's sweep dir) can be made: Hydra makes it before our code runs, and
    its own failure there is a traceback. Making it here is what Hydra would do next anyway."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    # Hydra's own overrides (hydra/launcher=..., hydra.launcher.n_jobs=...), sweeps left out
    own = [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/")) and "," not in o.split("=", 1)[-1]]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hcfg = compose(config_name="config", overrides=first_job + own, return_hydra_config=True)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(hcfg)  # `${hydra:...}` interpolations in the dir read it
    try:
        out = str(OmegaConf.select(hcfg, key))
    finally:
        HydraConfig.instance().cfg = previous
    _check_creatable(out, key)


def _check_creatable(path: str, key: str) -> None:
    """`path` is a directory, or can be made: its nearest existing ancestor is a directory in which a folder
    can be made (tried with a temporary one, removed at once, so nothing is left behind)."""
    import tempfile

    probe = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OSError(f"{key}: cannot create the output dir {path}: {probe} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".adarank-probe-"))
    except OSError as e:
        raise OSError(f"{key}: cannot create the output dir {path}: {probe}: {e.strerror or e}") from None


def preflight(cfg: Config) -> int:
    """Checks that need files but no model weights: data, model folder, targets, schedule. Returns T."""
    from ..inject import check_not_trained_in_full, unfreeze
    from ..increlora import check_growth
    from ..schedule import make_schedule
    from .data import get_task
    from .methods import METHODS, lora_ranks, method_budget, method_targets, target_names
    from .models import meta_model, resolve_path, tokenizer_source
    from .peft_baselines import peft_task_type
    from .train import check_cuda_graph, pick_device, total_steps

    get_task(cfg.task.name)
    if cfg.model.quantization != "none":
        from ..quant import check_available

        check_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun each rank sees 1/world of the data
    device = pick_device(cfg.train.device)
    check_cuda_graph(cfg.train.cuda_graph, device, world)
    from .speed import resolve as resolve_speed

    resolve_speed(cfg, device.type, world, None)  # a named train.speed that cannot run here is refused
    if device.type == "cpu" and cfg.model.dtype == "float16":
        # the head (and everything, for full fine-tuning) would train in fp16 on a CPU: NaN within steps
        raise ValueError("model.dtype: float16 weights cannot train on a CPU (the trained modules would be fp16); "
                         "use float32 or bfloat16 there")
    check_tracking(cfg.wandb.mode)
    if cfg.data.dir is not None and not os.path.isdir(os.path.expanduser(cfg.data.dir)):
        raise FileNotFoundError(f"data.dir: {cfg.data.dir} is not a directory")
    data = _load_task_cached(cfg.task.name, cfg.data.dir, cfg.seed, cfg.data.val_fraction, cfg.data.max_train_samples)
    check_splits(data.splits, cfg.task.name, cfg.data.dir)
    n_batches = math.ceil(math.ceil(len(data.splits["train"]) / world) / cfg.train.batch_size)
    # a causal task packs tokens into blocks, so its T is only known after tokenising: unless
    # train.max_steps fixes it, its schedule is checked when training starts
    known_T = not data.task.is_causal or cfg.train.max_steps is not None
    T = total_steps(n_batches, cfg.train.epochs, cfg.train.grad_accum, cfg.train.max_steps)
    mc, m = cfg.model, cfg.method
    model = meta_model(mc.name_or_path, None if data.task.is_causal else data.task.num_labels, mc.random_config,
                       mc.config_overrides)
    check_positions(model, cfg.task.max_length)
    if cfg.train.gradient_checkpointing:  # the meta model has the class the run would load
        from .gradient_checkpointing import check_supported

        check_supported(model)
    spec = METHODS[m.name]
    if spec.peft:
        peft_task_type(model)  # PEFT's model class needs a known head
    names = target_names(model, m, mc)
    if spec.adapters:
        check_not_trained_in_full(model, names, method_targets(m, mc), mc.train_modules)
    unfreeze(model, mc.train_modules)
    if m.rank_pattern is not None:  # the pattern's file, its names and its transform
        lora_ranks(m, names)
    if spec.adaptive:
        budget = method_budget(model, m, names)
        if known_T:
            schedule = make_schedule(T, m.init_frac, m.final_frac, m.delta_t)
            if spec.grows:
                check_growth(schedule, budget.init_total, budget.target_total, m.top_h, m.grow_by, len(names))
    resolve_path(tokenizer_source(cfg.model.name_or_path, cfg.model.tokenizer))
    _tokenizer_loads(cfg.model.name_or_path, cfg.model.tokenizer)
    return T


def check_splits(splits: dict, task: str, data_dir: str | None) -> None:
    """Every split a run trains on or scores is non-empty (an empty dev split would fail at the first
    evaluation, after training)."""
    where = f" in {data_dir}" if data_dir else ""
    for name, split in splits.items():
        if name != "test" and len(split) == 0:
            raise ValueError(f"data: the {name} split of {task}{where} has no rows")


def check_positions(model, max_length: int) -> None:
    """task.max_length fits the model's position embeddings (a longer batch fails mid-training)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"task.max_length: {max_length} tokens exceed the model's {limit} positions "
                         f"(max_position_embeddings); use task.max_length={limit} or less")


def check_tracking(mode: str) -> None:
    """wandb.mode=online needs credentials; without them W&B fails after the model loaded."""
    from .tracking import wandb_credentials

    if mode == "online" and not wandb_credentials():
        raise ValueError("wandb.mode: online needs W&B credentials (`wandb login`, or $WANDB_API_KEY); "
                         "use wandb.mode=offline and `wandb sync` later")


@functools.lru_cache(maxsize=8)
def _tokenizer_loads(name_or_path: str, tokenizer: str | None) -> None:
    """The tokenizer can be loaded (a hub id that does not exist would otherwise fail after the data is
    tokenised); its errors name the field it came from. Read once per sweep."""
    from .models import load_tokenizer

    load_tokenizer(name_or_path, tokenizer)


@functools.lru_cache(maxsize=8)
def _load_task_cached(*key):
    """Prevalidating a sweep preflights every job; most share their data, so read it once."""
    from .data import load_task

    return load_task(*key)


def check_out_dir(out_dir: str, cfg: Config) -> None:
    """Never overwrite a run by accident."""
    from .checkpoint import CKPT_NAME

    busy = [f for f in ("results.json", CKPT_NAME) if os.path.exists(os.path.join(out_dir, f))]
    if busy and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a run ({', '.join(busy)}); pass resume=true to continue it or overwrite=true to start over"
        )
    if cfg.overwrite and not cfg.resume and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one rank
        from . import checkpoint

        checkpoint.remove(out_dir)  # a fresh start: the old run's checkpoints and record go
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, "diverged.json"))


def pin_gpu(cfg: Config) -> None:
    """In a multirun on a host with several GPUs (e.g. the joblib launcher), job k takes GPU k mod n.
    torchrun jobs (WORLD_SIZE set) and explicit train.device settings are left alone."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.train.device != "auto" or "WORLD_SIZE" in os.environ:
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    hc = HydraConfig.get()
    if n > 1 and hc.mode == RunMode.MULTIRUN:
        cfg.train.device = f"cuda:{hc.job.num % n}"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(dcfg: DictConfig) -> float | None:
    import logging

    from hydra.core.hydra_config import HydraConfig

    from .lock import OutDirLock

    out_dir = HydraConfig.get().runtime.output_dir
    log = logging.getLogger("adarank").info  # the console and run.log (Hydra's job logging)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 owns the dir
    with contextlib.ExitStack() as owned:  # the lock goes when the run ends, however it ends
        try:
            cfg = to_config(dcfg)
            pin_gpu(cfg)
            if main_rank:
                owned.enter_context(OutDirLock(out_dir, warn=log))
            check_out_dir(out_dir, cfg)
            preflight(cfg)
        except USER_ERRORS as e:
            print(f"adarank: error: {one_line(e)}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        return _train(cfg, out_dir, log)


def _train(cfg: Config, out_dir: str, log) -> float | None:
    """Train, and say how it went in one line; a diverged run is recorded and, in a multirun, not the end."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ..atomic import atomic_write_json
    from .checkpoint import CheckpointError
    from .resume import ResumeRefused
    from .train import TrainingDiverged, train

    try:
        res = train(cfg, out_dir, log=log)
    except (ResumeRefused, CheckpointError) as e:  # found before any data or model loaded
        print(f"adarank: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except TrainingDiverged as e:
        print(f"adarank: error: {e}", file=sys.stderr)
        # a diverged run (a too-high learning rate in a grid, say) is a result: recorded next to its checkpoint
        if int(os.environ.get("RANK", "0")) == 0:
            atomic_write_json(os.path.join(out_dir, "diverged.json"), {"error": str(e), "overrides": list(HydraConfig.get().overrides.task)})
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # one job's divergence is not the sweep's end: the other jobs go on
        sys.exit(EXIT_DIVERGED)
    final = res["metrics"]["final"]
    log(
        f"[{res['method']} on {res['task']}] dev {res['metric']} = {res['value']:.4f} "
        f"(at the best-validation step: {res['best_value']:.4f}); "
        f"{res['trainable_params']:,} trainable params; {res['steps']} steps in {res['seconds']:.0f}s; "
        f"results in {out_dir}"
    )
    return final.get(f"val/{res['metric']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    err = prevalidate(argv)
    if err is not None:
        print(f"adarank: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    saved, sys.argv = sys.argv, [sys.argv[0]] + argv  # hydra.main reads sys.argv
    try:
        _app()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    # Run under the importable name `adarank.runner.cli`, not `__main__`: launchers that pickle the task (joblib's
    # loky workers) must find its functions by module name in a fresh process.
    from adarank.runner.cli import main as _main

    _main()
