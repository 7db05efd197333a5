"""Write a weight-only quantized copy of a converted checkpoint (quant.py: int8 per output channel, int4 per group).

    python scripts/quantize.py --mode int8                   # the default model
    python scripts/quantize.py --checkpoint_path checkpoints/<name> --mode int4 --groupsize 32

The copy is a new directory beside the original, <dir>-int8 or <dir>-int4-g<groupsize> (--out to choose):
config.json with a "quantization" entry, so generate.py, eval.py and bench.py load it with no flag;
model.safetensors holding the codes and scales (int4: two codes a byte, packed for the device at load);
and relative symlinks to everything else of the original (tokenizer, head scores, source.gguf).
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate as gen  # noqa: E402
import quant  # noqa: E402


def out_dir(checkpoint: Path, spec: dict) -> Path:
    suffix = spec["mode"] + (f"-g{spec['groupsize']}" if spec["mode"] == "int4" else "")
    return checkpoint.with_name(f"{checkpoint.name}-{suffix}")


def write(checkpoint: Path, out: Path, spec: dict) -> int:
    """Quantize the float checkpoint into `out`; returns the bytes of the new model.safetensors."""
    from safetensors.torch import save_file
    model, _ = gen.load(checkpoint, "cpu", torch.float32)  # one clear line if missing or corrupt
    if model.args.quantization:
        raise gen.UserError(f"{checkpoint} is already quantized ({model.args.quantization})")
    try:
        quant.quantize_model(model, spec, pack=False)  # the portable layout
    except ValueError as e:
        raise gen.UserError(str(e)) from None
    out.mkdir(parents=True)
    for entry in sorted(checkpoint.iterdir()):
        if entry.name not in ("config.json", "model.safetensors"):
            (out / entry.name).symlink_to(os.path.relpath(entry.resolve(), out))
    config = json.loads((checkpoint / "config.json").read_text()) | {"quantization": model.args.quantization}
    save_file(quant.state_to_save(model), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # last: a half-written copy has none
    return (out / "model.safetensors").stat().st_size


def main(argv=None):
    p = gen.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", default=gen.DEFAULT_CHECKPOINT)
    p.add_argument("--mode", required=True, choices=quant.MODES)
    p.add_argument("--groupsize", type=int, default=32, choices=quant.GROUPSIZES,
                   help="int4: input channels per scale and zero (default 32: it divides every width of the "
                        "default model, whose GGUF weights are Q4_1 in groups of 32)")
    p.add_argument("--out", help="output directory (default: beside the checkpoint, <dir>-int8 or <dir>-int4-g<groupsize>)")
    a = p.parse_args(argv)
    checkpoint = Path(a.checkpoint_path)
    spec = {"mode": a.mode} | ({"groupsize": a.groupsize} if a.mode == "int4" else {})
    out = Path(a.out) if a.out else out_dir(checkpoint, spec)
    if out.exists():
        raise gen.UserError(f"{out} exists; remove it or give --out")
    size = write(checkpoint, out, spec)
    before = (checkpoint / "model.safetensors").stat().st_size
    print(f"wrote {out} ({a.mode}{f', groupsize {a.groupsize}' if a.mode == 'int4' else ''}): "
          f"model.safetensors {size / 1e6:.0f} MB (float32 original {before / 1e6:.0f} MB)")


if __name__ == "__main__":
    gen.cli(main)
