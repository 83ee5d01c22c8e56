"""The encode API: texts or (instruction, text) pairs in, float32 embeddings out, in input order.

Inputs are tokenised once, sorted by length (longest first) and cut into batches whose padded size stays within a
token budget, so almost no arithmetic is spent on padding; each batch runs under `torch.inference_mode`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.utils import cached_file

from ..configuration_llama_encoder import LlamaEncoderConfig, is_native_bidirectional
from ..dtypes import DTYPE_CHOICES, describe_compute_dtype, resolve_compute_dtype
from ..errors import InputError, MissingInputError
from ..modeling_llama_encoder import LlamaEncoderModel, pad_for_encoder, tokenize_for_encoder
from ..prompts import choose_prompt

logger = logging.getLogger(__name__)

# A transformers tokenizer keeps its truncation settings on the shared Rust tokenizer and changes them per call,
# so threads tokenising at once could cut each other's inputs at the wrong length: one at a time.
_TOKENIZE_LOCK = threading.Lock()


def _checkpoint_file(path: str, name: str) -> Path | None:
    """A file of a checkpoint folder or Hub repo (downloaded into the cache if need be); None when it has none."""
    resolved = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    return Path(resolved) if resolved else None


def length_sorted_batches(
    lengths: Sequence[int], *, batch_tokens: int, max_batch_size: int, max_padding: float = 0.1
) -> list[list[int]]:
    """Indices grouped into batches, longest inputs first. A batch's rows x longest row stays within
    `batch_tokens` (a single longer input gets a batch of its own), it has at most `max_batch_size` rows, and no
    row is padded by more than `max_padding` of the batch's longest row: padding a 16-token text to 1024 costs more
    than a forward call of its own."""
    if batch_tokens < 1 or max_batch_size < 1 or not 0 <= max_padding < 1:
        raise InputError("batch_tokens and max_batch_size must be at least 1, and max_padding in [0, 1).")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for index in order:
        if current:
            longest = lengths[current[0]]
            if (
                (len(current) + 1) * longest > batch_tokens
                or len(current) == max_batch_size
                or lengths[index] < (1 - max_padding) * longest
            ):
                batches.append(current)
                current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def is_encoder_config(saved: dict) -> bool:
    """Whether a checkpoint's config.json (as a dict) is a llama_encoder checkpoint's: our remote-code config, or a
    native one (a stock bidirectional config of its family that carries the encoder's settings)."""
    native = is_native_bidirectional(saved) and "pooling_mode" in saved
    return saved.get("model_type") == LlamaEncoderConfig.model_type or native


class Encoder:
    """An encoder checkpoint ready to embed: `Encoder.from_pretrained(path).encode(texts)`.

    `prompts` (from the checkpoint's `config_sentence_transformers.json`: `query`, `document` and the task prompts
    its adapters were trained with, e.g. `sts`) can be used by name (`prompt_name=`);
    `max_seq_length` (from `sentence_bert_config.json`, else the model's positions) is where inputs are cut.
    """

    def __init__(
        self,
        model: LlamaEncoderModel,
        tokenizer,
        *,
        prompts: dict[str, str] | None = None,
        max_seq_length: int | None = None,
        name_or_path: str | None = None,
    ):
        if not isinstance(model.config, LlamaEncoderConfig):
            raise TypeError(f"Encoder needs a LlamaEncoderModel; got {type(model).__name__}.")
        if tokenizer.pad_token_id is None:
            raise InputError("The tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token).")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompts = dict(prompts or {})
        self.max_seq_length = max_seq_length or model.config.max_position_embeddings
        self.name_or_path = name_or_path or getattr(model.config, "_name_or_path", None) or "in-memory model"
        self.dtype_choice: str | None = None  # from_pretrained: the compute dtype chosen and why

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        allow_slow_dtype: bool = False,
    ) -> Encoder:
        """Load a checkpoint written by `llama-encoder convert` (a folder or a Hub repo id) with the package's own
        model class, to compute in `dtype`: auto (bfloat16 on a CUDA device that has it and on a CPU with native
        bfloat16 instructions, float32 elsewhere; see `llama_encoder.dtypes`), float32, bfloat16 or float16. A
        half-precision dtype on a CPU that only emulates it is refused before anything is loaded (SlowDtypeError,
        about 30x slower) unless `allow_slow_dtype`. The choice is logged and kept in `dtype_choice`."""
        path = str(path)
        if dtype not in DTYPE_CHOICES:
            raise InputError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}.")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        compute_dtype = resolve_compute_dtype(dtype, device, allow_slow_dtype=allow_slow_dtype)
        config_file = _checkpoint_file(path, "config.json")
        if config_file is None:
            raise MissingInputError(
                f"{path} has no config.json; give a folder (or Hub repo) written by `llama-encoder convert`."
            )
        saved = json.loads(config_file.read_text())
        if not is_encoder_config(saved):
            raise InputError(
                f"{path} holds a {saved.get('model_type')!r} model, not a llama_encoder checkpoint; convert it first "
                "with `llama-encoder convert`."
            )
        dtype_choice = describe_compute_dtype(compute_dtype, device)
        logger.info("Encoding in %s (--dtype %s)", dtype_choice, dtype)
        model = LlamaEncoderModel.from_pretrained(
            path, dtype=compute_dtype, attn_implementation=attn_implementation
        ).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        prompts, max_seq_length = {}, None
        st_config = _checkpoint_file(path, "config_sentence_transformers.json")
        if st_config is not None:
            prompts = json.loads(st_config.read_text()).get("prompts", {})
        bert_config = _checkpoint_file(path, "sentence_bert_config.json")
        if bert_config is not None:
            max_seq_length = json.loads(bert_config.read_text()).get("max_seq_length")
        encoder = cls(model, tokenizer, prompts=prompts, max_seq_length=max_seq_length, name_or_path=path)
        encoder.dtype_choice = dtype_choice
        return encoder

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def dimension(self) -> int:
        """The embedding size (the model's hidden size)."""
        return self.model.config.hidden_size

    def instruction_prompt(self, instruction: str) -> str:
        """The prompt an instruction becomes: the config's template, e.g. `Instruct: {instruction}\\nQuery: `."""
        return self.model.config.instruction_prompt(instruction)

    def _prompts_for(self, inputs, instruction, prompt, prompt_name) -> tuple[list[str], list[str]]:
        prompt = choose_prompt(self.prompts, self.instruction_prompt, prompt=prompt, prompt_name=prompt_name,
                               instruction=instruction)
        texts, prompts = [], []
        for index, item in enumerate(inputs):
            if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
                texts.append(item[1])
                prompts.append(self.instruction_prompt(item[0]))
            elif isinstance(item, str):
                texts.append(item)
                prompts.append(prompt or "")
            else:
                raise InputError(
                    f"Input {index} is a {type(item).__name__}; give strings or (instruction, text) pairs of strings."
                )
        return texts, prompts

    def encode(
        self,
        inputs: Sequence[str | tuple[str, str]],
        *,
        instruction: str | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
        batch_tokens: int = 16384,
        max_batch_size: int = 512,
        max_padding: float = 0.1,
        normalize: bool | None = None,
        convert_to: str = "numpy",
        show_progress: bool | None = None,
        max_length: int | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Embed `inputs` (strings, or (instruction, text) pairs whose instruction is attended to but not pooled).

        Plain strings get `prompt`, the saved prompt `prompt_name` (e.g. "query"), the template filled with
        `instruction`, or nothing. Returns float32 embeddings `(len(inputs), hidden)` in input order, as numpy or
        a CPU torch tensor (`convert_to="torch"`); L2-normalised when `normalize` (default: the checkpoint's
        setting). Inputs longer than `max_length` (default: the checkpoint's max_seq_length) are cut, with one
        warning that counts them. Batches hold at most `batch_tokens` padded tokens and `max_batch_size` rows, and
        pad no row by more than `max_padding` of the batch's longest.

        A blank text (empty or whitespace only, also as the text of a pair) has nothing to embed: it gets the zero
        vector, as in the checkpoint's own code and `VllmEncoder` (cosine 0 with everything, so it never ranks ahead
        of a real match), without a forward pass, and one warning counts such inputs. A text whose prompt leaves
        it no token within `max_length` is refused before any work.
        """
        if convert_to not in ("numpy", "torch"):
            raise InputError(f"convert_to must be 'numpy' or 'torch'; got {convert_to!r}.")
        if isinstance(inputs, str):
            raise InputError("encode takes a list of texts; wrap a single text in a list.")
        if normalize is False and self.model.config.normalize_embeddings:
            raise InputError("This checkpoint normalises its embeddings (normalize_embeddings in config.json); "
                             "unnormalised ones are not available from it.")
        inputs = list(inputs)
        texts, prompts = self._prompts_for(inputs, instruction, prompt, prompt_name)
        output = torch.zeros(len(texts), self.dimension, dtype=torch.float32)  # blank texts keep their zeros
        if texts:
            self._encode_into(output, texts, prompts, batch_tokens, max_batch_size, max_padding, normalize,
                              show_progress, max_length or self.max_seq_length)
        return output.numpy() if convert_to == "numpy" else output

    def _encode_into(self, output, texts, prompts, batch_tokens, max_batch_size, max_padding, normalize,
                     show_progress, limit):
        config = self.model.config
        with _TOKENIZE_LOCK:
            try:
                rows = tokenize_for_encoder(
                    self.tokenizer, texts, prompts, max_length=limit, append_eos=config.pooling_mode == "eos",
                    padding=False, return_tensors=None,
                )
            except ValueError as exc:  # a prompt that leaves a text no token: refused before any forward pass
                raise InputError(str(exc)) from None
        # Blank texts pool nothing: their rows stay zero, and the others batch as if they were not there.
        kept = [index for index, pooled in enumerate(rows["pool_mask"]) if any(pooled)]
        batches = [[kept[i] for i in batch] for batch in length_sorted_batches(
            [len(rows["input_ids"][index]) for index in kept], batch_tokens=batch_tokens,
            max_batch_size=max_batch_size, max_padding=max_padding,
        )]
        progress = tqdm(total=len(texts), initial=len(texts) - len(kept), desc="Encoding", unit="text",
                        disable=not (show_progress if show_progress is not None else len(batches) > 1))
        device = self.device
        with torch.inference_mode(), progress:
            for batch in batches:
                padded = pad_for_encoder(
                    [rows["input_ids"][i] for i in batch], [rows["pool_mask"][i] for i in batch],
                    pad_token_id=self.tokenizer.pad_token_id, padding_side=self.tokenizer.padding_side,
                )
                embeddings = self.model(**{k: v.to(device) for k, v in padded.items()}).pooler_output.float()
                if normalize and not config.normalize_embeddings:
                    embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
                output[torch.tensor(batch)] = embeddings.cpu()
                progress.update(len(batch))

    def encode_queries(self, texts: Sequence[str], *, instruction: str | None = None, **kwargs) -> np.ndarray:
        """Queries behind `instruction` (via the template), else behind the checkpoint's saved query prompt."""
        if instruction is not None:
            return self.encode(texts, instruction=instruction, **kwargs)
        return self.encode(texts, prompt=self.prompts.get("query", ""), **kwargs)

    def encode_documents(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """Documents behind the checkpoint's saved document prompt (usually none)."""
        return self.encode(texts, prompt=self.prompts.get("document", ""), **kwargs)
