"""Peak memory and time of merging two LoRA adapters: `stream_merge` versus peft's load-merge-save path.

Builds a synthetic Llama checkpoint (random weights, several safetensors shards, at least 3 GiB with the
defaults) and two random rank-16 adapters in peft's on-disk layout under a temporary folder, then runs each merge
in its own subprocess, which prints its peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`) and wall time.
Linux carries a process's high-water mark over into the programs it starts (ru_maxrss survives fork and exec), so
the checkpoint is also built in a subprocess and this launcher never imports torch: its own small peak, printed
at the end, is the floor under the children's figures (each child also reports its VmHWM, which exec resets).
The defaults fit a machine with 24 GiB of memory and about 16 GiB of free disk.

    python benchmarks/convert_memory.py            # defaults: hidden 2048, 24 layers, float32 (~4.4 GiB)
    python benchmarks/convert_memory.py --layers 4 # a quick run

The host line (benchmarks/host.py, measured in a subprocess too) is printed first and stored with --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

GIB = 2**30
MEMORY_TARGET = 1.5  # the bound: peak RSS over (largest base shard + adapters)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (`VmRSS`: now, `VmHWM`: peak of this program)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
    )


def _tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a LlamaForCausalLM's weights, from a model built on the meta device (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _report(start: float, baseline: int) -> None:
    """Print a merge child's figures as the JSON line the launcher reads."""
    figures = {
        "seconds": time.perf_counter() - start,
        "peak_rss": _peak_rss_bytes(),
        "hwm": _status_bytes("VmHWM"),
        "baseline": baseline,
    }
    print(json.dumps(figures))


def build_base(folder: Path, args: argparse.Namespace) -> dict:
    """Write a random LlamaForCausalLM checkpoint as shards of about `args.base_shard_gib`; return its sizes."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from llama_encoder.atomic import atomic_directory

    config = _llama_config(args)
    dtype = getattr(torch, args.dtype)
    shapes = _tensor_shapes(config)
    limit = int(args.base_shard_gib * GIB)
    generator = torch.Generator().manual_seed(0)
    with atomic_directory(folder) as tmp:
        config.save_pretrained(tmp)
        groups: list[list[str]] = [[]]
        sizes = [0]
        for name, shape in shapes.items():  # plan the shards, then fill them one at a time
            nbytes = math.prod(shape) * dtype.itemsize
            if groups[-1] and sizes[-1] + nbytes > limit:
                groups.append([])
                sizes.append(0)
            groups[-1].append(name)
            sizes[-1] += nbytes
        weight_map = {}
        for number, names in enumerate(tqdm(groups, desc="Random base", unit="shard"), start=1):
            file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            shard = {name: (torch.randn(shapes[name], generator=generator) * 0.02).to(dtype) for name in names}
            save_file(shard, tmp / file, metadata={"format": "pt"})
            del shard
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"total_bytes": sum(sizes), "largest_shard_bytes": max(sizes), "num_shards": len(groups)}


def build_adapter(folder: Path, args: argparse.Namespace, seed: int) -> int:
    """Write a random rank-`args.rank` LoRA adapter on every linear layer in peft's layout; return its bytes."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from llama_encoder.atomic import atomic_directory

    shapes = _tensor_shapes(_llama_config(args))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in ((n, s) for n, s in shapes.items() if n.endswith("proj.weight")):
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(args.rank, in_features, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, args.rank, generator=generator)
    for key in tensors:
        tensors[key] = (tensors[key] * 0.01).to(getattr(torch, args.dtype))
    with atomic_directory(folder) as tmp:
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGET_MODULES).save_pretrained(tmp)
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return (folder / "adapter_model.safetensors").stat().st_size


def child_stream(work: Path, out_shard_bytes: int) -> None:
    import torch  # noqa: F401  (imported before the RSS baseline, like the peft child)

    from llama_encoder.atomic import atomic_directory
    from llama_encoder.weights.lora import read_adapter
    from llama_encoder.weights.merge import stream_merge

    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    adapters = [read_adapter(work / "adapter1"), read_adapter(work / "adapter2")]
    with atomic_directory(work / "out-stream") as tmp:
        stream_merge(work / "base", adapters, tmp, shard_size_bytes=out_shard_bytes)
    _report(start, baseline)


