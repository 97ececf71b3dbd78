"""trainer.launcher: the shipped accelerate config files, the launch command built from them, the checks made
before launching, and what the loop does differently when parameters are sharded (FSDP, ZeRO-3). The runs
themselves (2 CPU processes with the ddp file, `accelerate launch` by hand) are in test_multiprocess.py."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_run, lora
from test_cli import assert_one_line_error

from lora_cli import launched
from lora_cli.artifacts import check_adapter_tensors
from lora_cli.config import LAUNCHERS, TrainerConfig
from lora_cli.errors import UserError
from lora_cli.paths import shipped_dir

TINY = ["recipe=banking_support", "model=tiny_llama"]


def accelerate_launch_arguments() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_is_an_accelerate_config_file_it_reads_whole(name):
    """accelerate's own loader refuses unknown top-level keys; the keys under fsdp_config / deepspeed_config
    become `accelerate launch` arguments, and one it has no argument for would be ignored silently."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = shipped_dir("launchers") / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type in (DistributedType.MULTI_GPU, DistributedType.FSDP, DistributedType.DEEPSPEED)
    assert launched.distributed_type(path) == config.distributed_type.value
    arguments = accelerate_launch_arguments()
    assert set(config.fsdp_config) <= arguments
    assert set(config.deepspeed_config) <= arguments
    assert (config.distributed_type == DistributedType.FSDP) == bool(config.fsdp_config)
    if config.distributed_type == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_use_orig_params"]  # the optimizer is built before wrapping
    if config.deepspeed_config.get("zero_stage") == 3:
        assert config.deepspeed_config["zero3_save_16bit_model"]  # what accelerate's get_state_dict gathers with
    assert f"trainer.launcher={name}" in path.read_text()  # each file opens with the command that uses it


def test_the_launcher_names_are_the_shipped_files():
    assert sorted(LAUNCHERS) == sorted(p.stem for p in shipped_dir("launchers").glob("*.yaml"))


def test_a_launcher_file_goes_to_accelerate_launch_instead_of_the_flags():
    args = [*TINY, "trainer.launcher=ddp", "trainer.num_processes=8", "hydra.run.dir=ignored"]
    command = launched.launch_command(args, TrainerConfig(num_processes=8, launcher="ddp"), "runs/x")
    config_file = command[command.index("--config_file") + 1]
    assert config_file == str(shipped_dir("launchers") / "ddp.yaml")
    assert "--multi_gpu" not in command and "--mixed_precision" not in command
    assert command[command.index("--num_processes") + 1] == "8"
    assert command[command.index("lora_cli") - 1:] == ["-m", "lora_cli", "train", *args[:-1], "hydra.run.dir=runs/x"]


def test_without_a_launcher_the_command_is_the_plain_multi_gpu_one():
    command = launched.launch_command(TINY, TrainerConfig(num_processes=2), "runs/x")
    assert "--config_file" not in command and "--machine_rank" not in command
    assert command[3:10] == ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes",
                             "2"]


def test_two_machines_meet_at_machine_zero():
    trainer = TrainerConfig(num_processes=16, launcher="fsdp", num_machines=2, machine_rank=1,
                            main_process_ip="10.0.0.1")
    command = launched.launch_command(TINY, trainer, "/shared/runs/x")
    flags = dict(zip(command[3::2], command[4::2], strict=False))
    assert flags["--num_processes"] == "16" and flags["--num_machines"] == "2"
    assert flags["--machine_rank"] == "1" and flags["--main_process_ip"] == "10.0.0.1"
    assert flags["--main_process_port"] == "29500"  # the same on every machine, unlike a free local port


@pytest.mark.parametrize(("args", "needles"), [
    (["trainer.launcher=nope", "trainer.num_processes=2"], ["trainer.launcher='nope'", "ddp, fsdp, fsdp_qlora"]),
    (["trainer.launcher=ddp"], ["trainer.launcher=ddp", "trainer.num_processes"]),
    (["trainer.launcher=/no/such/accelerate.yaml", "trainer.num_processes=2"], ["no such file"]),
    (["trainer.num_processes=4", "trainer.num_machines=2"], ["trainer.main_process_ip"]),
    (["trainer.num_processes=3", "trainer.num_machines=2", "trainer.main_process_ip=10.0.0.1"],
     ["multiple of trainer.num_machines"]),
])
def test_launch_settings_that_cannot_work_fail_in_one_line_before_a_run_dir_exists(tmp_path, args, needles):
    proc = lora("train", *TINY, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["fsdp", "fsdp_qlora", "deepspeed_zero2", "deepspeed_zero3"])
def test_sharding_launchers_on_a_cpu_only_machine_say_they_need_gpus(tmp_path, name):
    proc = lora("train", *TINY, f"trainer.launcher={name}", "trainer.num_processes=2",
                f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, f"trainer.launcher={name}", "needs CUDA GPUs", "gloo")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["trainer.num_processes=2"], {}, "trainer.num_processes=2 starts 2 processes on this machine"),
    ([], {"LOCAL_WORLD_SIZE": "2"}, "this launch starts 2 processes on this machine"),  # `accelerate launch` by hand
], ids=["num_processes", "launched_by_hand"])
def test_more_processes_than_gpus_is_one_line_not_nccls_traceback(tmp_path, monkeypatch, args, env, needle):
    """Seen on a 1-GPU machine: two processes on one GPU failed inside DDP's set-up, NCCL's 'Duplicate GPU
    detected' traceback from each process."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    proc = lora("train", *TINY, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, needle, "has 1 GPU;", "CUDA_VISIBLE_DEVICES=")
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_launch_by_hand_over_machines_checks_the_processes_on_this_one(monkeypatch):
    """`accelerate launch` by hand on 2 machines of 1 GPU, one process each: the run takes trainer.num_processes=2
    from the launch, and the GPU check counted both on this machine (refused: "starts 2 processes on this
    machine"). It counts what the launch started here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    launched.check_launcher(compose_run([*TINY, "trainer.num_processes=2"]))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="this launch starts 2 processes on this machine"):
        launched.check_launcher(compose_run([*TINY, "trainer.num_processes=2"]))


def test_deepspeed_without_its_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run = compose_run([*TINY, "trainer.launcher=deepspeed_zero3", "trainer.num_processes=2"])
    with pytest.raises(UserError, match="pip install deepspeed"):
        launched.check_launcher(run)


@pytest.mark.parametrize(("kind", "args", "needle"), [
    ("FSDP", ["adapter=slora"], "adapter=slora is not supported under FSDP"),
    ("DEEPSPEED", ["adapter=scalora"], "adapter=scalora is not supported under DEEPSPEED"),
    ("FSDP", ["trainer.save_every=10"], "checkpoints"),
    ("DEEPSPEED", ["trainer.grad_accum=2"], "trainer.grad_accum=2"),
    ("DEEPSPEED", ["trainer.on_nonfinite=skip"], "trainer.on_nonfinite=skip"),
    ("FSDP", ["adapter=qlora"], "model.dtype=bfloat16 and trainer.precision=bf16"),
])
def test_what_the_loop_does_not_do_under_sharding_is_refused(kind, args, needle):
    run = compose_run([*TINY, *args])
    with pytest.raises(UserError, match=needle):
        launched.check_supported(run, kind)
    launched.check_supported(run, "MULTI_GPU")  # DDP does all of it


def test_qlora_under_fsdp_in_bf16_is_accepted():
    run = compose_run([*TINY, "adapter=qlora", "model.dtype=bfloat16", "trainer.precision=bf16"])
    launched.check_supported(run, "FSDP")


@pytest.mark.parametrize(("tensors", "needle"), [
    ({}, "no lora_ tensor among 0"),
    ({"model.layers.0.mlp.weight": torch.ones(2)}, "no lora_ tensor"),
    ({"a.lora_A.weight": torch.ones(4, 2), "a.lora_B.weight": torch.empty(0)}, "1 of 2 tensors have no elements"),
])
def test_an_empty_adapter_is_never_written(tensors, needle):
    with pytest.raises(RuntimeError, match=needle):
        check_adapter_tensors(tensors)


def test_a_whole_adapter_passes_the_check():
    check_adapter_tensors({"a.lora_A.weight": torch.ones(4, 2), "a.lora_B.weight": torch.zeros(2, 4)})


def test_logits_computed_inside_the_forward_give_the_same_loss():
    """Under FSDP / ZeRO-3 the loss takes its logits from the wrapped model's forward (`head=None`) instead of
    running the head outside it on the labelled positions only: the loss and the gradients are the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_cli.data import IGNORE_INDEX
    from lora_cli.train import token_loss_sum

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    input_ids = torch.randint(0, 64, (3, 10))
    labels = input_ids.clone()
    labels[0, :6], labels[1, :3], labels[2, :] = IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX  # row 2: prompt only
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    results = []
    for head in (model.get_output_embeddings(), None):
        model.zero_grad()
        loss = token_loss_sum(model, head, batch)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_a_4bit_base_packed_in_float_keeps_one_dtype():
    """For FSDP / ZeRO-3 the 4-bit weights are packed in model.dtype, and the other base weights stay in it
    (peft's usual fp32 upcast of norms and embeddings would give the shards two dtypes)."""
    from lora_cli.adapters import build
    from lora_cli.models import load_model, resolve_checkpoint

    cfg = compose_run([*TINY, "adapter=qlora", "model.dtype=bfloat16"])
    base = load_model(resolve_checkpoint(cfg.model), cfg.model, None, "nf4", True, quant_storage="bfloat16")
    model = build(cfg.adapter).apply(base)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
