"""Typed schemas under the YAML configs, and the checks that run before any heavy work starts.

Each config group (`model`, `dataset`, `adapter`, `trainer`) maps 1:1 to a dataclass here. Hydra composes
the YAML on top of these schemas, so a typo'd key or a wrong type fails at composition; `validate()`
rejects values that type-check but make no sense, naming the key and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from lora_cli.errors import UserError, did_you_mean

MODEL_SOURCES = ("embedded", "random", "pretrained")
DTYPES = ("float32", "bfloat16", "float16")
DATASET_FORMATS = ("messages", "columns")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TASK_METRICS = ("exact_match", "token_f1")
LABEL_MODES = ("generate", "constrained", "score")
ADAPTERS = ("lora", "slora", "qlora", "scalora")
QUANTIZATIONS = ("nf4", "fp4")
NONFINITE_POLICIES = ("stop", "skip")
SCALE_SCHEDULES = ("constant", "linear")
SCALE_MODES = ("per_layer", "global")
SCALE_GRANULARITIES = ("layer", "module")
ETA_MODES = ("raw", "adam_effective")
MOMENT_CONVENTIONS = ("chain_rule", "own")
# Accelerate config files shipped in launchers/ (trainer.launcher=NAME); a path to the user's own also works.
LAUNCHERS = ("ddp", "fsdp", "fsdp_qlora", "deepspeed_zero2", "deepspeed_zero3")


# Bounds far past any LoRA run, which keep step counts (and the dry-run's arithmetic over them) finite and quick.
MAX_STEPS = 10**8
MAX_EPOCHS = 10**4


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _is_plain_name(name: str) -> bool:
    """A single safe path component: it becomes part of a run dir's name."""
    return bool(re.fullmatch(r"[\w.-]+", name)) and name not in (".", "..")


def _require_finite(group, prefix: str) -> None:
    """Every float of a config group (and of the groups inside it) is a number: `trainer.lr=inf` would train to a
    non-finite loss, and `merge.tolerance=inf` would pass any merge."""
    import dataclasses

    for item in dataclasses.fields(group):
        value = getattr(group, item.name)
        if dataclasses.is_dataclass(value):
            _require_finite(value, f"{prefix}{item.name}.")
        elif isinstance(value, float):
            _require(math.isfinite(value), f"{prefix}{item.name}={value} must be a finite number")


def _require_choice(value: str, key: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UserError(f"{key}={value!r} is not valid; {did_you_mean(str(value), options, f'{key}={{}}')}choose one "
                        f"of: {', '.join(options)}")


@dataclass
class ModelConfig:
    """The frozen base model and where its weights come from."""

    # embedded: a GGUF file shipped in a Python package, converted once into the cache;
    # random: a small model initialised from `architecture` (tests); pretrained: a hub id or local dir.
    source: str = "pretrained"
    # The model's identity: hub id / local dir for `pretrained`, the original hub id for `embedded`
    # (recorded as provenance), a free name for `random`.
    name_or_path: str = "???"
    revision: str | None = None
    # embedded (and `random`, which borrows the embedded model's tokenizer so tests need no download)
    gguf_package: str | None = None
    gguf_file: str | None = None
    # random: LlamaConfig fields and the seed of the initialisation
    architecture: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    dtype: str = "float32"
    trust_remote_code: bool = False

    def validate(self) -> None:
        _require_choice(self.source, "model.source", MODEL_SOURCES)
        _require_choice(self.dtype, "model.dtype", DTYPES)
        _require(self.name_or_path not in ("", "???"),
                 "model.name_or_path is not set; pass a hub id or a local model dir, e.g. "
                 "model=hf model.name_or_path=/path/to/model")
        if self.source == "embedded" or self.source == "random":
            _require(bool(self.gguf_package and self.gguf_file),
                     f"model.source={self.source} needs model.gguf_package and model.gguf_file")


@dataclass
class DatasetConfig:
    """Where the examples come from and how they become chat conversations."""

    name: str = "custom"
    # A local file or folder (a folder holds `<split>.jsonl|json|csv|parquet`), or builtin://NAME for
    # data shipped with lora-cli. Takes precedence over hub_id.
    path: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    train_split: str = "train"
    # None: hold out `eval_size` examples of the train split (seeded, so every run holds out the same).
    eval_split: str | None = None
    eval_size: float = 0.1  # a count when >= 1, a fraction of train when < 1
    # messages: a column of chat turns [{role, content}, ...]; columns: one prompt and one completion column.
    format: str = "messages"
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    rename_columns: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = None
    max_seq_len: int = 512
    train_on_prompt: bool = False
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # How `lora eval` scores generated replies: exact_match compares the reply's first line (a label) with
    # the gold one; token_f1 scores free-form replies by word overlap.
    task_metric: str = "token_f1"

    def validate(self) -> None:
        _require(_is_plain_name(self.name), f"dataset.name={self.name!r} names run dirs, so it must be a plain name "
                 "(letters, digits, '.', '_', '-'; no '/' or '..')")
        _require_choice(self.format, "dataset.format", DATASET_FORMATS)
        _require_choice(self.task_metric, "dataset.task_metric", TASK_METRICS)
        _require(bool(self.path or self.hub_id),
                 f"dataset {self.name!r} has neither dataset.path nor dataset.hub_id; "
                 "set dataset.path=FILE_OR_DIR")
        _require(self.max_seq_len > 0, f"dataset.max_seq_len={self.max_seq_len} must be > 0")
        _require(0 < self.eval_size < math.inf,
                 f"dataset.eval_size={self.eval_size} must be > 0 (a count when >= 1, a fraction of train when < 1)")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"dataset.{key}={value} must be > 0 (or null for all)")


