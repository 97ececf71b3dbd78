"""LoRA vs QLoRA memory on the embedded SmolLM2-135M: a few real training steps of each, in separate processes.

    python benchmarks/memory.py [--steps 3]          (or: make bench-memory)

Prints, per contender, the peak RSS of the whole `lora train` process and the bytes of the base model's
weights as loaded (4-bit packed weights + their quantisation state for QLoRA), and the QLoRA / LoRA ratios.
Both numbers come from the same machine in the same run; nothing is hard-coded. Writes
benchmarks/results/<date>-<machine>-memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import add_result_options, machine_name, result_file  # noqa: E402

# Both in fp32: trainer.precision=auto would take bf16 autocast for LoRA alone where the CPU has it.
CONTENDERS = {"lora": ["adapter=lora", "trainer.precision=fp32"], "qlora": ["adapter=qlora", "trainer.precision=fp32"]}
# Measured inside the training process's twin: the same loading code, the weights' storage bytes.
WEIGHT_BYTES = """
from lora_cli.config import compose
from lora_cli.models import load_model, resolve_checkpoint
cfg = compose(["recipe=banking_support", *{args!r}])
checkpoint = resolve_checkpoint(cfg.model)
model = load_model(checkpoint, cfg.model, None, cfg.adapter.quantize, cfg.adapter.double_quant)
seen, total = set(), 0
for tensor in [*model.parameters(), *model.buffers()]:
    if tensor.data_ptr() not in seen:
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
for module in model.modules():  # bitsandbytes keeps absmax and the double-quantisation state beside the weight
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        if state.state2 is not None:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
print(total)
"""


def train_peak_rss(args: list[str], steps: int, run_dir: Path) -> int:
    command = [str(Path(sys.executable).with_name("lora")), "train", "recipe=banking_support", *args,
               f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "dataset.max_eval_examples=16",
               f"hydra.run.dir={run_dir}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "run.json").read_text())["result"]["peak_memory"]["RSS"]


def weight_bytes(args: list[str]) -> int:
    code = WEIGHT_BYTES.format(args=args)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    add_result_options(parser)
    options = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in CONTENDERS.items():
            rows[name] = {"peak_rss": train_peak_rss(args, options.steps, Path(tmp) / name),
                          "weight_bytes": weight_bytes(args)}
    mib = 2**20
    print(f"{'':8} {'peak RSS':>12} {'base weights':>14}   ({options.steps} training steps, embedded SmolLM2-135M)")
    for name, row in rows.items():
        print(f"{name:8} {row['peak_rss'] / mib:9.0f} MiB {row['weight_bytes'] / mib:11.1f} MiB")
    ratios = {key: rows["qlora"][key] / rows["lora"][key] for key in ("peak_rss", "weight_bytes")}
    print(f"{'qlora/lora':8} {ratios['peak_rss']:12.2f} {ratios['weight_bytes']:14.2f}")
    result = {"date": date.today().isoformat(), "machine": machine_name(options), "node": platform.node(),
              "processor": platform.processor(),
              "steps": options.steps, "contenders": rows, "ratios": ratios}
    path = result_file(options, "json", "memory")
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
