"""Train the demo byte-level BPE tokenizer and wrap it as a transformers tokenizer with a chat template."""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"
# The demo model is a plain language model, not an instruction-tuned one: the template lays the conversation out as
# prose (system text, then each turn's text) so that a chat request continues the user's text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}{% if not loop.last %}\n{% endif %}{% endif %}"
    "{% endfor %}"
)


def train_tokenizer(paragraphs: list[str], out_dir: Path, vocab_size: int = 8192):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        paragraphs, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 512
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok
