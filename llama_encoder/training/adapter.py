"""What a run writes of its model: the adapter folder `convert --adapter` reads, and the same files in every
checkpoint the trainers save, so a checkpoint is a usable adapter and a resumed run reloads only what it trains.

Layout (unchanged from earlier versions): peft's `adapter_config.json` + `adapter_model.safetensors`; for contrastive
objectives `pooling_config.json` (the pooling trained with) and, with latent attention, `pooling_head.safetensors`;
`training_args.json` (the resolved arguments, with `prompt_instructions`: each task prompt trained, by name, whose
template is `instruction_template`) and `training_summary.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import InputError
from ..weights.lora import POOLING_CONFIG_NAME, POOLING_HEAD_NAME, TRAINING_ARGS_NAME
from .model import TrainingModel

ARGS_NAME = TRAINING_ARGS_NAME
SUMMARY_NAME = "training_summary.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def write_adapter_files(model: TrainingModel, folder: str | os.PathLike, *, contrastive: bool | None = None,
                        matryoshka_dims: list[int] | None = None) -> None:
    """Write the LoRA adapter (peft's files) and, for a contrastive run, the pooling config (with the Matryoshka
    dimensions trained, which `convert` records for vLLM and the card) and the latent head."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's placeholder card; the checkpoint gets a real one
    contrastive = model.lm_head is None if contrastive is None else contrastive
    if contrastive:
        config = model.encoder.config
        pooling = {"pooling_mode": config.pooling_mode}
        if config.pooling_mode == "latent_attention":
            head = {f"latent_attention.{k}": v.detach().float().cpu().contiguous()
                    for k, v in model.encoder.latent_attention.state_dict().items()}
            save_file(head, folder / POOLING_HEAD_NAME)
            pooling.update(config.latent_attention_settings())
        if matryoshka_dims:
            pooling["matryoshka_dimensions"] = sorted(set(matryoshka_dims))
        (folder / POOLING_CONFIG_NAME).write_text(json.dumps(pooling, indent=2) + "\n")


def load_trained_tensors(model: TrainingModel, folder: str | os.PathLike) -> None:
    """Copy the trained tensors of an adapter folder (a checkpoint) into `model` (the run resumed)."""
    folder = Path(folder)
    trained = dict(model.trainable_parameters())
    lora = {name: p for name, p in trained.items() if "lora_" in name}
    saved = load_file(folder / ADAPTER_WEIGHTS_NAME)
    # peft saves `base_model.model.<path>.lora_A.weight` for the parameter `...lora_A.default.weight`
    by_saved_name = {name.replace(".default.", ".").removeprefix("base_model.model."): p for name, p in lora.items()}
    saved = {name.removeprefix("base_model.model."): value for name, value in saved.items()}
    head = {}
    if (folder / POOLING_HEAD_NAME).is_file():
        head = load_file(folder / POOLING_HEAD_NAME)
    expected_head = {name for name in trained if "lora_" not in name}
    found_head = {f"base_model.model.{name}" for name in head}
    if set(saved) != set(by_saved_name) or {n.removeprefix("base_model.model.") for n in found_head} != {
            n.removeprefix("base_model.model.") for n in expected_head}:
        raise InputError(f"Checkpoint {folder} holds other trained tensors than this run trains; resume with the "
                         "same arguments as the interrupted run.")
    head_params = {name.removeprefix("base_model.model."): p for name, p in trained.items() if "lora_" not in name}
    with torch.no_grad():
        for name, value in saved.items():
            by_saved_name[name].copy_(value)
        for name, value in head.items():
            head_params[name].copy_(value)


__all__ = ["ADAPTER_WEIGHTS_NAME", "ARGS_NAME", "SUMMARY_NAME", "load_trained_tensors", "write_adapter_files"]