def child_peft(work: Path, out_shard_bytes: int, dtype_name: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llama_encoder.atomic import atomic_directory

    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(work / "base", dtype=getattr(torch, dtype_name))
    model = PeftModel.from_pretrained(model, work / "adapter1").merge_and_unload()
    model = PeftModel.from_pretrained(model, work / "adapter2").merge_and_unload()
    with atomic_directory(work / "out-peft") as tmp:
        model.save_pretrained(tmp, max_shard_size=out_shard_bytes)
    _report(start, baseline)


def child_build(work: Path, args: argparse.Namespace) -> None:
    """Check the free disk, then write the base and both adapters into `work`; print their sizes as JSON."""
    element = 4 if args.dtype == "float32" else 2
    expected = element * sum(math.prod(shape) for shape in _tensor_shapes(_llama_config(args)).values())
    needed = int(expected * (2 if args.skip_peft else 3) * 1.05)  # the base and each merged copy
    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(
            f"{work} has {free / GIB:.1f} GiB free but the benchmark needs about {needed / GIB:.1f} GiB "
            "(the base and each merged copy); pass --workdir on a larger disk or fewer --layers."
        )
    sizes = build_base(work / "base", args)
    sizes["adapter_bytes"] = [build_adapter(work / f"adapter{n}", args, seed=n) for n in (1, 2)]
    print(json.dumps(sizes))


def _run_child(mode: str, work: Path, args: argparse.Namespace) -> dict:
    """Run this script with `--child mode` and the same options; return the JSON its last output line holds."""
    command = [sys.executable, __file__, "--child", mode, "--workdir", str(work)]
    for option in ("hidden_size", "intermediate_size", "layers", "heads", "kv_heads", "vocab_size", "dtype", "rank",
                   "base_shard_gib", "out_shard_gib"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    command += ["--skip-peft"] if args.skip_peft else []
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"The {mode} child failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = time.perf_counter() - started
    return figures


def _max_abs_difference(work: Path, names: list[str]) -> float:
    """Largest difference between the two merged outputs over a few tensors (a sanity check of the numbers)."""
    from safetensors import safe_open

    from llama_encoder.weights.names import normalize_base_key
    from llama_encoder.weights.shards import resolve_base_files

    def locate(folder: Path) -> dict[str, Path]:
        found = {}
        for file in resolve_base_files(folder):
            with safe_open(file, "pt") as handle:
                found.update(dict.fromkeys(handle.keys(), file))
        return found

    stream, peft_files = locate(work / "out-stream"), locate(work / "out-peft")
    worst = 0.0
    for name in names:
        peft_name = next(key for key in peft_files if normalize_base_key(key) == name)
        with safe_open(stream[name], "pt") as left, safe_open(peft_files[peft_name], "pt") as right:
            difference = (left.get_tensor(name).float() - right.get_tensor(peft_name).float()).abs().max()
        worst = max(worst, float(difference))
    return worst


def _met(met: bool) -> str:
    return "met" if met else "MISSED"


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("synthetic checkpoint (LlamaForCausalLM with random weights)")
    model.add_argument("--hidden-size", type=int, default=2048, help="hidden size (default: %(default)s)")
    model.add_argument(
        "--intermediate-size", type=int, default=5632, help="MLP (gate/up/down) width (default: %(default)s)"
    )
    model.add_argument(
        "--layers", type=int, default=24,
        help="decoder layers, the main knob for the checkpoint size; the default gives ~4.4 GiB in float32 "
        "(default: %(default)s)",
    )
    model.add_argument("--heads", type=int, default=32, help="attention heads (default: %(default)s)")
    model.add_argument(
        "--kv-heads", type=int, default=4,
        help="key/value heads; fewer than --heads shrinks k_proj and v_proj (default: %(default)s)",
    )
    model.add_argument(
        "--vocab-size", type=int, default=32000,
        help="vocabulary size: rows of embed_tokens and lm_head (lm_head is dropped by the merge) "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="dtype of the base weights and of both adapters; both merges keep it (default: %(default)s)",
    )
    model.add_argument(
        "--rank", type=int, default=16,
        help="LoRA rank r of both adapters, which adapt every q/k/v/o/gate/up/down projection with alpha = 2r "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--base-shard-gib", type=float, default=1.0,
        help="largest size of one base shard in GiB; the memory target is relative to the largest shard "
        "(default: %(default)s)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--out-shard-gib", type=float, default=1.0,
        help="largest size of one output shard in GiB, for both merges (default: %(default)s)",
    )
    run.add_argument(
        "--workdir", type=Path,
        help="folder for the base, the adapters and the merged outputs; needs about three times the checkpoint "
        "size free (two with --skip-peft) (default: a new folder in /tmp)",
    )
    run.add_argument(
        "--skip-peft", action="store_true",
        help="measure stream_merge only: no peft run, no comparison and no time target",
    )
    run.add_argument(
        "--json", type=Path, metavar="FILE",
        help="also write the figures and the host (CPU, ISA, threads, versions) to this JSON file",
    )
    run.add_argument(
        "--keep", action="store_true",
        help="keep the work folder (base, adapters, outputs) afterwards; by default it is removed",
    )
    run.add_argument(
        "--child", choices=["build", "stream", "peft"],
        help="internal, one step in its own process: 'build' writes the checkpoint and adapters into --workdir, "
        "'stream' and 'peft' run one merge of them; each prints its figures as JSON. The benchmark starts itself "
        "with this option so that each merge has a peak RSS of its own",
    )
    args = parser.parse_args(argv)
    if args.child and args.workdir is None:
        parser.error("--child needs --workdir, the folder that holds (or receives) the base and the adapters")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    out_shard_bytes = int(args.out_shard_gib * GIB)
    if args.child == "build":
        child_build(args.workdir, args)
        return
    if args.child == "stream":
        child_stream(args.workdir, out_shard_bytes)
        return
    if args.child == "peft":
        child_peft(args.workdir, out_shard_bytes, args.dtype)
        return
    logging.basicConfig(level=logging.WARNING)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="convert-memory-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        host_run = subprocess.run([sys.executable, str(Path(__file__).with_name("host.py"))], capture_output=True,
                                  text=True, check=True, stdin=subprocess.DEVNULL)
        host = json.loads(host_run.stdout)
        print(host_run.stderr.strip())  # the host line
        print(f"Work folder: {work}")
        base = _run_child("build", work, args)
        adapter_bytes = base["adapter_bytes"]
        print(
            f"Checkpoint: {base['total_bytes'] / GIB:.2f} GiB in {base['num_shards']} shards, largest shard "
            f"{base['largest_shard_bytes'] / GIB:.2f} GiB; adapters {adapter_bytes[0] / 2**20:.1f} MiB + "
            f"{adapter_bytes[1] / 2**20:.1f} MiB (rank {args.rank}, {args.dtype}); output shards "
            f"{args.out_shard_gib:g} GiB; {os.cpu_count()} CPUs"
        )
        budget = base["largest_shard_bytes"] + sum(adapter_bytes)
        results = {"stream_merge": _run_child("stream", work, args)}
        if not args.skip_peft:
            results["peft"] = _run_child("peft", work, args)
        launcher_peak = _peak_rss_bytes()  # before the check below imports torch here
        for label, figures in results.items():
            print(
                f"{label:>12}: peak RSS {figures['peak_rss'] / GIB:.2f} GiB (VmHWM {figures['hwm'] / GIB:.2f}; "
                f"after imports {figures['baseline'] / GIB:.2f} GiB), merge {figures['seconds']:.1f} s, process "
                f"{figures['process_seconds']:.1f} s; peak / (largest shard + adapters) = "
                f"{figures['peak_rss'] / budget:.2f} ({(figures['peak_rss'] - figures['baseline']) / budget:.2f} "
                f"above imports), peak / checkpoint = "
                f"{figures['peak_rss'] / base['total_bytes']:.2f}"
            )
        stream = results["stream_merge"]
        memory_met = stream["peak_rss"] <= MEMORY_TARGET * budget
        verdict = f"Target: peak RSS <= {MEMORY_TARGET:g} x (largest shard + adapters) = " \
            f"{MEMORY_TARGET * budget / GIB:.2f} GiB: {stream['peak_rss'] / GIB:.2f} GiB, {_met(memory_met)}"
        if "peft" in results:
            peft = results["peft"]
            print(
                f"stream_merge / peft: peak RSS {stream['peak_rss'] / peft['peak_rss']:.2f}, "
                f"merge time {stream['seconds'] / peft['seconds']:.2f}"
            )
            verdict += f"; merge time <= peft's: {stream['seconds']:.1f} s vs {peft['seconds']:.1f} s, " \
                f"{_met(stream['seconds'] <= peft['seconds'])}"
            checked = ["layers.0.self_attn.q_proj.weight", f"layers.{args.layers - 1}.mlp.down_proj.weight"]
            print(f"Max |stream - peft| over {', '.join(checked)}: {_max_abs_difference(work, checked):.3g}")
        print(verdict)
        print(f"Launcher peak RSS {launcher_peak / GIB:.2f} GiB (the floor under the children's getrusage figures)")
        if args.json:
            args.json.write_text(json.dumps({"benchmark": "convert_memory", "options": vars(args) | {
                "workdir": str(work), "json": str(args.json)}, "checkpoint": base, "results": results,
                "launcher_peak_rss": launcher_peak, "verdict": verdict, "host": host}, indent=2, default=str) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
