"""Fixtures for the model tests: a small byte-level BPE tokenizer with a ChatML template."""
from __future__ import annotations

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_CORPUS = [
    "<think>I should look around first.</think>\n<action>look around</action>",
    "<think>The door is north.</think> <action>go north</action>\n",
    "You are in a kitchen. You see a fridge, a stove and a table.",
    "Your task is to boil water. Open the fridge, take the pot, 12 apples.",
] * 20


@pytest.fixture(scope="session")
def toy_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on a few agent-like lines; ChatML specials, no BOS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False)
