"""Builds a tiny Llama offline (random weights, a byte-level BPE tokenizer), for real ``vllm serve``.

Run with the vLLM environment's python, as a file: ``python .../watchdog/demo/vllm/model.py OUT_DIR``
(it imports only torch, tokenizers and transformers, which vLLM brings). No hub is
reachable here, so the model is made, not downloaded: 2 layers, hidden 128, 4 heads, 2 KV heads,
vocabulary 512, seeded, so every build is the same model.
"""

from __future__ import annotations

import sys
from pathlib import Path


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "the quick brown fox jumps over a lazy dog while tensor parallel ranks step through graph keys"
    words = text.split(" ")
    corpus = [" ".join(words[i % len(words) :] + words[: i % len(words)]) for i in range(400)]
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