@dataclass
class SLoraScaleConfig:
    """S-LoRA's learnable per-layer scale s_l on the adapter's contribution (../shared/specs/slora.md)."""

    init: float = 0.5
    init_schedule: str = "constant"  # constant | linear (from init_min at the first block to init at the last)
    init_min: float = 0.1
    mode: str = "per_layer"  # per_layer: s_l = exp(theta_l); global: s_l = exp(g0 + g1 * l / (L - 1))
    granularity: str = "layer"  # layer: one scale per block; module: one per adapted module
    learnable: bool = True
    lr_mult: float = 10.0
    bounds: list[float] = field(default_factory=lambda: [0.1, 10.0])  # s_l / init is projected into this range

    def validate(self) -> None:
        _require(self.init > 0, f"adapter.scale.init={self.init} must be > 0")
        _require(self.init_min > 0, f"adapter.scale.init_min={self.init_min} must be > 0")
        _require_choice(self.init_schedule, "adapter.scale.init_schedule", SCALE_SCHEDULES)
        _require_choice(self.mode, "adapter.scale.mode", SCALE_MODES)
        _require_choice(self.granularity, "adapter.scale.granularity", SCALE_GRANULARITIES)
        _require(self.lr_mult > 0, f"adapter.scale.lr_mult={self.lr_mult} must be > 0")
        _require(len(self.bounds) == 2 and 0 < self.bounds[0] <= 1 <= self.bounds[1],
                 f"adapter.scale.bounds={list(self.bounds)} must be [low, high] with 0 < low <= 1 <= high")
        _require(not (self.mode == "global" and self.granularity == "module"),
                 "adapter.scale.mode=global works per block; use adapter.scale.granularity=layer with it")


