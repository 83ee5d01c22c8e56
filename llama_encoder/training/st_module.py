"""The encoder being trained as a sentence-transformers input module, so `SentenceTransformerTrainer` and its losses
train it as they train any embedding model.

`TrainingEncoder` tokenises `prompt + text` with `tokenize_for_encoder` (the prompt, a task instruction, is attended
to and not pooled: the same tokens and pool mask a converted checkpoint embeds with) and returns the encoder's own
pooled output (mean, weighted mean, EOS, BOS or NV-Embed's latent attention, whose head trains beside LoRA) as
`sentence_embedding`. It wraps the LoRA-injected `LlamaEncoderModel` built by `training.model`, and saves only what a
run trains (the adapter folder `convert` reads), never the frozen base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sentence_transformers.base.modules import InputModule

from ..errors import InputError
from ..modeling_llama_encoder import tokenize_for_encoder
from .model import TrainingModel


class TrainingEncoder(InputModule):
    """A sentence-transformers input module around a `TrainingModel` (no Pooling module follows it)."""

    save_in_root = True

    def __init__(self, training_model: TrainingModel, max_seq_length: int) -> None:
        super().__init__()
        self.training_model = training_model
        self.auto_model = training_model.encoder  # the name sentence-transformers' helpers look for
        self.tokenizer = training_model.tokenizer
        self.max_seq_length = max_seq_length

    @property
    def config(self):
        return self.auto_model.config

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs) -> dict[str, Any]:
        """Tokenise `prompt + text` for each input; `pool_mask` marks the tokens pooled (the text's, not the
        prompt's). A `max_length` keyword (the trainer's per-column override) replaces `max_seq_length`."""
        for item in inputs:
            if not isinstance(item, str) or not item.strip():
                raise InputError(f"Training texts must be non-empty strings; got {item!r}.")
        encoded = tokenize_for_encoder(self.tokenizer, list(inputs), prompt or "",
                                       max_length=kwargs.get("max_length") or self.max_seq_length,
                                       append_eos=self.config.pooling_mode == "eos")
        return dict(encoded)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        output = self.auto_model(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                                 pool_mask=features["pool_mask"], return_dict=True)
        features["token_embeddings"] = output.last_hidden_state
        features["sentence_embedding"] = output.pooler_output
        return features

    def get_embedding_dimension(self) -> int:
        return self.config.hidden_size

    get_sentence_embedding_dimension = get_embedding_dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Write the trained tensors as the adapter folder `convert` reads (LoRA + pooling head and config)."""
        from .adapter import write_adapter_files

        write_adapter_files(self.training_model, output_path)


__all__ = ["TrainingEncoder"]
