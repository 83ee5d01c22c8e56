"""Sentence Transformers module for a bidirectional Llama encoder checkpoint (a Hub file: imports only torch,
transformers, sentence_transformers and `modeling_llama_encoder`).

`modules.json` names `sentence_transformers_llama_encoder.LlamaEncoderTransformer` as the checkpoint's only
module, so `SentenceTransformer(path, trust_remote_code=True)` embeds exactly like `AutoModel` +
`tokenize_for_encoder` + `forward`: the same tokens (no chat template, the prompt joined to each text), the same
pool mask (prompt tokens attended to but not pooled) and the encoder's own pooling, latent attention included. A
blank text (empty or whitespace only) gets the zero vector, as from the package's `Encoder`, so one empty document
does not stop a corpus.
"""

from collections.abc import Sequence
from typing import Any

from sentence_transformers.base.modules import Transformer

from .modeling_llama_encoder import tokenize_for_encoder


class LlamaEncoderTransformer(Transformer):
    """The Transformer module with the encoder's own tokenisation and pooling.

    `preprocess` tokenises `prompt + text` with `tokenize_for_encoder` (which marks the pooled tokens) instead of
    the stock text or chat-template path, and `forward` calls the encoder with that `pool_mask`, writing its
    `pooler_output` to `sentence_embedding` and its `last_hidden_state` to `token_embeddings`. No Pooling module
    follows it. `max_seq_length` is saved in `sentence_bert_config.json` so a reload truncates at the same length.
    """

    config_keys: list[str] = [*Transformer.config_keys, "max_seq_length"]

    @staticmethod
    def checkpoint_config(max_seq_length: int) -> dict[str, Any]:
        """The `sentence_bert_config.json` a checkpoint ships for this module: the text modality pinned to the plain
        forward path (no chat template), the encoder's `pooler_output` as the sentence embedding, no unpadding, and
        the truncation length. `get_config_dict()` gives the same dict once the module is loaded."""
        return {
            "transformer_task": "feature-extraction",
            "modality_config": {"text": {"method": "forward", "method_output_name": "pooler_output"}},
            "module_output_name": "sentence_embedding",
            "unpad_inputs": False,
            "max_seq_length": max_seq_length,
        }

    def preprocess(
        self,
        inputs: Sequence[str],
        prompt: str | None = None,
        processing_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """Tokenise `inputs` (plain strings) behind `prompt`; returns `input_ids`, `attention_mask`, `pool_mask`
        (tensors) and `modality`. A `max_length` keyword (as the trainer passes it) overrides `max_seq_length`.
        A blank input pools no token, so its embedding is the zero vector (`tokenize_for_encoder`)."""
        if not inputs:
            return {}
        if processing_kwargs:
            raise ValueError(
                "LlamaEncoderTransformer tokenises with tokenize_for_encoder and takes no processing_kwargs; "
                "set model.max_seq_length to change the truncation length instead."
            )
        for item in inputs:
            if not isinstance(item, str):
                raise ValueError(
                    f"A Llama encoder embeds plain strings only; got {type(item).__name__}. Pass text, and give "
                    "instructions through prompt= or prompt_name= rather than as pairs or chat messages."
                )
        max_length = kwargs.get("max_length") or self.max_seq_length
        encoded = tokenize_for_encoder(
            self.tokenizer,
            list(inputs),
            prompt or "",
            max_length=max_length,
            append_eos=self.config.pooling_mode == "eos",
        )
        encoded = dict(encoded)
        encoded["modality"] = "text"
        return encoded

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Encode a preprocessed batch; adds `token_embeddings` and `sentence_embedding` to `features`."""
        output = self.model(
            input_ids=features["input_ids"],
            attention_mask=features["attention_mask"],
            pool_mask=features["pool_mask"],
            return_dict=True,
        )
        features["token_embeddings"] = output.last_hidden_state
        features["sentence_embedding"] = output.pooler_output
        return features


__all__ = ["LlamaEncoderTransformer"]