@dataclass
class ScaLoraConfig:
    """ScaLoRA's periodic merge-and-rescale (../shared/specs/scalora.md)."""

    interval: int = 10  # rescale every I optimizer steps
    warmup: int | None = None  # no rescale before this step; null = min(100, 10% of the steps)
    L: float = 0.1  # smoothness constant of the quadratic bound; alpha, beta scale as 1/sqrt(L * eta)
    eta: str = "peak"  # which learning rate enters the formula: the peak lr
    eta_mode: str = "adam_effective"  # raw | adam_effective (eta / median sqrt(v_hat) of the module)
    clip: list[float] = field(default_factory=lambda: [0.5, 2.0])  # per-entry clamp of alpha and beta
    column_wise: bool = True  # false: the scalar variant only
    ridge: float = 1e-10
    moments: str = "chain_rule"  # chain_rule (spec) | own (the other reading, for ablations)

    def validate(self) -> None:
        _require(self.interval > 0, f"adapter.scalora.interval={self.interval} must be > 0")
        _require(self.warmup is None or self.warmup >= 0, f"adapter.scalora.warmup={self.warmup} must be >= 0")
        _require(self.L > 0, f"adapter.scalora.L={self.L} must be > 0")
        _require_choice(self.eta, "adapter.scalora.eta", ("peak",))
        _require_choice(self.eta_mode, "adapter.scalora.eta_mode", ETA_MODES)
        _require_choice(self.moments, "adapter.scalora.moments", MOMENT_CONVENTIONS)
        _require(len(self.clip) == 2 and 0 < self.clip[0] <= 1 <= self.clip[1],
                 f"adapter.scalora.clip={list(self.clip)} must be [low, high] with 0 < low <= 1 <= high")
        _require(self.ridge >= 0, f"adapter.scalora.ridge={self.ridge} must be >= 0")


@dataclass
class AdapterConfig:
    """The low-rank adapter: which modules of which blocks, at what rank, on what base precision."""

    name: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # peft's default; dropout costs ~15% of a CPU step (a mask per adapted module)
    # Module names (e.g. [q_proj, v_proj]) or "all-linear" (every linear layer but the output head).
    target_modules: Any = "all-linear"
    # Indices of the transformer blocks to adapt; null = all blocks.
    layers: list[int] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    # Load the base in 4 bits with bitsandbytes (QLoRA): nf4 | fp4 | null (full precision).
    quantize: str | None = None
    double_quant: bool = True
    scale: SLoraScaleConfig | None = None  # adapter=slora only
    scalora: ScaLoraConfig | None = None  # adapter=scalora only

    def validate(self) -> None:
        _require_choice(self.name, "adapter", ADAPTERS)
        if self.quantize is not None:
            _require_choice(self.quantize, "adapter.quantize", QUANTIZATIONS)
        _require(self.name != "qlora" or self.quantize is not None,
                 "adapter=qlora needs a 4-bit base: set adapter.quantize=nf4 (or fp4)")
        _require((self.name == "slora") == (self.scale is not None),
                 "adapter.scale belongs to adapter=slora only; pick adapter=slora or drop adapter.scale")
        _require((self.name == "scalora") == (self.scalora is not None),
                 "adapter.scalora belongs to adapter=scalora only; pick adapter=scalora or drop adapter.scalora")
        if self.scale is not None:
            self.scale.validate()
        if self.scalora is not None:
            self.scalora.validate()
            _require(self.quantize is None, "adapter=scalora cannot use a 4-bit base (adapter.quantize="
                     f"{self.quantize}): it merges into the base weights every interval, and merges into "
                     "quantized weights accumulate rounding error; set adapter.quantize=null")
            _require(not self.use_dora, "adapter=scalora cannot be combined with adapter.use_dora=true: "
                     "its rescale assumes W + s * B A; set adapter.use_dora=false")
        _require(self.r > 0, f"adapter.r={self.r} must be a positive integer (e.g. adapter.r=16)")
        _require(self.alpha > 0, f"adapter.alpha={self.alpha} must be > 0 (commonly 2 * adapter.r)")
        _require(0 <= self.dropout < 1, f"adapter.dropout={self.dropout} must be in [0, 1)")
        targets = self.target_modules
        _require(targets == "all-linear" or (isinstance(targets, list | tuple) and len(targets) > 0
                                             and all(isinstance(t, str) for t in targets)),
                 f"adapter.target_modules={targets!r} must be 'all-linear' or a non-empty list of names")
        _require(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
                 f"adapter.layers={self.layers} must be null (all blocks) or non-negative block indices")


@dataclass
class TrainerConfig:
    """The optimisation: schedule, batch, length of training, evaluation cadence."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    batch_size: int = 8
    grad_accum: int = 1
    # max_steps wins when set; otherwise train for `epochs` passes over the train split.
    max_steps: int | None = None
    epochs: float = 1.0
    max_grad_norm: float = 1.0
    eval_every: int = 50
    eval_batch_size: int = 16
    seed: int = 42
    precision: str = "auto"  # see train.auto_takes_bf16
    eval_at_end: bool = False  # also run `lora eval` (task metric) when training ends; sweeps report it
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # Steps of similar-length examples (little padding), in random order; false: plain shuffled batches.
    group_by_length: bool = True
    # Pack each micro-batch's examples end to end into rows of dataset.max_seq_len tokens, attention kept
    # within each example (exact): no padding at all, but attention spans whole rows (see data.pack).
    packing: bool = False
    keep_freed_memory: bool = True  # glibc keeps freed activation memory for the next step: fewer page faults
    # torch.compile every transformer block (fused elementwise kernels): slightly faster steps once compiled,
    # after 20-60 s of compiling on a 2-core CPU, so it pays off on long runs only. Plain LoRA only.
    compile: bool = False
    # LoRA layers compute W x + s B A x in one autograd function, scale and adds inside the GEMMs (exact, see
    # adapters/fused.py): 5-8% faster eager CPU steps. false: peft's own forward.
    fused_lora: bool = True
    save_every: int | None = None  # checkpoint every N steps (and on Ctrl-C / SIGTERM); null = only on signals
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    on_nonfinite: str = "stop"  # stop: fail naming the step (checkpoints kept); skip: drop that step's update
    num_processes: int = 1  # >1: `accelerate launch` this run on N processes (gloo on CPU, one GPU each on CUDA)
    # How the processes are launched: null (DDP, gloo on CPU), a name in launchers/ (ddp, fsdp, fsdp_qlora,
    # deepspeed_zero2, deepspeed_zero3) or the path of an accelerate config file.
    launcher: str | None = None
    # Several machines: num_processes counts all of them; run the same command on each with its machine_rank.
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None  # the address of machine 0, which every machine can reach
    main_process_port: int | None = None  # null: a free port on one machine, 29500 across machines

    def validate(self) -> None:
        _require(self.lr > 0, f"trainer.lr={self.lr} must be > 0 (e.g. trainer.lr=2e-4)")
        _require(self.batch_size > 0, f"trainer.batch_size={self.batch_size} must be > 0")
        _require(self.eval_batch_size > 0, f"trainer.eval_batch_size={self.eval_batch_size} must be > 0")
        _require(self.grad_accum > 0, f"trainer.grad_accum={self.grad_accum} must be > 0")
        _require(self.max_steps is None or 0 < self.max_steps <= MAX_STEPS,
                 f"trainer.max_steps={self.max_steps} must be in 1..{MAX_STEPS:,} (or null to train for "
                 "trainer.epochs)")
        _require(0 < self.epochs <= MAX_EPOCHS, f"trainer.epochs={self.epochs} must be > 0 and <= {MAX_EPOCHS:,}")
        _require(self.weight_decay >= 0, f"trainer.weight_decay={self.weight_decay} must be >= 0")
        _require(0 <= self.seed < 2**32, f"trainer.seed={self.seed} must be in [0, 2**32)")
        _require(0 <= self.warmup_ratio < 1, f"trainer.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        _require(self.max_grad_norm > 0, f"trainer.max_grad_norm={self.max_grad_norm} must be > 0")
        _require(self.eval_every > 0, f"trainer.eval_every={self.eval_every} must be > 0")
        _require_choice(self.schedule, "trainer.schedule", SCHEDULES)
        _require_choice(self.precision, "trainer.precision", PRECISIONS)
        _require(self.save_every is None or self.save_every > 0,
                 f"trainer.save_every={self.save_every} must be > 0 (or null: checkpoint only on Ctrl-C)")
        _require(self.keep_checkpoints > 0, f"trainer.keep_checkpoints={self.keep_checkpoints} must be > 0")
        _require_choice(self.on_nonfinite, "trainer.on_nonfinite", NONFINITE_POLICIES)
        _require(self.num_processes > 0, f"trainer.num_processes={self.num_processes} must be > 0")
        self._validate_launch()

    def _validate_launch(self) -> None:
        """The launch keys alone; what a launcher needs of the machine and the run is checked before launching
        (`launched.check_launcher`), so a finished run's config still loads on another machine."""
        launcher = self.launcher
        if not (launcher is None or launcher in LAUNCHERS or launcher.endswith((".yaml", ".yml", ".json"))):
            hint = did_you_mean(launcher, LAUNCHERS, "trainer.launcher={}")
            raise UserError(f"trainer.launcher={launcher!r} is not valid; {hint}choose one of: {', '.join(LAUNCHERS)} "
                            "(or the path of an accelerate config file, .yaml)")
        _require(launcher is None or self.num_processes > 1,
                 f"trainer.launcher={launcher} starts several processes; set trainer.num_processes=N (one per GPU, "
                 "counted over all machines)")
        _require(self.num_machines > 0, f"trainer.num_machines={self.num_machines} must be > 0")
        _require(0 <= self.machine_rank < self.num_machines,
                 f"trainer.machine_rank={self.machine_rank} must be in 0..{self.num_machines - 1} "
                 f"(trainer.num_machines={self.num_machines})")
        _require(self.num_processes % self.num_machines == 0,
                 f"trainer.num_processes={self.num_processes} counts the processes of all "
                 f"{self.num_machines} machines, so it must be a multiple of trainer.num_machines")
        _require(self.num_machines == 1 or self.main_process_ip is not None,
                 f"trainer.num_machines={self.num_machines} needs trainer.main_process_ip=ADDRESS (machine 0's "
                 "address, the same on every machine)")
        _require(self.main_process_port is None or 0 < self.main_process_port < 65536,
                 f"trainer.main_process_port={self.main_process_port} must be a port number (1..65535) or null")


@dataclass
class EvalConfig:
    """`lora eval`: how much to evaluate and how to generate the replies it scores (greedy)."""

    max_samples: int | None = None  # N examples of the eval split, a fixed random subset (data.sample); null = all
    batch_size: int = 16
    max_new_tokens: int = 64
    show_samples: int = 5  # sample generations printed and kept in eval.json
    # exact_match datasets: generate (free greedy), constrained (greedy restricted to the label set, a prefix
    # trie over the labels' tokens), score (every label ranked by its log-likelihood given the prompt).
    label_mode: str = "generate"

    def validate(self) -> None:
        _require_choice(self.label_mode, "eval.label_mode", LABEL_MODES)
        _require(self.max_samples is None or self.max_samples > 0, f"eval.max_samples={self.max_samples} must be > 0")
        _require(self.batch_size > 0, f"eval.batch_size={self.batch_size} must be > 0")
        _require(self.max_new_tokens > 0, f"eval.max_new_tokens={self.max_new_tokens} must be > 0")
        _require(self.show_samples >= 0, f"eval.show_samples={self.show_samples} must be >= 0")


@dataclass
class GenerateConfig:
    """`lora generate`: sampling settings and whether the adapter is on."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    adapter: bool = True  # false: the base model alone, to compare
    label_mode: str = "generate"  # generate | constrained | score: for label datasets, as eval.label_mode

    def validate(self) -> None:
        _require(self.max_new_tokens > 0, f"generate.max_new_tokens={self.max_new_tokens} must be > 0")
        _require(self.temperature >= 0, f"generate.temperature={self.temperature} must be >= 0")
        _require(0 < self.top_p <= 1, f"generate.top_p={self.top_p} must be in (0, 1]")
        _require_choice(self.label_mode, "generate.label_mode", LABEL_MODES)


@dataclass
class MergeConfig:
    """`lora merge`: the saved weights' dtype and the parity check that must pass before anything is kept."""

    dtype: str = "float32"
    # Max abs logit difference, merged vs base + adapter (fp32), as a fraction of the largest |logit|: fp32's
    # rounding grows with the logits' scale (2.3e-6 of it on the embedded model); a merge 1% off moved them by 1e-2
    # of it (tests/test_eval_merge_generate.py).
    tolerance: float = 1e-4
    probes: int = 4  # eval examples used as probe inputs
    overwrite: bool = False
    max_shard_size: str = "2GB"
    # ScaLoRA runs: also export a stock peft LoRA of this rank (truncated SVD of each module's total update).
    export_rank: int | None = None

    def validate(self) -> None:
        _require_choice(self.dtype, "merge.dtype", DTYPES)
        _require(self.tolerance > 0, f"merge.tolerance={self.tolerance} must be > 0")
        _require(self.probes > 0, f"merge.probes={self.probes} must be > 0")
        # What transformers' save_pretrained parses (utils.hub.convert_file_size_to_int): digits, then a unit.
        _require(re.fullmatch(r"\d+(gib|mib|kib|gb|mb|kb)", str(self.max_shard_size), re.IGNORECASE) is not None,
                 f"merge.max_shard_size={self.max_shard_size!r} must be a whole number and a unit, e.g. 2GB, 500MB "
                 "or 1GiB")
        _require(self.export_rank is None or self.export_rank > 0,
                 f"merge.export_rank={self.export_rank} must be > 0 (or null)")


@dataclass
class RunConfig:
    """One `lora train` run: the four groups plus run-level switches."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    # Continue an interrupted run: `auto` (the newest checkpoint of hydra.run.dir) or a checkpoint folder.
    resume: str | None = None
    debug: bool = False  # show Python tracebacks for user errors

    def validate(self) -> RunConfig:
        for name in ("model", "dataset", "adapter", "trainer", "eval", "generate", "merge"):
            _require_finite(getattr(self, name), f"{name}.")
            getattr(self, name).validate()
        plain_lora = self.adapter.name == "lora" and self.adapter.quantize is None and not self.adapter.use_dora
        _require(not self.trainer.compile or plain_lora,
                 f"trainer.compile=true is supported for plain LoRA (adapter=lora, no adapter.quantize, no "
                 f"adapter.use_dora), not for adapter={self.adapter.name} adapter.quantize={self.adapter.quantize} "
                 f"adapter.use_dora={self.adapter.use_dora}; set trainer.compile=false")
        return self


def register_schemas() -> None:
    """Put the schema under the primary config (`train.yaml` lists `run_schema` first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def register_recipes(recipes_dir) -> None:
    """Recipes live in their own folder but act as the `recipe` config group, applied at global scope."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for path in sorted(recipes_dir.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def to_run_config(cfg) -> RunConfig:
    """Turn Hydra's composed DictConfig into typed objects, running every value check."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lora_cli.overrides import one_line

    try:
        missing = sorted(OmegaConf.missing_keys(cfg))  # resolves interpolations: a bad `${...}` fails here
        if missing:
            raise UserError(f"{missing[0]} is not set; add {missing[0]}=VALUE to the command")
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise UserError(f"invalid config: {one_line(exc)}") from None
    return run.validate()


def with_absolute_paths(run: RunConfig) -> RunConfig:
    """The run with its local paths (a model folder, a data file or folder, a launcher file) made absolute, as the
    run dir's config.yaml keeps them: `lora eval|merge|generate run=...` and resume read it from wherever they
    are started. Hub ids, shipped names and `builtin://` data stay as given: only what exists here is a path."""
    from dataclasses import replace
    from pathlib import Path

    def absolute(value: str | None) -> str | None:
        local = Path(value).expanduser() if value and "://" not in value else None
        return str(local.resolve()) if local is not None and local.exists() else value

    model = replace(run.model, name_or_path=absolute(run.model.name_or_path)) \
        if run.model.source == "pretrained" else run.model
    launcher = run.trainer.launcher if run.trainer.launcher in LAUNCHERS else absolute(run.trainer.launcher)
    return replace(run, model=model, dataset=replace(run.dataset, path=absolute(run.dataset.path)),
                   trainer=replace(run.trainer, launcher=launcher))


def compose(overrides: list[str]) -> RunConfig:
    """The typed RunConfig that `lora train OVERRIDES` would run, composed in-process (for Python callers:
    tests, benchmarks, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lora_cli.paths import shipped_dir

    register_schemas()
    register_recipes(shipped_dir("recipes"))
    with initialize_config_dir(str(shipped_dir("configs")), version_base="1.3"):
        return to_run_config(hydra_compose("train", overrides=overrides))
